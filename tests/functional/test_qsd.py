"""qsd against the real qemu-storage-daemon, on chains built in tmp_path.

Every daemon serves its view through a real FUSE mount; the ``run_dir``
fixture kills whatever daemon a test left and unmounts its view, so a
failing test leaks neither processes nor mounts.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import uuid

import pytest
from eventlet import patcher
from oslo_privsep import priv_context

from ovirt_cinder import privsep
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage import qsd
from ovirt_cinder.storage.constants import KiB
from ovirt_cinder.storage.constants import MiB
from tests import qemuio

SIZE = 8 * MiB

# Real threads even after Cinder's tests monkey-patched the process (a
# writer that never yields would starve eventlet's hub).
threading = patcher.original("threading")


# Processes and mounts, seen without the module under test.


def daemons_using(path: str) -> list[int]:
    """Live qemu-storage-daemon processes with ``path`` in their argv."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if (os.path.basename(argv[0]) == "qemu-storage-daemon"
                and any(path in arg for arg in argv)):
            pids.append(int(entry))
    return pids


def mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


def nothing_left(run_dir: str) -> bool:
    return (not daemons_using(run_dir)
            and not mounted(os.path.join(run_dir, "view"))
            and not os.path.exists(run_dir))


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out: {predicate}"
        time.sleep(0.02)


@pytest.fixture
def run_dir(tmp_path):
    path = str(tmp_path / "run")
    yield path
    for pid in daemons_using(path):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not daemons_using(path))
    view = os.path.join(path, "view")
    if mounted(view):
        subprocess.run(["fusermount3", "-u", "-z", view], check=True)


# Chains. Layer i (base 0) holds byte 0x11 * (i + 1) in
# [i * 2 MiB, i * 2 MiB + 4 MiB), so every layer shadows part of the one
# below and the last 2 MiB of a two-layer chain read as zeros.


def pattern(index: int) -> int:
    return 0x11 * (index + 1)


def make_chain(tmp_path, count=2, base_fmt="raw") -> list[qsd.Layer]:
    layers: list[qsd.Layer] = []
    for index in range(count):
        fmt = base_fmt if index == 0 else "qcow2"
        vol_id = str(uuid.uuid4())
        path = str(tmp_path / vol_id)
        if layers:
            qemuimg.create(path, fmt, None, backing=layers[-1].vol_id,
                           backing_fmt=layers[-1].fmt)
        else:
            qemuimg.create(path, fmt, SIZE)
        qemuio.write_pattern(path, fmt, index * 2 * MiB, 4 * MiB,
                             pattern(index))
        layers.append(qsd.Layer(vol_id, path, fmt))
    return layers


def expected_view(count: int) -> bytes:
    view = bytearray(SIZE)
    for index in range(count):
        start = index * 2 * MiB
        view[start:start + 4 * MiB] = bytes([pattern(index)]) * 4 * MiB
    return bytes(view[:SIZE])


def overlay(tmp_path, parent: qsd.Layer) -> qsd.Layer:
    """A new qcow2 over ``parent`` with a relative backing name."""
    vol_id = str(uuid.uuid4())
    path = str(tmp_path / vol_id)
    qemuimg.create(path, "qcow2", None, backing=parent.vol_id,
                   backing_fmt=parent.fmt)
    return qsd.Layer(vol_id, path, "qcow2")


def read_view(daemon: qsd.Daemon) -> bytes:
    with open(daemon.view, "rb", buffering=0) as f:
        return f.read()


def write_view(daemon: qsd.Daemon, offset: int, data: bytes) -> None:
    fd = os.open(daemon.view, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def guest_view(layer: qsd.Layer, scratch) -> bytes:
    """What a guest reads through ``layer`` and its chain, read with -U
    while the daemon holds the images."""
    out = str(scratch / f"{uuid.uuid4()}.raw")
    subprocess.run(["qemu-img", "convert", "-U", "-f", layer.fmt, "-O",
                    "raw", layer.path, out], check=True, capture_output=True)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def backing_chain(layer: qsd.Layer) -> list[tuple[str, str | None]]:
    """(file name, backing string) from ``layer`` down, as qemu-img sees
    them with -U."""
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain",
                          "--output", "json", "-f", layer.fmt, layer.path],
                         check=True, capture_output=True, text=True).stdout
    return [(os.path.basename(i["filename"]), i.get("backing-filename"))
            for i in json.loads(out)]


