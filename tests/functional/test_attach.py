"""Attached images: a real qemu-storage-daemon serves the chain, and the
pool's snapshot, merge, extend and copies act on it live.

A writer thread writes through the daemon's view (the raw file the iSCSI
target serves) while the pool takes and deletes snapshots; each snapshot
must hold exactly what the guest saw at the moment it was taken, and the
guest's view must never change under it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import tempfile

import pytest
from eventlet import patcher

from ovirt_cinder.storage import actions
from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import flows
from ovirt_cinder.storage import pool as pool_mod
from ovirt_cinder.storage import validate
from tests.qemuio import view_digest
from tests.qemuio import write_pattern

# Real threads even after Cinder's tests monkey-patched the process: the
# writer never yields to eventlet's hub.
threading = patcher.original("threading")

MiB = sc.MiB
SIZE = 64 * MiB
BLOCK = 64 * 1024


@pytest.fixture
def run_path():
    # Short: a unix socket path is at most 107 bytes.
    path = tempfile.mkdtemp(prefix="oc-", dir="/tmp")
    yield path
    _stop_all(path)
    shutil.rmtree(path, ignore_errors=True)


def _stop_all(run_path):
    from ovirt_cinder.storage import attach
    att = attach.Attachments(run_path)
    for img_id in att.images():
        with contextlib.suppress(Exception):
            att.stop(img_id)


@pytest.fixture
def pool(mount, run_path):
    return pool_mod.StoragePool.create(mount, run_path=run_path)


@pytest.fixture
def img(pool, sd_id):
    img_id = validate.new_uuid()
    vol = pool.create_volume(sd_id, img_id, SIZE, fmt=sc.VolumeFormat.RAW)
    write_pattern(vol.path, "raw", 0, SIZE, 0x11)
    return img_id


def write_view(view, offset, pattern, length=MiB):
    """Write and flush ``length`` bytes of ``pattern`` through the view,
    as a guest would."""
    fd = os.open(view, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([pattern]) * length, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def digest(path, length=SIZE):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = length
        while remaining:
            data = f.read(min(remaining, MiB))
            if not data:
                break
            h.update(data)
            remaining -= len(data)
    return h.hexdigest()


class Writer(threading.Thread):
    """Writes numbered blocks at random offsets through the view."""

    def __init__(self, view):
        super().__init__(daemon=True)
        self.view = view
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.writes = 0
        self.error = None

    def run(self):
        rnd = random.Random(7)
        fd = os.open(self.view, os.O_WRONLY)
        try:
            while not self.stop_event.is_set():
                off = rnd.randrange(SIZE // BLOCK) * BLOCK
                data = (self.writes % 251 + 1).to_bytes(1, "big") * BLOCK
                with self.lock:
                    os.pwrite(fd, data, off)
                    self.writes += 1
        except BaseException as e:  # noqa: BLE001 -- reported by stop()
            self.error = e
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def paused(self):
        with self.lock:
            yield

    def stop(self):
        self.stop_event.set()
        self.join(30)
        assert self.error is None, self.error


def snapshot_view_digest(pool, sd_id, img_id, snap_id, scratch):
    vol = pool.image(sd_id, img_id).find_snapshot(snap_id)
    return view_digest(vol.path, vol.qemu_format, scratch)


def test_attach_serves_the_guest_view(pool, sd_id, img, tmp_path):
    pool.snapshot(sd_id, img, validate.new_uuid())
    leaf = pool.leaf(sd_id, img)
    write_pattern(leaf.path, "qcow2", MiB, MiB, 0x22)
    expected = view_digest(leaf.path, "qcow2", str(tmp_path))
    view = pool.attach(sd_id, img)
    assert os.path.getsize(view) == SIZE
    assert digest(view) == expected
    # Idempotent: the same daemon again.
    assert pool.attach(sd_id, img) == view
    pool.detach(sd_id, img)
    assert pool.attached(img) is None
    assert not os.path.exists(pool.attachments.run_dir(img))
    assert view not in open("/proc/mounts").read()


def test_live_snapshots_while_writing(pool, sd_id, img, tmp_path):
    view = pool.attach(sd_id, img)
    writer = Writer(view)
    writer.start()
    taken = {}
    try:
        for _ in range(3):
            snap_id = validate.new_uuid()
            with writer.paused():
                os.fsync(os.open(view, os.O_RDONLY))
                pool.snapshot(sd_id, img, snap_id)
                taken[snap_id] = digest(view)
        # Deleting the middle snapshot merges live; the others stay.
        middle = list(taken)[1]
        pool.delete_snapshot(sd_id, img, middle)
        del taken[middle]
    finally:
        writer.stop()
    final = digest(view)
    assert writer.writes > 0
    for snap_id, expected in taken.items():
        assert snapshot_view_digest(pool, sd_id, img, snap_id,
                                    str(tmp_path)) == expected
    tree = pool.image(sd_id, img)
    assert all(v.legal for v in tree.volumes.values())
    served = pool.attachments.daemon(img).chain()
    assert served == [v.vol_id for v in reversed(tree.chain())]
    pool.detach(sd_id, img)
    leaf = pool.leaf(sd_id, img)
    assert view_digest(leaf.path, leaf.qemu_format, str(tmp_path)) == final


def test_live_merge_of_the_leaf_snapshot(pool, sd_id, img, tmp_path):
    """Deleting the newest snapshot freezes the active leaf (qemu cannot
    commit the layer the export serves) and commits it into the
    snapshot, live; the guest's view is unchanged and the chain does not
    grow, however often it is done."""
    view = pool.attach(sd_id, img)
    snap_id = validate.new_uuid()
    pool.snapshot(sd_id, img, snap_id)
    write_view(view, 2 * MiB, 0x33)
    before = digest(view)
    pool.delete_snapshot(sd_id, img, snap_id)
    assert digest(view) == before
    for _ in range(3):
        snap_id = validate.new_uuid()
        pool.snapshot(sd_id, img, snap_id)
        pool.delete_snapshot(sd_id, img, snap_id)
    tree = pool.image(sd_id, img)
    assert not tree.snapshots()
    assert len(tree.volumes) == 2
    assert all(v.legal for v in tree.volumes.values())
    assert pool.attachments.daemon(img).chain() == [
        v.vol_id for v in reversed(tree.chain())]
    assert digest(view) == before
    pool.detach(sd_id, img)
    leaf = pool.leaf(sd_id, img)
    assert view_digest(leaf.path, leaf.qemu_format, str(tmp_path)) == before


def test_live_extend(pool, sd_id, img):
    view = pool.attach(sd_id, img)
    pool.snapshot(sd_id, img, validate.new_uuid())
    before = digest(view)
    leaf = pool.extend(sd_id, img, 2 * SIZE)
    assert leaf.meta.capacity == 2 * SIZE and leaf.legal
    assert os.path.getsize(view) == 2 * SIZE
    assert digest(view) == before
    fd = os.open(view, os.O_RDWR)
    os.pwrite(fd, b"\x44" * MiB, SIZE + MiB)
    assert os.pread(fd, MiB, SIZE + MiB) == b"\x44" * MiB
    os.close(fd)


def test_refused_while_attached(pool, sd_id, img):
    snap_id = validate.new_uuid()
    pool.snapshot(sd_id, img, snap_id)
    pool.attach(sd_id, img)
    with pytest.raises(errors.VolumeAttached):
        pool.revert_to_snapshot(sd_id, img, snap_id)
    with pytest.raises(errors.VolumeAttached):
        pool.delete_image(sd_id, img)
    pool.detach(sd_id, img)
    pool.revert_to_snapshot(sd_id, img, snap_id)


def test_clone_of_an_attached_image_reads_a_frozen_view(pool, sd_id, img,
                                                        tmp_path):
    view = pool.attach(sd_id, img)
    writer = Writer(view)
    chain_before = pool.attachments.daemon(img).chain()
    writer.start()
    try:
        clone = pool.clone(sd_id, img, validate.new_uuid())
    finally:
        writer.stop()
    # The temporary snapshot is merged back; the leaf stays a layer of
    # its own (see test_live_merge_of_the_leaf_snapshot).
    tree = pool.image(sd_id, img)
    assert len(tree.chain()) == len(chain_before) + 1
    assert not tree.snapshots()
    pool.clone(sd_id, img, validate.new_uuid())
    assert len(pool.image(sd_id, img).chain()) == len(chain_before) + 1
    assert clone.legal
    data = view_digest(clone.path, clone.qemu_format, str(tmp_path))
    assert len(data) == 64


class Boom(Exception):
    pass


def test_failed_live_snapshot_before_the_switch_reverts(
        pool, sd_id, img, monkeypatch):
    view = pool.attach(sd_id, img)
    before = digest(view)
    tree = pool.image(sd_id, img)

    def fail(*_a, **_k):
        raise Boom()

    real = actions.do_update_volume
    monkeypatch.setattr(actions, "do_update_volume", fail)
    with pytest.raises(Boom):
        pool.snapshot(sd_id, img, validate.new_uuid())
    monkeypatch.setattr(actions, "do_update_volume", real)
    after = pool.image(sd_id, img)
    assert set(after.volumes) == set(tree.volumes)
    assert pool.attachments.daemon(img).chain() == [tree.leaf().vol_id]
    assert digest(view) == before


def test_live_snapshot_cut_after_the_switch_goes_forward(
        pool, sd_id, img, monkeypatch):
    view = pool.attach(sd_id, img)
    real = actions.do_live_snapshot

    def switch_then_fail(ctx, **kwargs):
        real(ctx, **kwargs)
        raise Boom()

    monkeypatch.setattr(actions, "do_live_snapshot", switch_then_fail)
    with pytest.raises(errors.OperationIncomplete):
        pool.snapshot(sd_id, img, validate.new_uuid())
    monkeypatch.setattr(actions, "do_live_snapshot", real)
    assert pool.recover() == [("snapshot", flows.states.SUCCESS)]
    tree = pool.image(sd_id, img)
    assert all(v.legal for v in tree.volumes.values())
    assert pool.attachments.daemon(img).chain() == [
        v.vol_id for v in reversed(tree.chain())]
    fd = os.open(view, os.O_RDWR)
    os.pwrite(fd, b"\x55" * MiB, 0)
    os.close(fd)


def test_recovery_without_the_daemon_does_the_work_offline(
        pool, sd_id, img, tmp_path, monkeypatch):
    """A live merge cut short, then the daemon killed: recovery commits
    on the files, and the next attach serves the merged chain."""
    view = pool.attach(sd_id, img)
    snap_id = validate.new_uuid()
    pool.snapshot(sd_id, img, snap_id)
    write_view(view, 3 * MiB, 0x66)
    before = digest(view)

    def fail(*_a, **_k):
        raise Boom()

    for name in ("do_live_commit", "do_live_stream"):
        monkeypatch.setattr(actions, name, fail)
    with pytest.raises(errors.OperationIncomplete):
        pool.delete_snapshot(sd_id, img, snap_id)
    monkeypatch.undo()
    os.kill(pool.attachments.handle(img).pid(), signal.SIGKILL)
    _wait_dead(pool, img)
    assert pool.recover()[0][1] == flows.states.SUCCESS
    tree = pool.image(sd_id, img)
    assert not tree.snapshots()
    assert all(v.legal for v in tree.volumes.values())
    view = pool.attach(sd_id, img)
    assert digest(view) == before


def test_attach_after_the_daemon_was_killed(pool, sd_id, img):
    view = pool.attach(sd_id, img)
    write_view(view, 0, 0x77)
    os.kill(pool.attachments.handle(img).pid(), signal.SIGKILL)
    _wait_dead(pool, img)
    assert pool.attached(img) is None
    view = pool.attach(sd_id, img)
    with open(view, "rb") as f:
        assert f.read(MiB) == b"\x77" * MiB
    pool.detach(sd_id, img)
    assert view not in open("/proc/mounts").read()


def _wait_dead(pool, img, timeout=10):
    import time
    deadline = time.monotonic() + timeout
    while pool.attachments.handle(img).alive():
        assert time.monotonic() < deadline, "daemon still alive"
        time.sleep(0.05)
