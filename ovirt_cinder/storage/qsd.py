"""The one module that runs ``qemu-storage-daemon``.

The storage host owns every attached chain: one daemon per attached
volume opens the chain (every volume an explicit pair of block nodes, base
first) and serves the guest view, the top of the chain with its backing
chain below, as a raw file through a FUSE export at ``RUN_DIR/view``, for
tgtd to serve as a LUN. The daemon is started with ``--daemonize`` (it is
not our child and outlives a cinder-volume restart) and is driven over a
QMP socket, ``RUN_DIR/qmp.sock``; its pid is in ``RUN_DIR/pid``.

Nodes. Volume ``vol_id`` is the protocol node ``f<b32>`` (``file``, or
``host_device`` for a block device) under the format node ``v<b32>``
(``raw`` or ``qcow2``), where ``<b32>`` is the 16 bytes of the UUID in
lowercase base32 without padding (26 characters): QMP node names have at
most 31 characters, too few for 32 hex digits, and the name must give the
vol_id back (:func:`vol_id_of`). Every qcow2 format node names its backing
node explicitly (``backing=null`` for the base), so qemu never opens a
file by the name written in a header. The top: protocol node with
``discard=unmap``, format node with ``discard=unmap,detect-zeroes=unmap``.
Lower layers: format node ``read-only=on``, protocol node
``auto-read-only=on``. A protocol node uses ``cache.direct=on`` and
``aio=native`` when its file opens with ``O_DIRECT`` (probed for every
layer: a template may live on another filesystem), else
``cache.direct=off`` and ``aio=threads``; qemu refuses ``aio=native``
without ``cache.direct=on``, so a requested ``aio`` of ``native`` falls
back to ``threads`` there too.

Behaviour worth knowing (qemu-storage-daemon 7.2):

- The FUSE mountpoint of a file export must be an existing regular file
  (made empty before the start). The daemon reports the file as mode 0600,
  owned by the user that runs it: with ``allow-other=on`` other root
  processes (tgtd) read and write it, and ``O_DIRECT`` opens work; other
  users get EACCES anyway. On ``quit`` the daemon unmounts the view and
  removes its pidfile (the socket stays). Killed, it leaves a dead mount
  (``ENOTCONN``) that only ``fusermount3 -u -z`` removes.
- A writable FUSE export holds the RESIZE permission on its node for its
  whole life. The mirror job behind an active ``block-commit`` and the
  ``block-stream`` job both refuse to share RESIZE on the node they work
  on ("Permission conflict on node ...: permissions 'resize' are both
  required by an unnamed block device ... and unshared by commit job"):
  the active layer can be neither committed nor streamed into live.
  :meth:`Daemon.commit` and :meth:`Daemon.stream` raise
  :class:`ActiveLayer` for it; take a live :meth:`Daemon.snapshot` first,
  after which the old top is an intermediate layer that both handle.
- ``block-commit`` and ``block-stream`` reopen a read-only node they must
  write (the commit base, the stream top) read-write and back to
  read-only when the job ends; this works only because the protocol nodes
  of lower layers are ``auto-read-only`` (with ``read-only=on`` on the
  protocol node the job fails: "Block node is read-only"). ``device``
  of ``block-commit`` must be the root node (the export's node).
- ``block-commit`` and ``block-stream`` write ``backing-file`` verbatim
  into the overlay's header; without it qemu writes the base's absolute
  file name, so callers always pass the relative name. ``blockdev-snapshot``
  writes nothing: the overlay keeps the backing name it was created with.
  ``blockdev-snapshot`` reopens the old top read-only.
- Jobs run with ``auto-dismiss=false`` and are polled with ``query-jobs``:
  ``created``, ``running``, then ``concluded`` (with ``error`` on
  failure) until ``job-dismiss``; a job whose start fails goes straight
  to ``null`` and the command returns the error.
- ``block_resize`` also shrinks (no check), so :meth:`Daemon.resize`
  refuses a smaller size. The kernel caches the view's attributes for one
  second: until then ``stat`` shows the old size and reads past it return
  EOF; :meth:`Daemon.resize` returns once ``stat`` shows the new size.
- Locking: the daemon holds the top's image lock, so ``qemu-img info``
  of the top needs ``-U`` (``Failed to get shared "write" lock``) and
  ``qemu-io`` cannot open it. A lower qcow2 layer can be read without
  ``-U`` but not opened for writing or resized. A raw base is not
  protected at all: qemu shares WRITE and RESIZE on backing files and the
  raw driver passes that down, so another process can write or resize it
  under a running daemon; only the lease keeps writers away.

Root work (starting the daemon, QMP on its root-owned socket, signals,
unmounting, the root-only run directory) is in the ``_``-prefixed
functions decorated with ``privsep.sys_admin_pctxt.entrypoint``; they
take and return plain data. In a root process they run in-process
(:func:`ovirt_cinder.privsep.init`).
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ovirt_cinder import privsep
from ovirt_cinder.storage import errors

__all__ = [
    "ActiveLayer",
    "Daemon",
    "DaemonFailed",
    "DaemonGone",
    "DaemonRunning",
    "JobFailed",
    "Layer",
    "QmpClient",
    "QmpError",
    "QsdError",
    "Timeout",
    "file_node_name",
    "node_name",
    "vol_id_of",
]

LOG = logging.getLogger(__name__)

QSD = "qemu-storage-daemon"
FUSERMOUNT = "fusermount3"
EXPORT_ID = "view"
# Seconds: a QMP call, a poll of a job or a file, the wait for a killed
# daemon to go, the wait for the view to show a new size.
QMP_TIMEOUT = 30.0
POLL_INTERVAL = 0.05
KILL_WAIT = 10.0
VIEW_WAIT = 5.0
# sun_path is 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class Layer:
    vol_id: str
    path: str
    fmt: str


class QsdError(errors.StorageError):
    msg = "qemu-storage-daemon in {run_dir}: {reason}"


class DaemonFailed(QsdError):
    msg = "qemu-storage-daemon did not start (rc={rc}): {err}"


class DaemonRunning(QsdError):
    msg = "A qemu-storage-daemon already runs in {run_dir} (pid {pid})"


class DaemonGone(QsdError):
    msg = "No qemu-storage-daemon runs in {run_dir}: {reason}"


class QmpError(QsdError):
    msg = "QMP {cmd} failed: {cls}: {desc}"


class JobFailed(QsdError):
    msg = "Block job {job_id} failed: {error}"


class Timeout(QsdError):
    msg = "Timed out after {timeout} seconds waiting for {what}"


class ActiveLayer(QsdError):
    msg = ("Cannot {operation} volume {vol_id} live: it is the active "
           "layer, and qemu's jobs cannot share it with the writable FUSE "
           "export; take a live snapshot first")


# Node names.


def node_name(vol_id: str) -> str:
    """The format node of volume ``vol_id``."""
    return "v" + _b32(vol_id)


def file_node_name(vol_id: str) -> str:
    """The protocol node of volume ``vol_id``."""
    return "f" + _b32(vol_id)


def vol_id_of(node: str) -> str | None:
    """The vol_id of one of our nodes, None for any other node."""
    if len(node) != 27 or node[0] not in "vf":
        return None
    try:
        raw = base64.b32decode(node[1:].upper() + "======")
    except ValueError:
        return None
    return str(uuid.UUID(bytes=raw))


def _b32(vol_id: str) -> str:
    try:
        raw = uuid.UUID(vol_id).bytes
    except (ValueError, TypeError, AttributeError):
        raise errors.InvalidUUID(name="vol_id", value=vol_id) from None
    return base64.b32encode(raw).decode().rstrip("=").lower()


def _job_id(operation: str, vol_id: str) -> str:
    return f"{operation}-{_b32(vol_id)}"


# Node options.


def _supports_direct(path: str) -> bool:
    """Whether ``path`` opens with O_DIRECT (filesystems without it say
    EINVAL); other errors (a missing file) are left to qemu."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        return e.errno != errno.EINVAL
    os.close(fd)
    return True


