"""The index of a domain's external leases (``dom_md/xleases``).

oVirt keeps VM leases in ``xleases`` and maps a lease name to its offset
in an index; a V4+ data domain without a valid index is not usable for
them. The engine writes no external leases: it formats an empty index
when it creates a domain, as vdsm's ``xlease.format_index`` does, and
reads one back to check it. The layout is vdsm's (``lib/vdsm/storage/
xlease.py``), the same for 512 and 4K blocks; only the slot size (the
domain's ALIGNMENT) changes.

The file is a row of slots, one ALIGNMENT each::

    slot 0   offset 0            lockspace slot: never written (a hole)
    slot 1   1 x ALIGNMENT       the index (below)
    slot 2   2 x ALIGNMENT       reserved for sanlock: never written
    slot 3+n (3+n) x ALIGNMENT   the lease of record n (written only when
                                 a lease is added, by vdsm)

A freshly formatted file on a file domain is therefore ALIGNMENT +
:data:`INDEX_SIZE` bytes long (1,302,528 for 1 MiB).

The index is :data:`INDEX_SIZE` (62 x 4096 = 253952) bytes: a 512-byte
metadata block, then :data:`MAX_RECORDS` (3960) records of 64 bytes.

Metadata block (``>i x 4s x 48s x 10s x c 440x c``)::

    0    4   magic 0x12152016, big-endian
    4    1   NUL
    5    4   version, ASCII "0001"
    9    1   NUL
    10   48  lockspace (the domain's sd_id), ASCII, NUL-padded
    58   1   NUL
    59   10  mtime, ASCII "%010d" (seconds since the epoch)
    69   1   NUL
    70   1   updating flag: "-", or "u" while the index is being written
    71   440 NUL
    511  1   "\\n"

Record n, at index offset 512 + 64 n (``48s x 11s x 3c``)::

    0    48  resource (lease) name, NUL-padded; all NUL: a free record
    48   1   NUL
    49   11  ASCII "%011d": the lease offset, for debugging only (the
             offset is always computed from n); "00000000000" when free
    60   1   NUL
    61   1   updating flag "-" (a "u" record counts as missing)
    62   1   reserved, "-"
    63   1   "\\n"

Formatting writes the whole index with the metadata flagged ``u``, then
rewrites its first block (``block_size`` bytes) flagged ``-`` with a new
mtime; each write is fsynced. Reading validates as vdsm does: a short
read is :class:`TruncatedIndex`; a bad magic, version, non-ASCII
lockspace or non-numeric mtime is :class:`InvalidMetadata`; the ``u``
flag is :class:`IndexIsUpdating`. The lockspace is not compared with the
domain id and records are checked only when they are read.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import time

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors

__all__ = ["INDEX_SIZE", "MAX_RECORDS", "Index", "Record", "XleaseError",
           "InvalidIndex", "TruncatedIndex", "InvalidMetadata",
           "IndexIsUpdating", "InvalidRecord", "format_index", "read_index",
           "lease_offset"]

RESERVED_SLOTS = 3
INDEX_SLOT = 1
METADATA_SIZE = 512
RECORD_BASE = METADATA_SIZE
RECORD_SIZE = 64
INDEX_SIZE = 62 * 4096
MAX_RECORDS = (INDEX_SIZE - METADATA_SIZE) // RECORD_SIZE
INDEX_VERSION = 1
INDEX_MAGIC = 0x12152016
FLAG_NONE = b"-"
FLAG_UPDATING = b"u"
NAME_SIZE = 48

_META = struct.Struct(">i x 4s x 48s x 10s x c 440x c")
_RECORD = struct.Struct("48s x 11s x 3c")
_VALID = {(sc.BLOCK_SIZE_512, sc.MiB)} | {
    (sc.BLOCK_SIZE_4K, n * sc.MiB) for n in (1, 2, 4, 8)}


class XleaseError(errors.StorageError):
    msg = "External leases index {path}: {reason}"


class InvalidIndex(XleaseError):
    """The index cannot be used: it must be formatted or rebuilt."""


class TruncatedIndex(InvalidIndex):
    msg = ("External leases index {path} is truncated: {available} bytes "
           "of {expected}")


class InvalidMetadata(InvalidIndex):
    msg = "External leases index {path} has invalid metadata: {reason}"


class IndexIsUpdating(InvalidIndex):
    msg = ("External leases index {path} is being updated, or an update "
           "was aborted; it must be formatted or rebuilt")


class InvalidRecord(XleaseError):
    msg = "External leases index {path}: record {number} is invalid: " \
          "{reason}"


@dataclasses.dataclass(frozen=True)
class Record:
    """A used record: the lease ``resource`` at ``offset``."""

    number: int
    resource: str
    offset: int
    updating: bool = False


@dataclasses.dataclass(frozen=True)
class Index:
    """A valid index as read from storage."""

    path: str
    lockspace: str
    version: int
    mtime: int
    alignment: int
    records_data: bytes = dataclasses.field(repr=False)

    def records(self) -> list[Record]:
        """Used records (free ones are left out); raises
        :class:`InvalidRecord` for one that does not parse."""
        found = []
        for n in range(MAX_RECORDS):
            start = n * RECORD_SIZE
            raw = self.records_data[start:start + RECORD_SIZE]
            record = _parse_record(self.path, n, raw, self.alignment)
            if record is not None:
                found.append(record)
        return found

    def leases(self) -> dict[str, int]:
        """Lease name -> offset of every used record not being updated."""
        return {r.resource: r.offset for r in self.records()
                if not r.updating}


def lease_offset(number: int, alignment: int) -> int:
    """Where the lease of record ``number`` is: its slot, past the three
    reserved ones."""
    return (RESERVED_SLOTS + number) * alignment


def _check_geometry(alignment: int, block_size: int) -> None:
    if (block_size, alignment) not in _VALID:
        raise errors.InvalidParameter(
            name="block size/alignment", value=(block_size, alignment),
            reason="expected 512/1M or 4096/1M, 2M, 4M, 8M")


def _metadata(lockspace: str, updating: bool) -> bytes:
    return _META.pack(
        INDEX_MAGIC, b"%04d" % INDEX_VERSION,
        lockspace.encode("ascii").ljust(NAME_SIZE, b"\0"),
        b"%010d" % int(time.time()),
        FLAG_UPDATING if updating else FLAG_NONE, b"\n")


_EMPTY_RECORD = _RECORD.pack(b"", b"%011d" % 0, FLAG_NONE, FLAG_NONE,
                             b"\n")


def format_index(path: str, lockspace: str, *, alignment: int,
                 block_size: int) -> None:
    """Write an empty index for ``lockspace`` (the sd_id) into ``path``,
    an existing file, at 1 x ``alignment``."""
    _check_geometry(alignment, block_size)
    if len(lockspace.encode("ascii")) > NAME_SIZE:
        raise errors.InvalidParameter(name="lockspace", value=lockspace,
                                      reason="longer than 48 bytes")
    offset = INDEX_SLOT * alignment
    data = _metadata(lockspace, updating=True) + _EMPTY_RECORD * MAX_RECORDS
    fd = os.open(path, os.O_WRONLY)
    try:
        _pwrite_all(fd, data, offset)
        os.fsync(fd)
        first = _metadata(lockspace, updating=False)
        _pwrite_all(fd, first + data[METADATA_SIZE:block_size], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def read_index(path: str, *, alignment: int, block_size: int) -> Index:
    """Read and validate the index of ``path`` (see the module doc)."""
    _check_geometry(alignment, block_size)
    with open(path, "rb") as f:
        f.seek(INDEX_SLOT * alignment)
        data = f.read(INDEX_SIZE)
    if len(data) < INDEX_SIZE:
        raise TruncatedIndex(path=path, expected=INDEX_SIZE,
                             available=len(data))
    magic, version, lockspace, mtime, updating, _ = _META.unpack(
        data[:METADATA_SIZE])
    if magic != INDEX_MAGIC:
        raise InvalidMetadata(path=path, reason=f"magic {magic:#x}")
    try:
        version_number = int(version)
    except ValueError:
        raise InvalidMetadata(path=path,
                              reason=f"version {version!r}") from None
    if version_number != INDEX_VERSION:
        raise InvalidMetadata(
            path=path, reason=f"unsupported version {version_number}")
    try:
        name = lockspace.rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:
        raise InvalidMetadata(path=path,
                              reason=f"lockspace {lockspace!r}") from None
    try:
        mtime_value = int(mtime)
    except ValueError:
        raise InvalidMetadata(path=path,
                              reason=f"mtime {mtime!r}") from None
    if updating == FLAG_UPDATING:
        raise IndexIsUpdating(path=path)
    return Index(path=path, lockspace=name, version=version_number,
                 mtime=mtime_value, alignment=alignment,
                 records_data=data[RECORD_BASE:])


def _parse_record(path: str, number: int, raw: bytes,
                  alignment: int) -> Record | None:
    name, offset, updating, _reserved, _term = _RECORD.unpack(raw)
    name = name.rstrip(b"\0")
    if not name:
        return None
    try:
        resource = name.decode("ascii")
        int(offset)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRecord(path=path, number=number,
                            reason=f"{raw!r}") from None
    return Record(number=number, resource=resource,
                  offset=lease_offset(number, alignment),
                  updating=updating == FLAG_UPDATING)
