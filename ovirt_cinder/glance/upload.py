"""Receiving image bytes into a sparse staging file.

An upload is written into a hidden staging file next to the storage domain
(``<mount>/.tmp-<sd_id>-upload-<uuid>``: the domain's mount directory,
so the same filesystem; ``ovirt-storage fsck`` reports such a file left
by a crash as garbage of that domain). :func:`staging_file` creates it
exclusively and always removes it on the way out; a successful upload
has renamed it into the domain before that.

:func:`receive` copies a file-like object into it in chunks. Each chunk
is cut into blocks of :data:`BLOCK_SIZE` bytes; a run of all-zero blocks
becomes a hole (nothing is written there), a run of data blocks is one
``pwrite`` of a view of the chunk (no copy). The file is then truncated
to the number of bytes received, so trailing zeros are a hole too, and
fsynced once; on Linux, writeback of every 32 MiB written is started on
the way (``sync_file_range``, not waited for), so the disk works while
bytes arrive and the fsync has little left to wait for. Every byte,
zeros included, goes to the md5 checksum, the multihash and the optional
signature verifier, in order; each of them runs on its own thread fed by
a bounded queue of the received chunks (hashlib releases the GIL on large
buffers), so hashing overlaps reading and writing. :func:`receive`
stops with :class:`UploadTooLarge` once more than ``limit`` bytes
arrived, and with :class:`SizeMismatch` when the bytes do not add up to
``expected_size``; on any error the hashing threads are stopped and
joined before it raises.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import queue
import threading
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from typing import Protocol

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fileutil

__all__ = ["BLOCK_SIZE", "Received", "SizeMismatch", "UploadTooLarge",
           "receive", "staging_file", "data_runs"]

# Hole granularity: the qcow2 default cluster size.
BLOCK_SIZE = 64 * 1024

# Compared with ``bytes.startswith(zeros, offset)``: a memcmp, no copy
# (comparing memoryviews goes element by element, ~30x slower).
_ZEROS = bytes(BLOCK_SIZE)
_ZEROS_VIEW = memoryview(_ZEROS)

# Bytes of chunks each hashing queue may hold (at least two chunks).
_QUEUE_BYTES = 32 * 1024 * 1024

# Written bytes after which the disk is asked to start writing them back
# (sync_file_range, not waited for), so the final fsync has little left.
_WRITEBACK_BYTES = 32 * 1024 * 1024


class UploadTooLarge(errors.StorageError):
    msg = "Upload to {path} is over the limit of {limit} bytes"


class SizeMismatch(errors.StorageError):
    msg = "Upload to {path}: expected {expected} bytes, got {actual}"


class Reader(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class Verifier(Protocol):
    def update(self, data: bytes, /) -> Any: ...


@dataclass(frozen=True)
class Received:
    """What :func:`receive` wrote: size and digests of all the bytes."""

    path: str
    size: int
    checksum: str
    multihash: str
    allocated: int


@contextlib.contextmanager
def staging_file(mount: str, sd_id: str) -> Iterator[str]:
    """A new hidden file in ``mount``, removed when the block ends."""
    name = f"{sc.TEMP_PREFIX}{sd_id}-upload-{uuid.uuid4()}"
    path = os.path.join(mount, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660)
    os.close(fd)
    try:
        yield path
    finally:
        fileutil.remove_file(path)


def receive(path: str, image_file: Reader, *, hashing_algo: str = "sha256",
            chunk_size: int = 4 * 1024 * 1024, limit: int | None = None,
            verifier: Verifier | None = None,
            expected_size: int | None = None) -> Received:
    """Copy ``image_file`` into ``path`` sparsely; return sizes, digests.

    ``expected_size`` (None or 0: unknown) must be the number of bytes
    the reader yields, as glance_store's filesystem store checks.
    """
    md5 = hashlib.md5(usedforsecurity=False)
    multihash = _hasher(hashing_algo)
    updates: list[tuple[str, Callable[[bytes], Any]]] = [
        ("md5", md5.update), (hashing_algo, multihash.update)]
    if verifier is not None:
        updates.append(("verifier", verifier.update))
    depth = max(2, _QUEUE_BYTES // max(chunk_size, 1))
    feeders: list[_Feeder] = []
    try:
        for name, update in updates:
            feeders.append(_Feeder(f"upload-{name}", update, depth))
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            size = _copy(fd, path, image_file, chunk_size, limit,
                         expected_size or None, feeders)
            for feeder in feeders:
                feeder.finish()
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        for feeder in feeders:
            feeder.join()
    finally:
        for feeder in feeders:
            feeder.cancel()
    return Received(path=path, size=size, checksum=md5.hexdigest(),
                    multihash=multihash.hexdigest(),
                    allocated=fileutil.allocated_bytes(path))


def _copy(fd: int, path: str, image_file: Reader, chunk_size: int,
          limit: int | None, expected: int | None,
          feeders: list[_Feeder]) -> int:
    """Write the chunks of ``image_file`` sparsely; feed them; the size."""
    size = flushed = 0
    while chunk := image_file.read(chunk_size):
        if size - flushed >= _WRITEBACK_BYTES:
            _start_writeback(fd, flushed, size - flushed)
            flushed = size
        if type(chunk) is not bytes:
            # The hashing threads hold on to it: it must not change.
            chunk = bytes(chunk)
        offset = size
        size += len(chunk)
        if limit is not None and size > limit:
            raise UploadTooLarge(path=path, limit=limit)
        if expected is not None and size > expected:
            raise SizeMismatch(path=path, expected=expected, actual=size)
        for feeder in feeders:
            feeder.put(chunk)
        _write_sparse(fd, chunk, offset)
    if expected is not None and size != expected:
        raise SizeMismatch(path=path, expected=expected, actual=size)
    return size


class _Feeder:
    """One ``update`` function fed the chunks, in order, on a thread."""

    def __init__(self, name: str, update: Callable[[bytes], Any],
                 depth: int) -> None:
        self._update = update
        self._queue: queue.Queue[bytes | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._cancelled = False
        self._finished = False
        self._thread = threading.Thread(target=self._run, name=name,
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is not None or self._cancelled:
                continue  # drain: the producer never blocks on us
            try:
                self._update(chunk)
            except BaseException as e:  # re-raised by put() or join()
                self._error = e

    def put(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def finish(self) -> None:
        """No more chunks: the thread ends after the queued ones."""
        if not self._finished:
            self._finished = True
            self._queue.put(None)

    def join(self) -> None:
        """Wait for the queued chunks; raise what ``update`` raised."""
        self.finish()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Skip the queued chunks and end the thread; idempotent."""
        self._cancelled = True
        self.finish()
        self._thread.join()


def data_runs(buf: bytes) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_data) runs of ``buf`` in BLOCK_SIZE blocks."""
    if not isinstance(buf, (bytes, bytearray)):
        buf = bytes(buf)
    end = len(buf)
    start, current = 0, None
    for offset in range(0, end, BLOCK_SIZE):
        length = min(BLOCK_SIZE, end - offset)
        zeros = _ZEROS if length == BLOCK_SIZE else _ZEROS_VIEW[:length]
        is_data = not buf.startswith(zeros, offset)
        if current is not None and is_data != current:
            yield start, offset - start, current
            start = offset
        current = is_data
    if current is not None:
        yield start, end - start, current


def _write_sparse(fd: int, chunk: bytes, offset: int) -> None:
    """Write the data runs of ``chunk`` at ``offset``; skip zero runs."""
    view = memoryview(chunk)
    for start, length, is_data in data_runs(chunk):
        if is_data:
            _pwrite_all(fd, view[start:start + length], offset + start)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                     ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range back, without waiting; a hint (Linux only).

    Errors are left to the final fsync, which reports them.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _hasher(name: str) -> Any:
    if name == "md5":
        return hashlib.md5(usedforsecurity=False)
    return hashlib.new(name)
