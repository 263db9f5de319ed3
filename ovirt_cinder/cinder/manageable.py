"""What the driver can offer to ``cinder manageable-list``.

A manageable volume is an image of a pool domain that no Cinder volume
uses (no volume has it as ``name_id``); its reference is
``{"source-name": <image uuid>}``. Templates (Glance images kept in the
pool), images with a broken chain and images without a legal leaf are
listed as not safe to manage.

A manageable snapshot is a frozen volume of a Cinder volume's image whose
DESCRIPTION names a snapshot id (``{"snap": ...}``) that no Cinder snapshot
uses; its reference is ``{"source-name": <snapshot id>}``.

``extra_info`` is a dict of strings: Cinder's ``ManageableVolume`` and
``ManageableSnapshot`` objects refuse anything else.
"""

from __future__ import annotations

import math
from typing import Any

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage.pool import StoragePool

__all__ = ["image_entries", "snapshot_entries", "size_gb"]


def size_gb(capacity: int) -> int:
    """Cinder size (whole GiB, rounded up) of ``capacity`` bytes."""
    return max(1, math.ceil(capacity / sc.GiB))


def image_entries(pool: StoragePool,
                  used: dict[str, str]) -> list[dict[str, Any]]:
    """One entry per image; ``used`` maps image id -> Cinder volume id."""
    entries = []
    for sd_id in sorted(pool.domains):
        for img_id in pool.list_images(sd_id):
            entries.append(_image_entry(pool, sd_id, img_id, used))
    return entries


def _image_entry(pool: StoragePool, sd_id: str, img_id: str,
                 used: dict[str, str]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "reference": {"source-name": img_id}, "size": 0,
        "safe_to_manage": False, "reason_not_safe": None,
        "cinder_id": used.get(img_id), "extra_info": {"domain": sd_id}}
    try:
        tree = pool.image(sd_id, img_id)
        problems = tree.check()
        if tree.template() is not None:
            entry["size"] = size_gb(tree.template().meta.capacity)
            entry["reason_not_safe"] = "template image"
            return entry
        leaf = tree.leaf()
    except errors.StorageError as e:
        entry["reason_not_safe"] = str(e)
        return entry
    entry["size"] = size_gb(leaf.meta.capacity)
    if img_id in used:
        entry["reason_not_safe"] = "already managed"
    elif problems:
        entry["reason_not_safe"] = str(problems[0])
    else:
        entry["safe_to_manage"] = True
    return entry


def snapshot_entries(pool: StoragePool, volumes: list[tuple[str, str, str]],
                     used: set[str]) -> list[dict[str, Any]]:
    """Entries for snapshots found in the images of Cinder volumes.

    ``volumes`` holds (volume id, sd_id, img_id); ``used`` the storage
    snapshot ids Cinder already knows.
    """
    entries = []
    for volume_id, sd_id, img_id in volumes:
        try:
            snaps = pool.image(sd_id, img_id).snapshots()
        except errors.StorageError:
            continue
        for snap_id, vol in sorted(snaps.items()):
            entries.append({
                "reference": {"source-name": snap_id},
                "size": size_gb(vol.meta.capacity),
                "safe_to_manage": snap_id not in used,
                "reason_not_safe": (
                    "already managed" if snap_id in used else None),
                "cinder_id": None,
                "extra_info": {"domain": sd_id, "volume": vol.vol_id},
                "source_reference": {"source-id": volume_id}})
    return entries
