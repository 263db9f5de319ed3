"""The engine on a real local-directory domain with the real qemu-img.

Data is checked by content: patterns written with qemu-io are read back
through the chain after every operation.
"""

import os
import uuid

import pytest

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage import sdmeta
from ovirt_cinder.storage.pool import StoragePool
from tests import qemuio
from tests.functional.conftest import leftovers

MiB = sc.MiB
SIZE = 16 * MiB
FORMATS = [sc.VolumeFormat.RAW, sc.VolumeFormat.COW]


def uid():
    return str(uuid.uuid4())


def write(vol, offset, pattern, length=MiB):
    qemuio.write_pattern(vol.path, vol.qemu_format, offset, length, pattern)


def verify(vol, offset, pattern, length=MiB):
    qemuio.verify_pattern(vol.path, vol.qemu_format, offset, length,
                          pattern)


def test_pool_layout(pool, mount):
    dom = pool.master
    # As vdsm leaves them: the lease writes grew ids, leases and xleases
    # (see tests/functional/test_ovirt_format.py for their content).
    sizes = {"ids": MiB, "leases": 2 * MiB, "xleases": MiB + 253952,
             "inbox": 16 * MiB, "outbox": 16 * MiB}
    assert set(sizes) == set(sc.SPECIAL_FILES)
    for name, size in sizes.items():
        assert os.path.getsize(dom.dom_md(name)) == size
    assert os.path.isdir(dom.master_dir)
    with open(dom.dom_md("metadata"), "rb") as f:
        md = sdmeta.parse(f.read())
    assert md.version == 5
    assert md.role == sc.DomainRole.MASTER
    assert md.pool_id == pool.pool_id
    assert leftovers(dom.path) == []


def test_reopen_and_add_domain(pool, mount, mount2):
    dom2 = pool.add_domain(mount2, description="second")
    again = StoragePool.open([mount, mount2])
    assert again.pool_id == pool.pool_id
    assert set(again.domains) == {pool.master.sd_id, dom2.sd_id}
    assert again.master.sd_id == pool.master.sd_id


def test_open_without_master(mount2):
    with pytest.raises(errors.InvalidParameter):
        StoragePool.open([mount2])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("prealloc", list(sc.Preallocation))
def test_create_volume(pool, sd_id, fmt, prealloc):
    img = uid()
    vol = pool.create_volume(sd_id, img, SIZE, fmt=fmt, prealloc=prealloc)
    m = vol.meta
    assert (m.legality, m.voltype, m.format, m.type) == (
        sc.Legality.LEGAL, sc.VolumeType.LEAF, fmt, prealloc)
    assert m.capacity == SIZE and m.generation == 1 and m.image == img
    info = qemuimg.info(vol.path, fmt.qemu)
    assert info.virtual_size == SIZE
    if fmt == sc.VolumeFormat.COW:
        assert info.compat == "1.1"
    if prealloc == sc.Preallocation.PREALLOCATED:
        assert os.stat(vol.path).st_blocks * 512 >= SIZE
    assert os.path.getsize(vol.path + ".lease") == sc.VOLUME_LEASE_SIZE
    assert pool.list_images(sd_id) == [img]
    assert leftovers(pool.master.path) == []


def test_create_rejects_bad_input(pool, sd_id):
    with pytest.raises(errors.InvalidUUID):
        pool.create_volume(sd_id, "../../etc", SIZE)
    with pytest.raises(errors.InvalidParameter):
        pool.create_volume(sd_id, uid(), 1000)
    img = uid()
    pool.create_volume(sd_id, img, SIZE)
    with pytest.raises(errors.ImageExists):
        pool.create_volume(sd_id, img, SIZE)
    assert pool.list_images(sd_id) == [img]


def build_chain(pool, sd_id, fmt, snaps=3):
    """Leaf pattern i+1 at offset i MiB before snapshot i."""
    img = uid()
    pool.create_volume(sd_id, img, SIZE, fmt=fmt)
    snap_ids = []
    for i in range(snaps):
        write(pool.leaf(sd_id, img), i * MiB, 0x10 + i)
        snap_id = uid()
        pool.snapshot(sd_id, img, snap_id)
        snap_ids.append(snap_id)
    write(pool.leaf(sd_id, img), snaps * MiB, 0x10 + snaps)
    return img, snap_ids


