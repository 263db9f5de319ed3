"""qcow2 images with real structural damage, for inspection tests.

Each maker builds a healthy qcow2 with ``qemu-img`` and data written by
``qemu-io`` (clusters at 0 and in the middle, so there are L2 tables and
refcounts to damage), then corrupts bytes with Python as a broken or
hostile writer would. Header fields are at their qcow2 offsets
(docs/interop/qcow2.txt).

What qemu-img 7.2 makes of them: ``qemu-img info`` opens all of them but
the header-size ones (``qcow2 header exceeds cluster size``, ``Active L1
table too large``); ``qemu-img check`` counts the others as
``corruptions``. :func:`leaked` only leaks a cluster: harmless.
"""

from __future__ import annotations

import os
import struct
import subprocess

from tests import qemuio

__all__ = ["CHECK_FINDS", "DAMAGES", "healthy", "leaked"]

MiB = 1024 * 1024
SIZE = 64 * MiB
CLUSTER = 64 * 1024

# Header offsets (qcow2 version 3).
_L1_SIZE = 36
_L1_OFFSET = 40
_REFCOUNT_TABLE_OFFSET = 48
_INCOMPATIBLE_FEATURES = 72
_HEADER_LENGTH = 100
_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_COPIED = 1 << 63


def healthy(path: str) -> str:
    """A 64 MiB qcow2 with 1 MiB of 0x5a at 0 and of 0xa5 at 32 MiB."""
    subprocess.run(["qemu-img", "create", "-f", "qcow2", path, str(SIZE)],
                   check=True, capture_output=True)
    qemuio.write_pattern(path, "qcow2", 0, MiB, 0x5a)
    qemuio.write_pattern(path, "qcow2", SIZE // 2, MiB, 0xa5)
    return path


def _u64(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def _write(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _first_l2(path: str) -> int:
    return _u64(path, _u64(path, _L1_OFFSET)) & _OFFSET_MASK


def l1_past_eof(path: str) -> str:
    """The first L1 entry points 1 TiB past the end of the file."""
    healthy(path)
    _write(path, _u64(path, _L1_OFFSET), struct.pack(">Q", _COPIED | 1 << 40))
    return path


def refcount_table_out_of_range(path: str) -> str:
    """The refcount table offset in the header is 32 TiB."""
    healthy(path)
    _write(path, _REFCOUNT_TABLE_OFFSET, struct.pack(">Q", 1 << 45))
    return path


def header_length(path: str) -> str:
    """The header_length field says 1 MiB (more than a cluster)."""
    healthy(path)
    _write(path, _HEADER_LENGTH, struct.pack(">I", MiB))
    return path


def l1_size(path: str) -> str:
    """The l1_size field says 2**31 - 1 entries."""
    healthy(path)
    _write(path, _L1_SIZE, struct.pack(">I", 0x7FFFFFFF))
    return path


def truncated(path: str) -> str:
    """The file cut in half: L2 tables and data clusters past its end."""
    healthy(path)
    os.truncate(path, os.path.getsize(path) // 2)
    return path


def l2_over_l1(path: str) -> str:
    """Overlapping metadata: a data cluster mapped onto the L1 table."""
    healthy(path)
    l1 = _u64(path, _L1_OFFSET)
    _write(path, _first_l2(path), struct.pack(">Q", _COPIED | l1))
    return path


def l1_over_refcount_table(path: str) -> str:
    """Overlapping metadata: the L1 table is the refcount table."""
    healthy(path)
    _write(path, _L1_OFFSET,
           struct.pack(">Q", _u64(path, _REFCOUNT_TABLE_OFFSET)))
    return path


def marked_corrupt(path: str) -> str:
    """A qcow2 whose header has the ``corrupt`` bit set."""
    healthy(path)
    _write(path, _INCOMPATIBLE_FEATURES, struct.pack(">Q", 2))
    return path


def leaked(path: str) -> str:
    """A healthy image with one leaked cluster (refcount 1, unused)."""
    healthy(path)
    refblock = _u64(path, _u64(path, _REFCOUNT_TABLE_OFFSET))
    clusters = os.path.getsize(path) // CLUSTER
    os.truncate(path, (clusters + 1) * CLUSTER)
    _write(path, refblock + 2 * clusters, struct.pack(">H", 1))
    return path


# name -> maker; every one is refused by inspect_untrusted.
DAMAGES = {
    "l1_past_eof": l1_past_eof,
    "refcount_table_out_of_range": refcount_table_out_of_range,
    "header_length": header_length,
    "l1_size": l1_size,
    "truncated": truncated,
    "l2_over_l1": l2_over_l1,
    "l1_over_refcount_table": l1_over_refcount_table,
    "marked_corrupt": marked_corrupt,
}
# The ones qemu-img opens, so qemu-img check (or the corrupt bit) finds
# the damage: CorruptImage. The others fail qemu-img info: UnsafeImage.
CHECK_FINDS = set(DAMAGES) - {"header_length", "l1_size"}
