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
- ``progress`` callbacks run the command with ``-p`` and parse the
  ``(NN.NN/100%)`` updates qemu-img writes to stdout (separated by ``\\r``);
  the callback gets each new, larger percentage (qemu-img ends with 100).
  If the callback raises, the child is killed and the error propagates.
- ``commit`` keeps the top's content by default (``-d``), so a failed flow
  can still read the top; ``drop=True`` lets qemu-img empty the top.
- ``check`` exit codes: 0 clean, 2 corruptions, 3 leaks (results, never
  raised), 63 the format has no checks (an ``ok`` result with zeros), 1 and
  anything else (check not completed, cannot open) raise QemuImgError.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
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
]

QEMU_IMG = "qemu-img"
UNTRUSTED_CPU_SECONDS = 30
UNTRUSTED_ADDRESS_SPACE = 1 * GiB
PREALLOCATION_MODES = ("off", "falloc", "full", "metadata")

CHECK_OK = 0
CHECK_CORRUPTIONS = 2
CHECK_LEAKS = 3
CHECK_NOT_SUPPORTED = 63

Progress = Callable[[float], None]

_PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


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


# Subcommands.


def info(path: str, fmt: str | None = None, *, untrusted: bool = False,
         force_share: bool = True) -> ImageInfo:
    """Return ``qemu-img info`` of one image (never its backing chain)."""
    if untrusted and fmt is None:
        raise ValueError("untrusted images need an explicit format")
    args = ["info", "--output", "json"]
    args += _format_args(fmt)
    if force_share:
        args.append("-U")
    args.append(path)
    out = _run(args, limits=untrusted)
    return _parse_info(_loads(out, args))


def create(path: str, fmt: str, size: int | None = None, *,
           backing: str | None = None, backing_fmt: str | None = None,
           preallocation: str | None = None, compat: str = "1.1",
           cluster_size: int | None = None) -> None:
    """Create an image; a backing file always comes with its format."""
    _check_backing(backing, backing_fmt)
    _check_preallocation(preallocation)
    options = _create_options(fmt, compat, preallocation, cluster_size)
    args = ["create", "-f", fmt]
    if options:
        args += ["-o", options]
    if backing is not None:
        args += ["-b", backing, "-F", str(backing_fmt)]
    args.append(path)
    if size is not None:
        args.append(str(size))
    _run(args)


def convert(src: str, dst: str, *, src_fmt: str, dst_fmt: str,
            backing: str | None = None, backing_fmt: str | None = None,
            create: bool = True, target_is_zero: bool = False,
            copy_offload: bool = False, preallocation: str | None = None,
            compat: str = "1.1", cache: str | None = None,
            progress: Progress | None = None) -> None:
    """Copy ``src`` into ``dst`` (sparse).

    ``backing``: ``dst`` gets only the clusters allocated in the top layer
    of ``src`` (``-B backing -F backing_fmt``), see the module docstring;
    with ``create=False`` ``dst`` must already have that backing file.
    ``target_is_zero`` needs ``create=False`` and no backing; ``-o``
    options (``compat``, ``preallocation``) apply only when creating.
    ``cache`` is the target cache mode (``-t``, e.g. ``"none"``).
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
    args += [src, dst]
    _run_with_progress(args, progress)


def commit(top: str, *, top_fmt: str = "qcow2", base: str | None = None,
           progress: Progress | None = None, drop: bool = False) -> None:
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
    _run_with_progress(args, progress)


def rebase(path: str, backing: str | None, *, backing_fmt: str | None,
           fmt: str = "qcow2", unsafe: bool = False,
           progress: Progress | None = None) -> None:
    """Change the backing file of ``path``.

    ``backing`` None or "" rebases onto nothing. Safe mode (the default)
    copies into ``path`` the data that differs between the old and the
    new backing chain; ``unsafe`` only rewrites the header.
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
    _run_with_progress(args, progress)


