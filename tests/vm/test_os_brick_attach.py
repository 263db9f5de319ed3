"""A real Nova host attaches our iSCSI export: os-brick's ISCSIConnector
(open-iscsi, the kernel initiator) in a QEMU guest, while this machine,
the storage host, snapshots, merges and extends the volume live.

The storage host is Cinder's VolumeManager with our driver exporting over
Cinder's TgtAdm on the machine's tgtd (127.0.0.1:3260), as in
tests/functional/cinder/test_iscsi_export.py. The guest reaches that
portal as 10.0.2.2:3260 through QEMU's user network; everything else in
the connection info is what the driver returned.

The guest's writer writes 4 KiB blocks numbered 1, 2, ... to 64 slots in
turn (:mod:`tests.vm.agent`), so a snapshot taken under it is checked
exactly: it must hold the blocks 1..S for one S, at least every block
acknowledged before the snapshot began, and nothing of a write begun
after it returned.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from unittest import mock

from cinder import objects

from ovirt_cinder.storage import constants as sc
from tests import iscsi
from tests import qemuio
from tests.functional.cinder.conftest import new_volume
from tests.functional.cinder.test_iscsi_export import new_snapshot
from tests.vm import agent
from tests.vm.conftest import FACTS
from tests.vm.conftest import INITIATOR
from tests.vm.conftest import timed
from tests.vm.guest import GUEST_IP
from tests.vm.guest import HOST_IP

MiB, GiB = sc.MiB, sc.GiB
SLOTS = 64
STRIDE = 64 * 1024
BASE = 8 * MiB
WRITER = {"base": BASE, "stride": STRIDE, "slots": SLOTS}


def attach(mgr, ctx, volume, connector):
    """What Nova does: reserve, then attachment_update with its host's
    connector; cinder-api's attachment_complete once connected."""
    attachment = objects.VolumeAttachment(
        ctx, volume_id=volume.id, instance_uuid=str(uuid.uuid4()),
        attach_status="reserved", attach_mode="rw")
    attachment.create()
    conn = mgr.attachment_update(ctx, volume, connector, attachment.id)
    volume.refresh()
    volume.update({"status": "in-use", "attach_status": "attached"})
    volume.save()
    return attachment, conn


def guest_properties(conn):
    """The connection info as the guest must use it: the portal through
    QEMU's user network."""
    props = dict(conn)
    port = props["target_portal"].rpartition(":")[2]
    props["target_portal"] = f"{HOST_IP}:{port}"
    if "target_portals" in props:
        props["target_portals"] = [
            f"{HOST_IP}:{p.rpartition(':')[2]}"
            for p in props["target_portals"]]
    return props


def wait_writes(guest, count, timeout=120):
    """Wait until the guest's writer has done ``count`` writes; its
    state."""
    deadline = time.monotonic() + timeout
    while True:
        state = guest.call("writer_state")
        assert state["error"] is None, state["error"]
        if state["count"] >= count:
            return state
        assert state["alive"], state
        assert time.monotonic() < deadline, f"writer stuck: {state}"
        time.sleep(0.2)


def under_writes(guest, name, fn, *args):
    """Call ``fn(*args)`` while the guest's writer writes (16 more writes
    first); the writer's counts when it was called and when it returned.
    Its time and the writes done meanwhile are reported."""
    before = wait_writes(guest, guest.call("writer_state")["count"]
                         + 16)["count"]
    start = time.monotonic()
    fn(*args)
    seconds = time.monotonic() - start
    after = guest.call("writer_state")["count"]
    FACTS[name] = f"{seconds:.1f}s, {after - before} guest writes meanwhile"
    return before, after


