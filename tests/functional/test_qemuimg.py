"""qemuimg against the real qemu-img, on images built in tmp_path."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap

import pytest

from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fileutil
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage.constants import GiB
from ovirt_cinder.storage.constants import KiB
from ovirt_cinder.storage.constants import MiB
from tests import qemuio

FORMATS = ["raw", "qcow2"]

# qemu-img allocates the first block of a new raw image (to probe the
# alignment), so a raw image has this much data even when "empty".
RAW_HEAD = 4 * KiB


def head(fmt: str) -> int:
    return RAW_HEAD if fmt == "raw" else 0


@pytest.fixture(params=FORMATS)
def fmt(request: pytest.FixtureRequest) -> str:
    return request.param


def image(tmp_path, name, fmt, size=4 * MiB, **kw) -> str:
    path = str(tmp_path / name)
    qemuimg.create(path, fmt, size, **kw)
    return path


def chain(tmp_path, base_fmt="qcow2"):
    """base: 0xaa at 0-1M, 0xcc at 3M-4M; top: 0xbb at 1M-2M, 64K zeros
    at 3M (a zero cluster shadowing the base)."""
    base = image(tmp_path, "base", base_fmt)
    qemuio.write_pattern(base, base_fmt, 0, MiB, 0xaa)
    qemuio.write_pattern(base, base_fmt, 3 * MiB, MiB, 0xcc)
    top = image(tmp_path, "top", "qcow2", None, backing=base,
                backing_fmt=base_fmt)
    qemuio.write_pattern(top, "qcow2", MiB, MiB, 0xbb)
    qemuio.write_zeroes(top, "qcow2", 3 * MiB, 64 * KiB)
    return base, top


def verify_chain(path, fmt="qcow2"):
    qemuio.verify_pattern(path, fmt, 0, MiB, 0xaa)
    qemuio.verify_pattern(path, fmt, MiB, MiB, 0xbb)
    qemuio.verify_zero(path, fmt, 2 * MiB, MiB)
    qemuio.verify_zero(path, fmt, 3 * MiB, 64 * KiB)
    qemuio.verify_pattern(path, fmt, 3 * MiB + 64 * KiB, MiB - 64 * KiB,
                          0xcc)


# info


def test_info(tmp_path, fmt):
    path = image(tmp_path, "img", fmt, 3 * MiB)
    info = qemuimg.info(path)
    assert info.filename == path
    assert info.format == fmt
    assert info.virtual_size == 3 * MiB
    assert info.actual_size >= 0
    assert info.backing_filename is None
    assert info.backing_format is None
    assert info.data_file is None
    assert not info.dirty and not info.corrupt
    if fmt == "qcow2":
        assert (info.compat, info.cluster_size) == ("1.1", 64 * KiB)
    else:
        assert (info.compat, info.cluster_size) == (None, None)


def test_info_backing(tmp_path, fmt):
    base, top = chain(tmp_path, fmt)
    info = qemuimg.info(top, "qcow2")
    assert info.backing_filename == base
    assert info.backing_format == fmt
    assert info.virtual_size == 4 * MiB


def test_info_data_file(tmp_path):
    path, data = str(tmp_path / "img"), str(tmp_path / "data")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-o",
                    f"data_file={data}", path, "1M"], check=True,
                   capture_output=True)
    assert qemuimg.info(path, "qcow2").data_file == data


def test_info_missing(tmp_path):
    path = str(tmp_path / "missing")
    with pytest.raises(errors.QemuImgError) as e:
        qemuimg.info(path, "qcow2")
    assert e.value.cmd == "info"
    assert e.value.rc == 1
    assert "No such file" in e.value.err
    assert e.value.argv[:2] == ["qemu-img", "info"]
    assert path in e.value.argv


def test_info_untrusted(tmp_path, fmt):
    path = image(tmp_path, "img", fmt, MiB)
    info = qemuimg.info(path, fmt, untrusted=True)
    assert (info.format, info.virtual_size) == (fmt, MiB)


def test_info_untrusted_never_probes(tmp_path):
    path = image(tmp_path, "img", "qcow2", GiB)
    with pytest.raises(ValueError):
        qemuimg.info(path, untrusted=True)
    info = qemuimg.info(path, "raw", untrusted=True)
    assert info.format == "raw"
    assert info.virtual_size < MiB


def test_info_untrusted_runs_under_limits(tmp_path):
    with pytest.raises(errors.QemuImgError) as e:
        qemuimg.info(str(tmp_path / "missing"), "raw", untrusted=True)
    assert e.value.argv[:4] == ["prlimit", "--cpu=30",
                                f"--as={GiB}", "qemu-img"]


def test_info_untrusted_limit_enforced(tmp_path, monkeypatch):
    path = image(tmp_path, "img", "qcow2", MiB)
    monkeypatch.setattr(qemuimg, "UNTRUSTED_ADDRESS_SPACE", 8 * MiB)
    with pytest.raises(errors.QemuImgError):
        qemuimg.info(path, "qcow2", untrusted=True)


# create


def test_create_bad_format(tmp_path):
    with pytest.raises(errors.QemuImgError) as e:
        qemuimg.create(str(tmp_path / "img"), "bogus", MiB)
    assert (e.value.cmd, e.value.rc) == ("create", 1)
    assert "bogus" in e.value.err


def test_create_backing_needs_format(tmp_path):
    base = image(tmp_path, "base", "raw")
    with pytest.raises(ValueError):
        qemuimg.create(str(tmp_path / "top"), "qcow2", backing=base)


def test_create_bad_preallocation(tmp_path):
    with pytest.raises(ValueError):
        qemuimg.create(str(tmp_path / "img"), "raw", MiB,
                       preallocation="sparse")


def test_create_compat_and_cluster_size(tmp_path):
    path = image(tmp_path, "img", "qcow2", MiB, compat="0.10",
                 cluster_size=128 * KiB)
    info = qemuimg.info(path)
    assert (info.compat, info.cluster_size) == ("0.10", 128 * KiB)


@pytest.mark.parametrize("fmt,prealloc", [("raw", "full"),
                                          ("qcow2", "falloc")])
def test_create_preallocated(tmp_path, fmt, prealloc):
    path = image(tmp_path, "img", fmt, 4 * MiB, preallocation=prealloc)
    assert qemuimg.info(path).actual_size >= 4 * MiB
    qemuio.verify_zero(path, fmt, 0, 4 * MiB)


def test_create_sparse(tmp_path, fmt):
    path = image(tmp_path, "img", fmt, GiB)
    assert qemuimg.info(path).actual_size < MiB
    assert qemuimg.allocated_bytes(path, fmt=fmt) == head(fmt)


def test_create_size_from_backing(tmp_path, fmt):
    base = image(tmp_path, "base", fmt, 3 * MiB)
    top = image(tmp_path, "top", "qcow2", None, backing=base,
                backing_fmt=fmt)
    assert qemuimg.info(top).virtual_size == 3 * MiB


# convert


@pytest.mark.parametrize("dst_fmt", FORMATS)
def test_convert(tmp_path, fmt, dst_fmt):
    src = image(tmp_path, "src", fmt, 16 * MiB)
    qemuio.write_pattern(src, fmt, 2 * MiB, MiB, 0x55)
    dst = str(tmp_path / "dst")
    qemuimg.convert(src, dst, src_fmt=fmt, dst_fmt=dst_fmt)
    assert qemuimg.info(dst, dst_fmt).virtual_size == 16 * MiB
    qemuio.verify_zero(dst, dst_fmt, 0, 2 * MiB)
    qemuio.verify_pattern(dst, dst_fmt, 2 * MiB, MiB, 0x55)
    qemuio.verify_zero(dst, dst_fmt, 3 * MiB, 13 * MiB)
    # Sparse output: only the written MiB is allocated.
    assert qemuimg.allocated_bytes(dst, fmt=dst_fmt) == MiB + head(dst_fmt)


def test_convert_compat(tmp_path):
    src = image(tmp_path, "src", "raw", MiB)
    dst = str(tmp_path / "dst")
    qemuimg.convert(src, dst, src_fmt="raw", dst_fmt="qcow2",
                    compat="0.10")
    assert qemuimg.info(dst).compat == "0.10"


def test_convert_preallocation(tmp_path):
    src = image(tmp_path, "src", "raw", 4 * MiB)
    dst = str(tmp_path / "dst")
    qemuimg.convert(src, dst, src_fmt="raw", dst_fmt="raw",
                    preallocation="falloc")
    assert qemuimg.info(dst).actual_size >= 4 * MiB


@pytest.mark.parametrize("base_fmt", FORMATS)
@pytest.mark.parametrize("create", [True, False])
def test_convert_backing_copies_top_only(tmp_path, base_fmt, create):
    base, top = chain(tmp_path, base_fmt)
    base_copy = str(tmp_path / "base-copy")
    shutil.copyfile(base, base_copy)
    new = str(tmp_path / "new")
    if not create:
        qemuimg.create(new, "qcow2", backing=base_copy,
                       backing_fmt=base_fmt)
    qemuimg.convert(top, new, src_fmt="qcow2", dst_fmt="qcow2",
                    backing=base_copy, backing_fmt=base_fmt, create=create)

    info = qemuimg.info(new)
    assert (info.backing_filename, info.backing_format) == (base_copy,
                                                            base_fmt)
    top_layer = [e for e in qemuimg.map(new, fmt="qcow2") if e.depth == 0]
    # Base-only data (0-1M, 3M+64K-4M) is not in the new top layer.
    assert {(e.start, e.length, e.data) for e in top_layer} == {
        (MiB, MiB, True), (3 * MiB, 64 * KiB, False)}
    assert qemuimg.allocated_bytes(new, fmt="qcow2") == MiB
    verify_chain(new)


def test_convert_backing_needs_qcow2_target(tmp_path):
    base, top = chain(tmp_path)
    with pytest.raises(ValueError):
        qemuimg.convert(top, str(tmp_path / "new"), src_fmt="qcow2",
                        dst_fmt="raw", backing=base, backing_fmt="qcow2")


def test_convert_whole_chain(tmp_path):
    _, top = chain(tmp_path)
    dst = str(tmp_path / "flat")
    qemuimg.convert(top, dst, src_fmt="qcow2", dst_fmt="raw")
    verify_chain(dst, "raw")


def test_convert_existing_target_is_zero(tmp_path, fmt):
    src = image(tmp_path, "src", "qcow2", 4 * MiB)
    qemuio.write_pattern(src, "qcow2", MiB, MiB, 0x77)
    dst = image(tmp_path, "dst", fmt, 4 * MiB)
    qemuimg.convert(src, dst, src_fmt="qcow2", dst_fmt=fmt, create=False,
                    target_is_zero=True)
    qemuio.verify_zero(dst, fmt, 0, MiB)
    qemuio.verify_pattern(dst, fmt, MiB, MiB, 0x77)


def test_convert_existing_target_overwritten(tmp_path, fmt):
    src = image(tmp_path, "src", "qcow2", 4 * MiB)
    dst = image(tmp_path, "dst", fmt, 4 * MiB)
    qemuio.write_pattern(dst, fmt, 0, 4 * MiB, 0x11)
    qemuimg.convert(src, dst, src_fmt="qcow2", dst_fmt=fmt, create=False)
    qemuio.verify_zero(dst, fmt, 0, 4 * MiB)


@pytest.mark.parametrize("kw", [
    {"target_is_zero": True},
    {"create": False, "preallocation": "full"},
    {"preallocation": "bogus"},
    {"backing": "base"},
])
def test_convert_invalid_arguments(tmp_path, kw):
    src = image(tmp_path, "src", "raw", MiB)
    with pytest.raises(ValueError):
        qemuimg.convert(src, str(tmp_path / "dst"), src_fmt="raw",
                        dst_fmt="qcow2", **kw)


def test_convert_copy_offload(tmp_path):
    src = image(tmp_path, "src", "raw", 4 * MiB)
    qemuio.write_pattern(src, "raw", 0, MiB, 0x42)
    dst = str(tmp_path / "dst")
    qemuimg.convert(src, dst, src_fmt="raw", dst_fmt="raw",
                    copy_offload=True)
    qemuio.verify_pattern(dst, "raw", 0, MiB, 0x42)
    qemuio.verify_zero(dst, "raw", MiB, 3 * MiB)


def test_convert_cache_none(tmp_path):
    src = image(tmp_path, "src", "raw", 4 * MiB)
    qemuio.write_pattern(src, "raw", 0, MiB, 0x42)
    dst = str(tmp_path / "dst")
    qemuimg.convert(src, dst, src_fmt="raw", dst_fmt="qcow2", cache="none")
    qemuio.verify_pattern(dst, "qcow2", 0, MiB, 0x42)


def wide_chain(tmp_path, base_fmt):
    """64M: base 0xaa at 0-8M; top 0xbb at 16M-18M and 1M of zeros at
    4M (hiding base data). The view holds 9M of data."""
    base = image(tmp_path, "base", base_fmt, 64 * MiB)
    qemuio.write_pattern(base, base_fmt, 0, 8 * MiB, 0xaa)
    top = image(tmp_path, "top", "qcow2", None, backing=base,
                backing_fmt=base_fmt)
    qemuio.write_pattern(top, "qcow2", 16 * MiB, 2 * MiB, 0xbb)
    qemuio.write_zeroes(top, "qcow2", 4 * MiB, MiB)
    return top


def same_view(a, a_fmt, b, b_fmt):
    """Whether ``qemu-img compare`` finds the two guest views equal."""
    proc = subprocess.run(["qemu-img", "compare", "-f", a_fmt, "-F", b_fmt,
                           a, b], capture_output=True, text=True,
                          check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def caches(tmp_path):
    """Flushing cache modes this filesystem takes."""
    found = ["writeback"]
    if fileutil.supports_direct_io(str(tmp_path)):
        found.append("none")
    return found


@pytest.mark.parametrize("base_fmt", FORMATS)
@pytest.mark.parametrize("dst_fmt", FORMATS)
def test_convert_durable_unordered(tmp_path, base_fmt, dst_fmt):
    """What copies into volumes run: a flushing cache mode and -W; the
    view is copied exactly and the target stays sparse."""
    top = wide_chain(tmp_path, base_fmt)
    for cache in caches(tmp_path):
        dst = str(tmp_path / f"dst-{cache}")
        qemuimg.convert(top, dst, src_fmt="qcow2", dst_fmt=dst_fmt,
                        cache=cache, unordered_writes=True)
        assert same_view(top, "qcow2", dst, dst_fmt)
        qemuio.verify_pattern(dst, dst_fmt, 0, 4 * MiB, 0xaa)
        qemuio.verify_zero(dst, dst_fmt, 4 * MiB, MiB)
        qemuio.verify_pattern(dst, dst_fmt, 5 * MiB, 3 * MiB, 0xaa)
        qemuio.verify_zero(dst, dst_fmt, 8 * MiB, 8 * MiB)
        qemuio.verify_pattern(dst, dst_fmt, 16 * MiB, 2 * MiB, 0xbb)
        qemuio.verify_zero(dst, dst_fmt, 18 * MiB, 46 * MiB)
        assert qemuimg.allocated_bytes(dst, fmt=dst_fmt) == 9 * MiB
        assert fileutil.allocated_bytes(dst) < 16 * MiB


@pytest.mark.parametrize("dst_fmt", FORMATS)
def test_convert_durable_unordered_preallocated(tmp_path, dst_fmt):
    top = wide_chain(tmp_path, "raw")
    for cache in caches(tmp_path):
        dst = str(tmp_path / f"dst-{cache}")
        qemuimg.convert(top, dst, src_fmt="qcow2", dst_fmt=dst_fmt,
                        preallocation="falloc", cache=cache,
                        unordered_writes=True)
        assert same_view(top, "qcow2", dst, dst_fmt)
        # The whole virtual size is allocated, zeros included.
        assert fileutil.allocated_bytes(dst) >= 64 * MiB


@pytest.fixture
def traced_qemu_img(tmp_path, monkeypatch):
    """Run qemu-img under strace; return the file listing its flushes."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    log = tmp_path / "flushes"
    wrapper = tmp_path / "qemu-img"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        exec {strace} -f -qq -e trace=fdatasync,fsync -o {log} \\
            qemu-img "$@"
        """))
    wrapper.chmod(0o755)
    monkeypatch.setattr(qemuimg, "QEMU_IMG", str(wrapper))
    return log


@pytest.mark.parametrize("cache,flushes", [
    (None, False), ("writeback", True), ("none", True)])
def test_convert_flushes_target(tmp_path, traced_qemu_img, cache, flushes):
    """qemu-img's own default (unsafe) never flushes the target."""
    if cache not in (None, *caches(tmp_path)):
        pytest.skip("no O_DIRECT here")
    src = image(tmp_path, "src", "raw", 4 * MiB)
    qemuio.write_pattern(src, "raw", 0, MiB, 0x42)
    qemuimg.convert(src, str(tmp_path / "dst"), src_fmt="raw",
                    dst_fmt="raw", cache=cache, unordered_writes=True)
    calls = traced_qemu_img.read_text()
    assert ("fdatasync(" in calls or "fsync(" in calls) == flushes, calls


