"""Idempotent steps of the engine's operations, each with its undo.

Every operation in :mod:`flows` is a line of these steps. A step takes only
serialisable arguments (paths and ids), so a flow can be rebuilt from its
persisted logbook after a crash and re-run: each ``do_*`` finds out how far
an earlier run got and finishes the job; each ``undo_*`` removes what its
``do_*`` made. The on-disk invariants of DESIGN.md section 4 are the ground
truth both read:

- a volume is created ILLEGAL, filled, then flipped to LEGAL with a
  generation bump in one metadata write;
- a volume whose data changes in place is marked ILLEGAL first;
- a new image is built in ``images/.tmp-<img>`` and renamed into place;
- a removed image is renamed to ``images/_remove_me_<img>`` first;
- removing a volume marks it ILLEGAL, then removes data, lease, metadata.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fileutil
from ovirt_cinder.storage import image
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage import sd
from ovirt_cinder.storage import volmeta

Progress = Callable[[float], None]

# Set by the flow runner for the duration of a step: where long copies
# report progress (the CLI draws a bar from it).
progress_callback: Progress | None = None

_PREALLOC = {
    (sc.VolumeFormat.RAW, sc.Preallocation.PREALLOCATED): "falloc",
    (sc.VolumeFormat.COW, sc.Preallocation.PREALLOCATED): "falloc",
}


def _domain(sd_path: str) -> sd.FileDomain:
    return sd.FileDomain.open(sd_path)


def _image_dir(dom: sd.FileDomain, img_id: str, staged: bool) -> str:
    return dom.tmp_image_dir(img_id) if staged else dom.image_dir(img_id)


def _read_meta(dom, img_id, vol_id, directory):
    try:
        return dom.read_volume_meta(img_id, vol_id, directory)
    except errors.VolumeNotFound:
        return None


# Image directories


def do_make_image_dir(sd_path: str, img_id: str) -> None:
    dom = _domain(sd_path)
    if dom.has_image(img_id):
        raise errors.ImageExists(sd_id=dom.sd_id, img_id=img_id)
    os.makedirs(dom.tmp_image_dir(img_id), exist_ok=True)


def undo_make_image_dir(sd_path: str, img_id: str) -> None:
    fileutil.remove_tree(_domain(sd_path).tmp_image_dir(img_id))


def do_publish_image(sd_path: str, img_id: str) -> None:
    dom = _domain(sd_path)
    tmp = dom.tmp_image_dir(img_id)
    if os.path.isdir(tmp):
        os.rename(tmp, dom.image_dir(img_id))
        fileutil.fsync_dir(dom.images_dir)
    elif not dom.has_image(img_id):
        raise errors.ImageNotFound(sd_id=dom.sd_id, img_id=img_id)


def undo_publish_image(sd_path: str, img_id: str) -> None:
    dom = _domain(sd_path)
    if dom.has_image(img_id):
        os.rename(dom.image_dir(img_id), dom.tmp_image_dir(img_id))


def do_remove_image(sd_path: str, img_id: str) -> None:
    """Hide the image (rename), then purge it."""
    dom = _domain(sd_path)
    removed = dom.removed_image_dir(img_id)
    if dom.has_image(img_id):
        os.rename(dom.image_dir(img_id), removed)
        fileutil.fsync_dir(dom.images_dir)
    fileutil.remove_tree(removed)


# Volumes


def do_create_volume(sd_path: str, img_id: str, vol_id: str, *,
                     capacity: int, fmt: str, prealloc: str,
                     parent_id: str | None, voltype: str,
                     description: str = "", staged: bool = False,
                     legal: bool = True, sequence: int = 0) -> None:
    dom = _domain(sd_path)
    directory = _image_dir(dom, img_id, staged)
    old = _read_meta(dom, img_id, vol_id, directory)
    if old is not None and old.legality == sc.Legality.LEGAL:
        return
    _remove_volume_files(dom, img_id, vol_id, directory)
    meta = volmeta.VolumeMetadata(
        domain=dom.sd_id, image=img_id,
        parent=parent_id or sc.BLANK_UUID, capacity=capacity,
        format=sc.VolumeFormat(fmt), type=sc.Preallocation(prealloc),
        voltype=sc.VolumeType(voltype), legality=sc.Legality.ILLEGAL,
        description=description, ctime=int(time.time()),
        sequence=sequence)
    dom.write_volume_meta(img_id, vol_id, meta, directory)
    path = dom.volume_path(img_id, vol_id, directory)
    fileutil.create_sparse(path + sc.LEASE_EXT, sc.VOLUME_LEASE_SIZE)
    _create_data(dom, img_id, path, meta, directory)
    if legal:
        dom.write_volume_meta(img_id, vol_id, meta.with_next_generation(
            legality=sc.Legality.LEGAL), directory)


def _create_data(dom, img_id, path, meta, directory) -> None:
    prealloc = _PREALLOC.get((meta.format, meta.type))
    if meta.parent != sc.BLANK_UUID:
        parent = dom.read_volume_meta(img_id, meta.parent, directory)
        qemuimg.create(path, "qcow2", meta.capacity, backing=meta.parent,
                       backing_fmt=parent.format.qemu)
    else:
        qemuimg.create(path, meta.format.qemu, meta.capacity,
                       preallocation=prealloc)
    os.chmod(path, 0o660)


def undo_create_volume(sd_path: str, img_id: str, vol_id: str, *,
                       staged: bool = False, **_ignored) -> None:
    dom = _domain(sd_path)
    directory = _image_dir(dom, img_id, staged)
    if os.path.isdir(directory):
        _remove_volume_files(dom, img_id, vol_id, directory)


def do_update_volume(sd_path: str, img_id: str, vol_id: str, *,
                     changes: dict[str, object], staged: bool = False,
                     **_undo) -> None:
    """Set metadata fields (one write, GEN bumped) unless already set."""
    dom = _domain(sd_path)
    directory = _image_dir(dom, img_id, staged)
    meta = dom.read_volume_meta(img_id, vol_id, directory)
    typed = _typed_changes(changes)
    if all(getattr(meta, k) == v for k, v in typed.items()):
        return
    dom.write_volume_meta(img_id, vol_id,
                          meta.with_next_generation(**typed), directory)


def undo_update_volume(sd_path: str, img_id: str, vol_id: str, *,
                       undo: dict[str, object] | None = None,
                       staged: bool = False, **_ignored) -> None:
    if undo:
        do_update_volume(sd_path, img_id, vol_id, changes=undo,
                         staged=staged)


_FIELD_TYPES = {
    "format": sc.VolumeFormat, "type": sc.Preallocation,
    "voltype": sc.VolumeType, "legality": sc.Legality,
}


def _typed_changes(changes: dict[str, object]) -> dict[str, object]:
    return {k: _FIELD_TYPES[k](v) if k in _FIELD_TYPES else v
            for k, v in changes.items()}


def do_remove_volume(sd_path: str, img_id: str, vol_id: str,
                     staged: bool = False) -> None:
    dom = _domain(sd_path)
    directory = _image_dir(dom, img_id, staged)
    meta = _read_meta(dom, img_id, vol_id, directory)
    if meta is not None and meta.legality != sc.Legality.ILLEGAL:
        dom.write_volume_meta(img_id, vol_id, meta.with_next_generation(
            legality=sc.Legality.ILLEGAL), directory)
    _remove_volume_files(dom, img_id, vol_id, directory)


def _remove_volume_files(dom, img_id, vol_id, directory) -> None:
    path = dom.volume_path(img_id, vol_id, directory)
    fileutil.remove_file(path)
    fileutil.remove_file(path + sc.LEASE_EXT)
    fileutil.remove_file(path + sc.META_EXT + sc.NEW_EXT)
    fileutil.remove_file(path + sc.META_EXT)


def do_link_volume(sd_path: str, src_img_id: str, vol_id: str,
                   img_id: str, staged: bool = True) -> None:
    """Share a template volume into another image with hard links."""
    dom = _domain(sd_path)
    src = dom.volume_path(src_img_id, vol_id)
    dst = dom.volume_path(img_id, vol_id, _image_dir(dom, img_id, staged))
    for ext in (sc.LEASE_EXT, "", sc.META_EXT):
        if not os.path.exists(dst + ext):
            os.link(src + ext, dst + ext)


def undo_link_volume(sd_path: str, src_img_id: str, vol_id: str,
                     img_id: str, staged: bool = True) -> None:
    dom = _domain(sd_path)
    directory = _image_dir(dom, img_id, staged)
    if os.path.isdir(directory):
        _remove_volume_files(dom, img_id, vol_id, directory)


# Data


def do_commit(sd_path: str, img_id: str, top_id: str, base_id: str) -> None:
    """Write the top volume's data into its parent (the top is kept)."""
    dom = _domain(sd_path)
    tree = image.load(dom, img_id)
    top, base = tree.get(top_id), tree.get(base_id)
    if base.meta.capacity < top.meta.capacity:
        qemuimg.resize(base.path, top.meta.capacity, fmt=base.qemu_format)
    qemuimg.commit(top.path, top_fmt=top.qemu_format, base=base.path,
                   progress=progress_callback)


