"""Idempotent steps of the engine's operations, each with its undo.

Every operation in :mod:`flows` is a line of these steps. A step takes only
serialisable arguments (domain, image and volume ids, sizes, format names),
so a flow can be rebuilt from its persisted logbook after a crash and
re-run, plus a :class:`Context` that is never persisted: this host's
domains (ids are resolved to this host's own paths, never taken from the
logbook) and the lease manager. Each ``do_*`` finds out how far an earlier
run got and finishes the job; each ``undo_*`` removes what its ``do_*``
made, and only that. The on-disk invariants are the ground truth both
read (doc/source/contributor/flows.rst):

- a volume is created ILLEGAL, filled, then flipped to LEGAL with a
  generation bump in one metadata write;
- a volume whose data changes in place is marked ILLEGAL first;
- a new image is built in ``images/.tmp-<img>`` and renamed into place;
- a removed image is renamed to ``images/_remove_me_<img>`` first;
- removing a volume marks it ILLEGAL, then removes data, lease, metadata;
  a volume that another volume names as its parent is never removed.

Lease scope: every metadata change runs under the domain's SDM lease
(``ctx.sdm``), held for that change only; data work (copy, commit,
rebase, resize) runs outside it, under the image lease the caller holds
for the whole operation. A step that acts on a plan made earlier checks
it under the SDM lease first (``expect``) and raises
:class:`errors.StalePlan` when another host changed the volume. A change
to an image's metadata (or to the set of images) is counted in the
domain's counters in the same critical section (``ctx.counted``, see
:mod:`counters`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import counters
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fileutil
from ovirt_cinder.storage import image
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage import qsd
from ovirt_cinder.storage import sd
from ovirt_cinder.storage import sdmeta
from ovirt_cinder.storage import volmeta
from ovirt_cinder.storage import xlease

Progress = Callable[[float], None]

# Where long copies report progress when the context names no callback
# (the CLI draws a bar from it).
progress_callback: Progress | None = None

_PREALLOC = {
    (sc.VolumeFormat.RAW, sc.Preallocation.PREALLOCATED): "falloc",
    (sc.VolumeFormat.COW, sc.Preallocation.PREALLOCATED): "falloc",
}


@dataclasses.dataclass
class Context:
    """What steps need besides their persisted arguments.

    ``domains``: this host's open domains by id; ``leases``: the lease
    manager whose domain (SDM) lease guards metadata changes;
    ``attachments``: the daemons serving this host's attached images
    (the live steps act through them).
    """

    domains: Mapping[str, sd.FileDomain]
    leases: Any
    progress: Progress | None = None
    attachments: Any = None

    def domain(self, sd_id: str) -> sd.FileDomain:
        try:
            return self.domains[sd_id]
        except KeyError:
            raise errors.DomainNotFound(sd_id=sd_id) from None

    @contextlib.contextmanager
    def sdm(self, dom: sd.FileDomain) -> Iterator[sd.FileDomain]:
        """Hold ``dom``'s SDM lease around a metadata change."""
        with self.leases.domain_lease(dom):
            yield dom

    @contextlib.contextmanager
    def counted(self, dom: sd.FileDomain, img_id: str,
                staged: bool = False) -> Iterator[sd.FileDomain]:
        """Hold ``dom``'s SDM lease around a metadata change of image
        ``img_id``, and count the change in the domain's counters in the
        same critical section (a ``staged`` image counts for nothing until
        it is published)."""
        with self.sdm(dom), contextlib.ExitStack() as stack:
            if not staged:
                stack.enter_context(counters.accounting(dom, img_id))
            yield dom

    def daemon(self, img_id: str) -> Any:
        """The running daemon serving ``img_id`` on this host, or None."""
        if self.attachments is None:
            return None
        return self.attachments.daemon(img_id)

    def report(self, percent: float) -> None:
        callback = self.progress or progress_callback
        if callback is not None:
            callback(percent)

    @property
    def on_progress(self) -> Progress | None:
        if self.progress is None and progress_callback is None:
            return None
        return self.report


