"""The read side of an image: its volumes as a tree, and chain walks.

An image directory holds volumes that form a tree through their ``PUUID``
(parent) keys. Normally it is a line, base to leaf; a revert to an older
snapshot leaves the later snapshots as a side branch that stays readable.
Exactly one LEGAL volume is the LEAF: the active layer.

A volume whose metadata names another image is a template shared into
this directory by hard links; it must be SHARED. Walking a chain checks
for loops, missing parents and non-shared foreign parents.

:meth:`ImageTree.validate` and :meth:`ImageTree.problems` also check each
volume's data against its metadata, reading only the first bytes of the
data file (:mod:`qcow2`, never qemu-img):

- the data file exists (:class:`errors.MissingData`) and is a regular
  file or block device with a valid header (:class:`errors.BadVolumeData`);
- a COW volume is a qcow2 file (:class:`errors.FormatMismatchInChain`).
  A RAW volume's bytes are the guest's and are never interpreted: a guest
  that writes a qcow2 header into its raw disk must not lock itself out,
  and the engine never lets qemu-img probe a format;
- a qcow2 backing file is exactly the parent's volume id, a bare name in
  the image directory, and there is none without a parent; a RAW volume
  has no parent (:class:`errors.BackingMismatch`);
- a backing format, when the header records one, is the parent's format
  (:class:`errors.BackingFormatMismatch`);
- no external data file (:class:`errors.ExternalDataFile`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import description
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import qcow2
from ovirt_cinder.storage import volmeta

__all__ = ["Volume", "ImageTree", "load"]


@dataclasses.dataclass(frozen=True)
class Volume:
    """One volume as read from its metadata."""

    vol_id: str
    path: str
    meta: volmeta.VolumeMetadata

    @property
    def parent(self) -> str | None:
        p = self.meta.parent
        return None if p == sc.BLANK_UUID else p

    @property
    def snapshot_id(self) -> str | None:
        return description.get(self.meta.description, "snap")

    @property
    def legal(self) -> bool:
        return self.meta.legality == sc.Legality.LEGAL

    @property
    def qemu_format(self) -> str:
        return self.meta.format.qemu

    def as_dict(self) -> dict[str, object]:
        m = self.meta
        return {
            "vol_id": self.vol_id, "image": m.image, "parent": self.parent,
            "format": str(m.format), "type": str(m.type),
            "voltype": str(m.voltype), "legality": str(m.legality),
            "capacity": m.capacity, "generation": m.generation,
            "snapshot_id": self.snapshot_id,
            "description": m.description, "path": self.path,
        }


class ImageTree:
    """All volumes of one image directory."""

    def __init__(self, sd_id: str, img_id: str,
                 volumes: dict[str, Volume]) -> None:
        self.sd_id = sd_id
        self.img_id = img_id
        self.volumes = volumes

    def __contains__(self, vol_id: str) -> bool:
        return vol_id in self.volumes

    def get(self, vol_id: str) -> Volume:
        try:
            return self.volumes[vol_id]
        except KeyError:
            raise errors.VolumeNotFound(
                sd_id=self.sd_id, img_id=self.img_id,
                vol_id=vol_id) from None

    def children(self, vol_id: str) -> list[str]:
        return sorted(v.vol_id for v in self.volumes.values()
                      if v.meta.parent == vol_id)

    def own_volumes(self) -> Iterator[Volume]:
        """Volumes that belong to this image (not shared templates)."""
        return (v for v in self.volumes.values()
                if v.meta.image == self.img_id)

    def leaf(self) -> Volume:
        leaves = [v for v in self.own_volumes()
                  if v.meta.voltype == sc.VolumeType.LEAF and v.legal]
        if len(leaves) != 1:
            raise errors.ChainError(
                img_id=self.img_id,
                reason=f"{len(leaves)} legal leaf volumes")
        return leaves[0]

    def template(self) -> Volume | None:
        """The SHARED volume if this image is a template image."""
        own = list(self.own_volumes())
        if len(own) == 1 and own[0].meta.voltype == sc.VolumeType.SHARED:
            return own[0]
        return None

    def snapshots(self) -> dict[str, Volume]:
        return {v.snapshot_id: v for v in self.own_volumes()
                if v.snapshot_id and v.meta.voltype == sc.VolumeType.INTERNAL}

    def find_snapshot(self, snap_id: str) -> Volume:
        try:
            return self.snapshots()[snap_id]
        except KeyError:
            raise errors.SnapshotNotFound(img_id=self.img_id,
                                          snap_id=snap_id) from None

    def chain(self, vol_id: str | None = None) -> list[Volume]:
        """Volumes from the base up to ``vol_id`` (default the leaf)."""
        vol = self.get(vol_id) if vol_id else self.leaf()
        chain = [vol]
        seen = {vol.vol_id}
        while vol.parent:
            parent_id = vol.parent
            if parent_id in seen:
                raise errors.ChainLoop(img_id=self.img_id, vol_id=parent_id)
            if parent_id not in self.volumes:
                raise errors.MissingParent(
                    img_id=self.img_id, vol_id=vol.vol_id,
                    parent_id=parent_id)
            parent = self.volumes[parent_id]
            if (parent.meta.image != self.img_id
                    and parent.meta.voltype != sc.VolumeType.SHARED):
                raise errors.ParentNotShared(
                    img_id=self.img_id, vol_id=vol.vol_id,
                    parent_id=parent_id, parent_img_id=parent.meta.image)
            seen.add(parent_id)
            chain.append(parent)
            vol = parent
        chain.reverse()
        return chain

    def validate(self, vol_id: str | None = None) -> None:
        """Raise the first problem of the chain ending at ``vol_id``.

        ``vol_id`` defaults to the legal leaf, or the SHARED volume of a
        template image. The chain's metadata is checked first (as
        :meth:`chain` does), then each volume's data, base first (see the
        module docstring). Costs one small read per volume.
        """
        if vol_id is None:
            template = self.template()
            vol_id = (template or self.leaf()).vol_id
        for vol in self.chain(vol_id):
            problem = self._data_problem(vol)
            if problem is not None:
                raise problem

    def problems(self) -> list[errors.StorageError]:
        """Every problem of the image, each once (empty when healthy).

        What :meth:`check` finds, without repeating one broken link for
        every volume above it, plus the data checks of :meth:`validate`
        for every volume of the directory.
        """
        found: list[errors.StorageError] = []
        seen: set[tuple[type, str]] = set()

        def add(problem: errors.StorageError | None) -> None:
            if problem is not None:
                key = (type(problem), str(problem))
                if key not in seen:
                    seen.add(key)
                    found.append(problem)

        for vol_id in sorted(self.volumes):
            add(self._link_problem(self.volumes[vol_id]))
        for loop in self._loops():
            add(errors.ChainLoop(img_id=self.img_id, vol_id=min(loop)))
        if self.template() is None:
            try:
                self.leaf()
            except errors.ChainError as e:
                add(e)
        for vol_id in sorted(self.volumes):
            add(self._data_problem(self.volumes[vol_id]))
        return found

    def _link_problem(self, vol: Volume) -> errors.ChainError | None:
        """What is wrong with the link from ``vol`` to its parent."""
        parent_id = vol.parent
        if parent_id is None:
            return None
        parent = self.volumes.get(parent_id)
        if parent is None:
            return errors.MissingParent(img_id=self.img_id,
                                        vol_id=vol.vol_id,
                                        parent_id=parent_id)
        if (parent.meta.image != self.img_id
                and parent.meta.voltype != sc.VolumeType.SHARED):
            return errors.ParentNotShared(
                img_id=self.img_id, vol_id=vol.vol_id, parent_id=parent_id,
                parent_img_id=parent.meta.image)
        return None

    def _loops(self) -> list[frozenset[str]]:
        """The parent loops of the tree, each as the set of its volumes."""
        loops: list[frozenset[str]] = []
        done: set[str] = set()
        for start in sorted(self.volumes):
            path: list[str] = []
            vol_id: str | None = start
            while vol_id in self.volumes and vol_id not in done:
                if vol_id in path:
                    loops.append(frozenset(path[path.index(vol_id):]))
                    break
                path.append(vol_id)
                vol_id = self.volumes[vol_id].parent
            done.update(path)
        return loops

    def _data_problem(self, vol: Volume) -> errors.ChainError | None:
        """What is wrong with the data file of ``vol`` (one read)."""
        ids = {"img_id": self.img_id, "vol_id": vol.vol_id}
        try:
            if vol.meta.format == sc.VolumeFormat.RAW:
                os.stat(vol.path)
                if vol.parent is not None:
                    return errors.BackingMismatch(
                        backing=None, parent_id=vol.parent, **ids)
                return None
            header = qcow2.read_header(vol.path)
        except FileNotFoundError:
            return errors.MissingData(sd_id=self.sd_id, path=vol.path,
                                      **ids)
        except errors.NotQcow2:
            return errors.FormatMismatchInChain(
                expected="qcow2", actual="raw", **ids)
        except errors.Qcow2HeaderError as e:
            return errors.BadVolumeData(reason=e.reason, **ids)
        except OSError as e:
            return errors.BadVolumeData(
                reason=f"cannot read {vol.path}: {e.strerror}", **ids)
        if header.has_data_file:
            return errors.ExternalDataFile(data_file=header.data_file,
                                           **ids)
        if header.backing_file != vol.parent:
            return errors.BackingMismatch(
                backing=header.backing_file, parent_id=vol.parent, **ids)
        parent = self.volumes.get(vol.parent) if vol.parent else None
        if (parent is not None and header.backing_format is not None
                and header.backing_format != parent.qemu_format):
            return errors.BackingFormatMismatch(
                backing_format=header.backing_format,
                parent_id=parent.vol_id, parent_format=parent.qemu_format,
                **ids)
        return None

    def check(self) -> list[errors.StorageError]:
        """Every structural problem of the image (empty when healthy)."""
        problems: list[errors.StorageError] = []
        for vol in self.volumes.values():
            try:
                self.chain(vol.vol_id)
            except errors.ChainError as e:
                problems.append(e)
        if self.template() is None:
            try:
                self.leaf()
            except errors.ChainError as e:
                problems.append(e)
        return problems


def load(domain, img_id: str, image_dir: str | None = None) -> ImageTree:
    """Read every volume of an image directory of ``domain``."""
    directory = image_dir or domain.image_dir(img_id)
    volumes = {}
    for vol_id in domain.list_volumes(img_id, directory):
        meta = domain.read_volume_meta(img_id, vol_id, directory)
        path = domain.volume_path(img_id, vol_id, directory)
        volumes[vol_id] = Volume(vol_id=vol_id, path=path, meta=meta)
    return ImageTree(domain.sd_id, img_id, volumes)
