"""The ovirt store with real images made by qemu-img.

The first four tests are glance_store's functional scenarios
(glance_store/tests/functional/base.py: add, delete, get_size, get) run on
a real multi-store configuration instead of a devstack cloud.
"""

import hashlib
import io
import os
import subprocess
import uuid

import pytest
from glance_store import exceptions

from ovirt_cinder.glance import store as ovirt_store
from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import description
from ovirt_cinder.storage import fsck
from ovirt_cinder.storage import qemuimg
from tests import damaged
from tests import qemuio
from tests.functional.glance.conftest import staged_leftovers
from tests.unit.glance import fixtures

MiB, GiB = sc.MiB, sc.GiB
IMAGE_BITS = b"I am a bootable image, I promise"


def uid():
    return str(uuid.uuid4())


def add_bytes(store, data, img_id=None):
    return store.add(img_id or uid(), io.BytesIO(data), len(data),
                     "sha256")


def add_file(store, path, img_id=None):
    with open(path, "rb") as f:
        return store.add(img_id or uid(), f, os.path.getsize(path),
                         "sha256")


def read_all(store, uri, conf):
    image, size = store.get(fixtures.location_of(uri, conf))
    data = b"".join(image)
    assert len(data) == size
    return data


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def template(pool, uri):
    _, sd_id, img_id, vol_id = uri[len("ovirt://"):].split("/")
    vol = pool.image(sd_id, img_id).template()
    assert vol.vol_id == vol_id
    return vol


def make_qcow2(path, size, with_data=True):
    qemuimg.create(path, "qcow2", size)
    if with_data:
        qemuio.write_pattern(path, "qcow2", 0, MiB, 0x5a)
        qemuio.write_pattern(path, "qcow2", size - MiB, MiB, 0xa5)


# glance_store's functional scenarios


def test_add(glance_store):
    _, written, _, _, _ = add_bytes(glance_store, IMAGE_BITS)
    assert written == len(IMAGE_BITS)


def test_delete(glance_store, glance_conf, glance_pool):
    uri = add_bytes(glance_store, IMAGE_BITS)[0]
    glance_store.delete(fixtures.location_of(uri, glance_conf))
    assert glance_pool.list_images(glance_pool.master.sd_id) == []


def test_get_size(glance_store, glance_conf):
    uri = add_bytes(glance_store, IMAGE_BITS)[0]
    loc = fixtures.location_of(uri, glance_conf)
    assert glance_store.get_size(loc) == len(IMAGE_BITS)


def test_get(glance_store, glance_conf):
    uri = add_bytes(glance_store, IMAGE_BITS)[0]
    assert read_all(glance_store, uri, glance_conf) == IMAGE_BITS


# Real images


def test_qcow2_byte_identical(glance_store, glance_conf, glance_pool,
                              tmp_path):
    src = str(tmp_path / "src.qcow2")
    make_qcow2(src, 10 * GiB)
    uri, size, checksum, _, _ = add_file(glance_store, src)
    original = file_bytes(src)
    assert (size, checksum) == (len(original),
                                hashlib.md5(original).hexdigest())
    assert read_all(glance_store, uri, glance_conf) == original
    vol = template(glance_pool, uri)
    assert vol.meta.format == sc.VolumeFormat.COW
    assert vol.meta.voltype == sc.VolumeType.SHARED
    assert vol.meta.capacity == 10 * GiB
    assert description.get(vol.meta.description, "fmt") == "qcow2"
    qemuio.verify_pattern(vol.path, "qcow2", 10 * GiB - MiB, MiB, 0xa5)
    assert staged_leftovers(glance_pool) == []


def test_raw_sparse_byte_identical(glance_store, glance_conf, glance_pool,
                                   tmp_path):
    src = str(tmp_path / "src.raw")
    qemuimg.create(src, "raw", 256 * MiB)
    qemuio.write_pattern(src, "raw", 100 * MiB, MiB, 0x33)
    with open(src, "r+b") as f:
        f.seek(200 * MiB)
        f.write(b"\0" * (4 * MiB))  # allocated zeros become a hole too
    uri = add_file(glance_store, src)[0]
    assert read_all(glance_store, uri, glance_conf) == file_bytes(src)
    vol = template(glance_pool, uri)
    assert vol.meta.format == sc.VolumeFormat.RAW
    assert vol.meta.capacity == 256 * MiB
    assert os.stat(vol.path).st_blocks * 512 <= 2 * MiB


def test_iso_stored_raw_and_marked(glance_store, glance_conf, glance_pool,
                                   tmp_path):
    data = bytearray(64 * 1024)
    data[0x8001:0x8006] = b"CD001"
    uri = add_bytes(glance_store, bytes(data))[0]
    vol = template(glance_pool, uri)
    assert vol.meta.format == sc.VolumeFormat.RAW
    assert vol.meta.disktype == "ISOF"
    assert description.get(vol.meta.description, "fmt") == "iso"
    assert "iso" not in ovirt_store.COW_BASE_FORMATS
    assert read_all(glance_store, uri, glance_conf) == bytes(data)