def _image_dir(dom: sd.FileDomain, img_id: str, staged: bool) -> str:
    return dom.tmp_image_dir(img_id) if staged else dom.image_dir(img_id)


def _read_meta(dom, img_id, vol_id, directory):
    try:
        return dom.read_volume_meta(img_id, vol_id, directory)
    except errors.VolumeNotFound:
        return None


def _children(dom, img_id: str, vol_id: str, directory: str) -> list[str]:
    """Volumes of the image directory that name ``vol_id`` as parent."""
    found = []
    for other in dom.list_volumes(img_id, directory):
        meta = _read_meta(dom, img_id, other, directory)
        if meta is not None and meta.parent == vol_id:
            found.append(other)
    return found


# Image directories


def do_make_image_dir(ctx: Context, sd_id: str, img_id: str) -> None:
    with ctx.sdm(ctx.domain(sd_id)) as dom:
        if dom.has_image(img_id):
            raise errors.ImageExists(sd_id=dom.sd_id, img_id=img_id)
        dom.make_dir(dom.tmp_image_dir(img_id))


def undo_make_image_dir(ctx: Context, sd_id: str, img_id: str) -> None:
    with ctx.sdm(ctx.domain(sd_id)) as dom:
        fileutil.remove_tree(dom.tmp_image_dir(img_id))


def do_publish_image(ctx: Context, sd_id: str, img_id: str) -> None:
    with ctx.counted(ctx.domain(sd_id), img_id) as dom:
        tmp = dom.tmp_image_dir(img_id)
        if os.path.isdir(tmp):
            if dom.has_image(img_id):
                raise errors.ImageExists(sd_id=dom.sd_id, img_id=img_id)
            os.rename(tmp, dom.image_dir(img_id))
            fileutil.fsync_dir(dom.images_dir)
        elif not dom.has_image(img_id):
            raise errors.ImageNotFound(sd_id=dom.sd_id, img_id=img_id)


def undo_publish_image(ctx: Context, sd_id: str, img_id: str) -> None:
    with ctx.counted(ctx.domain(sd_id), img_id) as dom:
        if dom.has_image(img_id) and not os.path.exists(
                dom.tmp_image_dir(img_id)):
            os.rename(dom.image_dir(img_id), dom.tmp_image_dir(img_id))
            fileutil.fsync_dir(dom.images_dir)


def do_remove_image(ctx: Context, sd_id: str, img_id: str) -> None:
    """Hide the image (rename, under the SDM lease), then purge it."""
    dom = ctx.domain(sd_id)
    removed = dom.removed_image_dir(img_id)
    with ctx.counted(dom, img_id):
        if dom.has_image(img_id):
            os.rename(dom.image_dir(img_id), removed)
            fileutil.fsync_dir(dom.images_dir)
    fileutil.remove_tree(removed)


# Volumes


def do_create_volume(ctx: Context, sd_id: str, img_id: str, vol_id: str,
                     *, capacity: int, fmt: str, prealloc: str,
                     parent_id: str | None, voltype: str,
                     description: str = "", staged: bool = False,
                     legal: bool = True, sequence: int = 0,
                     live: bool = False) -> None:
    """Create a volume's metadata, lease and data; with ``legal`` mark it
    LEGAL at the end. ``live``: the parent is open in a daemon, so
    qemu-img must not open it (the overlay is created without reading
    its backing file)."""
    dom = ctx.domain(sd_id)
    directory = _image_dir(dom, img_id, staged)
    parent = parent_id or sc.BLANK_UUID
    with ctx.counted(dom, img_id, staged):
        old = _read_meta(dom, img_id, vol_id, directory)
        if old is not None and old.legality == sc.Legality.LEGAL:
            if old.parent != parent or old.image != img_id:
                raise errors.VolumeExists(vol_id=vol_id, img_id=img_id)
            return      # an earlier run finished this step
        _remove_volume_files(dom, img_id, vol_id, directory)
        meta = volmeta.VolumeMetadata(
            domain=dom.sd_id, image=img_id, parent=parent,
            capacity=capacity, format=sc.VolumeFormat(fmt),
            type=sc.Preallocation(prealloc),
            voltype=sc.VolumeType(voltype), legality=sc.Legality.ILLEGAL,
            description=description, ctime=int(time.time()),
            sequence=sequence)
        dom.write_volume_meta(img_id, vol_id, meta, directory)
        path = dom.volume_path(img_id, vol_id, directory)
        dom.create_volume_lease(path + sc.LEASE_EXT, vol_id)
    _create_data(dom, img_id, path, meta, directory, live)
    if legal:
        with ctx.counted(dom, img_id, staged):
            dom.write_volume_meta(img_id, vol_id, meta.with_next_generation(
                legality=sc.Legality.LEGAL), directory)


