"""A real glance_store multi-store configuration over a real pool."""

import os

import pytest
from glance_store import location

from ovirt_cinder.storage.pool import StoragePool
from tests.unit.glance import fixtures


@pytest.fixture
def glance_pool(tmp_path):
    mount = tmp_path / "mnt"
    mount.mkdir()
    return StoragePool.create(str(mount))


@pytest.fixture
def glance_conf(tmp_path, glance_pool):
    with fixtures.entry_point(str(tmp_path / "ep")):
        files = tmp_path / "files"
        files.mkdir()
        conf = fixtures.multi_store_conf([glance_pool.master.mount],
                                         str(files))
        yield conf
        conf.reset()
        location.SCHEME_TO_CLS_BACKEND_MAP = {}


@pytest.fixture
def glance_store(glance_conf):
    return fixtures.store_of()


def staged_leftovers(pool):
    """Staging files and half-built or half-removed images in the pool."""
    found = []
    for dom in pool.domains.values():
        found += [n for n in os.listdir(dom.mount) if n.startswith(".tmp-")]
        found += [n for n in os.listdir(dom.images_dir)
                  if n.startswith((".tmp-", "_remove_me_"))]
    return found
