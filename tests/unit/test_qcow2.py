"""qcow2 header parsing, against what qemu-img reports on real images."""

from __future__ import annotations

import json
import os
import struct
import subprocess

import pytest

from ovirt_cinder.storage import errors
from ovirt_cinder.storage import qcow2

KiB = 1024
MiB = 1024 * KiB


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True,
                          capture_output=True, text=True).stdout


def create(path, size="1M", *options, backing=None, backing_fmt=None,
           unsafe=False):
    args = ["create", "-f", "qcow2"]
    if options:
        args += ["-o", ",".join(options)]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt]
    if unsafe:
        args.append("-u")
    qemu_img(*args, str(path), size)
    return str(path)


def info(path):
    return json.loads(qemu_img("info", "--output", "json", "-U", "-f",
                               "qcow2", str(path)))


def assert_like_qemu(header, path):
    """Every field qemu-img info also reports agrees with it."""
    data = info(path)
    specific = data["format-specific"]["data"]
    assert header.version == {"0.10": 2, "1.1": 3}[specific["compat"]]
    assert header.virtual_size == data["virtual-size"]
    assert header.cluster_size == data["cluster-size"]
    assert header.backing_file == data.get("backing-filename")
    assert header.backing_format == data.get("backing-filename-format")
    assert header.has_data_file == ("data-file" in specific)
    assert header.data_file == specific.get("data-file")
    assert bool(header.incompatible_features & 1) == data["dirty-flag"]
    assert bool(header.incompatible_features & 2) == specific.get(
        "corrupt", False)
    extended_l2 = specific.get("extended-l2", False)
    assert bool(header.incompatible_features & 16) == extended_l2
    zstd = specific.get("compression-type", "zlib") == "zstd"
    assert bool(header.incompatible_features & 8) == zstd


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def field(path, offset, fmt):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


# Real images


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster_size", ["512", "65536", "2M"])
def test_plain(tmp_path, compat, cluster_size):
    path = create(tmp_path / "img", "3G", f"compat={compat}",
                  f"cluster_size={cluster_size}")
    header = qcow2.read_header(path)
    assert header.version == (2 if compat == "0.10" else 3)
    assert header.virtual_size == 3 * 1024 * MiB
    assert header.backing_file is None and header.backing_format is None
    assert not header.has_data_file
    assert header.incompatible_features == 0
    assert_like_qemu(header, path)
    assert qcow2.is_qcow2(path)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("backing_fmt", ["raw", "qcow2"])
def test_backing(tmp_path, compat, backing_fmt):
    base = str(tmp_path / "base")
    qemu_img("create", "-f", backing_fmt, base, "2M")
    top = create(tmp_path / "top", "2M", f"compat={compat}",
                 backing="base", backing_fmt=backing_fmt)
    header = qcow2.read_header(top)
    assert (header.backing_file, header.backing_format) == ("base",
                                                            backing_fmt)
    assert_like_qemu(header, top)


def test_backing_absolute(tmp_path):
    base = create(tmp_path / "base")
    top = create(tmp_path / "top", backing=base, backing_fmt="qcow2")
    assert qcow2.read_header(top).backing_file == base


def test_rebase_unsafe(tmp_path):
    top = create(tmp_path / "top", backing="base", backing_fmt="qcow2",
                 unsafe=True)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "/etc/hostname", "-F",
             "raw", top)
    header = qcow2.read_header(top)
    assert (header.backing_file, header.backing_format) == (
        "/etc/hostname", "raw")
    assert_like_qemu(header, top)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "", top)
    header = qcow2.read_header(top)
    assert (header.backing_file, header.backing_format) == (None, None)
    assert_like_qemu(header, top)


def test_longest_backing_name(tmp_path):
    name = "b" * 255 + "/" + "c" * 255 + "/" + "d" * 255 + "/" + "e" * 255
    assert len(name) == 1023
    top = create(tmp_path / "top", backing=name, backing_fmt="raw",
                 unsafe=True)
    header = qcow2.read_header(top)
    assert header.backing_file == name
    assert_like_qemu(header, top)