def _protocol(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "file"
    return "host_device" if stat.S_ISBLK(mode) else "file"


def _file_options(layer: Layer, *, top: bool,
                  aio: str | None) -> dict[str, Any]:
    direct = _supports_direct(layer.path)
    if aio is None or (aio == "native" and not direct):
        aio = "native" if direct else "threads"
    opts: dict[str, Any] = {
        "driver": _protocol(layer.path),
        "node-name": file_node_name(layer.vol_id),
        "filename": layer.path,
        "cache": {"direct": direct},
        "aio": aio,
    }
    if top:
        opts["discard"] = "unmap"
    else:
        opts["auto-read-only"] = True
    return opts


def _format_options(layer: Layer, parent: Layer | None, *,
                    top: bool) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "driver": layer.fmt,
        "node-name": node_name(layer.vol_id),
        "file": file_node_name(layer.vol_id),
    }
    if layer.fmt == "qcow2":
        opts["backing"] = None if parent is None else node_name(
            parent.vol_id)
    elif layer.fmt != "raw" or parent is not None:
        raise errors.InvalidParameter(
            name="chain", value=layer.vol_id,
            reason=f"a {layer.fmt} volume cannot be in a chain here")
    if top:
        opts.update({"discard": "unmap", "detect-zeroes": "unmap"})
    else:
        opts["read-only"] = True
    return opts


