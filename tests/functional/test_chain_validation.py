"""ImageTree.validate() and problems() on real images, damaged on purpose.

Images are built with qemu-img and metadata written through the domain
(sd.create_domain, FileDomain.write_volume_meta), as the engine lays them
out: a qcow2 volume's backing file is its parent's volume id, a bare name
in the image directory; a template volume is hard linked (data and
metadata) into the images over it. One test builds its images with the
engine itself.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import image
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage import sd
from ovirt_cinder.storage import volmeta

MiB = sc.MiB
COW = sc.VolumeFormat.COW
RAW = sc.VolumeFormat.RAW
LEAF = sc.VolumeType.LEAF
INTERNAL = sc.VolumeType.INTERNAL
SHARED = sc.VolumeType.SHARED


def uid():
    return str(uuid.uuid4())


@pytest.fixture
def dom(tmp_path):
    mount = tmp_path / "mnt"
    mount.mkdir()
    return sd.create_domain(str(mount), sd_id=uid(), pool_id=uid())


def add_volume(dom, img_id, fmt=COW, parent=None, voltype=LEAF,
               size=4 * MiB):
    """A volume as the engine makes it; returns its id."""
    vol_id = uid()
    os.makedirs(dom.image_dir(img_id), exist_ok=True)
    path = dom.volume_path(img_id, vol_id)
    if parent is None:
        qemuimg.create(path, fmt.qemu, size)
    else:
        parent_fmt = dom.read_volume_meta(img_id, parent).format.qemu
        qemuimg.create(path, "qcow2", size, backing=parent,
                       backing_fmt=parent_fmt)
    meta = volmeta.VolumeMetadata(
        domain=dom.sd_id, image=img_id, parent=parent or sc.BLANK_UUID,
        capacity=size, format=fmt, type=sc.Preallocation.SPARSE,
        voltype=voltype, legality=sc.Legality.LEGAL, ctime=1)
    dom.write_volume_meta(img_id, vol_id, meta)
    return vol_id


def build_chain(dom, base_fmt=COW, length=3):
    """An image base -> ... -> leaf; returns (img_id, [vol ids])."""
    img_id = uid()
    vols = [add_volume(dom, img_id, base_fmt,
                       voltype=LEAF if length == 1 else INTERNAL)]
    for i in range(1, length):
        voltype = LEAF if i == length - 1 else INTERNAL
        vols.append(add_volume(dom, img_id, parent=vols[-1],
                               voltype=voltype))
    return img_id, vols


def build_template(dom, fmt=RAW):
    """A template image and an image over it; returns their ids."""
    tmpl_img = uid()
    tmpl_vol = add_volume(dom, tmpl_img, fmt, voltype=SHARED)
    img_id = uid()
    os.makedirs(dom.image_dir(img_id))
    for ext in ("", sc.META_EXT):
        os.link(dom.volume_path(tmpl_img, tmpl_vol) + ext,
                dom.volume_path(img_id, tmpl_vol) + ext)
    leaf = add_volume(dom, img_id, parent=tmpl_vol)
    return tmpl_img, tmpl_vol, img_id, leaf


def tree(dom, img_id):
    return image.load(dom, img_id)


def rebase_unsafe(dom, img_id, vol_id, backing, backing_fmt="qcow2"):
    args = ["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", backing]
    if backing:
        args += ["-F", backing_fmt]
    subprocess.run([*args, dom.volume_path(img_id, vol_id)], check=True,
                   capture_output=True)


def set_meta(dom, img_id, vol_id, **changes):
    meta = dom.read_volume_meta(img_id, vol_id)
    dom.write_volume_meta(img_id, vol_id, meta.replace(**changes))


def replace_data(dom, img_id, vol_id, *qemu_img_create_args):
    path = dom.volume_path(img_id, vol_id)
    os.unlink(path)
    subprocess.run(["qemu-img", "create", *qemu_img_create_args, path,
                    "4M"], check=True, capture_output=True)


def only_problem(t):
    found = t.problems()
    assert len(found) == 1, found
    return found[0]


# Healthy


@pytest.mark.parametrize("base_fmt", [RAW, COW])
@pytest.mark.parametrize("length", [1, 2, 4])
def test_healthy_chain(dom, base_fmt, length):
    img_id, vols = build_chain(dom, base_fmt, length)
    t = tree(dom, img_id)
    t.validate()
    for vol_id in vols:
        t.validate(vol_id)
    assert t.problems() == []
    assert t.check() == []


@pytest.mark.parametrize("fmt", [RAW, COW])
def test_healthy_template(dom, fmt):
    tmpl_img, tmpl_vol, img_id, leaf = build_template(dom, fmt)
    # A template image validates its SHARED volume by default.
    tree(dom, tmpl_img).validate()
    assert tree(dom, tmpl_img).problems() == []
    t = tree(dom, img_id)
    t.validate()
    t.validate(tmpl_vol)
    assert t.problems() == []


def test_engine_images_validate(pool, sd_id):
    img_id = uid()
    pool.create_volume(sd_id, img_id, 8 * MiB, fmt=RAW)
    pool.snapshot(sd_id, img_id, uid())
    pool.snapshot(sd_id, img_id, uid())
    t = pool.image(sd_id, img_id)
    assert len(t.volumes) == 3
    t.validate()
    assert t.problems() == []

    tmpl_img = uid()
    pool.create_volume(sd_id, tmpl_img, 8 * MiB, fmt=COW, voltype=SHARED)
    clone = uid()
    pool.thin_clone(sd_id, tmpl_img, clone)
    pool.image(sd_id, tmpl_img).validate()
    t = pool.image(sd_id, clone)
    t.validate()
    assert t.problems() == []

    leaf = t.leaf()
    rebase_unsafe(pool.domain(sd_id), clone, leaf.vol_id, "/etc/hostname",
                  "raw")
    with pytest.raises(errors.BackingMismatch):
        pool.image(sd_id, clone).validate()


# Backing file against the parent


def test_backing_is_another_volume(dom):
    img_id, (base, mid, leaf) = build_chain(dom)
    rebase_unsafe(dom, img_id, leaf, base)
    t = tree(dom, img_id)
    with pytest.raises(errors.BackingMismatch) as e:
        t.validate()
    assert isinstance(e.value, errors.ChainError)
    assert (e.value.img_id, e.value.vol_id, e.value.backing,
            e.value.parent_id) == (img_id, leaf, base, mid)
    assert repr(base) in str(e.value) and repr(mid) in str(e.value)
    t.validate(mid)                     # the chain below is fine
    assert type(only_problem(t)) is errors.BackingMismatch


@pytest.mark.parametrize("backing", [
    "/etc/hostname",
    "../{img_id}/{parent}",
    "./{parent}",
    "{dom_path}/images/{img_id}/{parent}",
])
def test_backing_is_not_the_bare_parent_id(dom, backing):
    img_id, (base, leaf) = build_chain(dom, length=2)
    backing = backing.format(img_id=img_id, parent=base, dom_path=dom.path)
    rebase_unsafe(dom, img_id, leaf, backing)
    with pytest.raises(errors.BackingMismatch) as e:
        tree(dom, img_id).validate()
    assert (e.value.vol_id, e.value.backing, e.value.parent_id) == (
        leaf, backing, base)


def test_backing_removed(dom):
    img_id, (base, leaf) = build_chain(dom, length=2)
    rebase_unsafe(dom, img_id, leaf, "")
    with pytest.raises(errors.BackingMismatch) as e:
        tree(dom, img_id).validate()
    assert (e.value.backing, e.value.parent_id) == (None, base)


def test_backing_without_parent(dom):
    img_id, (vol,) = build_chain(dom, COW, length=1)
    other_img, (other,) = build_chain(dom, COW, length=1)
    rebase_unsafe(dom, img_id, vol, other)
    with pytest.raises(errors.BackingMismatch) as e:
        tree(dom, img_id).validate()
    assert (e.value.backing, e.value.parent_id) == (other, None)


def test_backing_format_mismatch(dom):
    img_id, (base, leaf) = build_chain(dom, COW, length=2)
    rebase_unsafe(dom, img_id, leaf, base, "raw")
    with pytest.raises(errors.BackingFormatMismatch) as e:
        tree(dom, img_id).validate()
    assert (e.value.vol_id, e.value.backing_format, e.value.parent_id,
            e.value.parent_format) == (leaf, "raw", base, "qcow2")


def test_raw_volume_with_parent(dom):
    img_id, (base, leaf) = build_chain(dom, RAW, length=2)
    replace_data(dom, img_id, leaf, "-f", "raw")
    set_meta(dom, img_id, leaf, format=RAW)
    with pytest.raises(errors.BackingMismatch) as e:
        tree(dom, img_id).validate()
    assert (e.value.vol_id, e.value.backing, e.value.parent_id) == (
        leaf, None, base)


# Metadata chain (what chain() checks)


def test_loop(dom):
    img_id, (base, mid, leaf) = build_chain(dom)
    set_meta(dom, img_id, base, parent=leaf)
    t = tree(dom, img_id)
    with pytest.raises(errors.ChainLoop):
        t.validate()
    loops = [p for p in t.problems() if isinstance(p, errors.ChainLoop)]
    assert len(loops) == 1
    assert loops[0].vol_id == min(base, mid, leaf)
    # The data disagrees with the metadata too: base has no backing file.
    assert any(isinstance(p, errors.BackingMismatch) and p.vol_id == base
               for p in t.problems())


def test_missing_parent(dom):
    img_id, (base, mid, leaf) = build_chain(dom)
    os.unlink(dom.volume_path(img_id, base) + sc.META_EXT)
    t = tree(dom, img_id)
    with pytest.raises(errors.MissingParent) as e:
        t.validate()
    assert (e.value.vol_id, e.value.parent_id) == (mid, base)
    # Reported once, not again for the leaf above it.
    assert only_problem(t).parent_id == base
    assert len(t.check()) == 2          # check() is unchanged


def test_parent_not_shared(dom):
    tmpl_img, tmpl_vol, img_id, leaf = build_template(dom)
    # The metadata as linked into the image (an atomic write replaces the
    # link with a file of its own).
    set_meta(dom, img_id, tmpl_vol, voltype=INTERNAL)
    t = tree(dom, img_id)
    with pytest.raises(errors.ParentNotShared):
        t.validate()
    assert type(only_problem(t)) is errors.ParentNotShared


# Data file against the declared format


def test_raw_data_where_cow_declared(dom):
    img_id, (base, mid, leaf) = build_chain(dom)
    replace_data(dom, img_id, mid, "-f", "raw")
    t = tree(dom, img_id)
    with pytest.raises(errors.FormatMismatchInChain) as e:
        t.validate()
    assert (e.value.vol_id, e.value.expected, e.value.actual) == (
        mid, "qcow2", "raw")
    assert only_problem(t).vol_id == mid


def test_qcow2_data_where_raw_declared_is_guest_data(dom):
    """A RAW volume's bytes are the guest's: never probed, never refused
    (a guest writing a qcow2 header into its disk must not lock itself
    out; qemu-img always gets the declared format)."""
    img_id, (base, leaf) = build_chain(dom, RAW, length=2)
    replace_data(dom, img_id, base, "-f", "qcow2")
    tree(dom, img_id).validate()
    assert tree(dom, img_id).problems() == []


def test_raw_data_starting_with_qcow2_magic(dom):
    img_id, (vol,) = build_chain(dom, RAW, length=1)
    with open(dom.volume_path(img_id, vol), "r+b") as f:
        f.write(b"QFI\xfb")
    tree(dom, img_id).validate()


def test_external_data_file(dom, tmp_path):
    img_id, (base, leaf) = build_chain(dom, length=2)
    data = str(tmp_path / "elsewhere")
    replace_data(dom, img_id, leaf, "-f", "qcow2", "-o",
                 f"data_file={data}", "-u", "-b", base, "-F", "qcow2")
    with pytest.raises(errors.ExternalDataFile) as e:
        tree(dom, img_id).validate()
    assert (e.value.vol_id, e.value.data_file) == (leaf, data)


def test_missing_data_file(dom):
    img_id, (base, mid, leaf) = build_chain(dom)
    path = dom.volume_path(img_id, mid)
    os.unlink(path)
    t = tree(dom, img_id)
    with pytest.raises(errors.MissingData) as e:
        t.validate()
    assert isinstance(e.value, errors.ChainError)
    assert (e.value.sd_id, e.value.img_id, e.value.vol_id, e.value.path) == (
        dom.sd_id, img_id, mid, path)
    assert only_problem(t).vol_id == mid


@pytest.mark.parametrize("damage", ["truncate", "fifo", "version"])
def test_unusable_data(dom, damage):
    img_id, (base, leaf) = build_chain(dom, length=2)
    path = dom.volume_path(img_id, leaf)
    if damage == "truncate":
        os.truncate(path, 50)
    elif damage == "fifo":
        os.unlink(path)
        os.mkfifo(path)                 # must not block validate()
    else:
        with open(path, "r+b") as f:
            f.seek(4)
            f.write(b"\0\0\0\x09")
    with pytest.raises(errors.BadVolumeData) as e:
        tree(dom, img_id).validate()
    assert e.value.vol_id == leaf and e.value.reason


# Choosing the chain, and listing every problem


def test_validate_checks_only_the_chain(dom):
    img_id, (base, mid, leaf) = build_chain(dom)
    # A side branch (left by a revert) with a broken backing file.
    side = add_volume(dom, img_id, parent=base, voltype=INTERNAL)
    rebase_unsafe(dom, img_id, side, "/etc/hostname", "raw")
    t = tree(dom, img_id)
    t.validate()
    with pytest.raises(errors.BackingMismatch):
        t.validate(side)
    assert [p.vol_id for p in t.problems()] == [side]


def test_validate_checks_base_first(dom):
    img_id, (base, mid, leaf) = build_chain(dom)
    os.unlink(dom.volume_path(img_id, leaf))
    replace_data(dom, img_id, base, "-f", "raw")
    with pytest.raises(errors.FormatMismatchInChain):
        tree(dom, img_id).validate()


def test_validate_needs_a_leaf(dom):
    img_id, (base, leaf) = build_chain(dom, length=2)
    set_meta(dom, img_id, leaf, legality=sc.Legality.ILLEGAL)
    t = tree(dom, img_id)
    with pytest.raises(errors.ChainError, match="0 legal leaf"):
        t.validate()
    t.validate(leaf)
    assert [type(p) for p in t.problems()] == [errors.ChainError]


def test_validate_unknown_volume(dom):
    img_id, _ = build_chain(dom, length=1)
    with pytest.raises(errors.VolumeNotFound):
        tree(dom, img_id).validate(uid())


def test_problems_lists_everything(dom, tmp_path):
    img_id, (base, mid, leaf) = build_chain(dom, COW, length=3)
    side = add_volume(dom, img_id, parent=mid, voltype=INTERNAL)
    orphan = add_volume(dom, img_id, parent=base, voltype=INTERNAL)
    rebase_unsafe(dom, img_id, leaf, base)                 # wrong parent
    os.unlink(dom.volume_path(img_id, side))               # no data
    replace_data(dom, img_id, mid, "-f", "raw")            # not qcow2
    set_meta(dom, img_id, orphan, parent=uid())            # lost parent
    t = tree(dom, img_id)
    found = {(type(p), p.vol_id) for p in t.problems()}
    assert found == {
        (errors.BackingMismatch, leaf),
        (errors.MissingData, side),
        (errors.FormatMismatchInChain, mid),
        (errors.MissingParent, orphan),
        # orphan's data still names base as its backing file.
        (errors.BackingMismatch, orphan),
    }
    assert all(isinstance(p, errors.StorageError) for p in t.problems())
    with pytest.raises(errors.FormatMismatchInChain):
        t.validate()
