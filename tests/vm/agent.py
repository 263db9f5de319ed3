"""The agent that runs inside the test VM: a Nova host's view of a volume.

Not imported by the guest: the host sends this file's source as the
first line on the virtio-serial port ``agent`` and the guest's stub
(``tools/vm/build.py``) runs :func:`main` on the port. The host imports it
too, for :func:`writer_block` and the writer's layout.

Protocol: one JSON object per line each way. A request is ``{"id": N,
"op": NAME, "args": {...}}``; its answer ``{"id": N, "ok": true,
"result": ...}`` or ``{"id": N, "ok": false, "error": TEXT, "traceback":
TEXT}``. The agent first sends ``{"ready": UPTIME}``. Op ``exit`` answers,
then :func:`main` returns and the guest powers off.

Only the standard library at module level: os-brick is imported by
``setup``, in the guest.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import threading
import time
import traceback
from importlib import metadata

MiB = 1024 * 1024
BLOCK = 4096
"""What the writer writes at a time: one SCSI command, atomic against a
live snapshot (qemu drains in-flight requests first)."""
MAGIC = b"vmwriter"


def writer_block(seq: int) -> bytes:
    """Block number ``seq`` (from 1) of the writer: a header naming it,
    then a byte that depends on it."""
    header = MAGIC + struct.pack("<Q", seq)
    return header + bytes([seq % 251 + 1]) * (BLOCK - len(header))


def parse_writer_block(data: bytes) -> int | None:
    """The ``seq`` of a writer block, 0 for zeros, None for anything else
    (a torn or foreign block)."""
    if data == bytes(len(data)):
        return 0
    if not data.startswith(MAGIC):
        return None
    seq = struct.unpack("<Q", data[len(MAGIC):len(MAGIC) + 8])[0]
    return seq if data == writer_block(seq) else None


def writer_slot_offset(base: int, stride: int, slot: int) -> int:
    return base + slot * stride


def expected_cut(last_seq: int, slots: int) -> list[int]:
    """The seq each slot holds after writes 1..``last_seq`` (write ``n``
    goes to slot ``(n - 1) % slots``); 0 for a slot never written."""
    found = [0] * slots
    for seq in range(max(1, last_seq - slots + 1), last_seq + 1):
        found[(seq - 1) % slots] = seq
    return found


# Direct I/O on the device


def _buffer(length: int) -> mmap.mmap:
    """A page-aligned buffer, as O_DIRECT needs."""
    return mmap.mmap(-1, length)


def pwrite_direct(path: str, offset: int, data: bytes) -> None:
    buf = _buffer(len(data))
    buf.write(data)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        done = os.pwritev(fd, [buf], offset)
        if done != len(data):
            raise OSError(f"short write at {offset}: {done}")
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


def pread_direct(path: str, offset: int, length: int) -> bytes:
    buf = _buffer(length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        done = os.preadv(fd, [buf], offset)
        if done != length:
            raise OSError(f"short read at {offset}: {done}")
        return bytes(buf[:length])
    finally:
        os.close(fd)
        buf.close()


def device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


class Writer(threading.Thread):
    """Writes block 1, 2, ... to ``slots`` slots in turn, each with
    O_DIRECT and fsync, until stopped: a guest that keeps writing."""

    def __init__(self, path: str, base: int, stride: int,
                 slots: int) -> None:
        super().__init__(daemon=True)
        self.path, self.base, self.stride = path, base, stride
        self.slots = slots
        self.count = 0
        """Writes done (acknowledged): blocks 1..count."""
        self.stop_event = threading.Event()
        self.error: str | None = None
        self.slowest = 0.0

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                seq = self.count + 1
                offset = writer_slot_offset(self.base, self.stride,
                                            (seq - 1) % self.slots)
                start = time.monotonic()
                pwrite_direct(self.path, offset, writer_block(seq))
                self.slowest = max(self.slowest, time.monotonic() - start)
                self.count = seq
        except Exception:  # noqa: BLE001 -- reported by writer_stop
            self.error = traceback.format_exc()

    def state(self) -> dict:
        return {"count": self.count, "error": self.error,
                "slowest": round(self.slowest, 3), "alive": self.is_alive()}


# Operations


class Agent:
    """``op_NAME(**args)`` answers the request ``NAME``."""

    def __init__(self) -> None:
        self.connector = None
        self.iscsid: subprocess.Popen | None = None
        self.writer: Writer | None = None

    def op_ping(self) -> float:
        return _uptime()

    def op_setup(self, initiator: str, lock_path: str = "/run/lock/brick"
                 ) -> dict:
        """Name the initiator, start iscsid, set os-brick up to run its
        root commands in-process (we are root, there is no sudo)."""
        with open("/etc/iscsi/initiatorname.iscsi", "w") as f:
            f.write(f"InitiatorName={initiator}\n")
        os.makedirs(lock_path, exist_ok=True)
        os.environ["OSLO_LOCK_PATH"] = lock_path
        # In the foreground, its log in a file (there is no syslog).
        with open("/run/iscsid.log", "w") as log:
            self.iscsid = subprocess.Popen(
                ["iscsid", "-f"], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT)
        from os_brick import initiator as brick_initiator
        from os_brick.initiator import connector
        from os_brick.privileged import default
        default.set_client_mode(False)
        self.connector = connector.InitiatorConnector.factory(
            brick_initiator.ISCSI, None, use_multipath=False)
        return {"os_brick": metadata.version("os-brick"),
                "uptime": _uptime()}

    def op_connector_properties(self, ip: str) -> dict:
        """What Nova's host passes to Cinder's attachment_update."""
        from os_brick.initiator import connector
        return connector.get_connector_properties(None, ip, False, False)

    def op_connect(self, props: dict) -> dict:
        return self.connector.connect_volume(props)

    def op_disconnect(self, props: dict, device_info: dict) -> None:
        self.connector.disconnect_volume(props, device_info)

    def op_extend(self, props: dict) -> int:
        return self.connector.extend_volume(props)

    def op_size(self, path: str) -> int:
        return device_size(path)

    def op_write(self, path: str, offset: int, length: int,
                 pattern: int) -> None:
        pwrite_direct(path, offset, bytes([pattern]) * length)

    def op_check(self, path: str, offset: int, length: int,
                 pattern: int) -> bool:
        """Whether the bytes at ``offset`` read (directly) as ``pattern``."""
        return pread_direct(path, offset, length) == bytes([pattern]) * length

    def op_read_slots(self, path: str, base: int, stride: int,
                      slots: int) -> list[int | None]:
        """The writer block seq found in each slot (see
        :func:`parse_writer_block`)."""
        return [parse_writer_block(pread_direct(
                    path, writer_slot_offset(base, stride, s), BLOCK))
                for s in range(slots)]

    def op_writer_start(self, path: str, base: int, stride: int,
                        slots: int) -> None:
        if self.writer is not None:
            raise RuntimeError("a writer is running")
        self.writer = Writer(path, base, stride, slots)
        self.writer.start()

    def op_writer_state(self) -> dict:
        return self.writer.state()

    def op_writer_stop(self) -> dict:
        writer, self.writer = self.writer, None
        writer.stop_event.set()
        writer.join(300)
        return writer.state()

    def op_sh(self, argv: list[str], timeout: float = 60) -> dict:
        """Run a command (diagnostics); its exit code and output."""
        proc = subprocess.run(argv, capture_output=True, text=True,
                              timeout=timeout, check=False)
        return {"rc": proc.returncode, "stdout": proc.stdout,
                "stderr": proc.stderr}

    def op_exit(self) -> None:
        if self.writer is not None:
            self.writer.stop_event.set()


def _uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


class Channel:
    """JSON lines on a file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.lock = threading.Lock()

    def send(self, msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        with self.lock:
            while data:
                data = data[os.write(self.fd, data):]

    def receive(self) -> dict | None:
        while b"\n" not in self.buffer:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)


def main(fd: int) -> None:
    channel = Channel(fd)
    agent = Agent()
    channel.send({"ready": _uptime()})
    while (request := channel.receive()) is not None:
        op = request["op"]
        try:
            result = getattr(agent, f"op_{op}")(**request.get("args", {}))
            answer = {"ok": True, "result": result}
        except Exception as e:  # noqa: BLE001 -- the host gets it
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc()}
        channel.send({"id": request["id"], **answer})
        if op == "exit":
            return
