"""The image cache (ovirt_cinder.cinder.image_cache) through the driver's
clone_image, on a real two-domain pool with the real qemu-img.

The Glance image service is the in-memory stand-in (a process boundary);
data is checked by content with qemu-io.
"""

import hashlib
import os
import threading

import pytest
from cinder import exception
from oslo_config import cfg

from ovirt_cinder.cinder import driver as ovirt_driver
from ovirt_cinder.cinder import image_cache
from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import description
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fsck
from ovirt_cinder.storage.pool import StoragePool
from tests import damaged
from tests import qemuio
from tests.unit.cinder import fakes
from tests.unit.cinder.test_driver import leaf
from tests.unit.cinder.test_driver import make_image
from tests.unit.cinder.test_driver import new_volume
from tests.unit.cinder.test_driver import verify

MiB, GiB = sc.MiB, sc.GiB


class CountingImageService(fakes.ImageService):
    """The stand-in Glance, counting downloads; images carry a hash."""

    def __init__(self):
        super().__init__()
        self.downloads = 0

    def add(self, data, disk_format, **meta):
        meta.setdefault("os_hash_algo", "sha512")
        meta.setdefault("os_hash_value", hashlib.sha512(data).hexdigest())
        return super().add(data, disk_format, **meta)

    def download(self, context, image_id, data):
        self.downloads += 1
        super().download(context, image_id, data)


@pytest.fixture
def glance():
    return CountingImageService()


def override(**values):
    for name, value in values.items():
        cfg.CONF.set_override(name, value, group="backend_defaults")


def from_image(drv, ctx, glance, image_id, sd_id, size=1):
    volume = new_volume(ctx, sd_id, size=size)
    result = drv.clone_image(ctx, volume, None,
                             glance.show(ctx, image_id), glance)
    return volume, result


def entry_of(drv, image_id, glance, ctx, host=1):
    return image_cache.entry_id(glance.show(ctx, image_id), host)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_first_and_later_volumes_are_thin_clones(drv, ctx, glance, sd1,
                                                 tmp_path, fmt):
    image_id = glance.add_file(make_image(tmp_path, fmt, 0x3c), fmt)
    cache_id = entry_of(drv, image_id, glance, ctx)

    first, result = from_image(drv, ctx, glance, image_id, sd1)
    assert result == (None, True)
    second, result = from_image(drv, ctx, glance, image_id, sd1)
    assert result == (None, True)
    assert glance.downloads == 1

    tmpl = image_cache.lookup(drv.pool, sd1, cache_id)
    assert tmpl is not None
    assert tmpl.meta.voltype == sc.VolumeType.SHARED
    assert tmpl.meta.format == (sc.VolumeFormat.COW if fmt == "qcow2"
                                else sc.VolumeFormat.RAW)
    assert description.get(tmpl.meta.description, "cache") == image_id
    for volume in (first, second):
        v = leaf(drv, volume)
        assert v.parent == tmpl.vol_id
        assert v.meta.capacity == GiB
        verify(drv, volume, 0, 0x3c)
        qemuio.verify_zero(v.path, v.qemu_format, MiB, 15 * MiB)
        qemuio.verify_zero(v.path, v.qemu_format, GiB - MiB, MiB)
    # A write to one clone reaches neither the entry nor the other.
    qemuio.write_pattern(leaf(drv, first).path, "qcow2", 0, MiB, 0x11)
    verify(drv, second, 0, 0x3c)
    qemuio.verify_pattern(tmpl.path, tmpl.qemu_format, 0, MiB, 0x3c)

    for volume in (first, second):
        drv.delete_volume(volume)
    # The entry stays for the next volume.
    assert drv.pool.list_images(sd1) == [cache_id]
    assert fsck.check(drv.pool).clean


def test_entry_per_domain(drv, ctx, glance, sd1, sd2, tmp_path):
    image_id = glance.add_file(make_image(tmp_path, "qcow2", 0x21), "qcow2")
    cache_id = entry_of(drv, image_id, glance, ctx)
    a, _ = from_image(drv, ctx, glance, image_id, sd1)
    b, _ = from_image(drv, ctx, glance, image_id, sd2)
    assert glance.downloads == 2
    for sd_id, volume in ((sd1, a), (sd2, b)):
        assert image_cache.lookup(drv.pool, sd_id, cache_id) is not None
        verify(drv, volume, 0, 0x21)


