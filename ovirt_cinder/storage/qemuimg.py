"""The one module that runs ``qemu-img``.

One function per subcommand. Every command is an argv list run with
``LC_ALL=C``, reading ``--output json`` where the subcommand has it; a
non-zero exit code becomes :class:`errors.QemuImgError` carrying ``cmd``
(the subcommand), ``rc``, ``out``, ``err`` and the full ``argv``. Results
are frozen dataclasses.

Behaviour worth knowing (qemu-img 7.2):

- ``info(untrusted=True)`` runs ``prlimit --cpu=30 --as=1073741824
  qemu-img info -f FMT ...``: the format must be given (probing untrusted
  bytes is never done) and the backing chain is never opened.
  ``check(untrusted=True)`` runs under the same limits.
- ``convert`` always writes sparse output (qemu-img's default ``-S 4k``;
  ``-S`` is never passed, so ``-C`` stays usable). With ``backing`` it
  passes ``-B backing -F backing_fmt``: qemu-img then copies only the
  clusters allocated in the source's top layer and leaves everything else
  unallocated in the target, so reads fall through to the backing file.
  This also works together with ``-n`` (``create=False``): create the
  target with :func:`create` over the backing first, then convert with
  the same ``backing`` (with ``-n`` qemu-img takes ``-B`` only as "skip
  what is not in the source's top layer" and never checks the target's
  real backing file). Zero clusters of the source's top stay zero clusters
  and still hide the base. Without ``-B`` a ``-n`` convert copies the whole
  chain (base data and zeros) into the target's top layer. qemu-img also
  accepts ``-n -B`` into a raw target, silently leaving the base data out,
  so a backing is refused (ValueError) unless the target is qcow2.
- ``convert``'s default target cache mode is ``unsafe``: qemu-img never
  flushes the target, and a copy it reports done may be lost with the
  page cache. A copy that must survive a power loss passes
  ``cache="none"`` (O_DIRECT writes, then one ``fdatasync`` when qemu-img
  closes the target; also with ``copy_offload``) or ``"writeback"`` (page
  cache, ``fdatasync`` at close). ``unordered_writes`` (``-W``) lets its
  coroutines write as soon as they have read, out of order: for a target
  nobody reads before the copy ends.
- ``progress`` callbacks run the command with ``-p`` and parse the
  ``(NN.NN/100%)`` updates qemu-img writes to stdout (separated by ``\\r``);
  the callback gets each new, larger percentage (qemu-img ends with 100).
  If the callback raises, the child is killed and the error propagates.
- ``commit`` keeps the top's content by default (``-d``), so a failed flow
  can still read the top; ``drop=True`` lets qemu-img empty the top.
- ``check`` exit codes: 0 clean, 2 corruptions, 3 leaks (results, never
  raised), 63 the format has no checks (an ``ok`` result with zeros), 1 and
  anything else (check not completed, cannot open) raise QemuImgError.

Every command runs under a bound, so a hung qemu-img (a dead NFS server,
a FIFO where an image should be) never blocks its caller, and the lease
it holds, forever:

- quick commands (``info``, ``create``, ``resize``, ``rebase`` with
  ``unsafe``, ``check``, ``measure``, ``map``) get a wall-clock
  ``timeout``, :data:`QUICK_TIMEOUT` seconds (120) unless given;
- data commands (``convert``, ``commit``, safe ``rebase``) may take hours
  and get a ``stall_timeout`` instead, :data:`STALL_TIMEOUT` seconds (600)
  unless given: they always run with ``-p`` and are killed once neither
  their progress nor their I/O counters have moved for that long.

:func:`set_timeouts` changes both defaults for the whole process. On
expiry the child gets SIGKILL and is reaped, then
:class:`errors.QemuImgTimeout` (a QemuImgError) is raised with ``cmd``,
``timeout``, ``reason``, ``stalled``, ``rc``, ``out``, ``err``, ``argv``
and ``pid``.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ovirt_cinder.storage import errors
from ovirt_cinder.storage.constants import GiB

__all__ = [
    "CheckResult",
    "Extent",
    "ImageInfo",
    "Measure",
    "allocated_bytes",
    "check",
    "commit",
    "convert",
    "create",
    "info",
    "map",
    "measure",
    "rebase",
    "resize",
    "set_timeouts",
]

QEMU_IMG = "qemu-img"
UNTRUSTED_CPU_SECONDS = 30
UNTRUSTED_ADDRESS_SPACE = 1 * GiB
PREALLOCATION_MODES = ("off", "falloc", "full", "metadata")

CHECK_OK = 0
CHECK_CORRUPTIONS = 2
CHECK_LEAKS = 3
CHECK_NOT_SUPPORTED = 63

# Default bounds (seconds), changed by set_timeouts(): the run time of
# a quick command, the time without progress of a data command.
QUICK_TIMEOUT = 120.0
STALL_TIMEOUT = 600.0
# How often a running command's progress is read and its bound checked,
# and the longest sleep between two looks at the child.
POLL_INTERVAL = 0.2
MAX_POLL_DELAY = 0.005
# How long to wait for a killed child to go.
KILL_WAIT = 10.0

Progress = Callable[[float], None]

_PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
_MAX_PENDING = 64
_CHUNK = 65536
_IO_KEYS = (b"rchar", b"wchar", b"syscr", b"syscw")


@dataclass(frozen=True)
class ImageInfo:
    filename: str
    format: str
    virtual_size: int
    actual_size: int
    backing_filename: str | None
    backing_format: str | None
    cluster_size: int | None
    compat: str | None
    data_file: str | None
    dirty: bool
    corrupt: bool


@dataclass(frozen=True)
class Measure:
    required: int
    fully_allocated: int


@dataclass(frozen=True)
class CheckResult:
    corruptions: int
    leaks: int
    check_errors: int
    image_end_offset: int | None

    @property
    def ok(self) -> bool:
        return not (self.corruptions or self.leaks or self.check_errors)


@dataclass(frozen=True)
class Extent:
    start: int
    length: int
    data: bool
    zero: bool
    depth: int


def set_timeouts(quick: float, stall: float) -> None:
    """Set the default bounds of every later call, in seconds (> 0)."""
    global QUICK_TIMEOUT, STALL_TIMEOUT
    quick = _timeout(quick, None, "quick")
    stall = _timeout(stall, None, "stall")
    QUICK_TIMEOUT, STALL_TIMEOUT = quick, stall


# Subcommands.


def info(path: str, fmt: str | None = None, *, untrusted: bool = False,
         force_share: bool = True,
         timeout: float | None = None) -> ImageInfo:
    """Return ``qemu-img info`` of one image (never its backing chain)."""
    if untrusted and fmt is None:
        raise ValueError("untrusted images need an explicit format")
    args = ["info", "--output", "json"]
    args += _format_args(fmt)
    if force_share:
        args.append("-U")
    args.append(path)
    out = _run(args, limits=untrusted, timeout=timeout)
    return _parse_info(_loads(out, args))


def create(path: str, fmt: str, size: int | None = None, *,
           backing: str | None = None, backing_fmt: str | None = None,
           preallocation: str | None = None, compat: str = "1.1",
           cluster_size: int | None = None, unsafe: bool = False,
           timeout: float | None = None) -> None:
    """Create an image; a backing file always comes with its format.

    ``unsafe`` (``-u``, needs ``size``): do not open the backing file,
    for an overlay on an image another process holds open for writing
    (qemu's image locks refuse to open it here)."""
    _check_backing(backing, backing_fmt)
    _check_preallocation(preallocation)
    options = _create_options(fmt, compat, preallocation, cluster_size)
    args = ["create", "-f", fmt]
    if options:
        args += ["-o", options]
    if backing is not None:
        args += ["-b", backing, "-F", str(backing_fmt)]
        if unsafe:
            if size is None:
                raise ValueError("an unsafe overlay needs its size")
            args.append("-u")
    args.append(path)
    if size is not None:
        args.append(str(size))
    _run(args, timeout=timeout)


def convert(src: str, dst: str, *, src_fmt: str, dst_fmt: str,
            backing: str | None = None, backing_fmt: str | None = None,
            create: bool = True, target_is_zero: bool = False,
            copy_offload: bool = False, preallocation: str | None = None,
            compat: str = "1.1", cache: str | None = None,
            unordered_writes: bool = False,
            progress: Progress | None = None,
            stall_timeout: float | None = None) -> None:
    """Copy ``src`` into ``dst`` (sparse).

    ``backing``: ``dst`` gets only the clusters allocated in the top layer
    of ``src`` (``-B backing -F backing_fmt``), see the module docstring;
    with ``create=False`` ``dst`` must already have that backing file.
    ``target_is_zero`` needs ``create=False`` and no backing; ``-o``
    options (``compat``, ``preallocation``) apply only when creating.
    ``cache`` is the target cache mode (``-t``; qemu-img's default,
    ``unsafe``, never flushes: see the module docstring);
    ``unordered_writes`` passes ``-W``.
    """
    _check_backing(backing, backing_fmt)
    _check_preallocation(preallocation)
    _check_convert_flags(dst_fmt, backing, create, target_is_zero,
                         preallocation)
    args = ["convert", "-f", src_fmt, "-O", dst_fmt]
    if create:
        options = _create_options(dst_fmt, compat, preallocation, None)
        if options:
            args += ["-o", options]
    else:
        args.append("-n")
    if backing is not None:
        args += ["-B", backing, "-F", str(backing_fmt)]
    if target_is_zero:
        args.append("--target-is-zero")
    if copy_offload:
        args.append("-C")
    if cache is not None:
        args += ["-t", cache]
    if unordered_writes:
        args.append("-W")
    args += [src, dst]
    _run_data(args, progress, stall_timeout)


def commit(top: str, *, top_fmt: str = "qcow2", base: str | None = None,
           progress: Progress | None = None, drop: bool = False,
           stall_timeout: float | None = None) -> None:
    """Commit ``top`` into its backing file (or into ``base``).

    The top keeps its content (``-d``) unless ``drop`` is true; removing
    the top volume is the caller's decision, taken after the commit.
    """
    args = ["commit", "-f", top_fmt]
    if base is not None:
        args += ["-b", base]
    if not drop:
        args.append("-d")
    args.append(top)
    _run_data(args, progress, stall_timeout)


def rebase(path: str, backing: str | None, *, backing_fmt: str | None,
           fmt: str = "qcow2", unsafe: bool = False,
           progress: Progress | None = None, timeout: float | None = None,
           stall_timeout: float | None = None) -> None:
    """Change the backing file of ``path``.

    ``backing`` None or "" rebases onto nothing. Safe mode (the default)
    copies into ``path`` the data that differs between the old and the
    new backing chain, under ``stall_timeout``; ``unsafe`` only rewrites
    the header, under ``timeout``.
    """
    args = ["rebase", "-f", fmt]
    if unsafe:
        args.append("-u")
    if backing:
        _check_backing(backing, backing_fmt)
        args += ["-b", backing, "-F", str(backing_fmt)]
    else:
        args += ["-b", ""]
    args.append(path)
    if not unsafe:
        _run_data(args, progress, stall_timeout)
    elif progress is None:
        _run(args, timeout=timeout)
    else:
        args = [args[0], "-p", *args[1:]]
        rc, out, err = _execute(args, timeout=timeout, progress=progress)
        if rc != 0:
            raise _error(args, rc, out, err)


def resize(path: str, size: int, *, fmt: str,
           preallocation: str | None = None, shrink: bool = False,
           timeout: float | None = None) -> None:
    """Set the virtual size; making it smaller needs ``shrink=True``."""
    _check_preallocation(preallocation)
    args = ["resize", "-f", fmt]
    if preallocation is not None:
        args.append(f"--preallocation={preallocation}")
    if shrink:
        args.append("--shrink")
    args += [path, str(size)]
    _run(args, timeout=timeout)


def measure(path: str, *, fmt: str, out_fmt: str,
            timeout: float | None = None) -> Measure:
    """Bytes needed to convert ``path`` to ``out_fmt``."""
    args = ["measure", "--output", "json", "-f", fmt, "-O", out_fmt, path]
    data = _loads(_run(args, timeout=timeout), args)
    return Measure(required=data["required"],
                   fully_allocated=data["fully-allocated"])


def check(path: str, *, fmt: str = "qcow2", untrusted: bool = False,
          timeout: float | None = None) -> CheckResult:
    """Check image consistency; corruptions and leaks are results.

    ``untrusted`` runs it under the same CPU and address-space limits as
    ``info(untrusted=True)``.
    """
    args = ["check", "--output", "json", "-f", fmt, path]
    rc, out, err = _execute(args, limits=untrusted, timeout=timeout)
    if rc == CHECK_NOT_SUPPORTED:
        return CheckResult(0, 0, 0, None)
    if rc not in (CHECK_OK, CHECK_CORRUPTIONS, CHECK_LEAKS):
        raise _error(args, rc, out, err, untrusted)
    data = _loads(out, args)
    return CheckResult(corruptions=data.get("corruptions", 0),
                       leaks=data.get("leaks", 0),
                       check_errors=data.get("check-errors", 0),
                       image_end_offset=data.get("image-end-offset"))


def map(path: str, *, fmt: str,
        timeout: float | None = None) -> list[Extent]:
    """Allocation map of ``path`` and its chain (``depth`` 0 is the top).

    Runs with ``-U``: a map of an image a daemon holds open for writing
    is a snapshot of a moving target, good for estimates only."""
    args = ["map", "--output", "json", "-U", "-f", fmt, path]
    out = _run(args, timeout=timeout)
    return [_parse_extent(e) for e in _loads(out, args)]


def allocated_bytes(path: str, *, fmt: str,
                    timeout: float | None = None) -> int:
    """Bytes holding data in the top layer of ``path`` only."""
    return sum(e.length for e in map(path, fmt=fmt, timeout=timeout)
               if e.data and e.depth == 0)


# Argument checks and builders.


def _format_args(fmt: str | None) -> list[str]:
    return [] if fmt is None else ["-f", fmt]


def _check_backing(backing: str | None, backing_fmt: str | None) -> None:
    if backing is not None and not backing_fmt:
        raise ValueError(f"backing file {backing!r} needs backing_fmt")


def _timeout(value: float | None, default: float | None,
             name: str) -> float:
    """A positive, finite number of seconds (``default`` for None)."""
    if value is None:
        value = default
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"invalid {name} timeout {value!r}")
    return float(value)