def _create_data(dom, img_id, path, meta, directory, live=False) -> None:
    prealloc = _PREALLOC.get((meta.format, meta.type))
    if meta.parent != sc.BLANK_UUID:
        parent = dom.read_volume_meta(img_id, meta.parent, directory)
        qemuimg.create(path, "qcow2", meta.capacity, backing=meta.parent,
                       backing_fmt=parent.format.qemu, unsafe=live)
    else:
        qemuimg.create(path, meta.format.qemu, meta.capacity,
                       preallocation=prealloc)
    dom.own_file(path)


def undo_create_volume(ctx: Context, sd_id: str, img_id: str, vol_id: str,
                       *, staged: bool = False, **_ignored: Any) -> None:
    dom = ctx.domain(sd_id)
    directory = _image_dir(dom, img_id, staged)
    with ctx.counted(dom, img_id, staged):
        if os.path.isdir(directory):
            _remove_volume_files(dom, img_id, vol_id, directory)


_FIELD_TYPES = {
    "format": sc.VolumeFormat, "type": sc.Preallocation,
    "voltype": sc.VolumeType, "legality": sc.Legality,
}


def _typed(changes: Mapping[str, object]) -> dict[str, object]:
    return {k: _FIELD_TYPES[k](v) if k in _FIELD_TYPES else v
            for k, v in changes.items()}


def _matches(meta: volmeta.VolumeMetadata,
             fields: Mapping[str, object]) -> bool:
    return all(getattr(meta, k) == v for k, v in _typed(fields).items())


def do_update_volume(ctx: Context, sd_id: str, img_id: str, vol_id: str,
                     *, changes: dict[str, object],
                     expect: dict[str, object] | None = None,
                     staged: bool = False, **_undo: Any) -> None:
    """Set metadata fields (one write, GEN bumped) unless already set.

    ``expect``: fields (``generation`` among them) the plan read; a
    volume that no longer has them raises :class:`errors.StalePlan`.
    """
    dom = ctx.domain(sd_id)
    directory = _image_dir(dom, img_id, staged)
    with ctx.counted(dom, img_id, staged):
        meta = dom.read_volume_meta(img_id, vol_id, directory)
        if _matches(meta, changes):
            return
        if expect and not _matches(meta, expect):
            raise errors.StalePlan(
                img_id=img_id, vol_id=vol_id,
                reason=f"is not {expect} any more")
        dom.write_volume_meta(img_id, vol_id,
                              meta.with_next_generation(**_typed(changes)),
                              directory)


def undo_update_volume(ctx: Context, sd_id: str, img_id: str, vol_id: str,
                       *, changes: dict[str, object],
                       undo: dict[str, object] | None = None,
                       staged: bool = False, **_ignored: Any) -> None:
    """Restore ``undo`` only where this step's ``changes`` are in place:
    a volume another writer changed since is left alone."""
    if not undo:
        return
    dom = ctx.domain(sd_id)
    directory = _image_dir(dom, img_id, staged)
    with ctx.counted(dom, img_id, staged):
        meta = _read_meta(dom, img_id, vol_id, directory)
        if meta is None or not _matches(meta, changes):
            return
        dom.write_volume_meta(img_id, vol_id,
                              meta.with_next_generation(**_typed(undo)),
                              directory)


