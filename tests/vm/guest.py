"""A throwaway QEMU guest with a full Debian kernel, driven by its agent.

The image is built by ``tools/vm/build.py`` into ``.vm/image/``. QEMU runs
in TCG mode (the machine's /dev/kvm cannot run stock kernels):

- the root image is opened with ``snapshot=on``, so a boot never changes
  it and several boots may share it;
- user networking (slirp): the guest is 10.0.2.15 and reaches the host's
  127.0.0.1 as :data:`HOST_IP` (10.0.2.2); it has no default route;
- the serial console (ttyS0: the kernel, init and the agent's stderr) goes
  to ``console.log`` in the work directory;
- a virtio-serial port named ``agent`` is a unix socket QEMU listens on
  (``wait=on``: the guest does not start before we are connected). We
  send it ``tests/vm/agent.py`` as the first line, then JSON requests,
  and read JSON answers (protocol in :mod:`tests.vm.agent`).

:func:`booted` is the context manager: the guest is powered off (the
agent's ``exit``), then killed if it does not stop, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

from tests.vm import agent as agent_mod

__all__ = ["HOST_IP", "IMAGE_DIR", "Guest", "GuestError", "booted"]

TOP = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
IMAGE_DIR = os.path.join(TOP, ".vm", "image")
BUILD = os.path.join(TOP, "tools", "vm", "build.py")
HOST_IP = "10.0.2.2"
GUEST_IP = "10.0.2.15"
QEMU = "qemu-system-x86_64"
CMDLINE = "console=ttyS0 panic=-1 net.ifnames=0 loglevel=4"
BOOT_TIMEOUT = 120
CALL_TIMEOUT = 180


class GuestError(Exception):
    """The guest failed: an operation raised, the guest died or did not
    answer in time. ``console`` is the end of its serial console."""

    msg = "{what}\n--- guest traceback ---\n{tb}\n--- console tail ---\n{con}"

    def __init__(self, what: str, console: str = "",
                 traceback: str = "") -> None:
        self.what = what
        self.console = console
        self.traceback = traceback
        super().__init__(self.msg.format(what=what, tb=traceback.strip(),
                                         con=console))


class Guest:
    """One running guest; use :func:`booted`."""

    def __init__(self, workdir: str, image_dir: str = IMAGE_DIR,
                 memory_mib: int = 1024) -> None:
        self.workdir = workdir
        self.image_dir = image_dir
        self.memory_mib = memory_mib
        self.socket_path = os.path.join(workdir, "agent.sock")
        self.console_path = os.path.join(workdir, "console.log")
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.reader = None
        self.next_id = 0
        self.broken = False
        """Whether the channel is out of step (a call timed out): no more
        calls then."""
        self.boot_seconds: float | None = None

    def argv(self) -> list[str]:
        image = self.image_dir
        return [
            QEMU, "-accel", "tcg", "-cpu", "max", "-smp", "1",
            "-m", str(self.memory_mib), "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot",
            # A system UUID, as every real host has (os-brick's connector
            # properties read it, or run dmidecode).
            "-uuid", str(uuid.uuid4()),
            "-kernel", os.path.join(image, "vmlinuz"),
            "-initrd", os.path.join(image, "initrd.img"),
            "-append", CMDLINE,
            "-drive", f"file={os.path.join(image, 'root.img')},if=virtio,"
                      "format=raw,snapshot=on",
            "-netdev", "user,id=net0", "-device",
            "virtio-net-pci,netdev=net0",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={self.socket_path},"
                        "server=on,wait=on",
            "-device", "virtserialport,chardev=agent,name=agent",
            "-serial", f"file:{self.console_path}"]

    def start(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Start QEMU and wait for the agent's ``ready``."""
        start = time.monotonic()
        log = open(os.path.join(self.workdir, "qemu.log"), "w")
        with log:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        self._connect(start + timeout)
        with open(agent_mod.__file__) as f:
            self._send({"agent": f.read()})
        ready = self._receive(start + timeout - time.monotonic(), "boot")
        if "ready" not in ready:
            raise GuestError(f"unexpected first message {ready}",
                             self.console())
        self.boot_seconds = time.monotonic() - start

    def _connect(self, deadline: float) -> None:
        while True:
            if self.proc.poll() is not None:
                raise GuestError(f"qemu exited with {self.proc.returncode}: "
                                 f"{self._qemu_log()}", self.console())
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(self.socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise GuestError("qemu did not listen on "
                                     f"{self.socket_path}") from None
                time.sleep(0.02)
        self.sock = sock
        self.reader = sock.makefile("rb")

    def _send(self, msg: dict) -> None:
        self.sock.sendall((json.dumps(msg) + "\n").encode())

    def _receive(self, timeout: float, what: str) -> dict:
        self.sock.settimeout(max(timeout, 0.1))
        try:
            line = self.reader.readline()
        except TimeoutError:
            self.broken = True
            raise GuestError(f"{what}: no answer in {timeout:.0f}s",
                             self.console()) from None
        if not line:
            self.broken = True
            raise GuestError(f"{what}: the guest closed the channel",
                             self.console())
        return json.loads(line)

    def call(self, op: str, timeout: float = CALL_TIMEOUT, **args):
        """Run the agent's ``op_<op>(**args)``; its result. GuestError if
        it raised."""
        if self.broken:
            raise GuestError(f"{op}: the channel is broken", self.console())
        self.next_id += 1
        self._send({"id": self.next_id, "op": op, "args": args})
        answer = self._receive(timeout, op)
        if answer.get("id") != self.next_id:
            self.broken = True
            raise GuestError(f"{op}: answer out of order: {answer}",
                             self.console())
        if not answer["ok"]:
            raise GuestError(f"{op}: {answer['error']}", self.console(),
                             answer.get("traceback", ""))
        return answer["result"]

    def stop(self, timeout: float = 30) -> None:
        """Power the guest off (the agent's ``exit``), or kill QEMU."""
        if self.proc is None:
            return
        try:
            if self.sock is not None and not self.broken and \
                    self.proc.poll() is None:
                with contextlib.suppress(GuestError, OSError):
                    self.call("exit", timeout=10)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        finally:
            if self.sock is not None:
                self.reader.close()
                self.sock.close()
                self.sock = None
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None

    def save_diagnostics(self) -> str | None:
        """Write the guest's iSCSI state, iscsid's log and the kernel's
        to ``diagnostics.txt`` in the work directory; its path, or None
        if the guest cannot tell."""
        script = ("iscsiadm -m session -P 1; lsscsi; cat /run/iscsid.log; "
                  "dmesg | tail -n 100")
        try:
            out = self.call("sh", timeout=30, argv=["sh", "-c", script])
        except (GuestError, OSError):
            return None
        path = os.path.join(self.workdir, "diagnostics.txt")
        with open(path, "w") as f:
            f.write(out["stdout"] + out["stderr"])
        return path

    def console(self, tail: int = 60) -> str:
        """The last ``tail`` lines of the serial console."""
        try:
            with open(self.console_path, errors="replace") as f:
                return "".join(f.readlines()[-tail:])
        except FileNotFoundError:
            return ""

    def _qemu_log(self) -> str:
        with open(os.path.join(self.workdir, "qemu.log"),
                  errors="replace") as f:
            return f.read()


@contextlib.contextmanager
def booted(workdir: str, **kw) -> Iterator[Guest]:
    """A started guest, stopped on exit whatever happened."""
    guest = Guest(workdir, **kw)
    try:
        guest.start()
        yield guest
    finally:
        guest.stop()


def build_image() -> float:
    """Build the image if needed (cached: fast); the seconds it took."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, BUILD], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{BUILD} failed:\n{proc.stdout}{proc.stderr}")
    return time.monotonic() - start
