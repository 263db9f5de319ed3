"""inspect_untrusted on real images made with qemu-img or by hand."""

from __future__ import annotations

import struct
import subprocess

import pytest

from ovirt_cinder.storage import errors
from ovirt_cinder.storage import inspect
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage.constants import GiB
from ovirt_cinder.storage.constants import KiB
from ovirt_cinder.storage.constants import MiB
from ovirt_cinder.storage.inspect import InspectedImage
from ovirt_cinder.storage.inspect import inspect_untrusted
from ovirt_cinder.storage.inspect import qemu_format
from tests import damaged
from tests import qemuio

ISO_BLOCK = 2048


def qemu_img_create(path, fmt, size, *options):
    argv = ["qemu-img", "create", "-f", fmt]
    for option in options:
        argv += ["-o", option]
    subprocess.run([*argv, str(path), str(size)], check=True,
                   capture_output=True)
    return str(path)


def raw_file(tmp_path, data=b"\x5a" * (64 * KiB), size=MiB):
    path = tmp_path / "raw"
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    return str(path)


def iso_file(tmp_path, blocks=32, size=64 * KiB, mbr=False):
    """An ISO 9660 primary volume descriptor of ``blocks`` 2K blocks."""
    pvd = bytearray(ISO_BLOCK)
    pvd[0:7] = b"\x01CD001\x01"
    pvd[80:88] = struct.pack("<I", blocks) + struct.pack(">I", blocks)
    pvd[128:132] = (struct.pack("<H", ISO_BLOCK)
                    + struct.pack(">H", ISO_BLOCK))
    path = tmp_path / "iso"
    with open(path, "wb") as f:
        if mbr:
            f.write(mbr_sector())
        f.seek(16 * ISO_BLOCK)
        f.write(pvd)
        f.truncate(size)
    return str(path)


def mbr_sector():
    """A legacy MBR with one Linux partition at LBA 2048."""
    sector = bytearray(512)
    sector[446:462] = struct.pack("<B3BB3BII", 0, 0, 0, 0, 0x83,
                                  0, 0, 0, 2048, 4096)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def test_raw(tmp_path):
    path = raw_file(tmp_path)
    image = inspect_untrusted(path, declared_format="raw")
    assert image == InspectedImage(path=path, format="raw",
                                   virtual_size=MiB,
                                   actual_size=image.actual_size)
    assert 64 * KiB <= image.actual_size < MiB


def test_raw_with_partition_table(tmp_path):
    path = raw_file(tmp_path, mbr_sector())
    image = inspect_untrusted(path, declared_format="raw")
    assert (image.format, image.virtual_size) == ("raw", MiB)


def test_qcow2(tmp_path):
    path = qemu_img_create(tmp_path / "img", "qcow2", 3 * MiB)
    qemuio.write_pattern(path, "qcow2", 0, MiB, 0x17)
    image = inspect_untrusted(path, declared_format="qcow2",
                              max_virtual_size=3 * MiB,
                              allowed_formats={"raw", "qcow2"})
    assert (image.format, image.virtual_size) == ("qcow2", 3 * MiB)
    assert image.actual_size > MiB


def test_qcow2_backing_file(tmp_path):
    base = qemu_img_create(tmp_path / "base", "raw", MiB)
    path = qemu_img_create(tmp_path / "img", "qcow2", MiB,
                           f"backing_file={base},backing_fmt=raw")
    with pytest.raises(errors.UnsafeImage) as e:
        inspect_untrusted(path, declared_format="qcow2")
    assert e.value.path == path
    assert "backing" in e.value.reason


def test_qcow2_data_file(tmp_path):
    data = tmp_path / "data"
    path = qemu_img_create(tmp_path / "img", "qcow2", MiB,
                           f"data_file={data}")
    with pytest.raises(errors.UnsafeImage) as e:
        inspect_untrusted(path)
    assert "data_file" in e.value.reason


def test_declared_raw_is_qcow2(tmp_path):
    path = qemu_img_create(tmp_path / "img", "qcow2", MiB)
    with pytest.raises(errors.FormatMismatch) as e:
        inspect_untrusted(path, declared_format="raw")
    assert (e.value.declared, e.value.actual) == ("raw", "qcow2")


def test_declared_qcow2_is_raw(tmp_path):
    path = raw_file(tmp_path)
    with pytest.raises(errors.FormatMismatch) as e:
        inspect_untrusted(path, declared_format="qcow2")
    assert (e.value.declared, e.value.actual) == ("qcow2", "raw")


@pytest.mark.parametrize("declared", ["raw", "iso", "ami", "RAW"])
def test_declared_raw_aliases(tmp_path, declared):
    path = raw_file(tmp_path)
    assert inspect_untrusted(path, declared_format=declared).format == "raw"


