"""A domain's counters: its images, volumes and provisioned bytes.

The Cinder driver reports, for every domain, the bytes provisioned in it.
Summing them by reading every image's metadata costs a ``.meta`` read per
volume (590 ms at 10,000 volumes), so every operation keeps a small
record of the sums up to date instead, and a stats refresh reads one
file (doc/source/contributor/counters.rst).

What is counted is what :func:`scan` counts, image by image
(:func:`count_image`): each directory ``images/<img>`` counts as one
image; if all its volume metadata parses, its own volumes (not the
templates it links) count as volumes, and the capacity of its template
(a lone SHARED volume) or else of its one legal leaf counts as
provisioned bytes (nothing when it has neither). Staged images
(``.tmp-<img>``) and removed ones (``_remove_me_<img>``) count for
nothing.

File ``<sd_id>/dom_md/ovirt-cinder-counters`` (ours: vdsm opens the files
of ``dom_md`` by name and never lists it)::

    FORMAT=1
    SDUUID=<sd_id>
    IMAGES=<count>
    VOLUMES=<count>
    PROVISIONED=<bytes>
    SEQ=<bumped by every write>
    SHA256=<hex SHA-256 of the bytes of the lines above>

in that order, ASCII, each line ending with ``\\n``. Anything else (a
missing file, a torn or zero-filled one, another domain's, another
format, a bad checksum) raises :class:`errors.BadCounters`: the record is
never trusted, it is rebuilt.

Writers hold the domain's SDM lease, the one that guards the metadata the
counters sum, and change the record in the same critical section as the
metadata: :func:`accounting` counts the image before and after the
change and adds the difference (:func:`update`), so two writers, two
processes or two hosts, never lose an update. A writer that finds the
record bad rebuilds it by a scan (:func:`rebuild`); recovery does so
after it runs a flow of a dead owner (a kill between a metadata change
and its count leaves the record off), and ``fsck --repair`` when it
differs from a scan. The record is written by rename without fsync
(``atomic_write(sync=False)``): see the design page for why that is
enough.

Readers (:func:`current`) read the record without any lease; when it is
bad they log once and scan, and never write it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from collections.abc import Iterable
from collections.abc import Iterator

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fileutil
from ovirt_cinder.storage import image

__all__ = ["Counters", "Record", "count_image", "scan", "read", "write",
           "update", "rebuild", "accounting", "current", "format_record",
           "parse"]

LOG = logging.getLogger(__name__)

FORMAT = 1
_KEYS = ("FORMAT", "SDUUID", "IMAGES", "VOLUMES", "PROVISIONED", "SEQ")
_CHECKSUM = "SHA256"
_MAX_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class Counters:
    images: int = 0
    volumes: int = 0
    provisioned: int = 0

    def __add__(self, other: Counters) -> Counters:
        return Counters(*(a + b for a, b in zip(
            dataclasses.astuple(self), dataclasses.astuple(other),
            strict=True)))

    def __sub__(self, other: Counters) -> Counters:
        return Counters(*(a - b for a, b in zip(
            dataclasses.astuple(self), dataclasses.astuple(other),
            strict=True)))

    def __bool__(self) -> bool:
        return any(dataclasses.astuple(self))

    @property
    def negative(self) -> bool:
        return any(v < 0 for v in dataclasses.astuple(self))

    @classmethod
    def total(cls, items: Iterable[Counters]) -> Counters:
        result = cls()
        for c in items:
            result += c
        return result


@dataclasses.dataclass(frozen=True)
class Record:
    """The counters as stored, with the number of writes so far."""

    counters: Counters
    seq: int


# Counting


def count_image(dom, img_id: str) -> Counters:
    """What the published image ``img_id`` adds to the domain's counters
    (all zeros when there is no such image directory)."""
    if not os.path.isdir(dom.image_dir(img_id)):
        return Counters()
    try:
        tree = image.load(dom, img_id)
    except errors.ImageNotFound:
        return Counters()
    except errors.StorageError:
        return Counters(images=1)
    volumes = sum(1 for _ in tree.own_volumes())
    try:
        top = tree.template() or tree.leaf()
    except errors.StorageError:
        return Counters(images=1, volumes=volumes)
    return Counters(images=1, volumes=volumes,
                    provisioned=top.meta.capacity)


def scan(dom) -> Counters:
    """The counters of ``dom`` by reading every image's metadata."""
    return Counters.total(count_image(dom, i) for i in dom.list_images())


# The record


def _path(dom) -> str:
    return dom.dom_md(sc.COUNTERS)


def format_record(sd_id: str, counters: Counters, seq: int) -> bytes:
    values = (FORMAT, sd_id, counters.images, counters.volumes,
              counters.provisioned, seq)
    body = "".join(f"{k}={v}\n" for k, v in zip(_KEYS, values,
                                                strict=True)).encode()
    return body + f"{_CHECKSUM}={hashlib.sha256(body).hexdigest()}\n" \
        .encode()