def wait_relogin(tgtd, iqn, old_nexus, timeout=60):
    """Wait until the initiator is logged in to ``iqn`` again, in a new
    session (an I_T nexus not in ``old_nexus``).

    Our online extend re-creates the target (Cinder's ``extend_target``:
    ``tgt-admin --update -f``), which drops the session; open-iscsi's
    iscsid logs in again about 2 s later (TCG guest). Nova calls
    os-brick's ``extend_volume`` as soon as Cinder's event arrives: a
    rescan before the new login reads the old capacity, and Nova then
    resizes nothing."""
    deadline = time.monotonic() + timeout
    while True:
        target = tgtd.targets().get(iqn)
        if target is not None and target.sessions and \
                not set(target.nexus_ids) & set(old_nexus):
            return
        assert time.monotonic() <= deadline, f"no new login to {iqn}"
        time.sleep(0.1)


def image_slots(path, fmt, scratch):
    """The writer block seq in each slot of the image's guest view (its
    whole chain), read by qemu-img even while a daemon holds it."""
    out = os.path.join(scratch, f"{uuid.uuid4()}.raw")
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw",
                    path, out], check=True, capture_output=True)
    try:
        with open(out, "rb") as f:
            return [agent.parse_writer_block(os.pread(
                        f.fileno(), agent.BLOCK,
                        agent.writer_slot_offset(BASE, STRIDE, s)))
                    for s in range(SLOTS)]
    finally:
        os.unlink(out)


def assert_cut(slots, before, after):
    """``slots`` hold exactly blocks 1..S for one S in [before, after+1];
    that S."""
    assert None not in slots, f"torn or foreign block: {slots}"
    last = max(slots)
    assert before <= last <= after + 1, (before, last, after)
    assert slots == agent.expected_cut(last, SLOTS)
    return last


