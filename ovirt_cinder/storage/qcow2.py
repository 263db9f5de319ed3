"""Read a qcow2 header without running qemu-img.

Only what the chain checks need is read: one ``pread`` of the first
:data:`INITIAL_READ` bytes (a second, bounded one when an image keeps its
extensions or backing file name further into its first cluster). Nothing
referenced by the header is ever opened, and opening never blocks (a FIFO
is refused, not waited on).

Layout (docs/interop/qcow2.txt of QEMU; big-endian integers)::

    offset  size  field
         0     4  magic "QFI\\xfb"
         4     4  version: 2 or 3
         8     8  backing_file_offset (0: no backing file)
        16     4  backing_file_size (at most 1023; name not NUL-terminated)
        20     4  cluster_bits (9..21: 512 bytes to 2 MiB clusters)
        24     8  size: the virtual size in bytes
        32     4  crypt_method
        36     4  l1_size
        40     8  l1_table_offset
        48     8  refcount_table_offset
        56     4  refcount_table_clusters
        60     4  nb_snapshots
        64     8  snapshots_offset
    version 3 only (version 2 headers end at 72, with no feature bits):
        72     8  incompatible_features (bit 0 dirty, 1 corrupt,
                  2 external data file, 3 compression type, 4 extended L2)
        80     8  compatible_features (bit 0 lazy refcounts)
        88     8  autoclear_features (bit 0 bitmaps, 1 raw data file)
        96     4  refcount_order
       100     4  header_length (104 up to the cluster size)
       104     1  compression_type (when header_length > 104)

Header extensions follow the header (at 72 for version 2, at
``header_length`` for version 3), each::

         0     4  type (0: end of the extension area)
         4     4  length of the data
         8     n  data, padded with zeros to a multiple of 8 bytes

They end at the end marker, or where the extension area ends: at
``backing_file_offset`` when that is inside the first cluster, else at the
end of the first cluster (as QEMU reads them). Types used here:

- ``0xE2792ACA`` backing file format name (``raw``, ``qcow2``...)
- ``0x44415441`` external data file name (``"DATA"``)

The backing file name is the ``backing_file_size`` bytes at
``backing_file_offset``; QEMU requires it inside the first cluster.

An image has an external data file when incompatible feature bit 2 is set
or the data file extension is present (:attr:`Header.has_data_file`).

Errors: a file that cannot be a qcow2 image (unknown version, truncated or
inconsistent header, not a regular file or block device) raises
:class:`errors.Qcow2HeaderError` with ``path`` and ``reason``, and its
subclass :class:`errors.NotQcow2` when the magic is wrong; errors opening
the file (a missing file) are the ``OSError`` of ``open``.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass

from ovirt_cinder.storage import errors

__all__ = ["Header", "MAGIC", "is_qcow2", "read_header"]

MAGIC = b"QFI\xfb"

# One read covers the header, the usual extensions and the backing file
# name of any image qemu-img creates.
INITIAL_READ = 4096

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_BACKING_FILE_SIZE = 1023

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")
_EXT = struct.Struct(">II")


@dataclass(frozen=True)
class Header:
    """The fields of a qcow2 header that describe its place in a chain."""

    version: int
    virtual_size: int
    cluster_bits: int
    backing_file: str | None
    backing_format: str | None
    has_data_file: bool
    incompatible_features: int
    data_file: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def is_qcow2(path: str) -> bool:
    """True if ``path`` starts with the qcow2 magic.

    Only the magic is compared (the header may still be invalid, see
    :func:`read_header`); a file shorter than the magic is not qcow2.
    """
    with _open(path) as f:
        return os.pread(f.fd, len(MAGIC), 0) == MAGIC


def read_header(path: str) -> Header:
    """Parse the qcow2 header of ``path`` (see the module docstring)."""
    with _open(path) as f:
        data = os.pread(f.fd, INITIAL_READ, 0)
        fixed = _parse_fixed(path, data)
        try:
            return fixed.header(path, data)
        except _Short:
            if len(data) < INITIAL_READ:
                raise _truncated(path, data) from None
        # Extensions or the backing file name lie further into the first
        # cluster: read all of what they may occupy, once.
        data += os.pread(f.fd, fixed.max_needed - len(data), len(data))
    try:
        return fixed.header(path, data)
    except _Short:
        raise _truncated(path, data) from None


class _open:
    """A read-only fd of a regular file or block device, never blocking."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            mode = os.fstat(self.fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise _error(path, "not a regular file or block device")
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> _open:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class _Fixed:
    """The fixed part of the header, and where the rest lies."""

    version: int
    backing_offset: int
    backing_size: int
    cluster_bits: int
    size: int
    incompatible: int
    header_length: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def ext_end(self) -> int:
        if 0 < self.backing_offset < self.cluster_size:
            return self.backing_offset
        return self.cluster_size

    @property
    def max_needed(self) -> int:
        """Bytes from offset 0 that may hold extensions and backing name."""
        end = self.ext_end
        if self.backing_offset:
            end = max(end, self.backing_offset + self.backing_size)
        return end

    def header(self, path: str, data: bytes) -> Header:
        exts = _parse_extensions(path, data, self.header_length,
                                 self.ext_end)
        backing = None
        if self.backing_offset:
            name_end = self.backing_offset + self.backing_size
            if name_end > len(data):
                raise _Short()
            # An empty name is no backing file, to QEMU too.
            backing = os.fsdecode(data[self.backing_offset:name_end]) or None
        backing_format = _ext_text(exts.get(EXT_BACKING_FORMAT))
        data_file = _ext_text(exts.get(EXT_DATA_FILE))
        return Header(
            version=self.version,
            virtual_size=self.size,
            cluster_bits=self.cluster_bits,
            backing_file=backing,
            backing_format=backing_format if backing is not None else None,
            has_data_file=bool(self.incompatible & INCOMPAT_DATA_FILE
                               or EXT_DATA_FILE in exts),
            incompatible_features=self.incompatible,
            data_file=data_file,
        )


