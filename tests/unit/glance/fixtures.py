"""Glance multi-store configuration over a real pool, for store tests.

:func:`entry_point` makes ``ovirt = ovirt_cinder.glance.store:Store``
visible in the ``glance_store.drivers`` group (a throw-away dist-info
directory on ``sys.path``) unless an installed ovirt-cinder already
provides it, so glance_store loads the store exactly as Glance does.
:func:`multi_store_conf` then builds the configuration Glance builds from
``enabled_backends = fast:ovirt,file1:file``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import sys
from collections.abc import Iterator

import glance_store
from glance_store import location
from oslo_config import cfg

__all__ = ["BACKEND", "ENTRY_POINT", "entry_point", "multi_store_conf",
           "location_of", "store_of"]

BACKEND = "fast"
ENTRY_POINT = "ovirt = ovirt_cinder.glance.store:Store"
_DIST = "ovirt_cinder_glance_test_ep-0.0.dist-info"


def _installed() -> bool:
    found = importlib.metadata.entry_points(group="glance_store.drivers",
                                            name="ovirt")
    return any(ep.value == "ovirt_cinder.glance.store:Store"
               for ep in found)


@contextlib.contextmanager
def entry_point(directory: str) -> Iterator[None]:
    """The store's entry point, registered while the block runs."""
    if _installed():
        yield
        return
    dist = os.path.join(directory, _DIST)
    os.makedirs(dist, exist_ok=True)
    with open(os.path.join(dist, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: ovirt-cinder-glance-test-ep"
                "\nVersion: 0.0\n")
    with open(os.path.join(dist, "entry_points.txt"), "w") as f:
        f.write(f"[glance_store.drivers]\n{ENTRY_POINT}\n")
    sys.path.insert(0, directory)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(directory)
        importlib.invalidate_caches()


def multi_store_conf(domain_paths: list[str], file_dir: str,
                     **options: object) -> cfg.ConfigOpts:
    """Glance's multi-store configuration with our store as ``fast``."""
    conf = cfg.ConfigOpts()
    conf(args=[])
    conf.register_opt(cfg.DictOpt("enabled_backends"))
    conf.set_override("enabled_backends",
                      {BACKEND: "ovirt", "file1": "file"})
    glance_store.register_store_opts(conf)
    conf.set_override("default_backend", BACKEND, group="glance_store")
    conf.set_override("ovirt_domain_paths", domain_paths, group=BACKEND)
    for name, value in options.items():
        conf.set_override(name, value, group=BACKEND)
    conf.set_override("filesystem_store_datadir", file_dir, group="file1")
    location.SCHEME_TO_CLS_BACKEND_MAP = {}
    glance_store.create_multi_stores(conf)
    return conf


def store_of(backend: str = BACKEND, scheme: str = "ovirt") -> object:
    """The store instance glance_store created for ``backend``."""
    return location.SCHEME_TO_CLS_BACKEND_MAP[scheme][backend]["store"]


def location_of(uri: str, conf: cfg.ConfigOpts,
                backend: str = BACKEND) -> location.Location:
    return location.get_location_from_uri_and_backend(uri, backend,
                                                      conf=conf)
