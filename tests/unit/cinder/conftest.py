"""Fixtures: the driver over a real pool of local directories."""

import pytest
from cinder import context as cinder_context
from cinder import objects

objects.register_all()

from cinder.volume import configuration  # noqa: E402
from oslo_config import cfg  # noqa: E402

from ovirt_cinder.cinder import driver as ovirt_driver  # noqa: E402
from ovirt_cinder.storage.pool import StoragePool  # noqa: E402
from tests.unit.cinder import fakes  # noqa: E402

BACKEND = "ovirt1"


@pytest.fixture
def mounts(tmp_path):
    paths = []
    for name in ("mnt1", "mnt2"):
        path = tmp_path / name
        path.mkdir()
        paths.append(str(path))
    return paths


@pytest.fixture
def storage(mounts):
    pool = StoragePool.create(mounts[0], description="master")
    pool.add_domain(mounts[1], description="second")
    return pool


@pytest.fixture
def sd1(storage):
    """The master domain."""
    return storage.master.sd_id


@pytest.fixture
def sd2(storage):
    """The other domain."""
    return next(s for s in storage.domains if s != storage.master.sd_id)


@pytest.fixture
def config(storage, mounts, tmp_path):
    conf = cfg.CONF
    conf.register_group(cfg.OptGroup(BACKEND))
    # No periodic recovery left running after a test (test_driver.py
    # starts its own where it checks one).
    overrides = {"ovirt_domain_paths": mounts,
                 "ovirt_pool_uuid": storage.pool_id,
                 "ovirt_max_image_virtual_size_gb": 2,
                 "ovirt_recovery_interval": 0}
    for name, value in overrides.items():
        conf.set_override(name, value, group="backend_defaults")
    conf.set_override("image_conversion_dir", str(tmp_path / "conv"))
    conf.set_override("lock_path", str(tmp_path / "locks"),
                      group="oslo_concurrency")
    yield configuration.Configuration([], config_group=BACKEND)
    conf.reset()
    conf.clear_override("image_conversion_dir")
    for name in overrides:
        conf.clear_override(name, group="backend_defaults")


@pytest.fixture
def drv(config):
    d = ovirt_driver.OvirtVolumeDriver(configuration=config,
                                       host=f"host@{BACKEND}")
    d.do_setup(None)
    d.check_for_setup_error()
    return d


@pytest.fixture
def ctx():
    return cinder_context.get_admin_context()


@pytest.fixture
def images():
    return fakes.ImageService()