def _check_preallocation(preallocation: str | None) -> None:
    if preallocation not in (None, *PREALLOCATION_MODES):
        raise ValueError(f"invalid preallocation {preallocation!r}")


def _check_convert_flags(dst_fmt: str, backing: str | None, create: bool,
                         target_is_zero: bool,
                         preallocation: str | None) -> None:
    if backing is not None and dst_fmt != "qcow2":
        raise ValueError(f"{dst_fmt} target cannot have a backing file")
    if target_is_zero and (create or backing is not None):
        raise ValueError("target_is_zero needs create=False and no backing")
    if preallocation is not None and not create:
        raise ValueError("preallocation applies only when creating")


def _create_options(fmt: str, compat: str, preallocation: str | None,
                    cluster_size: int | None) -> str:
    options = []
    if fmt == "qcow2":
        options.append(f"compat={compat}")
    if cluster_size is not None:
        options.append(f"cluster_size={cluster_size}")
    if preallocation is not None:
        options.append(f"preallocation={preallocation}")
    return ",".join(options)


# Output parsing.


def _loads(out: str, args: Sequence[str]) -> Any:
    try:
        return json.loads(out)
    except ValueError as e:
        raise errors.QemuImgError(cmd=args[0], rc=0, out=out,
                                  err=f"invalid JSON output: {e}",
                                  argv=_argv(args)) from e