def test_supports_direct_io(tmp_path, monkeypatch):
    assert isinstance(fileutil.supports_direct_io(str(tmp_path)), bool)
    assert os.listdir(tmp_path) == []

    def refuse(path, flags, mode=0o777):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    real_open = os.open
    monkeypatch.setattr(os, "open", refuse)
    assert not fileutil.supports_direct_io(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_convert_progress(tmp_path):
    src = image(tmp_path, "src", "raw", 64 * MiB)
    qemuio.write_pattern(src, "raw", 0, 64 * MiB, 0x01)
    values: list[float] = []
    qemuimg.convert(src, str(tmp_path / "dst"), src_fmt="raw",
                    dst_fmt="qcow2", progress=values.append)
    assert len(values) > 2
    assert values == sorted(set(values))
    assert values[-1] == 100.0


def test_convert_progress_error(tmp_path):
    values: list[float] = []
    with pytest.raises(errors.QemuImgError) as e:
        qemuimg.convert(str(tmp_path / "missing"), str(tmp_path / "dst"),
                        src_fmt="raw", dst_fmt="raw", progress=values.append)
    assert (e.value.cmd, e.value.rc) == ("convert", 1)
    assert "No such file" in e.value.err
    assert "-p" in e.value.argv


def test_convert_progress_callback_error(tmp_path):
    src = image(tmp_path, "src", "raw", 64 * MiB)
    qemuio.write_pattern(src, "raw", 0, 64 * MiB, 0x01)

    def fail(value):
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        qemuimg.convert(src, str(tmp_path / "dst"), src_fmt="raw",
                        dst_fmt="raw", progress=fail)
    assert qemu_children() == []


# commit


@pytest.mark.parametrize("drop", [False, True])
def test_commit(tmp_path, fmt, drop):
    base, top = chain(tmp_path, fmt)
    values: list[float] = []
    qemuimg.commit(top, drop=drop, progress=values.append)
    assert values[-1] == 100.0
    verify_chain(base, fmt)
    verify_chain(top)
    top_bytes = qemuimg.allocated_bytes(top, fmt="qcow2")
    assert top_bytes == (0 if drop else MiB)


def test_commit_into_base(tmp_path):
    base, mid = chain(tmp_path)
    top = image(tmp_path, "leaf", "qcow2", None, backing=mid,
                backing_fmt="qcow2")
    qemuio.write_pattern(top, "qcow2", 2 * MiB, 64 * KiB, 0xdd)
    qemuimg.commit(top, base=base)
    qemuio.verify_pattern(base, "qcow2", 2 * MiB, 64 * KiB, 0xdd)
    qemuio.verify_pattern(base, "qcow2", MiB, MiB, 0xbb)
    qemuio.verify_pattern(base, "qcow2", 0, MiB, 0xaa)


def test_commit_without_backing(tmp_path):
    path = image(tmp_path, "img", "qcow2", MiB)
    with pytest.raises(errors.QemuImgError) as e:
        qemuimg.commit(path)
    assert (e.value.cmd, e.value.rc) == ("commit", 1)
    assert e.value.err


# rebase


@pytest.mark.parametrize("backing", [None, ""])
def test_rebase_onto_nothing(tmp_path, fmt, backing):
    base, top = chain(tmp_path, fmt)
    values: list[float] = []
    qemuimg.rebase(top, backing, backing_fmt=None, progress=values.append)
    assert values and values[-1] == 100.0
    assert qemuimg.info(top).backing_filename is None
    os.unlink(base)
    verify_chain(top)


def test_rebase_safe_onto_other(tmp_path):
    base, top = chain(tmp_path)
    other = image(tmp_path, "other", "raw")
    qemuio.write_pattern(other, "raw", 0, 4 * MiB, 0x99)
    qemuimg.rebase(top, other, backing_fmt="raw")
    info = qemuimg.info(top)
    assert (info.backing_filename, info.backing_format) == (other, "raw")
    verify_chain(top)


def test_rebase_unsafe(tmp_path):
    base, top = chain(tmp_path)
    moved = str(tmp_path / "moved")
    os.rename(base, moved)
    qemuimg.rebase(top, moved, backing_fmt="qcow2", unsafe=True)
    assert qemuimg.info(top).backing_filename == moved
    verify_chain(top)


def test_rebase_needs_backing_format(tmp_path):
    _, top = chain(tmp_path)
    with pytest.raises(ValueError):
        qemuimg.rebase(top, "base", backing_fmt=None)


def test_rebase_missing_backing(tmp_path):
    _, top = chain(tmp_path)
    with pytest.raises(errors.QemuImgError) as e:
        qemuimg.rebase(top, str(tmp_path / "missing"), backing_fmt="qcow2")
    assert e.value.cmd == "rebase"


# resize


def test_resize(tmp_path, fmt):
    path = image(tmp_path, "img", fmt, MiB)
    qemuio.write_pattern(path, fmt, 0, MiB, 0x33)
    qemuimg.resize(path, 3 * MiB, fmt=fmt)
    assert qemuimg.info(path).virtual_size == 3 * MiB
    qemuio.verify_pattern(path, fmt, 0, MiB, 0x33)
    qemuio.verify_zero(path, fmt, MiB, 2 * MiB)


def test_resize_preallocation(tmp_path):
    path = image(tmp_path, "img", "raw", MiB)
    qemuimg.resize(path, 8 * MiB, fmt="raw", preallocation="falloc")
    assert qemuimg.info(path).actual_size >= 7 * MiB


def test_resize_shrink(tmp_path, fmt):
    path = image(tmp_path, "img", fmt, 2 * MiB)
    with pytest.raises(errors.QemuImgError) as e:
        qemuimg.resize(path, MiB, fmt=fmt)
    assert (e.value.cmd, e.value.rc) == ("resize", 1)
    assert "shrink" in e.value.err
    qemuimg.resize(path, MiB, fmt=fmt, shrink=True)
    assert qemuimg.info(path).virtual_size == MiB


# measure


@pytest.mark.parametrize("out_fmt", FORMATS)
def test_measure(tmp_path, fmt, out_fmt):
    path = image(tmp_path, "img", fmt, 16 * MiB)
    qemuio.write_pattern(path, fmt, 0, 2 * MiB, 0x21)
    m = qemuimg.measure(path, fmt=fmt, out_fmt=out_fmt)
    assert m.fully_allocated >= 16 * MiB
    if out_fmt == "raw":
        assert m.required == 16 * MiB
    else:
        assert 2 * MiB < m.required < 3 * MiB


def test_measure_missing(tmp_path):
    with pytest.raises(errors.QemuImgError) as e:
        qemuimg.measure(str(tmp_path / "x"), fmt="raw", out_fmt="qcow2")
    assert e.value.cmd == "measure"


# check


def refcount_block(path):
    with open(path, "rb") as f:
        (table,) = struct.unpack(">Q", f.read(56)[48:56])
        f.seek(table)
        (block,) = struct.unpack(">Q", f.read(8))
    return block


def set_refcount(path, cluster, value):
    with open(path, "r+b") as f:
        f.seek(refcount_block(path) + 2 * cluster)
        f.write(struct.pack(">H", value))


def test_check_clean(tmp_path):
    path = image(tmp_path, "img", "qcow2", MiB)
    qemuio.write_pattern(path, "qcow2", 0, MiB, 0x1)
    result = qemuimg.check(path)
    assert result.ok
    assert result.image_end_offset > MiB


def test_check_raw_not_supported(tmp_path):
    path = image(tmp_path, "img", "raw", MiB)
    assert qemuimg.check(path, fmt="raw") == qemuimg.CheckResult(
        0, 0, 0, None)


def test_check_leaks(tmp_path):
    path = image(tmp_path, "img", "qcow2", MiB)
    cluster = -(-os.path.getsize(path) // (64 * KiB))
    os.truncate(path, (cluster + 1) * 64 * KiB)
    set_refcount(path, cluster, 1)
    result = qemuimg.check(path)
    assert (result.leaks, result.corruptions) == (1, 0)
    assert not result.ok


def test_check_corruptions(tmp_path):
    path = image(tmp_path, "img", "qcow2", MiB)
    set_refcount(path, 0, 0)
    result = qemuimg.check(path)
    assert result.corruptions == 1
    assert not result.ok


def test_check_missing(tmp_path):
    with pytest.raises(errors.QemuImgError) as e:
        qemuimg.check(str(tmp_path / "missing"))
    assert (e.value.cmd, e.value.rc) == ("check", 1)


# map


def test_map(tmp_path, fmt):
    path = image(tmp_path, "img", fmt, 4 * MiB)
    qemuio.write_pattern(path, fmt, MiB, MiB, 0x5)
    extents = qemuimg.map(path, fmt=fmt)
    assert sum(e.length for e in extents) == 4 * MiB
    data = [(e.start, e.length) for e in extents if e.data]
    assert data[-1] == (MiB, MiB)
    assert all(e.depth == 0 for e in extents)
    assert qemuimg.allocated_bytes(path, fmt=fmt) == MiB + head(fmt)


def test_map_chain(tmp_path, fmt):
    _, top = chain(tmp_path, fmt)
    extents = qemuimg.map(top, fmt="qcow2")
    assert qemuimg.Extent(MiB, MiB, True, False, 0) in extents
    assert qemuimg.Extent(0, MiB, True, False, 1) in extents
    assert qemuimg.allocated_bytes(top, fmt="qcow2") == MiB


def test_map_missing(tmp_path):
    with pytest.raises(errors.QemuImgError) as e:
        qemuimg.map(str(tmp_path / "missing"), fmt="raw")
    assert e.value.cmd == "map"


class ChunkedStream:
    """A pipe that returns the given chunks, one per read."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    def read1(self, size: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def test_progress_update_split_between_reads():
    values: list[float] = []
    stream = ChunkedStream(b"    (0.00/100%)\r    (12.",
                           b"50/100%)\r    (100.00/100%)\r",
                           b"    (100.00/100%)\r\nImage committed.\n")
    out = qemuimg._stream_progress(stream.read1, values.append)
    assert values == [0.0, 12.5, 100.0]
    assert out.endswith(b"Image committed.\n")


# timeouts


def qemu_children():
    """Children of this process (zombies too) running qemu-img."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == os.getpid() and comm in ("qemu-img", "prlimit"):
            found.append(int(name))
    return found


def assert_killed(e, cmd, timeout, stalled):
    assert isinstance(e, errors.QemuImgError)
    assert (e.cmd, e.timeout, e.stalled) == (cmd, timeout, stalled)
    assert e.rc == -signal.SIGKILL      # killed, and reaped
    assert e.argv[e.argv.index("qemu-img") + 1] == cmd
    assert e.reason and e.err
    assert str(e).startswith(f"qemu-img {cmd} timed out after {timeout}")
    assert e.pid not in qemu_children()
    assert not os.path.exists(f"/proc/{e.pid}")


@pytest.fixture
def fifo(tmp_path):
    """A named pipe: qemu-img blocks opening it, as on a dead mount."""
    path = str(tmp_path / "fifo")
    os.mkfifo(path)
    return path


@pytest.fixture
def timeouts():
    saved = qemuimg.QUICK_TIMEOUT, qemuimg.STALL_TIMEOUT
    yield
    qemuimg.set_timeouts(*saved)


@pytest.mark.parametrize("untrusted", [False, True])
def test_quick_timeout(fifo, untrusted):
    with pytest.raises(errors.QemuImgTimeout) as e:
        qemuimg.info(fifo, "raw", untrusted=untrusted, timeout=0.5)
    assert_killed(e.value, "info", 0.5, stalled=False)
    assert "killed" in e.value.reason
    if untrusted:
        assert e.value.argv[0] == "prlimit"


@pytest.mark.parametrize("call", [
    lambda top, fifo: qemuimg.create(top + ".new", "qcow2", MiB,
                                     backing=fifo, backing_fmt="raw",
                                     timeout=0.5),
    lambda top, fifo: qemuimg.resize(top, 2 * MiB, fmt="qcow2",
                                     timeout=0.5),
    lambda top, fifo: qemuimg.check(top, timeout=0.5),
    lambda top, fifo: qemuimg.measure(fifo, fmt="raw", out_fmt="qcow2",
                                      timeout=0.5),
    lambda top, fifo: qemuimg.map(top, fmt="qcow2", timeout=0.5),
    lambda top, fifo: qemuimg.allocated_bytes(fifo, fmt="raw",
                                              timeout=0.5),
], ids=["create", "resize", "check", "measure", "map", "allocated_bytes"])
def test_quick_timeout_every_command(tmp_path, fifo, call):
    # Opening the FIFO, or a qcow2 over it, blocks.
    top = str(tmp_path / "top")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-u", "-b", fifo,
                    "-F", "raw", top, "1M"], check=True, capture_output=True)
    with pytest.raises(errors.QemuImgTimeout) as e:
        call(top, fifo)
    assert_killed(e.value, e.value.cmd, 0.5, stalled=False)