@pytest.mark.parametrize("meta", [
    {"os_hash_algo": None, "os_hash_value": None},
    {"container_format": "ova"},
])
def test_not_cached(drv, ctx, glance, sd1, tmp_path, meta):
    image_id = glance.add_file(make_image(tmp_path, "raw", 0x21), "raw",
                               **meta)
    _, result = from_image(drv, ctx, glance, image_id, sd1)
    assert result == (None, False)
    assert glance.downloads == 0
    assert drv.pool.list_images(sd1) == []


def test_md5_checksum_is_enough(drv, ctx, glance, sd1, tmp_path):
    path = make_image(tmp_path, "raw", 0x21)
    with open(path, "rb") as f:
        checksum = hashlib.md5(f.read()).hexdigest()
    image_id = glance.add_file(path, "raw", os_hash_algo=None,
                               os_hash_value=None, checksum=checksum)
    volume, result = from_image(drv, ctx, glance, image_id, sd1)
    assert result == (None, True)
    verify(drv, volume, 0, 0x21)


def test_disabled(drv, ctx, glance, sd1, tmp_path):
    override(ovirt_image_cache=False)
    image_id = glance.add_file(make_image(tmp_path, "raw", 0x21), "raw")
    assert from_image(drv, ctx, glance, image_id, sd1)[1] == (None, False)
    assert drv.pool.list_images(sd1) == []


def test_preallocated_volumes_are_copied(drv, ctx, glance, sd1, tmp_path):
    override(ovirt_volume_allocation="preallocated")
    image_id = glance.add_file(make_image(tmp_path, "raw", 0x21), "raw")
    assert from_image(drv, ctx, glance, image_id, sd1)[1] == (None, False)
    assert drv.pool.list_images(sd1) == []


def test_entries_per_host(drv, ctx, glance, sd1, tmp_path, config):
    image_id = glance.add_file(make_image(tmp_path, "raw", 0x21), "raw")
    from_image(drv, ctx, glance, image_id, sd1)
    override(ovirt_host_id=2)
    other = ovirt_driver.OvirtVolumeDriver(configuration=config,
                                           host="host2@ovirt1")
    other.do_setup(None)
    volume, result = from_image(other, ctx, glance, image_id, sd1)
    assert result == (None, True)
    assert glance.downloads == 2
    found = image_cache.entries(drv.pool, sd1)
    assert sorted(e.host for e in found) == [1, 2]
    assert {e.glance_id for e in found} == {image_id}
    verify(other, volume, 0, 0x21)


def test_evicts_least_recently_used_beyond_count(drv, ctx, glance, sd1,
                                                 tmp_path):
    override(ovirt_image_cache_max_count=2)
    ids = []
    for pattern in (0x31, 0x32):
        ids.append(glance.add(bytes([pattern]) * MiB, "raw"))
    first, _ = from_image(drv, ctx, glance, ids[0], sd1)
    from_image(drv, ctx, glance, ids[1], sd1)
    entry0 = entry_of(drv, ids[0], glance, ctx)
    entry1 = entry_of(drv, ids[1], glance, ctx)
    # Use the first again (and make its use clearly the later one).
    os.utime(drv.pool.domain(sd1).image_dir(entry1), (1, 1))
    from_image(drv, ctx, glance, ids[0], sd1)
    ids.append(glance.add(bytes([0x33]) * MiB, "raw"))
    third, _ = from_image(drv, ctx, glance, ids[2], sd1)

    cached = {e.img_id for e in image_cache.entries(drv.pool, sd1)}
    assert cached == {entry0, entry_of(drv, ids[2], glance, ctx)}
    assert entry1 not in cached
    verify(drv, third, 0, 0x33)
    verify(drv, first, 0, 0x31)


def test_evicted_entry_stays_under_its_volumes(drv, ctx, glance, sd1,
                                               tmp_path):
    override(ovirt_image_cache_max_count=1)
    old_image = glance.add(bytes([0x41]) * MiB, "raw")
    old, _ = from_image(drv, ctx, glance, old_image, sd1)
    new_image = glance.add(bytes([0x42]) * MiB, "raw")
    new, _ = from_image(drv, ctx, glance, new_image, sd1)
    assert [e.glance_id for e in image_cache.entries(drv.pool, sd1)] == [
        new_image]
    # The evicted entry's data lives on in the volume cloned from it.
    verify(drv, old, 0, 0x41)
    verify(drv, new, 0, 0x42)
    assert fsck.check(drv.pool).clean
    drv.delete_volume(old)
    drv.delete_volume(new)
    assert drv.pool.list_images(sd1) == [entry_of(drv, new_image, glance,
                                                  ctx)]
    assert fsck.check(drv.pool).clean