def daemons_of(run_path):
    """Pids of qemu-storage-daemon processes working under run_path."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"qemu-storage-daemon" \
                and any(run_path.encode() in a for a in argv):
            pids.append(int(pid))
    return pids


def mounts_under(path):
    with open("/proc/mounts") as f:
        return [line for line in f if path in line.split()[1]]


def test_os_brick_attach_live_snapshot_merge_extend(
        mgr, ctx, storage, tgtd, guest, run_path, tmp_path):
    sd_id = storage.master.sd_id
    pool = mgr.driver.pool
    volume = new_volume(ctx, sd_id)
    mgr.create_volume(ctx, volume)
    volume.refresh()
    leaf = pool.leaf(sd_id, volume.name_id)
    qemuio.write_pattern(leaf.path, leaf.qemu_format, 0, MiB, 0x11)
    first = new_snapshot(ctx, volume)
    mgr.create_snapshot(ctx, first)

    # Nova's host: its connector, then the attach.
    connector = guest.call("connector_properties", ip=GUEST_IP)
    assert connector["initiator"] == INITIATOR
    attachment, conn = attach(mgr, ctx, volume, connector)
    assert conn["driver_volume_type"] == "iscsi"
    assert conn["auth_method"] == "CHAP"
    iqn = conn["target_iqn"]
    props = guest_properties(conn)

    # 1. The guest connects with os-brick, reads what was there, writes.
    with timed("guest connect_volume"):
        device = guest.call("connect", props=props)
    path = device["path"]
    assert path.startswith("/dev/sd"), device
    assert guest.call("size", path=path) == GiB
    assert tgtd.target(iqn).sessions == 1
    assert guest.call("check", path=path, offset=0, length=MiB,
                      pattern=0x11)
    guest.call("write", path=path, offset=MiB, length=MiB, pattern=0x22)

    # 2. Live snapshot, merges and extend under the guest's writer.
    guest.call("writer_start", path=path, **WRITER)
    second = new_snapshot(ctx, volume)
    before, after = under_writes(guest, "create_snapshot (live)",
                                 mgr.create_snapshot, ctx, second)
    frozen = pool.image(sd_id, volume.name_id).find_snapshot(second.id)
    cut = assert_cut(image_slots(frozen.path, frozen.qemu_format,
                                 str(tmp_path)), before, after)
    FACTS["live snapshot"] = (f"holds blocks 1..{cut}; {before} were "
                              f"acknowledged before it began, {after} "
                              "when it returned")
    qemuio.verify_pattern(frozen.path, frozen.qemu_format, 0, MiB, 0x11)
    qemuio.verify_pattern(frozen.path, frozen.qemu_format, MiB, MiB, 0x22)
    under_writes(guest, "delete_snapshot (live merge of the base)",
                 mgr.delete_snapshot, ctx, first)
    third = new_snapshot(ctx, volume)
    under_writes(guest, "create_snapshot (live, again)",
                 mgr.create_snapshot, ctx, third)
    under_writes(guest, "delete_snapshot (live merge of the leaf's parent)",
                 mgr.delete_snapshot, ctx, third)

    # Nova is told (its API is the process boundary replaced here).
    nexus = tgtd.target(iqn).nexus_ids
    with mock.patch("cinder.compute.nova.API.extend_volume") as nova:
        under_writes(guest, "extend_volume (online)", mgr.extend_volume,
                     ctx, volume, 2, None)
    nova.assert_called_once()
    # The target was made again (tgt-admin --update -f): the session was
    # dropped, and the guest's iscsid logged in again by itself. The
    # driver returns only once it has (ovirt_cinder.cinder.tgt), so Nova's
    # rescan, which follows at once, reads the new size.
    wait_relogin(tgtd, iqn, nexus, timeout=0)
    wait_writes(guest, guest.call("writer_state")["count"] + 16)
    with timed("guest extend_volume"):
        assert guest.call("extend", props=props) == 2 * GiB
    assert guest.call("size", path=path) == 2 * GiB
    guest.call("write", path=path, offset=GiB + MiB, length=MiB,
               pattern=0x44)
    state = guest.call("writer_stop")
    assert state["error"] is None, state["error"]
    FACTS["guest writer"] = (f"{state['count']} writes of 4 KiB, slowest "
                             f"{state['slowest']}s")
    written = agent.expected_cut(state["count"], SLOTS)

    # 3. Everything the guest wrote reads back; it disconnects.
    assert guest.call("read_slots", path=path, **WRITER) == written
    for offset, pattern in ((0, 0x11), (MiB, 0x22), (GiB + MiB, 0x44)):
        assert guest.call("check", path=path, offset=offset, length=MiB,
                          pattern=pattern)
    with timed("guest disconnect_volume"):
        guest.call("disconnect", props=props, device_info=device)
    iscsi.wait_no_sessions(iqn)
    assert guest.call("sh", argv=["lsblk", "-dno", "NAME"])["stdout"] \
        .split() == ["vda"]

    # 4. The storage host: the snapshot is the point in time, the detach
    # leaves nothing behind, the chain holds what the guest wrote.
    frozen = pool.image(sd_id, volume.name_id).find_snapshot(second.id)
    assert assert_cut(image_slots(frozen.path, frozen.qemu_format,
                                  str(tmp_path)), cut, cut) == cut
    qemuio.verify_pattern(frozen.path, frozen.qemu_format, MiB, MiB, 0x22)
    with timed("attachment_delete"):
        mgr.attachment_delete(ctx, attachment.id, volume)
    assert iqn not in tgtd.targets()
    # Cinder's TgtAdm deletes the target, not its CHAP account (accounts
    # are global to tgtd): told, not asserted.
    left = conn["auth_username"] in tgtd.accounts()
    FACTS["CHAP account after the detach"] = \
        "left in tgtd" if left else "deleted"
    assert pool.attached(volume.name_id) is None
    assert not pool.attachments.images()
    assert daemons_of(run_path) == []
    assert mounts_under(run_path) == []
    leaf = pool.leaf(sd_id, volume.name_id)
    assert image_slots(leaf.path, leaf.qemu_format, str(tmp_path)) == written
    for offset, pattern in ((0, 0x11), (MiB, 0x22), (GiB + MiB, 0x44)):
        qemuio.verify_pattern(leaf.path, leaf.qemu_format, offset, MiB,
                              pattern)