def ids(layers) -> list[str]:
    """vol_ids top first, as Daemon.chain() gives them."""
    return [layer.vol_id for layer in reversed(layers)]


# Node names.


def test_node_names_fit_qmp_and_give_the_vol_id_back():
    vol_id = str(uuid.uuid4())
    assert len(qsd.node_name(vol_id)) <= 31
    assert qsd.node_name(vol_id) != qsd.file_node_name(vol_id)
    assert qsd.vol_id_of(qsd.node_name(vol_id)) == vol_id
    assert qsd.vol_id_of(qsd.file_node_name(vol_id)) == vol_id
    assert qsd.vol_id_of("#block123") is None
    with pytest.raises(errors.InvalidUUID):
        qsd.node_name("not-a-uuid")


# Start and stop.


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_start_serves_guest_view(tmp_path, run_dir, base_fmt):
    base, top = make_chain(tmp_path, 2, base_fmt)
    daemon = qsd.Daemon.start(run_dir, [base, top])

    assert daemon.alive()
    with open(daemon.pidfile) as f:
        assert daemon.pid() == int(f.read())
    assert daemon.top() == top.vol_id
    assert daemon.chain() == ids([base, top])
    assert daemon.size() == SIZE
    assert os.stat(daemon.view).st_size == SIZE
    assert read_view(daemon) == expected_view(2)

    # The daemon holds the top's lock: qemu-img needs -U.
    locked = subprocess.run(["qemu-img", "info", top.path],
                            capture_output=True, text=True)
    assert locked.returncode != 0 and "lock" in locked.stderr

    write_view(daemon, 7 * MiB, b"\x33" * 64 * KiB)
    daemon.stop()

    assert nothing_left(run_dir)
    qemuio.verify_pattern(top.path, "qcow2", 7 * MiB, 64 * KiB, 0x33)
    qemuio.verify_zero(base.path, base_fmt, 7 * MiB, 64 * KiB)
    daemon.stop()  # Idempotent.


@pytest.mark.parametrize("aio", [None, "native"])
def test_start_without_direct_io(tmp_path, run_dir, monkeypatch, aio):
    """Where O_DIRECT fails (EINVAL), nodes use the page cache and aio
    threads: qemu refuses aio=native without cache.direct=on."""
    monkeypatch.setattr(qsd, "_supports_direct", lambda path: False)
    chain = make_chain(tmp_path, 2)
    daemon = qsd.Daemon.start(run_dir, chain, aio=aio)
    with qsd.QmpClient(daemon.sock) as qmp:
        nodes = qmp.execute("query-named-block-nodes", {"flat": True})
    files = [n for n in nodes if n["drv"] == "file"]
    assert len(files) == 2
    assert not any(n["cache"]["direct"] for n in files)
    assert read_view(daemon) == expected_view(2)
    daemon.stop()


