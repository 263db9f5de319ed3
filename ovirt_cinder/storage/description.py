"""The volume DESCRIPTION field: compact JSON that names a snapshot.

oVirt writes either free text or a JSON object (``{"DiskAlias": ...}``)
into DESCRIPTION (at most 210 characters). We keep our own keys in a JSON
object and preserve anything else we find:

``snap``
    The id of the snapshot this (frozen) volume holds. The mapping
    snapshot -> volume therefore lives on storage, not in a database.
``tmpl``
    On a template (SHARED) volume: the id it was published under (a Glance
    image id).
``fmt``
    On a template stored by the Glance store: the format detected on
    upload (only ``raw`` and ``qcow2`` are copy-on-write bases).
``copy``
    On a copy of a template made for the thin clones of another domain:
    the domain of the original. The copy is removed once no image links
    it and the original is gone (``StoragePool.collect_template_copy``).

``cache``, ``host``
    On a template made by the Cinder driver's image cache: the Glance
    image id it holds and the storage host (``ovirt_host_id``) that made
    it (``ovirt_cinder/cinder/image_cache.py``).

``temp``
    On a volume frozen by a temporary live snapshot of an attached image
    (to merge its leaf, or to copy its moving top): its ``snap`` is the
    engine's, not a user's, and goes with ``temp`` when it is merged
    away.

A description that is not a JSON object is treated as opaque free text.
"""

from __future__ import annotations

import json

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors

__all__ = ["parse", "get", "update"]


def parse(text: str) -> dict[str, str]:
    if not text.startswith("{"):
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def get(text: str, key: str) -> str | None:
    value = parse(text).get(key)
    return value if isinstance(value, str) else None


def update(text: str, **changes: str | None) -> str:
    """Return ``text`` with keys set (or removed when None)."""
    if text and not text.startswith("{"):
        data: dict[str, str] = {"text": text}
    else:
        data = parse(text)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    if not data:
        return ""
    result = json.dumps(data, separators=(",", ":"), sort_keys=True)
    if len(result) > sc.DESCRIPTION_SIZE:
        raise errors.InvalidParameter(
            name="description", value=result, reason="too long")
    return result