def test_evicts_beyond_size(drv, ctx, glance, sd1, tmp_path):
    override(ovirt_image_cache_max_size_gb=1)
    big = []
    for pattern in (0x51, 0x52):
        path = str(tmp_path / f"big{pattern}.raw")
        with open(path, "wb") as f:
            f.write(bytes([pattern]) * (600 * MiB))
        big.append(glance.add_file(path, "raw"))
        os.unlink(path)
    first, _ = from_image(drv, ctx, glance, big[0], sd1)
    second, _ = from_image(drv, ctx, glance, big[1], sd1)
    # Both do not fit in 1 GiB: only the newer entry is kept.
    assert [e.glance_id for e in image_cache.entries(drv.pool, sd1)] == [
        big[1]]
    verify(drv, first, 599 * MiB, 0x51)
    verify(drv, second, 599 * MiB, 0x52)


@pytest.mark.parametrize("damage", ["l1_past_eof", "marked_corrupt"])
def test_damaged_image_refused(drv, ctx, glance, sd1, tmp_path, damage):
    path = damaged.DAMAGES[damage](str(tmp_path / "damaged.qcow2"))
    image_id = glance.add_file(path, "qcow2")
    with pytest.raises(exception.ImageUnacceptable) as e:
        from_image(drv, ctx, glance, image_id, sd1)
    assert image_id in str(e.value)
    assert drv.pool.list_images(sd1) == []
    assert fsck.check(drv.pool).clean


def test_image_larger_than_the_volume_refused(drv, ctx, glance, sd1,
                                              tmp_path):
    path = make_image(tmp_path, "qcow2", 0x21, size=GiB + MiB)
    image_id = glance.add_file(path, "qcow2")
    with pytest.raises(exception.ImageUnacceptable):
        from_image(drv, ctx, glance, image_id, sd1, size=1)
    # The entry stays for volumes large enough.
    volume, result = from_image(drv, ctx, glance, image_id, sd1, size=2)
    assert result == (None, True)
    verify(drv, volume, 0, 0x21)


def test_failed_conversion_leaves_no_entry(drv, ctx, glance, sd1,
                                           tmp_path, monkeypatch):
    image_id = glance.add_file(make_image(tmp_path, "raw", 0x21), "raw")
    real = StoragePool.import_volume

    def failing(self, *args, **kwargs):
        raise errors.QemuImgError(cmd="convert", rc=1, out="", argv=[],
                                  err="qemu-img: No space left on device")

    monkeypatch.setattr(StoragePool, "import_volume", failing)
    with pytest.raises(exception.VolumeBackendAPIException):
        from_image(drv, ctx, glance, image_id, sd1)
    assert drv.pool.list_images(sd1) == []
    monkeypatch.setattr(StoragePool, "import_volume", real)
    volume, result = from_image(drv, ctx, glance, image_id, sd1)
    assert result == (None, True)
    verify(drv, volume, 0, 0x21)


def test_concurrent_first_volumes_share_one_entry(drv, ctx, glance, sd1,
                                                  tmp_path):
    image_id = glance.add_file(make_image(tmp_path, "qcow2", 0x66),
                               "qcow2")
    results, failures = {}, []

    def make(index):
        try:
            results[index] = from_image(drv, ctx, glance, image_id, sd1)
        except Exception as e:  # reported below
            failures.append(e)

    threads = [threading.Thread(target=make, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert [r[1] for r in results.values()] == [(None, True)] * 4
    cache_id = entry_of(drv, image_id, glance, ctx)
    tmpl = image_cache.lookup(drv.pool, sd1, cache_id)
    assert [e.img_id for e in image_cache.entries(drv.pool, sd1)] == [
        cache_id]
    for volume, _ in results.values():
        assert leaf(drv, volume).parent == tmpl.vol_id
        verify(drv, volume, 0, 0x66)
    assert fsck.check(drv.pool).clean