def do_remove_volume(ctx: Context, sd_id: str, img_id: str, vol_id: str,
                     staged: bool = False) -> None:
    """Remove a volume no other volume depends on (ILLEGAL first)."""
    dom = ctx.domain(sd_id)
    directory = _image_dir(dom, img_id, staged)
    with ctx.counted(dom, img_id, staged):
        children = _children(dom, img_id, vol_id, directory)
        if children:
            raise errors.ChainError(
                img_id=img_id, reason=f"volume {vol_id} is the parent of "
                f"{', '.join(children)}; not removed")
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


def do_link_volume(ctx: Context, sd_id: str, src_img_id: str, vol_id: str,
                   img_id: str, staged: bool = True) -> None:
    """Share a template volume into another image with hard links."""
    with ctx.counted(ctx.domain(sd_id), img_id, staged) as dom:
        src = dom.volume_path(src_img_id, vol_id)
        dst = dom.volume_path(img_id, vol_id,
                              _image_dir(dom, img_id, staged))
        meta = dom.read_volume_meta(src_img_id, vol_id)
        if meta.voltype != sc.VolumeType.SHARED or not meta.legality == \
                sc.Legality.LEGAL:
            raise errors.InvalidOperation(
                operation="link volume",
                reason=f"{vol_id} is not a legal SHARED volume")
        for ext in (sc.LEASE_EXT, "", sc.META_EXT):
            if not os.path.exists(dst + ext):
                os.link(src + ext, dst + ext)


def undo_link_volume(ctx: Context, sd_id: str, src_img_id: str,
                     vol_id: str, img_id: str, staged: bool = True) -> None:
    dom = ctx.domain(sd_id)
    directory = _image_dir(dom, img_id, staged)
    with ctx.counted(dom, img_id, staged):
        if os.path.isdir(directory):
            _remove_volume_files(dom, img_id, vol_id, directory)


# Data (outside the SDM lease; the caller holds the image leases)


def _volume(ctx: Context, sd_id: str, img_id: str, vol_id: str,
            directory: str | None = None) -> image.Volume:
    dom = ctx.domain(sd_id)
    return image.load(dom, img_id, directory).get(vol_id)


def do_commit(ctx: Context, sd_id: str, img_id: str, top_id: str,
              base_id: str) -> None:
    """Write the top volume's data into its parent (the top is kept)."""
    tree = image.load(ctx.domain(sd_id), img_id)
    top, base = tree.get(top_id), tree.get(base_id)
    if base.meta.capacity < top.meta.capacity:
        qemuimg.resize(base.path, top.meta.capacity, fmt=base.qemu_format)
    qemuimg.commit(top.path, top_fmt=top.qemu_format, base=base.path,
                   progress=ctx.on_progress)


def do_rebase(ctx: Context, sd_id: str, img_id: str, vol_id: str,
              parent_id: str | None, unsafe: bool) -> None:
    """Point ``vol_id`` at ``parent_id``; safe mode copies differences."""
    tree = image.load(ctx.domain(sd_id), img_id)
    vol = tree.get(vol_id)
    info = qemuimg.info(vol.path, vol.qemu_format)
    if (info.backing_filename or None) == parent_id:
        return
    parent_fmt = tree.get(parent_id).qemu_format if parent_id else None
    qemuimg.rebase(vol.path, parent_id, backing_fmt=parent_fmt,
                   unsafe=unsafe, progress=ctx.on_progress)


def _target_cache(dom: sd.FileDomain) -> str:
    """The cache mode of a copy into a new volume of ``dom``: durable
    when qemu-img exits (its own default, ``unsafe``, never flushes).

    ``none`` where the filesystem takes O_DIRECT: the writes go to the
    disk while the source is read (with ``-W``, up to 8 in flight), and
    the fdatasync at close has almost nothing left to write; the page
    cache keeps what it held. ``writeback`` elsewhere: the copy lands
    in the page cache and fdatasync writes it all at the end.
    """
    return "none" if dom.supports_direct_io() else "writeback"