def do_rebase(sd_path: str, img_id: str, vol_id: str,
              parent_id: str | None, unsafe: bool) -> None:
    """Point ``vol_id`` at ``parent_id``; safe mode copies differences."""
    dom = _domain(sd_path)
    tree = image.load(dom, img_id)
    vol = tree.get(vol_id)
    info = qemuimg.info(vol.path, vol.qemu_format)
    if (info.backing_filename or None) == parent_id:
        return
    parent_fmt = tree.get(parent_id).qemu_format if parent_id else None
    qemuimg.rebase(vol.path, parent_id, backing_fmt=parent_fmt,
                   unsafe=unsafe, progress=progress_callback)


def do_convert(src_sd_path: str, src_img_id: str, src_vol_id: str,
               sd_path: str, img_id: str, vol_id: str, *, fmt: str,
               staged: bool, top_only: bool = False) -> None:
    """Copy a volume's view (or only its top layer) into a new volume.

    The target volume exists (created ILLEGAL by do_create_volume with
    ``legal=False``); its data is rewritten from scratch on every run.
    """
    src_dom, dom = _domain(src_sd_path), _domain(sd_path)
    src = image.load(src_dom, src_img_id).get(src_vol_id)
    directory = _image_dir(dom, img_id, staged)
    dst_meta = dom.read_volume_meta(img_id, vol_id, directory)
    dst = dom.volume_path(img_id, vol_id, directory)
    backing = backing_fmt = None
    if top_only and dst_meta.parent != sc.BLANK_UUID:
        backing = dst_meta.parent
        backing_fmt = dom.read_volume_meta(
            img_id, backing, directory).format.qemu
    fileutil.remove_file(dst)
    offload = (src_dom.sd_id == dom.sd_id and dom.supports_reflink())
    prealloc = _PREALLOC.get((dst_meta.format, dst_meta.type))
    qemuimg.convert(src.path, dst, src_fmt=src.qemu_format, dst_fmt=fmt,
                    backing=backing, backing_fmt=backing_fmt,
                    copy_offload=offload and backing is None,
                    preallocation=prealloc, progress=progress_callback)
    os.chmod(dst, 0o660)
    cap = dst_meta.capacity
    if cap > qemuimg.info(dst, fmt).virtual_size:
        qemuimg.resize(dst, cap, fmt=fmt)


