"""WSGI applications of `make cloud`, for gunicorn (``wsgi_apps:name()``).

Keystone and Glance build their WSGI apps from oslo.config, which parses
``sys.argv``: under gunicorn that is gunicorn's own command line, so each
factory resets it first. The configuration directories come from the
environment (``OS_KEYSTONE_CONFIG_DIR``, ``OS_GLANCE_CONFIG_DIR``).
"""

import sys


def keystone():
    sys.argv = ["keystone"]
    from keystone.server import wsgi
    return wsgi.initialize_public_application()


def glance():
    sys.argv = ["glance-api"]
    from glance.common import wsgi_app
    return wsgi_app.init_app()