def test_too_large(tmp_path):
    path = qemu_img_create(tmp_path / "img", "qcow2", 10 * GiB)
    with pytest.raises(errors.ImageTooLarge) as e:
        inspect_untrusted(path, max_virtual_size=GiB)
    assert (e.value.size, e.value.limit) == (10 * GiB, GiB)


def test_raw_too_large(tmp_path):
    path = raw_file(tmp_path)
    assert inspect_untrusted(path, max_virtual_size=MiB).virtual_size == MiB
    with pytest.raises(errors.ImageTooLarge):
        inspect_untrusted(path, max_virtual_size=MiB - 1)


def test_truncated_qcow2_header(tmp_path):
    good = qemu_img_create(tmp_path / "good", "qcow2", MiB)
    with open(good, "rb") as f:
        header = f.read(100)
    path = raw_file(tmp_path, header, size=100)
    with pytest.raises(errors.UnsafeImage) as e:
        inspect_untrusted(path)
    assert "qcow2" in e.value.reason


def test_garbage_qcow2_header(tmp_path):
    path = qemu_img_create(tmp_path / "img", "qcow2", MiB)
    with open(path, "r+b") as f:
        f.seek(20)  # cluster_bits
        f.write(struct.pack(">I", 99))
    with pytest.raises(errors.UnsafeImage) as e:
        inspect_untrusted(path, declared_format="qcow2")
    assert "qemu-img info failed" in e.value.reason
    assert isinstance(e.value.__cause__, errors.QemuImgError)


def test_qcow2_unknown_incompatible_feature(tmp_path):
    path = qemu_img_create(tmp_path / "img", "qcow2", MiB)
    with open(path, "r+b") as f:
        f.seek(72)  # incompatible_features
        f.write(struct.pack(">Q", 1 << 40))
    with pytest.raises(errors.UnsafeImage) as e:
        inspect_untrusted(path)
    assert "unknown_features" in e.value.reason


def test_hidden_second_header(tmp_path):
    path = qemu_img_create(tmp_path / "img", "qcow2", MiB)
    with open(path, "r+b") as f:
        f.seek(16 * ISO_BLOCK)
        f.write(b"\x01CD001\x01")
    with pytest.raises(errors.UnsafeImage) as e:
        inspect_untrusted(path)
    assert "iso,qcow2" in e.value.reason


def test_not_allowed(tmp_path):
    path = qemu_img_create(tmp_path / "img", "qcow2", MiB)
    with pytest.raises(errors.UnsafeImage) as e:
        inspect_untrusted(path, allowed_formats={"raw"})
    assert "not allowed" in e.value.reason


def test_iso(tmp_path):
    path = iso_file(tmp_path)
    image = inspect_untrusted(path, declared_format="iso",
                              allowed_formats={"iso"})
    assert (image.format, image.virtual_size) == ("iso", 64 * KiB)


def test_iso_declared_and_allowed_as_raw(tmp_path):
    path = iso_file(tmp_path)
    image = inspect_untrusted(path, declared_format="raw",
                              allowed_formats={"raw"})
    assert image.format == "iso"


def test_hybrid_iso(tmp_path):
    path = iso_file(tmp_path, mbr=True)
    assert inspect_untrusted(path).format == "iso"


def test_iso_volume_larger_than_file(tmp_path):
    path = iso_file(tmp_path, blocks=1024)
    with pytest.raises(errors.ImageTooLarge) as e:
        inspect_untrusted(path, max_virtual_size=MiB)
    assert e.value.size == 1024 * ISO_BLOCK


def test_vmdk(tmp_path):
    path = qemu_img_create(tmp_path / "img.vmdk", "vmdk", MiB)
    image = inspect_untrusted(path, declared_format="vmdk")
    assert (image.format, image.virtual_size) == ("vmdk", MiB)


def test_vmdk_extent_outside(tmp_path):
    path = qemu_img_create(tmp_path / "img.vmdk", "vmdk", MiB)
    with open(path, "r+b") as f:
        data = f.read(4096)
        offset = data.index(b'"img.vmdk"')
        f.seek(offset)
        f.write(b'"/dev/sda"')
    with pytest.raises(errors.UnsafeImage) as e:
        inspect_untrusted(path)
    assert "vmdk" in e.value.reason


def test_vhd(tmp_path):
    path = qemu_img_create(tmp_path / "img", "vpc", MiB)
    image = inspect_untrusted(path, declared_format="vhd")
    assert image.format == "vhd"
    assert image.virtual_size == qemuimg.info(path, "vpc").virtual_size


def test_qed_banned(tmp_path):
    path = qemu_img_create(tmp_path / "img", "qed", MiB)
    with pytest.raises(errors.UnsafeImage) as e:
        inspect_untrusted(path)
    assert "banned" in e.value.reason


def test_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        inspect_untrusted(str(tmp_path / "missing"))