def do_convert(ctx: Context, src_sd_id: str, src_img_id: str,
               src_vol_id: str, sd_id: str, img_id: str, vol_id: str, *,
               fmt: str, staged: bool, top_only: bool = False) -> None:
    """Copy a volume's view (or only its top layer) into a new volume.

    The target volume exists (created ILLEGAL by do_create_volume with
    ``legal=False``); its data is rewritten from scratch on every run,
    out of order (``-W``: nothing reads it before it is LEGAL), and is
    on the disk when the step ends (:func:`_target_cache`).
    """
    src_dom, dom = ctx.domain(src_sd_id), ctx.domain(sd_id)
    src = image.load(src_dom, src_img_id).get(src_vol_id)
    directory = _image_dir(dom, img_id, staged)
    dst_meta = dom.read_volume_meta(img_id, vol_id, directory)
    if dst_meta.legality != sc.Legality.ILLEGAL:
        raise errors.InvalidOperation(
            operation="copy", reason=f"target {vol_id} is not ILLEGAL")
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
                    preallocation=prealloc, cache=_target_cache(dom),
                    unordered_writes=True, progress=ctx.on_progress)
    dom.own_file(dst)
    cap = dst_meta.capacity
    if cap > qemuimg.info(dst, fmt).virtual_size:
        qemuimg.resize(dst, cap, fmt=fmt)


def do_resize(ctx: Context, sd_id: str, img_id: str, vol_id: str,
              size: int) -> None:
    vol = _volume(ctx, sd_id, img_id, vol_id)
    if qemuimg.info(vol.path, vol.qemu_format).virtual_size >= size:
        return
    prealloc = _PREALLOC.get((vol.meta.format, vol.meta.type))
    qemuimg.resize(vol.path, size, fmt=vol.qemu_format,
                   preallocation=prealloc)


def undo_resize(ctx: Context, sd_id: str, img_id: str, vol_id: str,
                size: int) -> None:
    """Shrink back what do_resize grew: the part past the capacity the
    metadata still records, up to ``size`` (new and never written)."""
    vol = _volume(ctx, sd_id, img_id, vol_id)
    current = qemuimg.info(vol.path, vol.qemu_format).virtual_size
    if vol.meta.capacity < current <= size:
        qemuimg.resize(vol.path, vol.meta.capacity, fmt=vol.qemu_format,
                       shrink=True)


# Live steps: through the daemon that serves an attached image, else on
# the files. A daemon that is gone (killed, or the host rebooted) no longer
# holds the files, and its next start opens the chain the metadata names;
# so a live step recovered without a daemon does the offline work instead,
# and the flow goes on as it would offline.


def layer(vol: image.Volume) -> qsd.Layer:
    """How a daemon opens ``vol``."""
    return qsd.Layer(vol_id=vol.vol_id, path=vol.path, fmt=vol.qemu_format)


def do_live_snapshot(ctx: Context, sd_id: str, img_id: str,
                     vol_id: str) -> None:
    """Make the daemon write into the new leaf ``vol_id`` (created over
    the daemon's current top by ``do_create_volume(live=True)``)."""
    daemon = ctx.daemon(img_id)
    if daemon is None:
        return
    daemon.snapshot(layer(_volume(ctx, sd_id, img_id, vol_id)))


def do_live_commit(ctx: Context, sd_id: str, img_id: str, top_id: str,
                   base_id: str) -> None:
    """Commit the intermediate layer ``top`` into ``base`` in the daemon
    (done already when ``top`` is out of its graph); qemu writes
    ``base``'s id as the backing name of the volume above ``top``."""
    daemon = ctx.daemon(img_id)
    if daemon is None:
        do_commit(ctx, sd_id, img_id, top_id, base_id)
    else:
        daemon.commit(top_id, base_id, backing_file=base_id)