def _parse_info(data: dict[str, Any]) -> ImageInfo:
    specific = data.get("format-specific", {}).get("data", {})
    return ImageInfo(
        filename=data["filename"],
        format=data["format"],
        virtual_size=data["virtual-size"],
        actual_size=data.get("actual-size", 0),
        backing_filename=data.get("backing-filename"),
        backing_format=data.get("backing-filename-format"),
        cluster_size=data.get("cluster-size"),
        compat=specific.get("compat"),
        data_file=specific.get("data-file"),
        dirty=data.get("dirty-flag", False),
        corrupt=specific.get("corrupt", False),
    )


def _parse_extent(data: dict[str, Any]) -> Extent:
    return Extent(start=data["start"], length=data["length"],
                  data=data["data"], zero=data["zero"],
                  depth=data["depth"])


# Running.


def _argv(args: Sequence[str], limits: bool = False) -> list[str]:
    argv = [QEMU_IMG, *args]
    if limits:
        argv = ["prlimit", f"--cpu={UNTRUSTED_CPU_SECONDS}",
                f"--as={UNTRUSTED_ADDRESS_SPACE}", *argv]
    return argv


def _env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C"}


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _error(args: Sequence[str], rc: int, out: str, err: str,
           limits: bool = False) -> errors.QemuImgError:
    return errors.QemuImgError(cmd=args[0], rc=rc, out=out,
                               err=err.strip(), argv=_argv(args, limits))


