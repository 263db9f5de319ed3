"""Receiving image bytes into a sparse staging file.

An upload is written into a hidden staging file next to the storage domain
(``<mount>/.tmp-<sd_id>-upload-<uuid>``: the domain's mount directory,
so the same filesystem; ``ovirt-storage fsck`` reports such a file left
by a crash as garbage of that domain). :func:`staging_file` creates it
exclusively and always removes it on the way out; a successful upload
has renamed it into the domain before that.

:func:`receive` copies a file-like object into it in chunks. Each chunk
is cut into blocks of :data:`BLOCK_SIZE` bytes; a run of all-zero blocks
becomes a hole (the file offset moves on, nothing is written), a run of
data blocks is one write. The file is then truncated to the number of
bytes received, so trailing zeros are a hole too, and fsynced. While
copying, :func:`receive` feeds every byte, zeros included, to the md5
checksum, the multihash and the optional signature verifier, and stops
with :class:`UploadTooLarge` once more than ``limit`` bytes arrived.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from typing import BinaryIO
from typing import Protocol

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fileutil

__all__ = ["BLOCK_SIZE", "Received", "UploadTooLarge", "receive",
           "staging_file", "data_runs"]

# Hole granularity: the qcow2 default cluster size.
BLOCK_SIZE = 64 * 1024

_ZEROS = memoryview(bytes(BLOCK_SIZE))


class UploadTooLarge(errors.StorageError):
    msg = "Upload to {path} is over the limit of {limit} bytes"


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
            verifier: Verifier | None = None) -> Received:
    """Copy ``image_file`` into ``path`` sparsely; return sizes, digests."""
    md5 = hashlib.md5(usedforsecurity=False)
    multihash = _hasher(hashing_algo)
    size = 0
    with open(path, "r+b", buffering=0) as f:
        while chunk := image_file.read(chunk_size):
            size += len(chunk)
            if limit is not None and size > limit:
                raise UploadTooLarge(path=path, limit=limit)
            md5.update(chunk)
            multihash.update(chunk)
            if verifier is not None:
                verifier.update(chunk)
            _write_sparse(f, chunk)
        f.truncate(size)
        os.fsync(f.fileno())
    return Received(path=path, size=size, checksum=md5.hexdigest(),
                    multihash=multihash.hexdigest(),
                    allocated=fileutil.allocated_bytes(path))


def data_runs(buf: bytes) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_data) runs of ``buf`` in BLOCK_SIZE blocks."""
    view = memoryview(buf)
    start, current = 0, None
    for offset in range(0, len(view), BLOCK_SIZE):
        block = view[offset:offset + BLOCK_SIZE]
        is_data = block != _ZEROS[:len(block)]
        if current is not None and is_data != current:
            yield start, offset - start, current
            start = offset
        current = is_data
    if current is not None:
        yield start, len(view) - start, current


def _write_sparse(f: BinaryIO, chunk: bytes) -> None:
    view = memoryview(chunk)
    for offset, length, is_data in data_runs(chunk):
        if is_data:
            _write_all(f, view[offset:offset + length])
        else:
            f.seek(length, os.SEEK_CUR)


def _write_all(f: BinaryIO, data: memoryview) -> None:
    while data:
        written = f.write(data)
        data = data[written:]


def _hasher(name: str) -> Any:
    if name == "md5":
        return hashlib.md5(usedforsecurity=False)
    return hashlib.new(name)