def do_live_stream(ctx: Context, sd_id: str, img_id: str, vol_id: str,
                   base_id: str, parent_id: str | None) -> None:
    """Pull ``base``'s data into its child ``vol_id`` in the daemon (done
    already when ``base`` is out of its graph); ``vol_id``'s backing
    becomes ``parent_id``."""
    daemon = ctx.daemon(img_id)
    if daemon is None:
        do_rebase(ctx, sd_id, img_id, vol_id, parent_id, unsafe=False)
    else:
        daemon.stream(vol_id, base_id, new_backing=parent_id,
                      backing_file=parent_id)


def do_live_resize(ctx: Context, sd_id: str, img_id: str, vol_id: str,
                   size: int) -> None:
    """Grow the leaf the daemon serves; the guest sees the new size."""
    daemon = ctx.daemon(img_id)
    if daemon is None:
        do_resize(ctx, sd_id, img_id, vol_id, size)
        return
    if daemon.size() < size:
        daemon.resize(size)


def do_export(ctx: Context, sd_id: str, img_id: str, vol_id: str,
              dst: str, fmt: str) -> None:
    """Copy a volume's whole view into a file outside the domain."""
    vol = _volume(ctx, sd_id, img_id, vol_id)
    qemuimg.convert(vol.path, dst, src_fmt=vol.qemu_format, dst_fmt=fmt,
                    progress=ctx.on_progress)


def do_import(ctx: Context, sd_id: str, img_id: str, vol_id: str, src: str,
              src_fmt: str, staged: bool = True) -> None:
    """Fill a new (ILLEGAL) volume from an inspected file, durably and
    out of order, as :func:`do_convert` does."""
    dom = ctx.domain(sd_id)
    directory = _image_dir(dom, img_id, staged)
    dst = dom.volume_path(img_id, vol_id, directory)
    meta = dom.read_volume_meta(img_id, vol_id, directory)
    if meta.legality != sc.Legality.ILLEGAL:
        raise errors.InvalidOperation(
            operation="import", reason=f"target {vol_id} is not ILLEGAL")
    prealloc = _PREALLOC.get((meta.format, meta.type))
    fileutil.remove_file(dst)
    qemuimg.convert(src, dst, src_fmt=src_fmt, dst_fmt=meta.format.qemu,
                    preallocation=prealloc, cache=_target_cache(dom),
                    unordered_writes=True, progress=ctx.on_progress)
    # The copy has the source's size; the volume has its own capacity
    # (a small image fills the start of a larger volume).
    size = qemuimg.info(dst, meta.format.qemu).virtual_size
    if size > meta.capacity:
        raise errors.InvalidParameter(
            name="src", value=src,
            reason=f"virtual size {size} exceeds the volume's capacity "
                   f"{meta.capacity}")
    if size < meta.capacity:
        qemuimg.resize(dst, meta.capacity, fmt=meta.format.qemu,
                       preallocation=prealloc)
    dom.own_file(dst)


def do_adopt_volume(ctx: Context, sd_id: str, img_id: str, vol_id: str, *,
                    src: str, capacity: int, fmt: str, voltype: str,
                    description: str = "", disktype: str = "DATA",
                    staged: bool = True) -> None:
    """Make ``src`` the data of a new ILLEGAL volume by renaming it: no copy.

    ``src`` is a complete, inspected file that the caller wrote on the
    domain's filesystem. A re-run after the rename finds ``src`` gone and
    the data in place; a missing ``src`` without data fails the flow.
    """
    dom = ctx.domain(sd_id)
    directory = _image_dir(dom, img_id, staged)
    dst = dom.volume_path(img_id, vol_id, directory)
    with ctx.counted(dom, img_id, staged):
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
        dom.create_volume_lease(dst + sc.LEASE_EXT, vol_id)
        dom.own_file(src)
        os.rename(src, dst)
        fileutil.fsync_dir(directory)


def undo_adopt_volume(ctx: Context, sd_id: str, img_id: str, vol_id: str,
                      *, staged: bool = True, **_ignored: Any) -> None:
    undo_create_volume(ctx, sd_id, img_id, vol_id, staged=staged)