def test_daemon_outlives_the_process_that_started_it(tmp_path, run_dir):
    """As when cinder-volume restarts: the daemon is nobody's child and
    in a session of its own; a new process takes it over by run_dir."""
    chain = make_chain(tmp_path, 2)
    script = ("import sys; from ovirt_cinder.storage import qsd; "
              "qsd.Daemon.start(sys.argv[1], [qsd.Layer(*a.split(',')) "
              "for a in sys.argv[2:]])")
    subprocess.run([sys.executable, "-c", script, run_dir,
                    *(f"{x.vol_id},{x.path},{x.fmt}" for x in chain)],
                   check=True, capture_output=True)

    daemon = qsd.Daemon(run_dir)
    pid = daemon.pid()
    with open(f"/proc/{pid}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    assert ppid != os.getpid()
    assert os.getsid(pid) != os.getsid(0)
    assert daemon.chain() == ids(chain)
    assert read_view(daemon) == expected_view(2)
    daemon.stop()
    assert nothing_left(run_dir)


def test_start_twice_is_refused(tmp_path, run_dir):
    chain = make_chain(tmp_path, 1)
    daemon = qsd.Daemon.start(run_dir, chain)
    with pytest.raises(qsd.DaemonRunning):
        qsd.Daemon.start(run_dir, chain)
    assert daemon.alive()
    daemon.stop()


def test_start_on_missing_file_leaves_nothing(tmp_path, run_dir):
    base, top = make_chain(tmp_path, 2)
    os.unlink(base.path)
    with pytest.raises(qsd.DaemonFailed) as e:
        qsd.Daemon.start(run_dir, [base, top])
    assert e.value.rc != 0
    assert "No such file" in e.value.err
    assert e.value.argv[0] == "qemu-storage-daemon"
    assert nothing_left(run_dir)


@pytest.fixture
def privsep_daemon(monkeypatch):
    """Entry points run in a forked privsep daemon, as for a cinder-volume
    that is not root: arguments and results cross a socket (msgpack)."""
    monkeypatch.setattr(privsep, "init", lambda: None)
    context = privsep.sys_admin_pctxt
    context.set_client_mode(True)
    context.start(priv_context.Method.FORK)
    yield
    context.stop()
    context.set_client_mode(False)


def test_through_privsep_daemon(tmp_path, run_dir, privsep_daemon):
    base, top = make_chain(tmp_path, 2)
    daemon = qsd.Daemon.start(run_dir, [base, top])
    assert daemon.chain() == ids([base, top])
    new = overlay(tmp_path, top)
    daemon.snapshot(new)
    daemon.commit(top.vol_id, base.vol_id, backing_file=base.vol_id)
    daemon.resize(2 * SIZE)
    assert daemon.size() == 2 * SIZE
    with pytest.raises(qsd.QmpError):
        daemon.snapshot(qsd.Layer(str(uuid.uuid4()), str(tmp_path / "x"),
                                  "qcow2"))
    daemon.stop()
    assert nothing_left(run_dir)
    with pytest.raises(qsd.DaemonFailed):
        qsd.Daemon.start(run_dir, [qsd.Layer(base.vol_id,
                                             str(tmp_path / "x"), "raw")])
    assert nothing_left(run_dir)


# Failures.


def test_qmp_error(tmp_path, run_dir):
    base, top = make_chain(tmp_path, 2)
    daemon = qsd.Daemon.start(run_dir, [base, top])
    with qsd.QmpClient(daemon.sock) as qmp:
        with pytest.raises(qsd.QmpError) as e:
            qmp.execute("no-such-command")
        assert e.value.cls == "CommandNotFound"
        assert qmp.execute("query-block-exports")[0]["id"] == "view"

    # A failed snapshot leaves neither the chain nor the nodes changed.
    missing = qsd.Layer(str(uuid.uuid4()), str(tmp_path / "missing"),
                        "qcow2")
    with pytest.raises(qsd.QmpError) as e:
        daemon.snapshot(missing)
    assert e.value.cmd == "blockdev-add"
    assert daemon.chain() == ids([base, top])
    with qsd.QmpClient(daemon.sock) as qmp:
        names = {n["node-name"] for n in qmp.execute(
            "query-named-block-nodes", {"flat": True})}
    assert qsd.file_node_name(missing.vol_id) not in names
    daemon.stop()


@pytest.mark.parametrize("cleanup", ["stop", "cleanup_stale"])
def test_killed_daemon(tmp_path, run_dir, cleanup):
    daemon = qsd.Daemon.start(run_dir, make_chain(tmp_path, 2))
    os.kill(daemon.pid(), signal.SIGKILL)
    wait_for(lambda: not daemon.alive())

    assert daemon.pid() is None
    with pytest.raises(qsd.DaemonGone):
        daemon.top()
    assert mounted(daemon.view)  # Dead: ENOTCONN until unmounted.
    with pytest.raises(OSError):
        os.stat(daemon.view)

    getattr(daemon, cleanup)()
    assert nothing_left(run_dir)
    daemon.cleanup_stale()  # Idempotent.


# Live changes.


class Writer(threading.Thread):
    """Writes 4 KiB records, record i (from 1) filled with i, into slot
    i % SLOTS of the first MiB of the view, one after the other."""

    SLOTS = 256
    RECORD = 4 * KiB

    def __init__(self, view: str) -> None:
        super().__init__(daemon=True)
        self.view = view
        self.count = 0
        self.error: BaseException | None = None
        self._done = threading.Event()

    def run(self) -> None:
        fd = os.open(self.view, os.O_WRONLY)
        try:
            while not self._done.is_set():
                seq = self.count + 1
                os.pwrite(fd, self.record(seq), self.offset(seq))
                self.count = seq
        except BaseException as e:
            self.error = e
        finally:
            os.close(fd)

    def stop(self) -> int:
        self._done.set()
        self.join()
        if self.error is not None:
            raise self.error
        return self.count

    @classmethod
    def offset(cls, seq: int) -> int:
        return seq % cls.SLOTS * cls.RECORD

    @classmethod
    def record(cls, seq: int) -> bytes:
        return struct.pack("<Q", seq) * (cls.RECORD // 8)

    @classmethod
    def seqs(cls, data: bytes) -> list[int]:
        """The record in each slot (0 where none was written)."""
        seqs = []
        for slot in range(cls.SLOTS):
            block = data[slot * cls.RECORD:(slot + 1) * cls.RECORD]
            seq = struct.unpack_from("<Q", block)[0]
            assert block == struct.pack("<Q", seq) * (cls.RECORD // 8) \
                or seq == 0x1111111111111111, f"torn record in {slot}"
            seqs.append(seq)
        return seqs

    @classmethod
    def after(cls, last: int) -> list[int]:
        """Slots after records 1..last: the newest record of each."""
        seqs = [0x1111111111111111] * cls.SLOTS  # The base pattern.
        for seq in range(max(1, last - cls.SLOTS + 1), last + 1):
            seqs[seq % cls.SLOTS] = seq
        return seqs


def test_snapshot_while_writing(tmp_path, run_dir):
    base, top = make_chain(tmp_path, 2)
    daemon = qsd.Daemon.start(run_dir, [base, top])
    new = overlay(tmp_path, top)
    writer = Writer(daemon.view)
    writer.start()
    try:
        wait_for(lambda: writer.count > 2 * Writer.SLOTS)
        daemon.snapshot(new)
        frozen = hashlib.sha256(guest_view(top, tmp_path)).hexdigest()
        at_snapshot = writer.count
        wait_for(lambda: writer.count > at_snapshot + 2 * Writer.SLOTS)
    finally:
        last = writer.stop()

    assert daemon.top() == new.vol_id
    assert daemon.chain() == ids([base, top, new])
    daemon.snapshot(new)  # Idempotent.
    assert daemon.chain() == ids([base, top, new])
    view = read_view(daemon)
    daemon.stop()

    # The old top is frozen: unchanged since the snapshot, and it holds
    # exactly the records written before some point.
    old = guest_view(top, tmp_path)
    assert hashlib.sha256(old).hexdigest() == frozen
    cut = max(Writer.seqs(old))
    assert 2 * Writer.SLOTS < cut <= at_snapshot
    assert Writer.seqs(old) == Writer.after(cut)
    # The guest lost nothing; the later records are in the overlay.
    assert Writer.seqs(view) == Writer.after(last)
    assert guest_view(new, tmp_path) == view
    assert old[MiB:] == view[MiB:] == expected_view(2)[MiB:]
    assert backing_chain(new)[0] == (new.vol_id, top.vol_id)


def test_commit_intermediate(tmp_path, run_dir):
    base, top = make_chain(tmp_path, 2)
    daemon = qsd.Daemon.start(run_dir, [base, top])
    new = overlay(tmp_path, top)
    daemon.snapshot(new)
    write_view(daemon, 7 * MiB, b"\x44" * 64 * KiB)
    before = read_view(daemon)

    daemon.commit(top.vol_id, base.vol_id, backing_file=base.vol_id)

    assert daemon.chain() == ids([base, new])
    assert read_view(daemon) == before
    # The daemon let go of the committed volume: no lock on it now.
    subprocess.run(["qemu-img", "info", top.path], check=True,
                   capture_output=True)
    daemon.commit(top.vol_id, base.vol_id)  # Idempotent.
    daemon.stop()
    assert backing_chain(new) == [(new.vol_id, base.vol_id),
                                  (base.vol_id, None)]
    assert guest_view(new, tmp_path) == before
    qemuio.verify_pattern(base.path, "raw", 2 * MiB, 4 * MiB, 0x22)


def test_active_layer_cannot_be_merged(tmp_path, run_dir):
    base, top = make_chain(tmp_path, 2)
    daemon = qsd.Daemon.start(run_dir, [base, top])
    with pytest.raises(qsd.ActiveLayer):
        daemon.commit(top.vol_id, base.vol_id)
    with pytest.raises(qsd.ActiveLayer):
        daemon.stream(top.vol_id, base.vol_id, new_backing=None)
    with pytest.raises(errors.InvalidOperation):
        daemon.commit(base.vol_id, top.vol_id)
    assert daemon.chain() == ids([base, top])
    assert read_view(daemon) == expected_view(2)
    daemon.stop()


def test_stream(tmp_path, run_dir):
    base, mid, top = make_chain(tmp_path, 3)
    daemon = qsd.Daemon.start(run_dir, [base, mid, top])
    new = overlay(tmp_path, top)
    daemon.snapshot(new)
    before = read_view(daemon)
    assert before == expected_view(3)

    daemon.stream(top.vol_id, mid.vol_id, new_backing=base.vol_id,
                  backing_file=base.vol_id)
    assert daemon.chain() == ids([base, top, new])
    assert read_view(daemon) == before
    assert backing_chain(top) == [(top.vol_id, base.vol_id),
                                  (base.vol_id, None)]
    daemon.stream(top.vol_id, mid.vol_id, new_backing=base.vol_id)

    daemon.stream(top.vol_id, base.vol_id, new_backing=None)
    assert daemon.chain() == ids([top, new])
    assert read_view(daemon) == before
    daemon.stop()
    assert backing_chain(new) == [(new.vol_id, top.vol_id),
                                  (top.vol_id, None)]
    assert guest_view(top, tmp_path) == before


def test_resize(tmp_path, run_dir):
    daemon = qsd.Daemon.start(run_dir, make_chain(tmp_path, 2))
    fd = os.open(daemon.view, os.O_RDWR)
    try:
        daemon.resize(2 * SIZE)
        assert daemon.size() == 2 * SIZE
        # resize() returns once the view shows the new size, also to a
        # reader that opened it before.
        assert os.fstat(fd).st_size == 2 * SIZE
        assert os.pread(fd, SIZE, 0) == expected_view(2)
        assert os.pread(fd, SIZE, SIZE) == bytes(SIZE)
        os.pwrite(fd, b"\x55" * 4 * KiB, 2 * SIZE - 4 * KiB)
        assert os.pread(fd, 8 * KiB, 2 * SIZE - 4 * KiB) == b"\x55" * 4 * KiB
    finally:
        os.close(fd)
    with pytest.raises(errors.InvalidParameter):
        daemon.resize(SIZE)
    daemon.resize(2 * SIZE)  # Same size: nothing to do.
    daemon.stop()
