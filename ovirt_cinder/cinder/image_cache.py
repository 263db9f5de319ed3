"""The image cache: plain Glance images kept as templates of a domain.

A volume made from a Glance image that is not a template of our pool
(an image in another store) would cost a whole download and conversion
each time. With the cache, the first such volume converts the image once
into a template image (a SHARED volume) in the volume's domain; that
volume and every later one from the same image are thin clones of it
(a qcow2 overlay: O(1)). Cinder's own image-volume cache keeps a whole
volume per image and clones it; ours keeps the template the thin clone
path already uses for images stored by our Glance store.

Entries
    An entry is a template image whose id is a version-5 UUID derived
    (:func:`entry_id`) from the Glance image id, the image's hash
    (``os_hash_algo``/``os_hash_value``, else its md5 ``checksum``) and
    the storage host's ``ovirt_host_id``; its DESCRIPTION holds
    ``cache`` (the Glance image id) and ``host``. Finding an entry is one
    ``stat``, with no index to keep. An image without a hash is not
    cached.

One entry per storage host
    Image leases are host-local (``doc/source/contributor/leases.rst``):
    two hosts could stage one image id at once. The host id in the entry
    id keeps the services of a cluster from ever building one entry
    together; each host builds and evicts only its own entries.

Bounds and eviction
    After adding an entry, the host's entries in that domain beyond
    ``ovirt_image_cache_max_count``, or beyond
    ``ovirt_image_cache_max_size_gb`` of allocated space, are deleted,
    least recently used first (a use sets the entry directory's mtime).
    Deleting an entry is deleting a template image: the volumes cloned
    from it keep its volume through their hard links, so their data stays
    and the space is freed with the last of them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from typing import Any

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import description
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import image
from ovirt_cinder.storage import inspect
from ovirt_cinder.storage.pool import StoragePool

__all__ = ["Entry", "entry_id", "lookup", "touch", "entries", "add",
           "evict"]

LOG = logging.getLogger(__name__)

# The namespace of entry ids (uuid5); never change it: existing entries
# would no longer be found.
NAMESPACE = uuid.UUID("6f1d7c2e-93a4-4b8e-a0c5-2d7e4b9f1a36")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One cache entry of a domain."""

    img_id: str
    glance_id: str
    host: int
    allocated: int
    last_used: float


def entry_id(image_meta: dict[str, Any], host: int) -> str | None:
    """The id of the entry of the Glance image ``image_meta`` describes,
    on storage host ``host``; None when the image cannot be cached."""
    glance_id = image_meta.get("id")
    algo, value = image_meta.get("os_hash_algo"), image_meta.get(
        "os_hash_value")
    if not (algo and value):
        algo, value = "md5", image_meta.get("checksum")
    if not (glance_id and value):
        return None
    return str(uuid.uuid5(NAMESPACE, f"{glance_id}/{algo}:{value}/{host}"))


def _entry(tree: image.ImageTree) -> tuple[image.Volume, str, int] | None:
    """The template, Glance id and host of a cache entry image."""
    if uuid.UUID(tree.img_id).version != 5:
        return None
    tmpl = tree.template()
    if tmpl is None:
        return None
    glance_id = description.get(tmpl.meta.description, "cache")
    host = description.get(tmpl.meta.description, "host")
    if glance_id is None or host is None or not host.isdigit():
        return None
    return tmpl, glance_id, int(host)


def lookup(pool: StoragePool, sd_id: str, img_id: str
           ) -> image.Volume | None:
    """The template of entry ``img_id`` in domain ``sd_id``, if present."""
    if not pool.domain(sd_id).has_image(img_id):
        return None
    try:
        found = _entry(pool.image(sd_id, img_id))
    except errors.StorageError:
        return None
    return found[0] if found else None


def touch(pool: StoragePool, sd_id: str, img_id: str) -> None:
    """Record a use of entry ``img_id`` (its directory's mtime)."""
    try:
        os.utime(pool.domain(sd_id).image_dir(img_id))
    except OSError as e:
        LOG.debug("Cannot record the use of cache entry %s: %s", img_id, e)


def entries(pool: StoragePool, sd_id: str) -> list[Entry]:
    """The cache entries of domain ``sd_id`` (of every host)."""
    dom = pool.domain(sd_id)
    found = []
    for img_id in dom.list_images():
        if uuid.UUID(img_id).version != 5:
            continue
        try:
            entry = _entry(pool.image(sd_id, img_id))
            if entry is None:
                continue
            tmpl, glance_id, host = entry
            allocated = os.stat(tmpl.path).st_blocks * 512
            last_used = os.stat(dom.image_dir(img_id)).st_mtime
        except (errors.StorageError, OSError):
            continue  # removed meanwhile
        found.append(Entry(img_id, glance_id, host, allocated, last_used))
    return found


def add(pool: StoragePool, sd_id: str, img_id: str, glance_id: str,
        host: int, path: str, found: inspect.InspectedImage
        ) -> image.Volume:
    """Convert the inspected image file ``path`` into entry ``img_id``.

    Raises ``ImageExists`` when another process of this host made the
    entry first (it waited for the entry's image lease meanwhile).
    """
    qemu_fmt = inspect.qemu_format(found.format)
    fmt = (sc.VolumeFormat.COW if qemu_fmt == "qcow2"
           else sc.VolumeFormat.RAW)
    size = max(found.virtual_size, 1)
    capacity = -(-size // sc.BLOCK_SIZE_512) * sc.BLOCK_SIZE_512
    return pool.import_volume(
        sd_id, img_id, path, qemu_fmt, capacity, fmt=fmt,
        voltype=sc.VolumeType.SHARED,
        description=description.update("", cache=glance_id,
                                       host=str(host)))


def evict(pool: StoragePool, sd_id: str, host: int, *, max_count: int,
          max_bytes: int, keep: str) -> list[str]:
    """Delete host ``host``'s least recently used entries in domain
    ``sd_id`` beyond ``max_count`` entries or ``max_bytes`` allocated
    (0: no bound), never ``keep``; return the ids deleted."""
    own = sorted((e for e in entries(pool, sd_id) if e.host == host),
                 key=lambda e: (e.img_id != keep, -e.last_used))
    removed = []
    count = allocated = 0
    for entry in own:
        fits = ((not max_count or count < max_count)
                and (not max_bytes
                     or allocated + entry.allocated <= max_bytes))
        if fits or entry.img_id == keep:
            count += 1
            allocated += entry.allocated
            continue
        try:
            if pool.delete_image(sd_id, entry.img_id):
                removed.append(entry.img_id)
                LOG.info("Image cache: removed the entry of image %s "
                         "(%s) from domain %s", entry.glance_id,
                         entry.img_id, sd_id)
        except errors.StorageError as e:
            LOG.warning("Image cache: could not remove the entry of image "
                        "%s (%s) from domain %s: %s", entry.glance_id,
                        entry.img_id, sd_id, e)
    return removed