def noop(*_args: Any, **_kwargs: Any) -> None:
    """The undo of steps whose effect is undone by an earlier undo."""


# Format upgrade (V3/V4 to V5), in vdsm's order (formatconverter.py), so
# that every crash leaves a domain that oVirt and this engine read:
#
# 1. upgrade_v4 (V3 only): create and format ``dom_md/xleases``, then
#    ``VERSION=4``;
# 2. convert_volumes_metadata: every ``.meta`` gains ``CAP`` and keeps
#    ``SIZE`` and ``MTIME``: still a V4 record (a reader takes CAP when it
#    is there); skipped once the domain is V5;
# 3. convert_metadata: one atomic write of ``VERSION=5``, ``BLOCK_SIZE=
#    512``, ``ALIGNMENT=1048576``, without ``LOGBLKSIZE``/``PHYBLKSIZE``;
# 4. finalize_volumes_metadata: every ``.meta`` rewritten as V5 (``SEQ``,
#    no ``SIZE``/``MTIME``); until then the leftovers are ignored.
#
# Each step reads the version from storage under the SDM lease and does
# only what is left. Records that do not parse are skipped with a warning,
# as vdsm skips them. Data files are never touched.

_LOG = logging.getLogger(__name__)


def _disk_metadata(dom: sd.FileDomain) -> sdmeta.DomainMetadata:
    """The domain metadata as on storage now (``dom`` is updated)."""
    dom.metadata = sd.FileDomain.open(dom.path).metadata
    return dom.metadata


def do_upgrade_v4(ctx: Context, sd_id: str) -> None:
    """V3 to V4: an external leases volume with an empty index, then the
    version (vdsm's v4DomainConverter; an existing xleases is reused)."""
    dom = ctx.domain(sd_id)
    with ctx.sdm(dom):
        md = _disk_metadata(dom)
        if md.version >= 4:
            return
        path = dom.dom_md("xleases")
        if not os.path.exists(path):
            fileutil.create_sparse(path, 0, **dom.ownership.ids)
        # A V4 domain is always 512-byte blocks and 1 MiB alignment.
        xlease.format_index(path, dom.sd_id, alignment=sc.ALIGNMENT,
                            block_size=sc.BLOCK_SIZE_512)
        dom.write_metadata(sdmeta.upgraded(md, 4))


def do_convert_volumes_metadata(ctx: Context, sd_id: str) -> None:
    """Add ``CAP`` to every V4 volume record (still V4)."""
    dom = ctx.domain(sd_id)
    with ctx.sdm(dom):
        version = _disk_metadata(dom).version
    if version >= sc.DOMAIN_VERSION:
        return
    if version != 4:
        raise errors.InvalidOperation(
            operation="convert volume metadata",
            reason=f"domain {sd_id} is V{version}, not V4")
    _rewrite_volumes(ctx, dom, _with_capacity)


def _with_capacity(data: bytes, meta: volmeta.VolumeMetadata,
                   path: str) -> bytes | None:
    if "CAP" in volmeta.record_keys(data, path):
        return None
    return volmeta.legacy_bytes(meta, capacity=True)


def do_convert_metadata(ctx: Context, sd_id: str) -> None:
    """V4 to V5 in one domain metadata write."""
    dom = ctx.domain(sd_id)
    with ctx.sdm(dom):
        md = _disk_metadata(dom)
        if md.version >= sc.DOMAIN_VERSION:
            return
        if md.version != 4:
            raise errors.InvalidOperation(
                operation="convert domain metadata",
                reason=f"domain {sd_id} is V{md.version}, not V4")
        dom.write_metadata(sdmeta.upgraded(md, sc.DOMAIN_VERSION))


