"""ovirt_cinder.storage.xlease: the xleases index, byte for byte."""

import os
import struct
import time
import uuid

import pytest

from ovirt_cinder.storage import errors
from ovirt_cinder.storage import xlease

MiB = 1024 * 1024
SD = "3a3e5e2c-0000-4000-8000-000000000002"
GEOMETRIES = [(512, MiB), (4096, MiB), (4096, 2 * MiB), (4096, 8 * MiB)]


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "xleases"
    p.write_bytes(b"")
    return str(p)


def index_bytes(path, alignment):
    with open(path, "rb") as f:
        f.seek(alignment)
        return f.read()


@pytest.mark.parametrize("block_size,alignment", GEOMETRIES)
def test_format_layout(path, block_size, alignment):
    before = int(time.time())
    xlease.format_index(path, SD, alignment=alignment, block_size=block_size)
    # Slot 0 is a hole; the index fills slot 1 from its start.
    assert os.path.getsize(path) == alignment + xlease.INDEX_SIZE == \
        alignment + 253952
    with open(path, "rb") as f:
        assert not f.read(alignment).strip(b"\0")
    data = index_bytes(path, alignment)
    meta = data[:512]
    assert meta[:4] == bytes.fromhex("12152016")
    assert meta[4:10] == b"\x000001\x00"
    assert meta[10:58] == SD.encode().ljust(48, b"\0")
    assert meta[58:59] == b"\0" and meta[69:70] == b"\0"
    assert before <= int(meta[59:69]) <= time.time() + 1
    assert meta[70:71] == b"-"
    assert meta[71:511] == bytes(440) and meta[511:] == b"\n"
    empty = bytes(49) + b"00000000000\x00--\n"
    assert len(empty) == 64
    assert data[512:] == empty * 3960
    assert xlease.MAX_RECORDS == 3960


@pytest.mark.parametrize("block_size,alignment", GEOMETRIES)
def test_read_back(path, block_size, alignment):
    xlease.format_index(path, SD, alignment=alignment, block_size=block_size)
    index = xlease.read_index(path, alignment=alignment,
                              block_size=block_size)
    assert (index.lockspace, index.version) == (SD, 1)
    assert index.records() == [] and index.leases() == {}


def test_format_writes_the_updating_flag_first(path, monkeypatch):
    writes = []
    real = os.pwrite

    def pwrite(fd, data, offset):
        writes.append((bytes(data[70:71]), len(data), offset))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    xlease.format_index(path, SD, alignment=MiB, block_size=4096)
    assert writes == [(b"u", xlease.INDEX_SIZE, MiB), (b"-", 4096, MiB)]


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(MiB + offset)
        f.write(data)


@pytest.fixture
def formatted(path):
    xlease.format_index(path, SD, alignment=MiB, block_size=512)
    return path


def read(path):
    return xlease.read_index(path, alignment=MiB, block_size=512)


@pytest.mark.parametrize("offset,data,reason", [
    (0, b"\x12\x15\x20\x17", "magic"),
    (5, b"0002", "unsupported version 2"),
    (5, b"00x1", "version"),
    (10, b"\xff", "lockspace"),
    (59, b"12345abcde", "mtime"),
])
def test_invalid_metadata(formatted, offset, data, reason):
    patch(formatted, offset, data)
    with pytest.raises(xlease.InvalidMetadata) as e:
        read(formatted)
    assert reason in str(e.value)
    assert isinstance(e.value, xlease.InvalidIndex)


def test_updating(formatted):
    patch(formatted, 70, b"u")
    with pytest.raises(xlease.IndexIsUpdating):
        read(formatted)


def test_truncated(formatted):
    os.truncate(formatted, MiB + xlease.INDEX_SIZE - 1)
    with pytest.raises(xlease.TruncatedIndex) as e:
        read(formatted)
    assert e.value.available == xlease.INDEX_SIZE - 1
    os.truncate(formatted, 0)
    with pytest.raises(xlease.TruncatedIndex):
        read(formatted)


def test_lockspace_not_compared(formatted):
    # As vdsm: the lockspace is read, not checked against the domain.
    other = str(uuid.uuid4())
    patch(formatted, 10, other.encode())
    assert read(formatted).lockspace == other


def record(name, offset, flag=b"-"):
    return struct.pack("48s x 11s x 3c", name.encode(), b"%011d" % offset,
                       flag, b"-", b"\n")


def test_records(formatted):
    patch(formatted, 512 + 64 * 2, record("vm-lease", 42))
    patch(formatted, 512 + 64 * 5, record("half-made", 0, b"u"))
    index = read(formatted)
    # The offset comes from the record's place, never from its text.
    assert index.records() == [
        xlease.Record(2, "vm-lease", 5 * MiB),
        xlease.Record(5, "half-made", 8 * MiB, updating=True)]
    assert index.leases() == {"vm-lease": 5 * MiB}
    assert xlease.lease_offset(0, 2 * MiB) == 6 * MiB


def test_invalid_record(formatted):
    patch(formatted, 512 + 64 * 7, b"\xffbad")
    index = read(formatted)     # records are checked when read
    with pytest.raises(xlease.InvalidRecord) as e:
        index.records()
    assert e.value.number == 7


def test_bad_arguments(path):
    with pytest.raises(errors.InvalidParameter):
        xlease.format_index(path, SD, alignment=2 * MiB, block_size=512)
    with pytest.raises(errors.InvalidParameter):
        xlease.format_index(path, "x" * 49, alignment=MiB, block_size=512)
    with pytest.raises(errors.InvalidParameter):
        xlease.read_index(path, alignment=3 * MiB, block_size=4096)
