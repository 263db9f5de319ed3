"""Attached volumes over iSCSI through Cinder's real VolumeManager.

The backend serves volumes with ``ovirt_export_protocol = iscsi`` and
Cinder's own ``tgtadm`` target helper on the machine's tgtd; the
"Nova host" is libiscsi (qemu-io ``iscsi://`` with the CHAP credentials
of the connection info), since os-brick's ISCSIConnector needs a kernel
initiator these machines lack. The volume is written through the target
while it is snapshotted, merged and extended live.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from unittest import mock

import pytest
from cinder import exception
from cinder import objects

from ovirt_cinder.storage import constants as sc
from tests import iscsi
from tests import qemuio
from tests.functional.cinder.conftest import CONF
from tests.functional.cinder.conftest import new_volume

MiB, GiB = sc.MiB, sc.GiB
CONNECTOR = {"initiator": "iqn.2004-10.org.example:nova1",
             "ip": "127.0.0.1", "host": "nova1", "multipath": False,
             "platform": "x86_64", "os_type": "linux"}



@pytest.fixture(scope="module")
def tgtd():
    daemon = iscsi.Tgtd.ensure()
    yield daemon
    daemon.stop()


@pytest.fixture
def export_protocol():
    return "iscsi"


@pytest.fixture
def iscsi_conf(cinder_conf, tmp_path, tgtd):
    volumes_dir = tmp_path / "volumes"
    volumes_dir.mkdir()
    for name, value in {"target_helper": "tgtadm",
                        "iscsi_target_flags": "direct",
                        "target_ip_address": "127.0.0.1",
                        "volumes_dir": str(volumes_dir)}.items():
        CONF.set_override(name, value, group="backend_defaults")
    with iscsi.conf_include(str(volumes_dir)):
        yield volumes_dir


@pytest.fixture
def mgr(iscsi_conf, volume_manager):
    return volume_manager


def new_snapshot(ctx, volume):
    snap = objects.Snapshot(ctx, volume_id=volume.id, volume_size=volume.size,
                            status="creating", user_id=ctx.user_id,
                            project_id=ctx.project_id)
    snap.create()
    return snap


def attach(mgr, ctx, volume):
    attachment = objects.VolumeAttachment(
        ctx, volume_id=volume.id, instance_uuid=str(uuid.uuid4()),
        attach_status="reserved", attach_mode="rw")
    attachment.create()
    conn = mgr.attachment_update(ctx, volume, dict(CONNECTOR),
                                 attachment.id)
    # What cinder-api's attachment_complete does once Nova connected.
    volume.refresh()
    volume.update({"status": "in-use", "attach_status": "attached"})
    volume.save()
    return attachment, conn


def credentials(conn):
    """attachment_update returns the driver's connection data flattened
    into the connection info, as Nova gets it."""
    return conn["target_iqn"], (conn["auth_username"],
                                conn["auth_password"])


class IscsiWriter(threading.Thread):
    """Writes numbered 1 MiB blocks through the target, as a guest."""

    def __init__(self, iqn, chap):
        super().__init__(daemon=True)
        self.iqn, self.chap = iqn, chap
        self.stop_event = threading.Event()
        self.written: dict[int, int] = {}
        self.error = None

    def run(self):
        n = 0
        try:
            while not self.stop_event.is_set():
                offset = (8 + n % 32) * MiB
                pattern = 0x80 + n % 64
                iscsi.write_pattern(self.iqn, offset, MiB, pattern,
                                    chap=self.chap)
                self.written[offset] = pattern
                n += 1
        except BaseException as e:  # noqa: BLE001 -- reported by stop()
            self.error = e

    def stop(self):
        self.stop_event.set()
        self.join(60)
        assert self.error is None, self.error
        assert self.written


def test_attach_write_snapshot_merge_extend_detach(mgr, ctx, storage, tgtd):
    sd_id = storage.master.sd_id
    volume = new_volume(ctx, sd_id)
    mgr.create_volume(ctx, volume)
    volume.refresh()
    leaf = mgr.driver.pool.leaf(sd_id, volume.name_id)
    qemuio.write_pattern(leaf.path, leaf.qemu_format, 0, MiB, 0x11)
    first = new_snapshot(ctx, volume)
    mgr.create_snapshot(ctx, first)

    attachment, conn = attach(mgr, ctx, volume)
    assert conn["driver_volume_type"] == "iscsi"
    assert conn["target_portal"] == iscsi.PORTAL
    assert conn["target_lun"] == 1
    assert conn["auth_method"] == "CHAP"
    iqn, chap = credentials(conn)
    assert volume.provider_auth.split()[1:] == list(chap)
    assert iscsi.read_pattern_ok(iqn, 0, MiB, 0x11, chap=chap)
    assert not iscsi.login_ok(iqn, chap=(chap[0], "wrong-password-1234"))
    assert not iscsi.login_ok(iqn)

    # Snapshots and their merges, live, while a guest writes.
    writer = IscsiWriter(iqn, chap)
    writer.start()
    try:
        iscsi.write_pattern(iqn, MiB, MiB, 0x22, chap=chap)
        second = new_snapshot(ctx, volume)
        mgr.create_snapshot(ctx, second)
        iscsi.write_pattern(iqn, MiB, MiB, 0x33, chap=chap)
        frozen = mgr.driver.pool.image(sd_id, volume.name_id) \
            .find_snapshot(second.id)
        qemuio.verify_pattern(frozen.path, frozen.qemu_format, MiB, MiB,
                              0x22)
        mgr.delete_snapshot(ctx, first)
        third = new_snapshot(ctx, volume)
        mgr.create_snapshot(ctx, third)
        mgr.delete_snapshot(ctx, third)
    finally:
        writer.stop()
    for offset, pattern in writer.written.items():
        assert iscsi.read_pattern_ok(iqn, offset, MiB, pattern, chap=chap)
    assert iscsi.read_pattern_ok(iqn, 0, MiB, 0x11, chap=chap)
    assert iscsi.read_pattern_ok(iqn, MiB, MiB, 0x33, chap=chap)
    frozen = mgr.driver.pool.image(sd_id, volume.name_id) \
        .find_snapshot(second.id)
    qemuio.verify_pattern(frozen.path, frozen.qemu_format, MiB, MiB, 0x22)

    # A clone (also what cinder-backup makes of an in-use volume) reads
    # a frozen view of the attached volume.
    clone = new_volume(ctx, sd_id, source_volid=volume.id)
    mgr.create_volume(ctx, clone)
    clone.refresh()
    assert clone.status == "available"
    cloned = mgr.driver.pool.leaf(sd_id, clone.name_id)
    qemuio.verify_pattern(cloned.path, cloned.qemu_format, MiB, MiB, 0x33)
    qemuio.verify_pattern(cloned.path, cloned.qemu_format, 0, MiB, 0x11)
    # Its temporary snapshot is merged back.
    assert set(mgr.driver.pool.image(sd_id, volume.name_id)
               .snapshots()) == {second.id}

    # Revert needs the volume detached; extend is online.
    with pytest.raises(exception.InvalidVolume):
        mgr.driver.revert_to_snapshot(ctx, volume, second)
    # Nova is told (its API is the process boundary replaced here).
    with mock.patch("cinder.compute.nova.API.extend_volume") as nova:
        mgr.extend_volume(ctx, volume, 2, None)
    nova.assert_called_once()
    volume.refresh()
    assert volume.size == 2 and volume.status == "in-use"
    assert iscsi.capacity(iqn, chap=chap) == 2 * GiB
    iscsi.write_pattern(iqn, GiB + MiB, MiB, 0x44, chap=chap)
    assert iscsi.read_pattern_ok(iqn, MiB, MiB, 0x33, chap=chap)

    mgr.attachment_delete(ctx, attachment.id, volume)
    assert iqn not in tgtd.targets()
    assert mgr.driver.pool.attached(volume.name_id) is None
    assert not mgr.driver.pool.attachments.images()
    # Everything the guest wrote is in the chain.
    leaf = mgr.driver.pool.leaf(sd_id, volume.name_id)
    qemuio.verify_pattern(leaf.path, leaf.qemu_format, GiB + MiB, MiB,
                          0x44)
    qemuio.verify_pattern(leaf.path, leaf.qemu_format, MiB, MiB, 0x33)


def test_restart_keeps_serving_and_a_dead_daemon_is_replaced(
        mgr, ctx, storage, tgtd):
    sd_id = storage.master.sd_id
    volume = new_volume(ctx, sd_id)
    mgr.create_volume(ctx, volume)
    attachment, conn = attach(mgr, ctx, volume)
    iqn, chap = credentials(conn)
    iscsi.write_pattern(iqn, 0, MiB, 0x55, chap=chap)
    pool = mgr.driver.pool
    pid = pool.attachments.handle(volume.name_id).pid()

    # cinder-volume restarts: ensure_export finds the same daemon.
    mgr.init_host(service_id=mgr.service_id)
    assert pool.attachments.handle(volume.name_id).pid() == pid
    assert iscsi.read_pattern_ok(iqn, 0, MiB, 0x55, chap=chap)

    # The daemon dies: the next start serves the volume from a new one
    # and the target reads the new view.
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pool.attachments.handle(volume.name_id).alive():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    mgr.init_host(service_id=mgr.service_id)
    assert pool.attachments.handle(volume.name_id).pid() != pid
    assert iscsi.read_pattern_ok(iqn, 0, MiB, 0x55, chap=chap)
    iscsi.write_pattern(iqn, MiB, MiB, 0x56, chap=chap)

    mgr.attachment_delete(ctx, attachment.id, volume)
    assert iqn not in tgtd.targets()
    assert not pool.attachments.images()