def test_quick_timeout_unsafe_rebase(tmp_path):
    values: list[float] = []
    with pytest.raises(errors.QemuImgTimeout) as e:
        # Reading the image's header hangs.
        qemuimg.rebase(hanging_image(MiB), "base", backing_fmt="raw",
                       unsafe=True, progress=values.append, timeout=0.5)
    assert_killed(e.value, "rebase", 0.5, stalled=False)
    assert "-u" in e.value.argv


def test_set_timeouts(fifo, timeouts):
    qemuimg.set_timeouts(0.5, 30)
    assert (qemuimg.QUICK_TIMEOUT, qemuimg.STALL_TIMEOUT) == (0.5, 30.0)
    with pytest.raises(errors.QemuImgTimeout) as e:
        qemuimg.info(fifo, "raw")
    assert_killed(e.value, "info", 0.5, stalled=False)


@pytest.mark.parametrize("quick,stall", [
    (0, 1), (1, 0), (-1, 1), (float("inf"), 1), (1, float("nan")),
    (True, 1), ("1", 1), (None, 1)])
def test_set_timeouts_invalid(timeouts, quick, stall):
    with pytest.raises(ValueError):
        qemuimg.set_timeouts(quick, stall)
    assert (qemuimg.QUICK_TIMEOUT, qemuimg.STALL_TIMEOUT) == (120.0, 600.0)