def test_backing_format_missing(tmp_path):
    top = create(tmp_path / "top", backing="base", backing_fmt="raw",
                 unsafe=True)
    # Rename the backing format extension to an unknown type: qemu keeps
    # it as unknown, and the image has a backing file with no format.
    with open(top, "rb") as f:
        head = f.read(4096)
    offset = head.index(struct.pack(">I", qcow2.EXT_BACKING_FORMAT), 104)
    patch(top, offset, struct.pack(">I", 0x12345678))
    header = qcow2.read_header(top)
    assert (header.backing_file, header.backing_format) == ("base", None)
    assert_like_qemu(header, top)


@pytest.mark.parametrize("raw", [False, True])
def test_data_file(tmp_path, raw):
    data = str(tmp_path / "data")
    options = [f"data_file={data}"] + (["data_file_raw=on"] if raw else [])
    path = create(tmp_path / "img", "1M", *options)
    header = qcow2.read_header(path)
    assert header.has_data_file
    assert header.data_file == data
    assert header.incompatible_features & qcow2.INCOMPAT_DATA_FILE
    assert_like_qemu(header, path)


def test_data_file_bit_without_extension(tmp_path):
    path = create(tmp_path / "img")
    patch(path, 72, struct.pack(">Q", qcow2.INCOMPAT_DATA_FILE))
    header = qcow2.read_header(path)
    assert header.has_data_file and header.data_file is None


def test_incompatible_features(tmp_path):
    path = create(tmp_path / "img", "1M", "extended_l2=on",
                  "compression_type=zstd", "lazy_refcounts=on")
    header = qcow2.read_header(path)
    assert header.incompatible_features == 8 | 16
    assert_like_qemu(header, path)


def test_dirty_flag(tmp_path):
    path = create(tmp_path / "img", "1M", "lazy_refcounts=on")
    patch(path, 72, struct.pack(">Q", qcow2.INCOMPAT_DIRTY))
    header = qcow2.read_header(path)
    assert header.incompatible_features == qcow2.INCOMPAT_DIRTY
    assert_like_qemu(header, path)


def test_one_small_read(tmp_path, monkeypatch):
    top = create(tmp_path / "top", backing="base", backing_fmt="qcow2",
                 unsafe=True)
    reads = []
    pread = os.pread

    def counting(fd, n, offset):
        reads.append((n, offset))
        return pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting)
    qcow2.read_header(top)
    assert reads == [(qcow2.INITIAL_READ, 0)]


def test_backing_name_past_first_read(tmp_path):
    """A backing file name beyond the first read, in the first cluster."""
    top = create(tmp_path / "top", backing="base", backing_fmt="raw",
                 unsafe=True)
    name = b"x" * 100 + b"/base"
    patch(top, 40000, name)
    patch(top, 8, struct.pack(">QI", 40000, len(name)))
    header = qcow2.read_header(top)
    assert header.backing_file == name.decode()
    assert header.backing_format == "raw"
    assert_like_qemu(header, top)


def test_extensions_past_first_read(tmp_path):
    """A long header pushes the extensions beyond the first read."""
    top = create(tmp_path / "top", backing="base", backing_fmt="raw",
                 unsafe=True)
    offset = field(top, 8, ">Q")
    size = field(top, 16, ">I")
    with open(top, "rb") as f:
        head = f.read(offset + size)
    header_length = field(top, 100, ">I")
    exts = head[header_length:offset]
    new_length = 8192
    patch(top, header_length, b"\0" * (new_length - header_length))
    patch(top, new_length, exts + b"base")
    patch(top, 100, struct.pack(">I", new_length))
    patch(top, 8, struct.pack(">Q", new_length + len(exts)))
    header = qcow2.read_header(top)
    assert (header.backing_file, header.backing_format) == ("base", "raw")
    assert_like_qemu(header, top)


# Not qcow2, damaged, truncated


def write(path, data):
    path.write_bytes(data)
    return str(path)