def do_resize(sd_path: str, img_id: str, vol_id: str, size: int) -> None:
    dom = _domain(sd_path)
    vol = image.load(dom, img_id).get(vol_id)
    if qemuimg.info(vol.path, vol.qemu_format).virtual_size >= size:
        return
    prealloc = _PREALLOC.get((vol.meta.format, vol.meta.type))
    qemuimg.resize(vol.path, size, fmt=vol.qemu_format,
                   preallocation=prealloc)


def do_export(sd_path: str, img_id: str, vol_id: str, dst: str,
              fmt: str) -> None:
    """Copy a volume's whole view into a file outside the domain."""
    vol = image.load(_domain(sd_path), img_id).get(vol_id)
    qemuimg.convert(vol.path, dst, src_fmt=vol.qemu_format, dst_fmt=fmt,
                    progress=progress_callback)


def do_import(sd_path: str, img_id: str, vol_id: str, src: str,
              src_fmt: str, staged: bool = True) -> None:
    """Fill a new (ILLEGAL) volume from an inspected file."""
    dom = _domain(sd_path)
    directory = _image_dir(dom, img_id, staged)
    dst = dom.volume_path(img_id, vol_id, directory)
    meta = dom.read_volume_meta(img_id, vol_id, directory)
    fileutil.remove_file(dst)
    qemuimg.convert(src, dst, src_fmt=src_fmt, dst_fmt=meta.format.qemu,
                    preallocation=_PREALLOC.get((meta.format, meta.type)),
                    progress=progress_callback)
    os.chmod(dst, 0o660)


def do_adopt_volume(sd_path: str, img_id: str, vol_id: str, *, src: str,
                    capacity: int, fmt: str, voltype: str,
                    description: str = "", disktype: str = "DATA",
                    staged: bool = True) -> None:
    """Make ``src`` the data of a new ILLEGAL volume by renaming it: no copy.

    ``src`` is a complete, inspected file that the caller wrote on the
    domain's filesystem. A re-run after the rename finds ``src`` gone and
    the data in place; a missing ``src`` without data fails the flow.
    """
    dom = _domain(sd_path)
    directory = _image_dir(dom, img_id, staged)
    dst = dom.volume_path(img_id, vol_id, directory)
    if not os.path.exists(src):
        if os.path.exists(dst) and _read_meta(
                dom, img_id, vol_id, directory) is not None:
            return
        raise errors.VolumeNotFound(sd_id=dom.sd_id, img_id=img_id,
                                    vol_id=vol_id)
    meta = volmeta.VolumeMetadata(
        domain=dom.sd_id, image=img_id, parent=sc.BLANK_UUID,
        capacity=capacity, format=sc.VolumeFormat(fmt),
        type=sc.Preallocation.SPARSE, voltype=sc.VolumeType(voltype),
        legality=sc.Legality.ILLEGAL, description=description,
        disktype=disktype, ctime=int(time.time()))
    dom.write_volume_meta(img_id, vol_id, meta, directory)
    fileutil.remove_file(dst + sc.LEASE_EXT)
    fileutil.create_sparse(dst + sc.LEASE_EXT, sc.VOLUME_LEASE_SIZE)
    os.chmod(src, 0o660)
    os.rename(src, dst)
    fileutil.fsync_dir(directory)


def undo_adopt_volume(sd_path: str, img_id: str, vol_id: str, *,
                      staged: bool = True, **_ignored) -> None:
    undo_create_volume(sd_path, img_id, vol_id, staged=staged)


def noop(*_args, **_kwargs) -> None:
    """The undo of steps whose effect is undone by an earlier undo."""
