"""StoragePool.adopt_volume: a prepared file becomes a volume by rename.

(The engine entry point the Glance store publishes with; it lives here
with its only user until the lead moves it next to tests of the pool.)
"""

import os
import uuid

import pytest

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage.pool import StoragePool
from tests.functional.conftest import leftovers

MiB = sc.MiB


@pytest.fixture
def pool(tmp_path):
    mount = tmp_path / "mnt"
    mount.mkdir()
    return StoragePool.create(str(mount))


def staged(pool, fmt):
    path = os.path.join(pool.master.mount, f".tmp-{pool.master.sd_id}-x")
    qemuimg.create(path, fmt, 4 * MiB)
    return path


@pytest.mark.parametrize("fmt, vfmt", [("qcow2", sc.VolumeFormat.COW),
                                       ("raw", sc.VolumeFormat.RAW)])
def test_adopt_keeps_bytes(pool, fmt, vfmt):
    sd_id, img_id = pool.master.sd_id, str(uuid.uuid4())
    src = staged(pool, fmt)
    with open(src, "rb") as f:
        original = f.read()
    vol = pool.adopt_volume(sd_id, img_id, src, 4 * MiB, fmt=vfmt,
                            voltype=sc.VolumeType.SHARED,
                            disktype=sc.DiskType.ISOF, description="d")
    assert not os.path.exists(src)
    with open(vol.path, "rb") as f:
        assert f.read() == original
    assert vol.legal and vol.meta.format == vfmt
    assert (vol.meta.voltype, vol.meta.disktype, vol.meta.description) == \
        (sc.VolumeType.SHARED, "ISOF", "d")
    assert pool.image(sd_id, img_id).template().vol_id == vol.vol_id
    assert leftovers(pool.master.path) == []


def test_adopt_existing_image_leaves_source(pool):
    sd_id, img_id = pool.master.sd_id, str(uuid.uuid4())
    pool.create_volume(sd_id, img_id, MiB)
    src = staged(pool, "raw")
    with pytest.raises(errors.ImageExists):
        pool.adopt_volume(sd_id, img_id, src, 4 * MiB)
    assert os.path.exists(src)
    assert leftovers(pool.master.path) == []


def test_adopt_other_filesystem(pool, tmp_path):
    src = "/dev/shm/adopt-test-" + str(uuid.uuid4())
    if os.stat("/dev/shm").st_dev == os.stat(pool.master.path).st_dev:
        pytest.skip("/dev/shm is on the domain's filesystem")
    open(src, "wb").close()
    try:
        with pytest.raises(errors.InvalidParameter):
            pool.adopt_volume(pool.master.sd_id, str(uuid.uuid4()), src,
                              MiB)
    finally:
        os.unlink(src)