def test_invalid_timeout_argument(tmp_path):
    path = image(tmp_path, "img", "raw", MiB)
    with pytest.raises(ValueError):
        qemuimg.info(path, timeout=0)
    with pytest.raises(ValueError):
        qemuimg.convert(path, str(tmp_path / "dst"), src_fmt="raw",
                        dst_fmt="raw", stall_timeout=-1)
    assert qemu_children() == []


def test_within_timeouts(tmp_path):
    src = image(tmp_path, "src", "raw", 4 * MiB, timeout=60)
    qemuio.write_pattern(src, "raw", 0, MiB, 0x42)
    assert qemuimg.info(src, "raw", timeout=60).virtual_size == 4 * MiB
    dst = str(tmp_path / "dst")
    qemuimg.convert(src, dst, src_fmt="raw", dst_fmt="qcow2",
                    stall_timeout=60)
    qemuio.verify_pattern(dst, "qcow2", 0, MiB, 0x42)
    assert qemuimg.check(dst, timeout=60).ok
    assert qemuimg.allocated_bytes(dst, fmt="qcow2", timeout=60) == MiB


def hanging_image(size):
    """An image name whose every read and write waits an hour."""
    node = {"driver": "null-co", "size": size,
            "latency-ns": 3600 * 10**9}
    return "json:" + json.dumps({"file": node})