@pytest.mark.parametrize("name,qemu", [
    ("raw", "raw"), ("iso", "raw"), ("gpt", "raw"), ("ami", "raw"),
    ("vhd", "vpc"), ("ploop", "parallels"), ("qcow2", "qcow2"),
    ("vmdk", "vmdk"),
])
def test_qemu_format(name, qemu):
    assert qemu_format(name) == qemu


def test_qemu_info_rechecks_backing_file(tmp_path):
    # The inspector rejects these first; the qemu-img check is a second
    # line of defence, tested here on its own.
    base = qemu_img_create(tmp_path / "base", "raw", MiB)
    path = qemu_img_create(tmp_path / "img", "qcow2", MiB,
                           f"backing_file={base},backing_fmt=raw")
    with pytest.raises(errors.UnsafeImage, match="backing file"):
        inspect._qemu_info(path, "qcow2")


def test_qemu_info_rechecks_data_file(tmp_path):
    path = qemu_img_create(tmp_path / "img", "qcow2", MiB,
                           f"data_file={tmp_path / 'data'}")
    with pytest.raises(errors.UnsafeImage, match="data file"):
        inspect._qemu_info(path, "qcow2")


# Structural damage (rule 9): qemu-img check under limits


@pytest.mark.parametrize("damage", sorted(damaged.DAMAGES))
def test_damaged_qcow2_refused(tmp_path, damage):
    path = damaged.DAMAGES[damage](str(tmp_path / "img.qcow2"))
    with pytest.raises(errors.UnsafeImage) as e:
        inspect_untrusted(path, declared_format="qcow2")
    if damage in damaged.CHECK_FINDS:
        assert isinstance(e.value, errors.CorruptImage)
        assert "damaged" in str(e.value)


@pytest.mark.parametrize("damage", sorted(damaged.CHECK_FINDS - {
    "marked_corrupt"}))
def test_check_counts_corruptions(tmp_path, damage):
    path = damaged.DAMAGES[damage](str(tmp_path / "img.qcow2"))
    # qemu-img itself opens these: only its check sees the damage.
    assert qemuimg.info(path, "qcow2", untrusted=True).format == "qcow2"
    with pytest.raises(errors.CorruptImage, match="corruptions"):
        inspect_untrusted(path)


def test_leaks_accepted_and_logged(tmp_path, caplog):
    path = damaged.leaked(str(tmp_path / "img.qcow2"))
    assert qemuimg.check(path).leaks == 1
    caplog.set_level("INFO", logger="ovirt_cinder.storage.inspect")
    image = inspect_untrusted(path, declared_format="qcow2")
    assert image.format == "qcow2"
    assert "1 leaked clusters" in caplog.text


def test_check_failure_is_corrupt(tmp_path, monkeypatch):
    path = damaged.healthy(str(tmp_path / "img.qcow2"))

    def failing(*args, **kwargs):
        raise errors.QemuImgError(cmd="check", rc=1, out="",
                                  err=f"qemu-img: Could not open '{path}'",
                                  argv=[])

    monkeypatch.setattr(qemuimg, "check", failing)
    with pytest.raises(errors.CorruptImage, match="check failed"):
        inspect_untrusted(path)


def test_check_runs_under_limits(tmp_path, monkeypatch):
    path = damaged.healthy(str(tmp_path / "img.qcow2"))
    seen = []
    real = qemuimg._execute

    def execute(args, **kwargs):
        seen.append((args[0], kwargs.get("limits")))
        return real(args, **kwargs)

    monkeypatch.setattr(qemuimg, "_execute", execute)
    inspect_untrusted(path)
    assert ("info", True) in seen and ("check", True) in seen


def test_raw_and_iso_pass_the_check(tmp_path):
    # qemu-img has no checks for raw: nothing to refuse.
    assert inspect_untrusted(raw_file(tmp_path)).format == "raw"
    assert inspect_untrusted(iso_file(tmp_path)).format == "iso"


@pytest.mark.parametrize("damage", ["truncated", "header_length"])
def test_name_hides_the_path(tmp_path, damage):
    staging = tmp_path / ".tmp-staging-upload-1234"
    path = damaged.DAMAGES[damage](str(staging))
    with pytest.raises(errors.UnsafeImage) as e:
        inspect_untrusted(path, name="image-42")
    assert e.value.path == "image-42"
    assert str(tmp_path) not in str(e.value)
    assert ".tmp-staging" not in str(e.value)
    assert "image-42" in str(e.value)


def test_name_in_size_and_format_errors(tmp_path):
    path = qemu_img_create(tmp_path / ".tmp-x", "qcow2", 10 * GiB)
    with pytest.raises(errors.ImageTooLarge) as e:
        inspect_untrusted(path, max_virtual_size=GiB, name="img")
    assert (e.value.path, e.value.size) == ("img", 10 * GiB)
    assert ".tmp-x" not in str(e.value)
    with pytest.raises(errors.FormatMismatch) as e:
        inspect_untrusted(path, declared_format="raw", name="img")
    assert str(e.value) == "Image img declared as raw but is qcow2"