def resize(path: str, size: int, *, fmt: str,
           preallocation: str | None = None, shrink: bool = False) -> None:
    """Set the virtual size; making it smaller needs ``shrink=True``."""
    _check_preallocation(preallocation)
    args = ["resize", "-f", fmt]
    if preallocation is not None:
        args.append(f"--preallocation={preallocation}")
    if shrink:
        args.append("--shrink")
    args += [path, str(size)]
    _run(args)


def measure(path: str, *, fmt: str, out_fmt: str) -> Measure:
    """Bytes needed to convert ``path`` to ``out_fmt``."""
    args = ["measure", "--output", "json", "-f", fmt, "-O", out_fmt, path]
    data = _loads(_run(args), args)
    return Measure(required=data["required"],
                   fully_allocated=data["fully-allocated"])


def check(path: str, *, fmt: str = "qcow2") -> CheckResult:
    """Check image consistency; corruptions and leaks are results."""
    args = ["check", "--output", "json", "-f", fmt, path]
    rc, out, err = _execute(_argv(args))
    if rc == CHECK_NOT_SUPPORTED:
        return CheckResult(0, 0, 0, None)
    if rc not in (CHECK_OK, CHECK_CORRUPTIONS, CHECK_LEAKS):
        raise _error(args, rc, out, err)
    data = _loads(out, args)
    return CheckResult(corruptions=data.get("corruptions", 0),
                       leaks=data.get("leaks", 0),
                       check_errors=data.get("check-errors", 0),
                       image_end_offset=data.get("image-end-offset"))


def map(path: str, *, fmt: str) -> list[Extent]:
    """Allocation map of ``path`` and its chain (``depth`` 0 is the top)."""
    args = ["map", "--output", "json", "-f", fmt, path]
    return [_parse_extent(e) for e in _loads(_run(args), args)]


def allocated_bytes(path: str, *, fmt: str) -> int:
    """Bytes holding data in the top layer of ``path`` only."""
    return sum(e.length for e in map(path, fmt=fmt)
               if e.data and e.depth == 0)


# Argument checks and builders.


def _format_args(fmt: str | None) -> list[str]:
    return [] if fmt is None else ["-f", fmt]


def _check_backing(backing: str | None, backing_fmt: str | None) -> None:
    if backing is not None and not backing_fmt:
        raise ValueError(f"backing file {backing!r} needs backing_fmt")


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


def _execute(argv: list[str]) -> tuple[int, str, str]:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL,
                          capture_output=True, env=_env(), check=False)
    return proc.returncode, _decode(proc.stdout), _decode(proc.stderr)


def _run(args: Sequence[str], limits: bool = False) -> str:
    rc, out, err = _execute(_argv(args, limits))
    if rc != 0:
        raise _error(args, rc, out, err, limits)
    return out


def _run_with_progress(args: list[str], progress: Progress | None) -> None:
    """Run with ``-p``, feeding progress from stdout as it streams."""
    if progress is None:
        _run(args)
        return
    args = [args[0], "-p", *args[1:]]
    argv = _argv(args)
    with tempfile.TemporaryFile() as err_file, subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=err_file, env=_env()) as proc:
        try:
            fd = proc.stdout.fileno()  # type: ignore[union-attr]
            # os.read returns what is there, also on eventlet's green
            # pipes (cinder-volume monkey-patches), which lack read1().
            out = _stream_progress(lambda n: os.read(fd, n), progress)
        except BaseException:
            proc.kill()
            raise
        rc = proc.wait()
        err_file.seek(0)
        err = _decode(err_file.read())
    if rc != 0:
        raise _error(args, rc, _decode(out), err)


def _stream_progress(read: Callable[[int], bytes],
                     progress: Progress) -> bytes:
    """Read to EOF, reporting each new, larger percentage.

    Text after the last complete ``(NN.NN/100%)`` is kept for the next
    chunk, so an update split between two reads is parsed once, whole.
    """
    out = bytearray()
    pending = b""
    last = -1.0
    while chunk := read(4096):
        out += chunk
        pending += chunk
        end = 0
        for match in _PROGRESS_RE.finditer(pending):
            value = float(match.group(1))
            if value > last:
                last = value
                progress(value)
            end = match.end()
        pending = pending[end:]
    return bytes(out)