def parse(data: bytes, sd_id: str, path: str = "") -> Record:
    """The record in ``data``; raise :class:`errors.BadCounters`."""
    def bad(reason: str) -> errors.BadCounters:
        return errors.BadCounters(sd_id=sd_id, path=path, reason=reason)

    body, sep, last = data.rstrip(b"\n").rpartition(b"\n")
    body += sep
    if not last.startswith(f"{_CHECKSUM}=".encode()):
        raise bad("no checksum: torn or not a counters record")
    if last[len(_CHECKSUM) + 1:] != \
            hashlib.sha256(body).hexdigest().encode():
        raise bad("checksum mismatch: torn or damaged")
    try:
        lines = body.decode("ascii").splitlines()
        values = dict(line.split("=", 1) for line in lines)
    except ValueError:
        raise bad("not KEY=value lines") from None
    if list(values) != list(_KEYS) or len(lines) != len(_KEYS):
        raise bad(f"keys {list(values)}, expected {list(_KEYS)}")
    if values["FORMAT"] != str(FORMAT):
        raise bad(f"format {values['FORMAT']!r}, expected {FORMAT}")
    if values["SDUUID"] != sd_id:
        raise bad(f"a record of domain {values['SDUUID']!r}")
    numbers = []
    for key in _KEYS[2:]:
        text = values[key]
        if not text.isdigit():
            raise bad(f"{key}={text!r} is not a count")
        numbers.append(int(text))
    return Record(Counters(*numbers[:3]), seq=numbers[3])


def read(dom) -> Record:
    """The stored record of ``dom``; raise :class:`errors.BadCounters`
    when it is missing or cannot be trusted."""
    path = _path(dom)
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_SIZE + 1)
    except FileNotFoundError:
        raise errors.BadCounters(sd_id=dom.sd_id, path=path,
                                 reason="missing") from None
    if len(data) > _MAX_SIZE:
        raise errors.BadCounters(sd_id=dom.sd_id, path=path,
                                 reason=f"more than {_MAX_SIZE} bytes")
    return parse(data, dom.sd_id, path)


def write(dom, counters: Counters, seq: int) -> None:
    """Replace the record (the caller holds the SDM lease). Without an
    fsync: a torn or lost write is found by the checksum or rebuilt by
    recovery (module doc)."""
    fileutil.atomic_write(_path(dom), format_record(dom.sd_id, counters,
                                                    seq),
                          sync=False, **dom.ownership.ids)


# Writers (under the domain's SDM lease)


def _writable(dom) -> bool:
    # A V3 or V4 domain is not written until it is upgraded.
    return dom.metadata.version >= sc.DOMAIN_VERSION


def rebuild(dom) -> tuple[Record | None, Counters]:
    """Scan ``dom`` and store the result unless the record already holds
    it; return the record found (None: bad) and the scan. The caller
    holds the SDM lease."""
    try:
        old = read(dom)
    except errors.BadCounters:
        old = None
    new = scan(dom)
    if _writable(dom) and (old is None or old.counters != new):
        write(dom, new, (old.seq if old else 0) + 1)
    return old, new


def update(dom, delta: Counters) -> None:
    """Add ``delta`` to the record (the caller holds the SDM lease); a bad
    record is rebuilt by a scan instead (which already counts the change
    the delta describes)."""
    if not delta or not _writable(dom):
        return
    try:
        old = read(dom)
    except errors.BadCounters as e:
        LOG.warning("%s; rebuilding them by a scan of the domain", e)
        rebuild(dom)
        return
    new = old.counters + delta
    if new.negative:
        LOG.warning("Counters of storage domain %s would become %s; "
                    "rebuilding them by a scan of the domain", dom.sd_id,
                    new)
        rebuild(dom)
        return
    write(dom, new, old.seq + 1)


@contextlib.contextmanager
def accounting(dom, img_id: str) -> Iterator[None]:
    """Count what the caller changes in the published image ``img_id``
    while it holds ``dom``'s SDM lease, even when the change fails half
    way.

    The counters never fail the change: if they cannot be kept (an error
    reading the image, a full domain), the record is removed, readers
    scan, and the next change rebuilds it.
    """
    try:
        before: Counters | None = count_image(dom, img_id)
    except OSError as e:
        LOG.warning("Cannot count image %s of domain %s: %s", img_id,
                    dom.sd_id, e)
        before = None
    try:
        yield
    finally:
        _settle(dom, img_id, before)


def _settle(dom, img_id: str, before: Counters | None) -> None:
    try:
        if before is not None:
            update(dom, count_image(dom, img_id) - before)
            return
    except (OSError, errors.StorageError) as e:
        LOG.warning("Counters of storage domain %s not updated for image "
                    "%s: %s", dom.sd_id, img_id, e)
    _invalidate(dom)


def _invalidate(dom) -> None:
    """Remove a record that may be off: the next change rebuilds it."""
    try:
        if fileutil.remove_file(_path(dom)):
            LOG.warning("Removed the counters of storage domain %s; the "
                        "next change rebuilds them", dom.sd_id)
    except OSError as e:
        LOG.error("Counters of storage domain %s may be off and cannot be "
                  "removed (%s): `ovirt-storage fsck --repair` rewrites "
                  "them", dom.sd_id, e)


# Readers (no lease)

# The last reason each domain (by path) fell back to a scan: logged once.
_fallbacks: dict[str, str] = {}


def current(dom) -> Counters:
    """The counters of ``dom`` from its record, without a lease; a scan
    when the record is bad (logged once while it stays bad)."""
    try:
        counters = read(dom).counters
    except errors.BadCounters as e:
        if _fallbacks.get(dom.path) != e.reason:
            _fallbacks[dom.path] = e.reason
            level = (logging.INFO if e.reason == "missing"
                     else logging.WARNING)
            LOG.log(level, "%s; scanning the domain's images instead", e)
        return scan(dom)
    _fallbacks.pop(dom.path, None)
    return counters
