"""Small file primitives: atomic publish, fsync, sparse files, removal.

Every metadata write goes through :func:`atomic_write`: the data is written
to ``<path>.new``, fsynced, renamed over ``<path>``, and the directory is
fsynced, so a reader sees either the old or the new content, never a torn
one.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import shutil

from ovirt_cinder.storage import constants as sc

__all__ = [
    "atomic_write", "fsync_dir", "create_sparse", "remove_file",
    "remove_tree", "allocated_bytes", "supports_reflink",
    "supports_direct_io",
]

FICLONE = 0x40049409


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int = sc.FILE_MODE, *,
                 uid: int = -1, gid: int = -1, sync: bool = True) -> None:
    """Publish ``data`` at ``path`` via ``path.new`` + fsync + rename.

    The file gets ``mode`` whatever the umask, and the owner ``uid`` and
    group ``gid`` (-1: as the process creates it) before it is renamed.
    ``sync=False`` skips both fsyncs: the rename still gives readers the
    old or the new content, but after a power loss the file may hold
    the old content, or a new one not written out (only for data that
    carries its own checksum and can be rebuilt: counters.py).
    """
    tmp = path + sc.NEW_EXT
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            _set_owner_mode(fd, mode, uid, gid)
            _write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        # ENOSPC, EIO: the old content stays and nothing is left behind.
        remove_file(tmp)
        raise
    if sync:
        fsync_dir(os.path.dirname(path) or ".")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def create_sparse(path: str, size: int, mode: int = sc.FILE_MODE, *,
                  uid: int = -1, gid: int = -1) -> None:
    """Create ``path`` (never an existing one) as a sparse file, with
    ``mode`` whatever the umask and the owner ``uid``:``gid``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        _set_owner_mode(fd, mode, uid, gid)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _set_owner_mode(fd: int, mode: int, uid: int, gid: int) -> None:
    # The umask masked the mode os.open was given.
    os.fchmod(fd, mode)
    if uid != -1 or gid != -1:
        os.fchown(fd, uid, gid)


def remove_file(path: str) -> bool:
    """Remove ``path``; return False if it was already gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def remove_tree(path: str) -> bool:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return False
    return True


def allocated_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512


def supports_reflink(directory: str) -> bool:
    """Probe whether files in ``directory`` can be cloned with FICLONE."""
    src = os.path.join(directory, sc.TEMP_PREFIX + "reflink-src")
    dst = os.path.join(directory, sc.TEMP_PREFIX + "reflink-dst")
    try:
        with open(src, "w+b") as s, open(dst, "wb") as d:
            s.write(b"x" * 4096)
            s.flush()
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
        return True
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV,
                       errno.EINVAL, errno.ENOSYS):
            return False
        raise
    finally:
        remove_file(src)
        remove_file(dst)


# A direct write of this size and alignment suits 512 and 4K sectors.
DIRECT_IO_BLOCK = 4096


def supports_direct_io(directory: str) -> bool:
    """Probe whether files in ``directory`` take O_DIRECT writes (tmpfs
    before Linux 6.6 and some FUSE filesystems refuse them)."""
    path = os.path.join(directory, sc.TEMP_PREFIX + "direct-io")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                     | os.O_DIRECT, 0o600)
        try:
            with mmap.mmap(-1, DIRECT_IO_BLOCK) as block:  # page-aligned
                os.write(fd, block)
        finally:
            os.close(fd)
        return True
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    finally:
        remove_file(path)