def verify_snapshot(pool, sd_id, img, snap_id, n):
    """Snapshot n (0-based) sees patterns 0..n and zeros after."""
    vol = pool.image(sd_id, img).find_snapshot(snap_id)
    for i in range(n + 1):
        verify(vol, i * MiB, 0x10 + i)
    qemuio.verify_zero(vol.path, vol.qemu_format, (n + 1) * MiB, MiB)


def verify_leaf(pool, sd_id, img, n):
    leaf = pool.leaf(sd_id, img)
    for i in range(n + 1):
        verify(leaf, i * MiB, 0x10 + i)


@pytest.mark.parametrize("fmt", FORMATS)
def test_snapshot_chain(pool, sd_id, fmt):
    img, snaps = build_chain(pool, sd_id, fmt)
    tree = pool.image(sd_id, img)
    chain = tree.chain()
    assert [v.snapshot_id for v in chain] == snaps + [None]
    assert [v.meta.voltype for v in chain] == [sc.VolumeType.INTERNAL] * 3 \
        + [sc.VolumeType.LEAF]
    assert chain[0].meta.format == fmt
    assert all(v.meta.format == sc.VolumeFormat.COW for v in chain[1:])
    for n, snap in enumerate(snaps):
        verify_snapshot(pool, sd_id, img, snap, n)
    verify_leaf(pool, sd_id, img, 3)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("big_child", [False, True])
def test_delete_snapshot(pool, sd_id, fmt, position, big_child):
    img, snaps = build_chain(pool, sd_id, fmt)
    tree = pool.image(sd_id, img)
    base = tree.find_snapshot(snaps[position]).vol_id
    child = tree.children(base)[0]
    if big_child:
        # The child holds more data: streaming the parent down copies
        # less than committing the child up.
        qemuio.write_pattern(tree.get(child).path, "qcow2", 8 * MiB,
                             6 * MiB, 0x77)
    pool.delete_snapshot(sd_id, img, snaps[position])
    tree = pool.image(sd_id, img)
    survivor, removed = (child, base) if big_child else (base, child)
    assert survivor in tree and removed not in tree
    if position < 2:
        # The survivor carries the child's snapshot identity.
        assert tree.get(survivor).snapshot_id == snaps[position + 1]
    assert tree.check() == []
    assert len(tree.volumes) == 3
    assert set(tree.snapshots()) == set(snaps) - {snaps[position]}
    for n, snap in enumerate(snaps):
        if n != position:
            verify_snapshot(pool, sd_id, img, snap, n)
    verify_leaf(pool, sd_id, img, 3)
    assert all(v.legal for v in tree.volumes.values())
    assert leftovers(pool.master.path) == []


