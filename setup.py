import setuptools

setuptools.setup(setup_requires=["pbr>=6.1.0"], pbr=True)