def _parse_fixed(path: str, data: bytes) -> _Fixed:
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise errors.NotQcow2(path=path,
                              reason=f"bad magic {data[:len(MAGIC)]!r}")
    if len(data) < _V2.size:
        raise _error(path, f"truncated: {len(data)} bytes, a version 2 "
                     f"header has {_V2.size}")
    (_, version, backing_offset, backing_size, cluster_bits, size,
     _crypt, _l1_size, _l1_offset, _rc_offset, _rc_clusters, _nb_snaps,
     _snaps_offset) = _V2.unpack_from(data)
    if version not in (2, 3):
        raise _error(path, f"unsupported version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise _error(path, f"invalid cluster_bits {cluster_bits}")
    cluster_size = 1 << cluster_bits
    incompatible = 0
    header_length = V2_HEADER_LENGTH
    if version == 3:
        if len(data) < V2_HEADER_LENGTH + _V3.size:
            raise _error(path, f"truncated: {len(data)} bytes, a version 3 "
                         f"header has at least {V3_MIN_HEADER_LENGTH}")
        (incompatible, _compatible, _autoclear, _refcount_order,
         header_length) = _V3.unpack_from(data, V2_HEADER_LENGTH)
        if not V3_MIN_HEADER_LENGTH <= header_length <= cluster_size:
            raise _error(path, f"invalid header_length {header_length}")
    if backing_offset:
        if backing_size > MAX_BACKING_FILE_SIZE:
            raise _error(path, f"backing file name of {backing_size} bytes "
                         f"(at most {MAX_BACKING_FILE_SIZE})")
        if (backing_offset < header_length
                or backing_offset + backing_size > cluster_size):
            raise _error(path, f"backing file name at {backing_offset}, "
                         "outside the first cluster after the header")
    return _Fixed(version=version, backing_offset=backing_offset,
                  backing_size=backing_size, cluster_bits=cluster_bits,
                  size=size, incompatible=incompatible,
                  header_length=header_length)


def _parse_extensions(path: str, data: bytes, start: int,
                      end: int) -> dict[int, bytes]:
    """Header extensions in ``data[start:end]``, by type (first wins)."""
    exts: dict[int, bytes] = {}
    offset = start
    while offset < end:
        if end - offset < _EXT.size:
            raise _error(path, f"truncated header extension at {offset}")
        if offset + _EXT.size > len(data):
            raise _Short()
        ext_type, length = _EXT.unpack_from(data, offset)
        offset += _EXT.size
        if ext_type == EXT_END:
            break
        if length > end - offset:
            raise _error(path, f"header extension {ext_type:#010x} of "
                         f"{length} bytes overflows the extension area")
        if offset + length > len(data):
            raise _Short()
        exts.setdefault(ext_type, data[offset:offset + length])
        offset += (length + 7) & ~7
    return exts


def _ext_text(value: bytes | None) -> str | None:
    if value is None:
        return None
    return os.fsdecode(value.rstrip(b"\0"))


class _Short(Exception):
    """The header goes on past the bytes read so far."""


def _truncated(path: str, data: bytes) -> errors.Qcow2HeaderError:
    return _error(path, f"truncated: the file ends at {len(data)} bytes, "
                  "inside its header")


def _error(path: str, reason: str) -> errors.Qcow2HeaderError:
    return errors.Qcow2HeaderError(path=path, reason=reason)
