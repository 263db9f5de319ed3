"""Write and verify data patterns with ``qemu-io`` in functional tests.

``qemu-io`` opens an image with its backing chain, so verifying a leaf
checks what a guest would read through the whole chain. qemu-io may print
``Pattern verification failed`` and still exit 0 (older versions), so the
output is checked as well as the exit code; any failure is an
AssertionError carrying qemu-io's output.
"""

from __future__ import annotations

import os
import subprocess

__all__ = [
    "verify_pattern", "verify_zero", "write_pattern", "write_zeroes"]

_FAILURES = ("Pattern verification failed", "failed", "can't open")


def write_pattern(path: str, fmt: str, offset: int, length: int,
                  pattern: int) -> None:
    """Fill ``length`` bytes at ``offset`` with the byte ``pattern``."""
    _qemu_io(path, fmt, f"write -P {pattern:#04x} {offset} {length}")


def write_zeroes(path: str, fmt: str, offset: int, length: int) -> None:
    """Write zeroes without data (qcow2 zero clusters, raw holes)."""
    _qemu_io(path, fmt, f"write -z {offset} {length}")


def verify_pattern(path: str, fmt: str, offset: int, length: int,
                   pattern: int) -> None:
    """Assert ``length`` bytes at ``offset`` all equal ``pattern``."""
    _qemu_io(path, fmt, f"read -P {pattern:#04x} {offset} {length}",
             read_only=True)


def verify_zero(path: str, fmt: str, offset: int, length: int) -> None:
    """Assert ``length`` bytes at ``offset`` read as zeros."""
    verify_pattern(path, fmt, offset, length, 0)


def _qemu_io(path: str, fmt: str, command: str,
             read_only: bool = False) -> str:
    argv = ["qemu-io", "-f", fmt, "-c", command, path]
    if read_only:
        argv.insert(1, "-r")
    proc = subprocess.run(argv, capture_output=True, text=True,
                          env={**os.environ, "LC_ALL": "C"},
                          check=False)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 or any(f in output for f in _FAILURES):
        raise AssertionError(
            f"qemu-io {command!r} on {path} (rc={proc.returncode}): "
            f"{output.strip()}")
    return output


def view_digest(path: str, fmt: str, scratch: str, *,
                force_share: bool = False) -> str:
    """sha256 of the guest view of the image at ``path`` (its whole chain),
    read through a raw copy made in the directory ``scratch`` (outside the
    domains, which may be full). ``force_share`` (``-U``) reads an image
    a daemon holds open."""
    import hashlib
    import tempfile

    fd, out = tempfile.mkstemp(dir=scratch, suffix=".view")
    os.close(fd)
    try:
        share = ["-U"] if force_share else []
        subprocess.run(["qemu-img", "convert", *share, "-f", fmt, "-O",
                        "raw", path, out], check=True, capture_output=True)
        h = hashlib.sha256()
        with open(out, "rb") as f:
            for block in iter(lambda: f.read(1024 * 1024), b""):
                h.update(block)
        return h.hexdigest()
    finally:
        os.unlink(out)