def _run(args: Sequence[str], *, limits: bool = False,
         timeout: float | None = None) -> str:
    """Run a quick command; return its stdout."""
    rc, out, err = _execute(args, limits=limits, timeout=timeout)
    if rc != 0:
        raise _error(args, rc, out, err, limits)
    return out


def _run_data(args: list[str], progress: Progress | None,
              stall_timeout: float | None) -> None:
    """Run a data command with ``-p``, under a stall timeout."""
    args = [args[0], "-p", *args[1:]]
    stall = _timeout(stall_timeout, STALL_TIMEOUT, "stall")
    rc, out, err = _execute(args, stall=stall, progress=progress)
    if rc != 0:
        raise _error(args, rc, out, err)


def _execute(args: Sequence[str], *, limits: bool = False,
             timeout: float | None = None, stall: float | None = None,
             progress: Progress | None = None) -> tuple[int, str, str]:
    """Run qemu-img with ``args``; return ``(rc, stdout, stderr)``.

    The child runs under a bound, ``stall`` seconds without progress if
    given, else ``timeout`` (default :data:`QUICK_TIMEOUT`) seconds in
    all; past it the child is killed, reaped, and QemuImgTimeout raised.
    Output goes to unnamed temporary files, never pipes: nothing can
    block on a full pipe, and reading progress never waits (which also
    holds under eventlet). The child stays in our process group, so
    whoever kills the group (a service stop, a test's host crash) kills
    qemu-img too.
    """
    if stall is None:
        timeout = _timeout(timeout, QUICK_TIMEOUT, "quick")
    argv = _argv(args, limits)
    with tempfile.TemporaryFile() as out_file, \
            tempfile.TemporaryFile() as err_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                stdout=out_file, stderr=err_file,
                                env=_env())
        try:
            expired = _supervise(proc, out_file.fileno(), timeout, stall,
                                 progress)
        except BaseException:
            _kill(proc)
            raise
        rc = proc.returncode if expired is None else _kill(proc)
        out = _decode(_read_all(out_file.fileno()))
        err = _decode(_read_all(err_file.fileno()))
    if expired is not None:
        bound, reason = expired
        if rc is None:
            reason += (f"; pid {proc.pid} not reaped {KILL_WAIT} seconds "
                       "after SIGKILL")
        raise errors.QemuImgTimeout(
            cmd=args[0], rc=rc, out=out,
            err=err.strip() or f"timed out after {bound} seconds",
            argv=argv, timeout=bound, reason=reason,
            stalled=stall is not None, pid=proc.pid)
    return proc.returncode, out, err