def do_finalize_volumes_metadata(ctx: Context, sd_id: str) -> None:
    """Rewrite every volume record of a V5 domain in the V5 format, then
    build the domain's counters by a scan (an oVirt domain has none)."""
    dom = ctx.domain(sd_id)
    with ctx.sdm(dom):
        version = _disk_metadata(dom).version
    if version != sc.DOMAIN_VERSION:
        raise errors.InvalidOperation(
            operation="finalize volume metadata",
            reason=f"domain {sd_id} is V{version}, not V5")
    _rewrite_volumes(ctx, dom, _v5_record)
    with ctx.sdm(dom):
        counters.rebuild(dom)


def _v5_record(data: bytes, meta: volmeta.VolumeMetadata,
               path: str) -> bytes | None:
    new = meta.to_bytes()
    return None if data.rstrip(b"\0") == new else new


_Convert = Callable[[bytes, volmeta.VolumeMetadata, str], "bytes | None"]


def _rewrite_volumes(ctx: Context, dom: sd.FileDomain,
                     convert: _Convert) -> None:
    """Rewrite each volume record with ``convert(data, meta, path)``
    (None: keep it), one image at a time under the SDM lease.

    A template's record that other images share by hard links is
    converted once, in its own image, then linked again into the others
    (link and rename: atomic), so the images keep sharing one file.
    """
    shared = []
    for img_id in dom.list_images():
        with ctx.sdm(dom):
            for vol_id, path, data, meta in _records(dom, img_id):
                if meta.image != img_id:
                    shared.append((img_id, vol_id, meta.image))
                    continue
                new = convert(data, meta, path)
                if new is not None:
                    fileutil.atomic_write(path, new, **dom.ownership.ids)
    for img_id, vol_id, owner_img in shared:
        with ctx.sdm(dom):
            _rewrite_shared(dom, img_id, vol_id, owner_img, convert)


def _records(dom: sd.FileDomain, img_id: str) -> Iterator[tuple]:
    """(vol_id, path, bytes, metadata) of each readable record."""
    try:
        vol_ids = dom.list_volumes(img_id)
    except errors.ImageNotFound:
        return      # removed meanwhile
    for vol_id in vol_ids:
        found = _record(dom, img_id, vol_id)
        if found is not None:
            yield (vol_id, *found)


def _record(dom: sd.FileDomain, img_id: str, vol_id: str
            ) -> tuple[str, bytes, volmeta.VolumeMetadata] | None:
    path = dom.volume_path(img_id, vol_id) + sc.META_EXT
    try:
        with open(path, "rb") as f:
            data = f.read(sc.METADATA_SIZE + 1)
        meta = volmeta.VolumeMetadata.from_bytes(data, path)
    except FileNotFoundError:
        return None
    except errors.MetadataError as e:
        _LOG.warning("Skipping volume %s with invalid metadata: %s",
                     vol_id, e)
        return None
    if len(meta.description) > sc.DESCRIPTION_SIZE:
        # vdsm truncates such a description whenever it reads it.
        _LOG.warning("Truncating the description of volume %s to %d "
                     "characters", vol_id, sc.DESCRIPTION_SIZE)
        meta = meta.replace(
            description=meta.description[:sc.DESCRIPTION_SIZE].strip())
    return path, data, meta


def _rewrite_shared(dom: sd.FileDomain, img_id: str, vol_id: str,
                    owner_img: str, convert: _Convert) -> None:
    found = _record(dom, img_id, vol_id)
    if found is None:
        return
    path, data, meta = found
    owner = dom.volume_path(owner_img, vol_id)
    try:
        linked = os.path.samefile(owner, dom.volume_path(img_id, vol_id))
        owner_meta = os.path.exists(owner + sc.META_EXT)
    except FileNotFoundError:
        linked = False      # the template image is gone: convert here
    if linked and owner_meta:
        if not os.path.samefile(owner + sc.META_EXT, path):
            tmp = path + sc.NEW_EXT
            fileutil.remove_file(tmp)
            os.link(owner + sc.META_EXT, tmp)
            os.rename(tmp, path)
            fileutil.fsync_dir(os.path.dirname(path))
        return
    new = convert(data, meta, path)
    if new is not None:
        fileutil.atomic_write(path, new, **dom.ownership.ids)
