"""The read side of an image: its volumes as a tree, and chain walks.

An image directory holds volumes that form a tree through their ``PUUID``
(parent) keys. Normally it is a line, base to leaf; a revert to an older
snapshot leaves the later snapshots as a side branch that stays readable.
Exactly one LEGAL volume is the LEAF: the active layer.

A volume whose metadata names another image is a template shared into
this directory by hard links; it must be SHARED. Walking a chain checks
for loops, missing parents and non-shared foreign parents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import description
from ovirt_cinder.storage import errors
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