def _supervise(proc: subprocess.Popen, out_fd: int,
               timeout: float | None, stall: float | None,
               progress: Progress | None) -> tuple[float, str] | None:
    """Wait for ``proc``; return ``(bound, reason)`` if it ran too long.

    Waiting is polling with short sleeps (:func:`_wait`): green under
    eventlet, no selectors, no threads. A quick command without progress
    is only waited for. Otherwise its stdout is read every
    :data:`POLL_INTERVAL` seconds for progress; a data command makes
    progress when its percentage grows or its I/O counters (read and
    written bytes and calls, ``/proc/PID/io``) move, so a copy that
    takes long between two percent steps is not taken for a stall.
    """
    start = time.monotonic()
    if stall is None and progress is None:
        assert timeout is not None
        if _wait(proc, timeout):
            return None
        return timeout, "still running, killed"
    parser = _ProgressParser(progress)
    offset = 0
    state: tuple[object, ...] | None = None
    changed = start
    while True:
        interval = POLL_INTERVAL
        if timeout is not None:
            interval = max(0.0, min(interval,
                                    start + timeout - time.monotonic()))
        _wait(proc, interval)
        chunk = os.pread(out_fd, _CHUNK, offset)
        while chunk:
            offset += len(chunk)
            parser.feed(chunk)
            chunk = os.pread(out_fd, _CHUNK, offset)
        if proc.returncode is not None:
            return None
        now = time.monotonic()
        if timeout is not None and now - start >= timeout:
            return timeout, "still running, killed"
        if stall is not None:
            current = (parser.last, _io_counters(proc.pid))
            if current != state:
                state, changed = current, now
            elif now - changed >= stall:
                last = "none" if parser.last < 0 else f"{parser.last}%"
                return stall, (f"no progress for {stall} seconds (last "
                               f"progress {last}), killed")


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``proc``; True if it ended.

    Sleeps grow from 0.2 ms to :data:`MAX_POLL_DELAY`, so a command of a
    few milliseconds is not slowed down much (``Popen.wait(timeout)``
    sleeps up to 50 ms), and a long one costs a cheap ``waitpid`` now and
    then.
    """
    deadline = time.monotonic() + timeout
    delay = 0.0002
    while proc.poll() is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 1.25, MAX_POLL_DELAY)
    return True


def _kill(proc: subprocess.Popen) -> int | None:
    """SIGKILL ``proc`` and reap it; None if it does not die in time.

    A child stuck in uninterruptible I/O may outlive SIGKILL for a while;
    the Popen object then stays in subprocess's list of children to reap.
    """
    proc.kill()
    return proc.returncode if _wait(proc, KILL_WAIT) else None


def _io_counters(pid: int) -> tuple[int, ...] | None:
    """rchar, wchar, syscr, syscw of ``pid``; None where unreadable."""
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            data = f.read()
    except OSError:
        return None
    values = dict(line.split(b":", 1) for line in data.splitlines()
                  if b":" in line)
    try:
        return tuple(int(values[key]) for key in _IO_KEYS)
    except (KeyError, ValueError):
        return None


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


class _ProgressParser:
    """Parse ``(NN.NN/100%)`` updates, reporting each new, larger one.

    Text after the last complete update is kept for the next chunk, so an
    update split between two reads is parsed once, whole.
    """

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.last = -1.0
        self._pending = b""

    def feed(self, chunk: bytes) -> None:
        self._pending += chunk
        end = 0
        for match in _PROGRESS_RE.finditer(self._pending):
            value = float(match.group(1))
            if value > self.last:
                self.last = value
                if self.progress is not None:
                    self.progress(value)
            end = match.end()
        # Keep at most one partial update (qemu-img's are short).
        self._pending = self._pending[end:][-_MAX_PENDING:]


def _stream_progress(read: Callable[[int], bytes],
                     progress: Progress) -> bytes:
    """Read to EOF, reporting each new, larger percentage."""
    out = bytearray()
    parser = _ProgressParser(progress)
    while chunk := read(_CHUNK):
        out += chunk
        parser.feed(chunk)
    return bytes(out)
