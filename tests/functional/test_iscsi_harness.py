"""tests/iscsi.py against the real tgtd, libiscsi and qemu, and Cinder's
own TgtAdm exporting a file through it.

A tgtd started here is stopped at the end of the module; one that was
already running is left as it was (only our targets are removed).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import uuid

import pytest

from tests import iscsi
from tests import qemuio

MiB = 1024 * 1024
SIZE = 64 * MiB
PREFIX = "iqn.2010-10.org.openstack:"


@pytest.fixture(scope="module")
def daemons():
    """Every Tgtd this module used; those it started are stopped last."""
    used: list[iscsi.Tgtd] = []
    yield used
    for tgtd in used:
        tgtd.stop()


@pytest.fixture
def tgtd(daemons):
    tgtd = iscsi.Tgtd.ensure()
    daemons.append(tgtd)
    return tgtd


@pytest.fixture
def iqn(tgtd):
    """A unique target name, deleted after the test."""
    name = f"iqn.2024-01.org.ovirt-cinder.test:{uuid.uuid4().hex[:12]}"
    yield name
    tgtd.delete_target(name)


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return str(path)


def chap_user() -> str:
    return f"test{uuid.uuid4().hex[:12]}"


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@pytest.fixture
def holder():
    """Keeps an initiator logged in (``qemu-io -c 'sleep MS'``)."""
    procs: list[subprocess.Popen] = []

    def hold(iqn: str, ms: int, chap=None) -> subprocess.Popen:
        proc = subprocess.Popen(
            ["qemu-io", "-f", "raw", "-c", f"sleep {ms}",
             iscsi.url(iqn, chap=chap)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def wait_sessions(iqn: str, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while iscsi.Tgtd().target(iqn).sessions != count:
        assert time.monotonic() < deadline, f"{iqn}: not {count} sessions"
        time.sleep(0.05)


def test_parse_targets():
    out = """\
Target 3: iqn.2024-01.test:a
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 9
            Initiator: iqn.2008-11.org.linux-kvm alias: none
            Connection: 0
                IP Address: 127.0.0.1
    LUN information:
        LUN: 0
            Type: controller
            Backing store path: None
        LUN: 1
            Type: disk
            Size: 67 MB, Block size: 512
            Backing store path: /tmp/a.img
            Backing store flags:
    Account information:
        u1
    ACL information:
        ALL
Target 4: iqn.2024-01.test:b
    System information:
    I_T nexus information:
    LUN information:
        LUN: 0
            Backing store path: None
    Account information:
    ACL information:
"""
    targets = iscsi.parse_targets(out)
    assert targets == {
        "iqn.2024-01.test:a": iscsi.TargetInfo(
            3, "iqn.2024-01.test:a", {1: "/tmp/a.img"}, ["u1"], ["ALL"], 1),
        "iqn.2024-01.test:b": iscsi.TargetInfo(4, "iqn.2024-01.test:b"),
    }
    assert targets["iqn.2024-01.test:a"].nexus_ids == [9]


def test_url():
    assert iscsi.url("iqn.x:y") == f"iscsi://{iscsi.PORTAL}/iqn.x:y/1"
    assert iscsi.url("iqn.x:y", 2, ("u", "p")) == (
        f"iscsi://u%p@{iscsi.PORTAL}/iqn.x:y/2")
    with pytest.raises(ValueError):
        iscsi.url("iqn.x:y", chap=("u", "p@ss"))


def test_add_target(tgtd, iqn, disk):
    tid = tgtd.add_target(iqn, disk)
    target = tgtd.targets()[iqn]
    assert target == iscsi.TargetInfo(tid, iqn, {1: disk}, [], ["ALL"], 0)


def test_pattern_and_checksum(tgtd, iqn, disk):
    tgtd.add_target(iqn, disk)
    iscsi.write_pattern(iqn, 1 * MiB, 2 * MiB, 0x5A)

    assert iscsi.read_pattern_ok(iqn, 1 * MiB, 2 * MiB, 0x5A)
    assert not iscsi.read_pattern_ok(iqn, 1 * MiB, 2 * MiB, 0x5B)
    # Guards: nothing written around the range.
    assert iscsi.read_pattern_ok(iqn, 0, 1 * MiB, 0)
    assert iscsi.read_pattern_ok(iqn, 3 * MiB, 1 * MiB, 0)
    qemuio.verify_pattern(disk, "raw", 1 * MiB, 2 * MiB, 0x5A)
    qemuio.verify_zero(disk, "raw", 0, 1 * MiB)
    qemuio.verify_zero(disk, "raw", 3 * MiB, SIZE - 3 * MiB)
    assert iscsi.sha256(iqn, SIZE) == file_sha256(disk)
    assert iscsi.capacity(iqn) == SIZE


def test_chap(tgtd, iqn, disk):
    chap = (chap_user(), "Secret12345678")
    tgtd.add_target(iqn, disk, chap=chap)
    assert tgtd.target(iqn).accounts == [chap[0]]

    assert iscsi.login_ok(iqn, chap=chap)
    assert not iscsi.login_ok(iqn, chap=(chap[0], "Wrong12345678"))
    assert not iscsi.login_ok(iqn)
    iscsi.write_pattern(iqn, 0, MiB, 0x33, chap=chap)
    assert iscsi.read_pattern_ok(iqn, 0, MiB, 0x33, chap=chap)
    with pytest.raises(iscsi.CommandError, match="Authentication failure"):
        iscsi.qemu_io(iqn, ["read 0 512"], chap=(chap[0], "Wrong12345678"))
    with pytest.raises(iscsi.CommandError, match="Authentication failure"):
        iscsi.qemu_io(iqn, ["read 0 512"])


def test_login_to_missing_target_is_an_error(tgtd, iqn, disk):
    tgtd.add_target(iqn, disk)
    with pytest.raises(iscsi.CommandError, match="Target not found"):
        iscsi.login_ok(iqn + "-missing")


def test_delete_target(tgtd, iqn, disk, holder):
    chap = (chap_user(), "Secret12345678")
    tgtd.add_target(iqn, disk, chap=chap)
    holder(iqn, 5000, chap)
    wait_sessions(iqn, 1)

    tgtd.delete_target(iqn)

    assert iqn not in tgtd.targets()
    assert chap[0] not in tgtd.accounts()
    iscsi.wait_no_sessions(iqn)
    tgtd.delete_target(iqn)  # Nothing left to delete.


def test_grown_file_keeps_its_size_until_reopened(tgtd, iqn, disk, holder):
    tgtd.add_target(iqn, disk)
    holder(iqn, 3000)
    wait_sessions(iqn, 1)
    held = tgtd.target(iqn).nexus_ids
    iscsi.write_pattern(iqn, SIZE - MiB, MiB, 0x77)
    os.truncate(disk, 2 * SIZE)

    assert iscsi.capacity(iqn) == SIZE

    tgtd.reopen_lun(iqn)
    assert iscsi.capacity(iqn) == 2 * SIZE
    wait_sessions(iqn, 1)
    assert tgtd.target(iqn).nexus_ids == held  # Kept the session.
    iscsi.write_pattern(iqn, 2 * SIZE - MiB, MiB, 0x78)
    assert iscsi.read_pattern_ok(iqn, SIZE - MiB, MiB, 0x77)
    qemuio.verify_pattern(disk, "raw", 2 * SIZE - MiB, MiB, 0x78)


def test_conf_include(tmp_path):
    with iscsi.conf_include(str(tmp_path)) as path, \
            iscsi.conf_include(str(tmp_path)) as nested:
        assert os.path.dirname(path) == iscsi.CONF_D
        name = f"ovirt-cinder-test-{os.getpid()}.conf"
        assert os.path.basename(path) == name
        assert nested != path
        with open(path) as f:
            assert f.read() == f"include {tmp_path}/*\n"
    assert not os.path.exists(path)
    assert not os.path.exists(nested)


# Cinder's TgtAdm


class VolumeDb:
    """What TgtAdm asks of Cinder's DB: ``volume_get`` (provider_auth)."""

    def __init__(self) -> None:
        self.volumes: dict[str, object] = {}

    def volume_get(self, context, volume_id):
        from cinder import exception
        try:
            return self.volumes[volume_id]
        except KeyError:
            raise exception.VolumeNotFound(volume_id=volume_id) from None


@pytest.fixture(scope="module")
def cinder_in_process():
    from cinder import objects
    from cinder import privsep
    objects.register_all()
    privsep.sys_admin_pctxt.set_client_mode(False)


@pytest.fixture
def tgt_adm(cinder_in_process, tmp_path):
    """Cinder's TgtAdm, writing its target files in tmp_path/volumes,
    which tgt-admin reads through conf_include."""
    from cinder.volume import configuration
    from cinder.volume import driver
    from cinder.volume.targets import tgt
    from oslo_config import cfg

    group = f"iscsi_harness_{uuid.uuid4().hex[:8]}"
    conf = configuration.Configuration(driver.volume_opts, group)
    volumes_dir = tmp_path / "volumes"
    volumes_dir.mkdir()
    options = {"target_helper": "tgtadm", "target_ip_address": "127.0.0.1",
               "volumes_dir": str(volumes_dir), "target_prefix": PREFIX}
    for name, value in options.items():
        cfg.CONF.set_override(name, value, group=group)
    target = tgt.TgtAdm(root_helper="", configuration=conf)
    target.db = VolumeDb()
    try:
        with iscsi.conf_include(str(volumes_dir)):
            yield target
    finally:
        for name in options:
            cfg.CONF.clear_override(name, group=group)