def test_delete_all_snapshots(pool, sd_id):
    img, snaps = build_chain(pool, sd_id, sc.VolumeFormat.RAW)
    for snap in [snaps[1], snaps[0], snaps[2]]:
        pool.delete_snapshot(sd_id, img, snap)
    tree = pool.image(sd_id, img)
    assert len(tree.volumes) == 1
    verify_leaf(pool, sd_id, img, 3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_revert_to_snapshot(pool, sd_id, fmt):
    img, snaps = build_chain(pool, sd_id, fmt)
    old_leaf = pool.leaf(sd_id, img)
    leaf = pool.revert_to_snapshot(sd_id, img, snaps[2])
    assert not os.path.exists(old_leaf.path)
    verify_leaf(pool, sd_id, img, 2)
    qemuio.verify_zero(leaf.path, "qcow2", 3 * MiB, MiB)
    # Revert to an older one keeps the later snapshots readable.
    pool.revert_to_snapshot(sd_id, img, snaps[0])
    verify_leaf(pool, sd_id, img, 0)
    qemuio.verify_zero(pool.leaf(sd_id, img).path, "qcow2", MiB, MiB)
    for n, snap in enumerate(snaps):
        verify_snapshot(pool, sd_id, img, snap, n)
    assert pool.image(sd_id, img).check() == []


def test_the_done_when_walk(pool, sd_id):
    """Chain of 3, merge the middle, revert to the first."""
    img, snaps = build_chain(pool, sd_id, sc.VolumeFormat.COW)
    pool.delete_snapshot(sd_id, img, snaps[1])
    pool.revert_to_snapshot(sd_id, img, snaps[0])
    verify_leaf(pool, sd_id, img, 0)
    verify_snapshot(pool, sd_id, img, snaps[0], 0)
    verify_snapshot(pool, sd_id, img, snaps[2], 2)
    pool.delete_snapshot(sd_id, img, snaps[2])
    tree = pool.image(sd_id, img)
    assert tree.check() == [] and len(tree.volumes) == 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_clone(pool, sd_id, fmt):
    img, snaps = build_chain(pool, sd_id, fmt)
    clone_img = uid()
    vol = pool.clone(sd_id, img, clone_img, fmt=fmt)
    assert vol.parent is None and vol.meta.format == fmt
    verify_leaf(pool, sd_id, clone_img, 3)
    from_snap = uid()
    vol = pool.clone(sd_id, img, from_snap, snap_id=snaps[0],
                     size=2 * SIZE)
    assert qemuimg.info(vol.path, vol.qemu_format).virtual_size == 2 * SIZE
    assert vol.meta.capacity == 2 * SIZE
    verify_leaf(pool, sd_id, from_snap, 0)
    qemuio.verify_zero(vol.path, vol.qemu_format, MiB, MiB)
    # The clone is independent of its source.
    write(pool.leaf(sd_id, clone_img), 0, 0x99)
    verify_leaf(pool, sd_id, img, 3)


@pytest.mark.parametrize("direct_io", [True, False])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("prealloc", list(sc.Preallocation))
def test_clone_from_snapshot_is_durable(pool, sd_id, monkeypatch, fmt,
                                        prealloc, direct_io):
    """The copy flushes its target before the volume becomes LEGAL
    (O_DIRECT where the domain takes it, else the page cache and
    fdatasync), writes out of order, and keeps sparse volumes sparse
    and preallocated ones allocated."""
    dom = pool.master
    if direct_io and not dom.supports_direct_io():
        pytest.skip("no O_DIRECT on this filesystem")
    dom._direct_io = direct_io
    img, snaps = build_chain(pool, sd_id, fmt)
    copies = []
    convert = qemuimg.convert

    def spy(*args, **kwargs):
        copies.append(kwargs)
        convert(*args, **kwargs)

    monkeypatch.setattr(qemuimg, "convert", spy)
    new = uid()
    vol = pool.clone(sd_id, img, new, snap_id=snaps[1], fmt=fmt,
                     prealloc=prealloc)
    [kwargs] = copies
    assert kwargs["cache"] == ("none" if direct_io else "writeback")
    assert kwargs["unordered_writes"]
    verify_leaf(pool, sd_id, new, 1)
    qemuio.verify_zero(vol.path, vol.qemu_format, 2 * MiB, SIZE - 2 * MiB)
    allocated = os.stat(vol.path).st_blocks * 512
    if prealloc == sc.Preallocation.PREALLOCATED:
        assert allocated >= SIZE
    else:
        assert allocated < 4 * MiB
    assert leftovers(dom.path) == []


def make_template(pool, sd_id, tmp_path, size=SIZE):
    src = str(tmp_path / "src.raw")
    qemuimg.create(src, "raw", size)
    qemuio.write_pattern(src, "raw", 0, MiB, 0x42)
    img = uid()
    pool.import_volume(sd_id, img, src, "raw", size,
                       voltype=sc.VolumeType.SHARED)
    return img


def test_thin_clone(pool, sd_id, tmp_path):
    tmpl_img = make_template(pool, sd_id, tmp_path)
    tmpl = pool.image(sd_id, tmpl_img).template()
    img = uid()
    leaf = pool.thin_clone(sd_id, tmpl_img, img, size=2 * SIZE)
    assert leaf.parent == tmpl.vol_id
    assert os.stat(tmpl.path).st_nlink == 2
    assert qemuimg.allocated_bytes(leaf.path, fmt="qcow2") == 0
    verify(leaf, 0, 0x42)
    write(leaf, 0, 0x43)
    verify(pool.image(sd_id, tmpl_img).template(), 0, 0x42)
    # Deleting the template image keeps the clone whole.
    pool.delete_image(sd_id, tmpl_img)
    assert pool.image(sd_id, img).check() == []
    verify(pool.leaf(sd_id, img), 0, 0x43)
    qemuio.verify_pattern(
        pool.leaf(sd_id, img).path, "qcow2", MiB, MiB, 0)


def test_thin_clone_needs_template(pool, sd_id):
    img = uid()
    pool.create_volume(sd_id, img, SIZE)
    with pytest.raises(errors.InvalidOperation):
        pool.thin_clone(sd_id, img, uid())


@pytest.mark.parametrize("fmt", FORMATS)
def test_extend(pool, sd_id, fmt):
    img, _ = build_chain(pool, sd_id, fmt, snaps=1)
    leaf = pool.extend(sd_id, img, 2 * SIZE)
    assert leaf.meta.capacity == 2 * SIZE
    assert leaf.meta.legality == sc.Legality.LEGAL
    assert qemuimg.info(leaf.path, "qcow2").virtual_size == 2 * SIZE
    verify_leaf(pool, sd_id, img, 1)
    with pytest.raises(errors.InvalidOperation):
        pool.extend(sd_id, img, SIZE)


@pytest.mark.parametrize("move", [False, True])
def test_copy_image(pool, sd_id, mount2, tmp_path, move):
    dom2 = pool.add_domain(mount2)
    tmpl_img = make_template(pool, sd_id, tmp_path)
    img = uid()
    pool.thin_clone(sd_id, tmpl_img, img)
    write(pool.leaf(sd_id, img), MiB, 0x11)
    snap = uid()
    pool.snapshot(sd_id, img, snap)
    write(pool.leaf(sd_id, img), 2 * MiB, 0x12)
    tree = pool.copy_image(sd_id, img, dom2.sd_id, move=move)
    assert tree.check() == []
    assert set(tree.snapshots()) == {snap}
    leaf = tree.leaf()
    verify(leaf, 0, 0x42)
    verify(leaf, MiB, 0x11)
    verify(leaf, 2 * MiB, 0x12)
    snap_vol = tree.find_snapshot(snap)
    qemuio.verify_zero(snap_vol.path, "qcow2", 2 * MiB, MiB)
    assert dom2.has_image(tmpl_img)
    assert pool.domain(sd_id).has_image(img) is not move
    assert leftovers(dom2.path) == [] and leftovers(pool.master.path) == []


def test_delete_image(pool, sd_id):
    img, _ = build_chain(pool, sd_id, sc.VolumeFormat.COW, snaps=1)
    assert pool.delete_image(sd_id, img) is True
    assert pool.list_images(sd_id) == []
    assert not os.path.exists(pool.master.image_dir(img))
    assert pool.delete_image(sd_id, img) is False
    assert leftovers(pool.master.path) == []


def test_export_volume(pool, sd_id, tmp_path):
    img, snaps = build_chain(pool, sd_id, sc.VolumeFormat.COW, snaps=2)
    dst = str(tmp_path / "out.qcow2")
    pool.export_volume(sd_id, img, dst, fmt="qcow2")
    info = qemuimg.info(dst, "qcow2")
    assert info.backing_filename is None
    for i in range(3):
        qemuio.verify_pattern(dst, "qcow2", i * MiB, MiB, 0x10 + i)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("prealloc", [sc.Preallocation.SPARSE,
                                      sc.Preallocation.PREALLOCATED],
                         ids=lambda p: p.name)
def test_import_smaller_image_fills_whole_capacity(pool, sd_id, tmp_path,
                                                   fmt, prealloc):
    """A 2 MiB image imported into a 16 MiB volume: the volume is 16 MiB
    (its capacity, not the image's size), the image's bytes at its start,
    zeros after."""
    src = str(tmp_path / "small.raw")
    qemuimg.create(src, "raw", 2 * MiB)
    qemuio.write_pattern(src, "raw", 0, 2 * MiB, 0x5A)
    img = uid()
    vol = pool.import_volume(sd_id, img, src, "raw", SIZE, fmt=fmt,
                             prealloc=prealloc)
    assert vol.meta.capacity == SIZE
    assert qemuimg.info(vol.path, vol.qemu_format).virtual_size == SIZE
    verify(vol, 0, 0x5A, 2 * MiB)
    qemuio.verify_zero(vol.path, vol.qemu_format, 2 * MiB, SIZE - 2 * MiB)
    assert pool.image(sd_id, img).check() == []


def test_import_larger_image_refused(pool, sd_id, tmp_path):
    """An image larger than the volume's capacity is refused and the
    flow leaves nothing behind."""
    src = str(tmp_path / "big.raw")
    qemuimg.create(src, "raw", 2 * SIZE)
    img = uid()
    with pytest.raises(errors.InvalidParameter, match="exceeds"):
        pool.import_volume(sd_id, img, src, "raw", SIZE)
    assert not pool.domain(sd_id).has_image(img)
    assert leftovers(pool.domain(sd_id).path) == []