def test_raw_file(tmp_path):
    path = str(tmp_path / "raw")
    qemu_img("create", "-f", "raw", path, "1M")
    assert not qcow2.is_qcow2(path)
    with pytest.raises(errors.NotQcow2) as e:
        qcow2.read_header(path)
    assert e.value.path == path
    assert "magic" in e.value.reason


@pytest.mark.parametrize("data", [b"", b"QFI", b"QFI\xfa" + b"\0" * 200,
                                  os.urandom(4096)], ids=[
    "empty", "short-magic", "bad-magic", "random"])
def test_garbage(tmp_path, data):
    path = write(tmp_path / "img", data)
    assert not qcow2.is_qcow2(path)
    with pytest.raises(errors.NotQcow2):
        qcow2.read_header(path)


@pytest.mark.parametrize("length", [4, 50, 71, 72, 103])
def test_truncated_fixed_header(tmp_path, length):
    head = open(create(tmp_path / "img"), "rb").read(length)
    path = write(tmp_path / "truncated", head)
    assert qcow2.is_qcow2(path)
    with pytest.raises(errors.Qcow2HeaderError) as e:
        qcow2.read_header(path)
    assert not isinstance(e.value, errors.NotQcow2)
    assert "truncated" in e.value.reason


def test_truncated_extensions(tmp_path):
    img = create(tmp_path / "img", backing="base", backing_fmt="raw",
                 unsafe=True)
    header_length = field(img, 100, ">I")
    for length in (header_length, header_length + 6, header_length + 12):
        head = open(img, "rb").read(length)
        path = write(tmp_path / f"cut-{length}", head)
        with pytest.raises(errors.Qcow2HeaderError, match="truncated"):
            qcow2.read_header(path)


def test_truncated_backing_name(tmp_path):
    img = create(tmp_path / "img", backing="base-volume", backing_fmt="raw",
                 unsafe=True)
    offset = field(img, 8, ">Q")
    head = open(img, "rb").read(offset + 4)
    path = write(tmp_path / "cut", head)
    with pytest.raises(errors.Qcow2HeaderError, match="truncated"):
        qcow2.read_header(path)


@pytest.mark.parametrize("offset,value,reason", [
    (4, struct.pack(">I", 1), "version 1"),
    (4, struct.pack(">I", 4), "version 4"),
    (20, struct.pack(">I", 8), "cluster_bits 8"),
    (20, struct.pack(">I", 22), "cluster_bits 22"),
    (100, struct.pack(">I", 96), "header_length 96"),
    (100, struct.pack(">I", 131072), "header_length 131072"),
    (8, struct.pack(">QI", 512, 1024), "1024 bytes"),
    (8, struct.pack(">QI", 65530, 10), "outside the first cluster"),
    (8, struct.pack(">QI", 16, 4), "outside the first cluster"),
])
def test_invalid_header(tmp_path, offset, value, reason):
    path = create(tmp_path / "img")
    patch(path, offset, value)
    with pytest.raises(errors.Qcow2HeaderError) as e:
        qcow2.read_header(path)
    assert reason in e.value.reason
    assert str(e.value).startswith(f"Invalid qcow2 header in {path}: ")


def test_extension_overflow(tmp_path):
    path = create(tmp_path / "img", backing="base", backing_fmt="raw",
                  unsafe=True)
    header_length = field(path, 100, ">I")
    patch(path, header_length + 4, struct.pack(">I", 60000))
    with pytest.raises(errors.Qcow2HeaderError, match="overflows"):
        qcow2.read_header(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        qcow2.read_header(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        qcow2.is_qcow2(str(tmp_path / "missing"))


def test_fifo_does_not_block(tmp_path):
    path = str(tmp_path / "fifo")
    os.mkfifo(path)
    for call in (qcow2.read_header, qcow2.is_qcow2):
        with pytest.raises(errors.Qcow2HeaderError, match="regular file"):
            call(path)


def test_directory(tmp_path):
    with pytest.raises(errors.Qcow2HeaderError, match="regular file"):
        qcow2.read_header(str(tmp_path))