def stalling_top(tmp_path, size=64 * MiB):
    """A qcow2 whose first half copies at once; the rest hangs."""
    top = str(tmp_path / "top")
    qemuimg.create(top, "qcow2", size, backing=hanging_image(size),
                   backing_fmt="raw")
    qemuio.write_pattern(top, "qcow2", 0, size // 2, 0x17)
    return top


@pytest.mark.parametrize("report", [True, False])
def test_stalled_convert(tmp_path, report):
    top = stalling_top(tmp_path)
    values: list[float] = []
    with pytest.raises(errors.QemuImgTimeout) as e:
        qemuimg.convert(top, str(tmp_path / "dst"), src_fmt="qcow2",
                        dst_fmt="raw", stall_timeout=1,
                        progress=values.append if report else None)
    assert_killed(e.value, "convert", 1.0, stalled=True)
    assert "-p" in e.value.argv
    assert "no progress" in e.value.reason
    if report:
        # It did copy the top before it stalled reading the backing.
        assert 0 < values[-1] < 100
        assert f"{values[-1]}%" in e.value.reason


def test_stalled_commit(tmp_path):
    top = stalling_top(tmp_path)
    with pytest.raises(errors.QemuImgTimeout) as e:
        qemuimg.commit(top, stall_timeout=1)
    assert_killed(e.value, "commit", 1.0, stalled=True)


def test_stalled_safe_rebase(tmp_path):
    top = stalling_top(tmp_path)
    with pytest.raises(errors.QemuImgTimeout) as e:
        qemuimg.rebase(top, None, backing_fmt=None, stall_timeout=1)
    assert_killed(e.value, "rebase", 1.0, stalled=True)
    assert "-u" not in e.value.argv


def test_stall_timeout_default(tmp_path, timeouts):
    top = stalling_top(tmp_path)
    qemuimg.set_timeouts(120, 1)
    with pytest.raises(errors.QemuImgTimeout) as e:
        qemuimg.convert(top, str(tmp_path / "dst"), src_fmt="qcow2",
                        dst_fmt="qcow2")
    assert_killed(e.value, "convert", 1.0, stalled=True)


def test_io_counters():
    counters = qemuimg._io_counters(os.getpid())
    assert counters is not None and len(counters) == 4
    assert all(isinstance(c, int) for c in counters)
    assert qemuimg._io_counters(2**22 + 1) is None


EVENTLET_SCRIPT = textwrap.dedent("""
    import eventlet
    eventlet.monkey_patch()
    import json, sys
    from ovirt_cinder.storage import errors, qemuimg

    src, dst, fifo, top = sys.argv[1:5]
    result = {"progress": [], "ticks": 0}

    def ticker():
        while True:
            result["ticks"] += 1
            eventlet.sleep(0.05)

    eventlet.spawn(ticker)
    qemuimg.convert(src, dst, src_fmt="raw", dst_fmt="qcow2",
                    progress=result["progress"].append)
    for name, call in [
            ("quick", lambda: qemuimg.info(fifo, "raw", timeout=0.5)),
            ("stall", lambda: qemuimg.convert(
                top, dst + ".2", src_fmt="qcow2", dst_fmt="raw",
                stall_timeout=1))]:
        ticks = result["ticks"]
        try:
            call()
        except errors.QemuImgTimeout as e:
            result[name] = [e.cmd, e.rc, e.stalled]
        # Other green threads ran while we waited.
        result[name + "_ticks"] = result["ticks"] - ticks
    json.dump(result, sys.stdout)
""")


def test_under_eventlet(tmp_path, fifo):
    """cinder-volume monkey-patches: waiting must stay green."""
    src = image(tmp_path, "src", "raw", 64 * MiB)
    qemuio.write_pattern(src, "raw", 0, 64 * MiB, 0x01)
    top = stalling_top(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", EVENTLET_SCRIPT, src, str(tmp_path / "dst"),
         fifo, top], capture_output=True, text=True, timeout=120,
        check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["progress"][-1] == 100.0
    assert result["progress"] == sorted(set(result["progress"]))
    assert result["quick"] == ["info", -signal.SIGKILL, False]
    assert result["stall"] == ["convert", -signal.SIGKILL, True]
    assert result["quick_ticks"] > 0 and result["stall_ticks"] > 0
    qemuio.verify_pattern(str(tmp_path / "dst"), "qcow2", 0, 64 * MiB,
                          0x01)