def test_vmdk_stored_as_bytes(glance_store, glance_conf, glance_pool,
                              tmp_path):
    src = str(tmp_path / "src.vmdk")
    subprocess.run(["qemu-img", "create", "-f", "vmdk", src, "64M"],
                   check=True, capture_output=True)
    uri = add_file(glance_store, src)[0]
    vol = template(glance_pool, uri)
    assert vol.meta.format == sc.VolumeFormat.RAW
    assert description.get(vol.meta.description, "fmt") == "vmdk"
    assert read_all(glance_store, uri, glance_conf) == file_bytes(src)


# Unsafe images


def _backing(tmp_path):
    base = str(tmp_path / "base.raw")
    qemuimg.create(base, "raw", MiB)
    path = str(tmp_path / "backing.qcow2")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", base,
                    "-F", "raw", path], check=True, capture_output=True)
    return path


def _data_file(tmp_path):
    path = str(tmp_path / "datafile.qcow2")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-o",
                    f"data_file={tmp_path / 'data.raw'}", path, "1M"],
                   check=True, capture_output=True)
    return path


def _truncated(tmp_path):
    src = str(tmp_path / "full.qcow2")
    qemuimg.create(src, "qcow2", MiB)
    path = str(tmp_path / "truncated.qcow2")
    with open(path, "wb") as f:
        f.write(file_bytes(src)[:20])
    return path


def _too_large(tmp_path):
    path = str(tmp_path / "huge.qcow2")
    qemuimg.create(path, "qcow2", 2048 * GiB)
    return path


@pytest.mark.parametrize("make", [_backing, _data_file, _truncated,
                                  _too_large])
def test_unsafe_refused(glance_store, glance_pool, tmp_path, make):
    path = make(tmp_path)
    img_id = uid()
    with pytest.raises(ovirt_store.UnsafeImageRejected):
        add_file(glance_store, path, img_id)
    assert glance_pool.list_images(glance_pool.master.sd_id) == []
    assert staged_leftovers(glance_pool) == []
    # The id is free again for a good upload.
    add_bytes(glance_store, IMAGE_BITS, img_id)


@pytest.mark.parametrize("damage", sorted(damaged.DAMAGES))
def test_damaged_refused(glance_store, glance_pool, tmp_path, damage):
    path = damaged.DAMAGES[damage](str(tmp_path / "damaged.qcow2"))
    img_id = uid()
    with pytest.raises(ovirt_store.UnsafeImageRejected) as e:
        add_file(glance_store, path, img_id)
    message = str(e.value)
    assert img_id in message
    # The staging file (<mount>/.tmp-<sd>-upload-<uuid>) is never named.
    assert ".tmp-" not in message
    assert glance_pool.master.mount not in message
    if damage in damaged.CHECK_FINDS:
        assert "damaged" in message
    assert glance_pool.list_images(glance_pool.master.sd_id) == []
    assert staged_leftovers(glance_pool) == []
    assert fsck.check(glance_pool).clean


def test_leaked_clusters_stored(glance_store, glance_conf, glance_pool,
                                tmp_path):
    # Leaks are unused space, not damage: stored byte for byte.
    src = damaged.leaked(str(tmp_path / "leaked.qcow2"))
    uri = add_file(glance_store, src)[0]
    assert read_all(glance_store, uri, glance_conf) == file_bytes(src)
    assert template(glance_pool, uri).meta.format == sc.VolumeFormat.COW


def test_too_large_upload_message_hides_staging(glance_store, glance_conf,
                                                glance_pool, monkeypatch):
    monkeypatch.setattr(glance_store._options, "ovirt_max_image_size", 1)
    monkeypatch.setattr(ovirt_store, "_QCOW2_SLACK", 0)
    img_id = uid()
    with pytest.raises(ovirt_store.UnsafeImageRejected) as e:
        add_bytes(glance_store, IMAGE_BITS, img_id)
    assert img_id in str(e.value) and ".tmp-" not in str(e.value)
    assert staged_leftovers(glance_pool) == []


# Delete semantics


def test_delete_with_dependent_volume(glance_store, glance_conf,
                                      glance_pool, tmp_path):
    src = str(tmp_path / "src.qcow2")
    make_qcow2(src, 64 * MiB)
    uri = add_file(glance_store, src)[0]
    tmpl = template(glance_pool, uri)
    sd_id, tmpl_img = glance_pool.master.sd_id, tmpl.meta.image
    dep = uid()
    glance_pool.thin_clone(sd_id, tmpl_img, dep)
    loc = fixtures.location_of(uri, glance_conf)

    glance_store.delete(loc)

    # Gone from Glance at once ...
    with pytest.raises(exceptions.NotFound):
        glance_store.get(loc)
    assert tmpl_img not in glance_pool.list_images(sd_id)
    # ... the dependent's chain is whole and reads the template's data ...
    tree = glance_pool.image(sd_id, dep)
    assert tree.check() == []
    leaf = tree.leaf()
    base = tree.get(leaf.parent)
    assert base.vol_id == tmpl.vol_id
    assert os.stat(base.path).st_nlink == 1
    qemuio.verify_pattern(leaf.path, "qcow2", 0, MiB, 0x5a)
    # ... and the template's data goes with the last dependent.
    glance_pool.delete_image(sd_id, dep)
    assert glance_pool.list_images(sd_id) == []
    assert staged_leftovers(glance_pool) == []