class Daemon:
    """A handle on the daemon of one run directory (maybe not running)."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = os.path.abspath(run_dir)

    def __repr__(self) -> str:
        return f"Daemon({self.run_dir!r})"

    @property
    def view(self) -> str:
        return os.path.join(self.run_dir, "view")

    @property
    def sock(self) -> str:
        return os.path.join(self.run_dir, "qmp.sock")

    @property
    def pidfile(self) -> str:
        return os.path.join(self.run_dir, "pid")

    # Life cycle.

    @classmethod
    def start(cls, run_dir: str, chain: Sequence[Layer], *,
              timeout: float = 30, aio: str | None = None) -> Daemon:
        """Start a daemon serving ``chain`` (base first); return once the
        view is mounted and QMP answers. On failure nothing is left."""
        if not chain:
            raise errors.InvalidParameter(name="chain", value=chain,
                                          reason="empty")
        daemon = cls(run_dir)
        if len(daemon.sock) > MAX_SOCKET_PATH:
            raise errors.InvalidParameter(
                name="run_dir", value=run_dir,
                reason=f"socket path longer than {MAX_SOCKET_PATH} bytes")
        privsep.init()
        pid = daemon.pid()
        if pid is not None:
            raise DaemonRunning(run_dir=daemon.run_dir, pid=pid)
        daemon.cleanup_stale()
        argv = daemon._argv(chain, aio)
        rc, err = _start(daemon.run_dir, argv, timeout)
        if rc is None:
            raise Timeout(run_dir=daemon.run_dir, timeout=timeout,
                          what="qemu-storage-daemon to start")
        if rc != 0:
            raise DaemonFailed(run_dir=daemon.run_dir, rc=rc,
                               err=err.strip(), argv=argv)
        try:
            daemon._check_started()
        except BaseException:
            daemon._stop_quietly()
            raise
        return daemon

    def stop(self, timeout: float = 30) -> None:
        """Quit (SIGTERM without QMP, SIGKILL after ``timeout``), then
        unmount a dead view and remove the run directory. Idempotent."""
        privsep.init()
        pid = self.pid()
        if pid is not None:
            self._terminate(pid, timeout)
        self._remove()

    def _stop_quietly(self) -> None:
        """Stop after a failure, never hiding it."""
        try:
            self.stop()
        except (QsdError, OSError) as e:
            LOG.warning("Cannot stop %s: %s", self, e)

    def cleanup_stale(self) -> None:
        """Unmount a dead view and remove the run directory, unless the
        daemon runs (after a crash or a reboot)."""
        privsep.init()
        if not self.alive():
            self._remove()

    def pid(self) -> int | None:
        """The daemon's pid, None when it does not run."""
        privsep.init()
        return _pid(self.pidfile)

    def alive(self) -> bool:
        return self.pid() is not None

    # Queries.

    def top(self) -> str:
        """vol_id of the volume the view serves now."""
        return self.chain()[0]

    def chain(self) -> list[str]:
        """vol_ids from the top to the base, as the daemon sees them."""
        graph = self._execute("x-debug-query-block-graph")
        names = {n["id"]: n["name"] for n in graph["nodes"]}
        ids = {name: node_id for node_id, name in names.items() if name}
        children: dict[int, dict[str, int]] = {}
        for edge in graph["edges"]:
            children.setdefault(edge["parent"], {})[edge["name"]] = \
                edge["child"]
        return _walk(ids[self._export_node()], names, children)

    def size(self) -> int:
        """The guest-visible size in bytes (virtual size of the top)."""
        top = node_name(self.top())
        for node in self._execute("query-named-block-nodes",
                                  {"flat": True}):
            if node["node-name"] == top:
                return node["image"]["virtual-size"]
        raise QsdError(run_dir=self.run_dir, reason=f"no node {top}")

    # Changes.

    def snapshot(self, overlay: Layer) -> None:
        """Make ``overlay`` (a qcow2 file over the current top, made by
        the caller) the new top; writes go on into it. Idempotent."""
        top = self.top()
        if top == overlay.vol_id:
            return
        self._drop_nodes(overlay.vol_id)  # Left by an interrupted call.
        added: list[str] = []
        try:
            for opts in (_file_options(overlay, top=True, aio=None),
                         _format_options(overlay, None, top=True)):
                self._execute("blockdev-add", opts)
                added.insert(0, opts["node-name"])
            self._execute("blockdev-snapshot",
                          {"node": node_name(top),
                           "overlay": node_name(overlay.vol_id)})
        except BaseException:
            self._forget(added)
            raise

    def commit(self, top_vol_id: str, base_vol_id: str, *,
               backing_file: str | None = None,
               timeout: float | None = None) -> None:
        """Merge ``top_vol_id`` into its parent ``base_vol_id`` and drop
        it from the graph; ``backing_file`` is the name written into the
        overlay of ``top_vol_id``. Idempotent. The active layer cannot be
        committed (:class:`ActiveLayer`, see the module docstring)."""
        job = _job_id("commit", top_vol_id)
        self._finish_job(job, timeout)
        chain = self.chain()
        if top_vol_id not in chain:
            self._drop_nodes(top_vol_id)
            return
        if chain[0] == top_vol_id:
            raise ActiveLayer(operation="commit", vol_id=top_vol_id)
        _check_parent(chain, top_vol_id, base_vol_id)
        args: dict[str, Any] = {
            "job-id": job, "device": node_name(chain[0]),
            "top-node": node_name(top_vol_id),
            "base-node": node_name(base_vol_id), "auto-dismiss": False}
        if backing_file is not None:
            args["backing-file"] = backing_file
        self._execute("block-commit", args)
        self._finish_job(job, timeout)
        self._drop_nodes(top_vol_id)

    def stream(self, top_vol_id: str, base_vol_id: str, *,
               new_backing: str | None, backing_file: str | None = None,
               timeout: float | None = None) -> None:
        """Pull ``base_vol_id`` (the parent of ``top_vol_id``) into
        ``top_vol_id``, whose parent becomes ``new_backing`` (the parent
        of ``base_vol_id``, None for none), and drop it from the graph.
        Idempotent. The active layer cannot be streamed into
        (:class:`ActiveLayer`)."""
        job = _job_id("stream", base_vol_id)
        self._finish_job(job, timeout)
        chain = self.chain()
        if base_vol_id not in chain:
            self._drop_nodes(base_vol_id)
            return
        if chain[0] == top_vol_id:
            raise ActiveLayer(operation="stream into", vol_id=top_vol_id)
        _check_parent(chain, top_vol_id, base_vol_id)
        _check_parent(chain, base_vol_id, new_backing)
        args: dict[str, Any] = {"job-id": job,
                                "device": node_name(top_vol_id),
                                "auto-dismiss": False}
        if new_backing is not None:
            args["base-node"] = node_name(new_backing)
            if backing_file is not None:
                args["backing-file"] = backing_file
        elif backing_file is not None:
            raise errors.InvalidParameter(
                name="backing_file", value=backing_file,
                reason="a volume without backing has no backing file")
        self._execute("block-stream", args)
        self._finish_job(job, timeout)
        self._drop_nodes(base_vol_id)

    def resize(self, size: int) -> None:
        """Grow the guest view to ``size`` bytes; returns once ``stat``
        of the view shows it. Shrinking is refused."""
        current = self.size()
        if size < current:
            raise errors.InvalidParameter(
                name="size", value=size,
                reason=f"smaller than the current size {current}")
        if size > current:
            self._execute("block_resize", {"node-name": node_name(
                self.top()), "size": size})
        self._wait(lambda: _view_size(self.view) == size, VIEW_WAIT,
                   f"the view to show size {size}")

    # Helpers.

    def _argv(self, chain: Sequence[Layer], aio: str | None) -> list[str]:
        argv = [QSD, "--daemonize", "--pidfile", self.pidfile,
                "--chardev", "socket,id=qmp,server=on,wait=off,path="
                + self.sock.replace(",", ",,"),
                "--monitor", "chardev=qmp"]
        parent = None
        for layer in chain:
            top = layer is chain[-1]
            for opts in (_file_options(layer, top=top, aio=aio),
                         _format_options(layer, parent, top=top)):
                argv += ["--blockdev", json.dumps(opts)]
            parent = layer
        export = {"type": "fuse", "id": EXPORT_ID,
                  "node-name": node_name(chain[-1].vol_id),
                  "mountpoint": self.view, "writable": True,
                  "growable": False, "allow-other": "on"}
        return [*argv, "--export", json.dumps(export)]

    def _check_started(self) -> None:
        """The parent exits once the export is mounted and the monitor
        listens; check both."""
        self._export_node()
        if not _mounted(_mountpoint(self.run_dir)):
            raise QsdError(run_dir=self.run_dir,
                           reason=f"{self.view} is not mounted")

    def _export_node(self) -> str:
        for export in self._execute("query-block-exports"):
            if export["id"] == EXPORT_ID:
                return export["node-name"]
        raise QsdError(run_dir=self.run_dir, reason="no export")

    def _execute(self, cmd: str, args: dict[str, Any] | None = None, *,
                 timeout: float = QMP_TIMEOUT) -> Any:
        privsep.init()
        reply = _qmp(self.sock, cmd, args or {}, timeout)
        if "return" in reply:
            return reply["return"]
        if "error" in reply:
            error = reply["error"]
            raise QmpError(run_dir=self.run_dir, cmd=cmd, args=args,
                           cls=error.get("class"), desc=error.get("desc"))
        if "timeout" in reply:
            raise Timeout(run_dir=self.run_dir, timeout=timeout,
                          what=f"QMP {cmd}")
        raise DaemonGone(run_dir=self.run_dir, reason=reply["gone"])

    def _finish_job(self, job_id: str, timeout: float | None) -> None:
        """Wait for job ``job_id`` (if any) to conclude; dismiss it."""
        info = self._wait_job(job_id, timeout)
        if info is None:
            return
        self._execute("job-dismiss", {"id": job_id})
        if "error" in info:
            raise JobFailed(run_dir=self.run_dir, job_id=job_id,
                            error=info["error"])

    def _wait_job(self, job_id: str,
                  timeout: float | None) -> dict[str, Any] | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            jobs = self._execute("query-jobs")
            info = next((j for j in jobs if j["id"] == job_id), None)
            if info is None or info["status"] == "concluded":
                return info
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(run_dir=self.run_dir, timeout=timeout,
                              what=f"block job {job_id} ({info['status']})")
            time.sleep(POLL_INTERVAL)

    def _drop_nodes(self, vol_id: str) -> None:
        """blockdev-del the nodes of ``vol_id`` that exist."""
        nodes = {n["node-name"] for n in self._execute(
            "query-named-block-nodes", {"flat": True})}
        for name in (node_name(vol_id), file_node_name(vol_id)):
            if name in nodes:
                self._execute("blockdev-del", {"node-name": name})

    def _forget(self, names: list[str]) -> None:
        """blockdev-del ``names`` after a failure, never raising."""
        for name in names:
            try:
                self._execute("blockdev-del", {"node-name": name})
            except QsdError as e:
                LOG.warning("Cannot remove node %s: %s", name, e)

    def _terminate(self, pid: int, timeout: float) -> None:
        try:
            self._execute("quit", timeout=min(timeout, QMP_TIMEOUT))
        except QsdError as e:
            LOG.warning("Cannot quit %s over QMP (%s), terminating", self,
                        e)
            _signal(pid, int(signal.SIGTERM))
        if self._gone(pid, timeout):
            return
        LOG.warning("%s pid %s still runs after %s seconds, killing", self,
                    pid, timeout)
        _signal(pid, int(signal.SIGKILL))
        if not self._gone(pid, KILL_WAIT):
            raise Timeout(run_dir=self.run_dir, timeout=KILL_WAIT,
                          what=f"pid {pid} to exit after SIGKILL")

    def _gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while _running(pid, self.pidfile, ours=True):
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL)
        return True

    def _remove(self) -> None:
        reason = _cleanup(self.run_dir)
        if reason is not None:
            raise QsdError(run_dir=self.run_dir, reason=reason)

    def _wait(self, done: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() >= deadline:
                raise Timeout(run_dir=self.run_dir, timeout=timeout,
                              what=what)
            time.sleep(POLL_INTERVAL)


def _walk(node: int | None, names: dict[int, str],
          children: dict[int, dict[str, int]]) -> list[str]:
    """vol_ids down the backing chain from ``node``, through the filter
    nodes jobs insert (their one child is ``file`` or ``backing``)."""
    chain: list[str] = []
    seen = set()
    while node is not None and node not in seen:
        seen.add(node)
        name = names[node]
        edges = children.get(node, {})
        vol_id = vol_id_of(name) if name.startswith("v") else None
        if vol_id is not None:
            chain.append(vol_id)
            node = edges.get("backing")
        else:
            node = edges.get("backing", edges.get("file"))
    return chain


def _check_parent(chain: list[str], vol_id: str,
                  parent: str | None) -> None:
    if vol_id not in chain:
        raise errors.InvalidOperation(
            operation=f"merge {vol_id} with {parent}",
            reason=f"{vol_id} is not in the daemon's chain")
    index = chain.index(vol_id)
    actual = chain[index + 1] if index + 1 < len(chain) else None
    if actual != parent:
        raise errors.InvalidOperation(
            operation=f"merge {vol_id} with {parent}",
            reason=f"its parent in the daemon is {actual}")


# Plain helpers, no privilege needed.


_PF_KTHREAD = 0x00200000


def _running(pid: int, pidfile: str, *, ours: bool = False) -> bool:
    """Whether ``pid`` is a live qemu-storage-daemon using ``pidfile``.

    ``ours``: the pid comes from that pidfile. A dying daemon is still
    running while any of its threads is: its thread group leader turns
    zombie (empty cmdline) first, and its files (and qemu's image locks
    on them) go only with the last thread. Where nothing reaps orphans
    (a container's init) the zombie stays: it is gone once it is the only
    task left."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    if argv == [b""]:
        return ours and _exiting(pid)
    return (os.path.basename(argv[0]) == QSD.encode()
            and pidfile.encode() in argv)


def _exiting(pid: int) -> bool:
    """Whether ``pid``, whose cmdline is empty, is a process still on its
    way out (its memory is released before its files are, and a thread
    group leader turns zombie before its other threads are gone), rather
    than a zombie alone or a kernel thread."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    state, flags = fields[0], int(fields[6])
    if flags & _PF_KTHREAD:
        return False
    return not (state in ("Z", "X") and len(tasks) <= 1)


def _mountpoint(run_dir: str) -> str:
    """The view as /proc/mounts names it (symlinks resolved)."""
    return os.path.join(os.path.realpath(run_dir), "view")


def _mounted(path: str) -> bool:
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            if _unescape(line.split()[1]) == path:
                return True
    return False


def _unescape(field: str) -> str:
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"),
                       ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C"}


class QmpClient:
    """A tiny synchronous QMP client over a unix socket.

    ``with QmpClient(path) as qmp: qmp.execute("query-jobs")``: connects,
    reads the greeting, negotiates capabilities; every call waits at most
    ``timeout`` seconds for its reply and skips events. Socket errors
    (OSError, TimeoutError on expiry) propagate; :meth:`execute` raises
    :class:`QmpError` for an error reply, :meth:`call` returns it.
    """

    def __init__(self, path: str, timeout: float = QMP_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> QmpClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(self.timeout)
            self._sock.connect(self.path)
            deadline = time.monotonic() + self.timeout
            if "QMP" not in self._read(deadline):
                raise ConnectionError(f"no QMP greeting on {self.path}")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf = b""

    def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        reply = self.call(cmd, args)
        if "error" in reply:
            raise QmpError(run_dir=os.path.dirname(self.path), cmd=cmd,
                           args=args, cls=reply["error"].get("class"),
                           desc=reply["error"].get("desc"))
        return reply["return"]

    def call(self, cmd: str,
             args: dict[str, Any] | None = None) -> dict[str, Any]:
        """The reply to ``cmd``: ``{"return": ...}`` or ``{"error": ...}``."""
        if self._sock is None:
            raise ConnectionError(f"not connected to {self.path}")
        msg: dict[str, Any] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        deadline = time.monotonic() + self.timeout
        self._sock.settimeout(self.timeout)
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read(deadline)
            if "return" in reply or "error" in reply:
                return reply

    def _read(self, deadline: float) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no QMP reply on {self.path}")
            self._sock.settimeout(remaining)
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionResetError(
                    errno.ECONNRESET, f"QMP connection closed: {self.path}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)


# Privileged entry points: plain data in and out.


@privsep.sys_admin_pctxt.entrypoint
def _start(run_dir: str, argv: list[str],
           timeout: float) -> tuple[int | None, str]:
    """Make ``run_dir`` (0700) and the empty view file, run the daemon
    and wait for its parent to exit: ``(rc, stderr)``, rc None if it
    did not exit in ``timeout`` seconds. On failure nothing is left."""
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    os.mkdir(run_dir, 0o700)
    rc: int | None = None
    try:
        os.close(os.open(os.path.join(run_dir, "view"),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        rc, err = _run(argv, timeout)
        return rc, err
    finally:
        if rc != 0:
            _remove(run_dir)


@privsep.sys_admin_pctxt.entrypoint
def _pid(pidfile: str) -> int | None:
    try:
        with open(pidfile, encoding="ascii") as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pid if _running(pid, pidfile, ours=True) else None


@privsep.sys_admin_pctxt.entrypoint
def _qmp(sock: str, cmd: str, args: dict[str, Any],
         timeout: float) -> dict[str, Any]:
    """One QMP command: its reply, or ``{"timeout": reason}`` or
    ``{"gone": reason}`` when the daemon did not answer."""
    try:
        with QmpClient(sock, timeout) as client:
            return client.call(cmd, args)
    except TimeoutError as e:
        return {"timeout": str(e)}
    except OSError as e:
        return {"gone": f"{sock}: {e.strerror or e}"}
    except (QmpError, ValueError) as e:
        return {"error": {"class": "ProtocolError", "desc": str(e)}}


@privsep.sys_admin_pctxt.entrypoint
def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@privsep.sys_admin_pctxt.entrypoint
def _view_size(view: str) -> int | None:
    try:
        return os.stat(view).st_size
    except OSError:
        return None


@privsep.sys_admin_pctxt.entrypoint
def _cleanup(run_dir: str) -> str | None:
    """Kill a daemon left without pidfile, unmount a dead view, remove
    ``run_dir``; a reason when something is left."""
    try:
        _remove(run_dir)
    except OSError as e:
        return f"cannot clean up: {e}"
    return None


# Root helpers, called only from the entry points.


def _run(argv: list[str], timeout: float) -> tuple[int | None, str]:
    """Run ``argv`` to its end: ``(rc, stderr)``; rc None after a
    timeout (the child then got SIGKILL). Output goes to a file: the
    daemonized grandchild keeps a pipe open until it is ready."""
    with tempfile.TemporaryFile() as err_file:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL,
                                    stderr=err_file, env=_env())
        except OSError as e:
            return 127, f"cannot run {argv[0]}: {e}"
        try:
            rc: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        err_file.seek(0)
        err = err_file.read().decode("utf-8", errors="replace")
    if rc is None:
        err += f"\nstill starting after {timeout} seconds, killed"
    return rc, err


def _remove(run_dir: str) -> None:
    pidfile = os.path.join(run_dir, "pid")
    for pid in _daemons(pidfile):
        _kill(pid, pidfile)
    view = _mountpoint(run_dir)
    if _mounted(view):
        proc = subprocess.run([FUSERMOUNT, "-u", "-z", view],
                              stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, env=_env(), check=False)
        if _mounted(view):
            raise OSError(errno.EBUSY, f"{FUSERMOUNT} -u -z {view} failed "
                          f"(rc={proc.returncode}): {proc.stderr.strip()}")
    if os.path.lexists(run_dir):
        shutil.rmtree(run_dir)


def _daemons(pidfile: str) -> list[int]:
    """Pids of live daemons started with ``--pidfile pidfile``."""
    return [int(entry) for entry in os.listdir("/proc")
            if entry.isdigit() and _running(int(entry), pidfile)]


def _kill(pid: int, pidfile: str) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + KILL_WAIT
    while (_running(pid, pidfile, ours=True)
           and time.monotonic() < deadline):
        time.sleep(POLL_INTERVAL)