def new_volume(**kw):
    from cinder import objects
    return objects.Volume(id=str(uuid.uuid4()), _name_id=None, size=1,
                          provider_location=None, provider_auth=None, **kw)


def test_cinder_tgtadm_export(tgtd, tgt_adm, disk):
    from cinder import context
    ctx = context.get_admin_context()
    volume = new_volume()
    iqn = PREFIX + volume.name
    volume.provider_auth = "CHAP user1234 Secret12345678"
    tgt_adm.db.volumes[volume.id] = volume
    try:
        data = tgt_adm.create_export(ctx, volume, disk)

        tid = tgtd.target(iqn).tid
        assert data == {
            "location": f"{iscsi.PORTAL},{tid} {iqn} 1",
            "auth": "CHAP user1234 Secret12345678"}
        assert tgtd.target(iqn) == iscsi.TargetInfo(
            tid, iqn, {1: disk}, ["user1234"], ["ALL"], 0)
        chap = ("user1234", "Secret12345678")
        assert iscsi.login_ok(iqn, chap=chap)
        assert not iscsi.login_ok(iqn)

        volume.provider_location = data["location"]
        info = tgt_adm.initialize_connection(volume, {"initiator": "iqn.x"})
        assert info == {"driver_volume_type": "iscsi", "data": {
            "target_discovered": False, "target_portal": iscsi.PORTAL,
            "target_iqn": iqn, "target_lun": 1, "volume_id": volume.id,
            "auth_method": "CHAP", "auth_username": "user1234",
            "auth_password": "Secret12345678", "encrypted": False}}

        tgt_adm.remove_export(ctx, volume)

        assert iqn not in tgtd.targets()
        assert os.listdir(tgt_adm.volumes_dir) == []
        # tgt-admin --delete leaves the account behind.
        assert "user1234" in tgtd.accounts()
    finally:
        tgtd.delete_target(iqn)
        iscsi._tgtadm("--op", "delete", "--mode", "account", "--user",
                      "user1234", check=False)


def test_cinder_tgtadm_new_chap(tgtd, tgt_adm, disk):
    from cinder import context
    volume = new_volume()
    iqn = PREFIX + volume.name
    try:
        data = tgt_adm.create_export(context.get_admin_context(), volume,
                                     disk)

        method, user, password = data["auth"].split()
        assert method == "CHAP"
        assert tgtd.target(iqn).accounts == [user]
        assert iscsi.login_ok(iqn, chap=(user, password))
    finally:
        tgtd.delete_target(iqn)


def test_cinder_tgtadm_extend_drops_sessions(tgtd, tgt_adm, disk, holder):
    from cinder import context
    from cinder import objects
    volume = new_volume()
    iqn = PREFIX + volume.name
    try:
        data = tgt_adm.create_export(context.get_admin_context(), volume,
                                     disk)
        chap = tuple(data["auth"].split()[1:])
        volume.volume_attachment = objects.VolumeAttachmentList(
            objects=[objects.VolumeAttachment(id=str(uuid.uuid4()))])
        holder(iqn, 3000, chap)
        wait_sessions(iqn, 1)
        [held] = tgtd.target(iqn).nexus_ids
        os.truncate(disk, 2 * SIZE)

        tgt_adm.extend_target(volume)  # tgt-admin --update IQN -f

        # Dropped; qemu may already have logged in again (a new nexus).
        assert held not in tgtd.target(iqn).nexus_ids
        assert iscsi.capacity(iqn, chap=chap) == 2 * SIZE
    finally:
        tgtd.delete_target(iqn)


def test_stop(tgtd, daemons, disk, holder):
    """Runs last: stops the tgtd this module started, if any."""
    owner = next((d for d in daemons if d.started), None)
    if owner is None:
        pytest.skip("tgtd was running before this module")
    pid = owner.proc.pid
    iqn = "iqn.2024-01.org.ovirt-cinder.test:stop"
    chap = (chap_user(), "Secret12345678")
    tgtd.add_target(iqn, disk, chap=chap)
    holder(iqn, 5000, chap)
    wait_sessions(iqn, 1)

    owner.stop()

    assert owner.proc is None
    assert not os.path.exists(f"/proc/{pid}")
    assert live_tgtd_pids() == []
    with pytest.raises(iscsi.CommandError):
        tgtd.targets()


def live_tgtd_pids() -> list[int]:
    """Pids of the tgtd processes that are not zombies."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        state = stat[stat.rindex(")") + 2]
        if comm == "tgtd" and state != "Z":
            pids.append(int(pid))
    return pids
