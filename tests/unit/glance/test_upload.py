"""Receiving uploads into sparse staging files (real files in tmp_path)."""

import errno
import hashlib
import io
import os
import threading

import pytest

from ovirt_cinder.glance import upload

B = upload.BLOCK_SIZE


@pytest.mark.parametrize("buf, runs", [
    (b"", []),
    (b"a", [(0, 1, True)]),
    (bytes(10), [(0, 10, False)]),
    (bytes(B) + b"a", [(0, B, False), (B, 1, True)]),
    (b"a" + bytes(2 * B - 1), [(0, B, True), (B, B, False)]),
    (b"a" * B * 2 + bytes(B) + b"b", [(0, 2 * B, True), (2 * B, B, False),
                                      (3 * B, 1, True)]),
])
def test_data_runs(buf, runs):
    assert list(upload.data_runs(buf)) == runs


def test_receive_sparse(tmp_path):
    data = b"x" * B + bytes(64 * B) + b"y" * 3 + bytes(16 * B)
    path = str(tmp_path / "f")
    open(path, "wb").close()
    got = upload.receive(path, io.BytesIO(data), hashing_algo="sha512",
                         chunk_size=4 * B)
    with open(path, "rb") as f:
        assert f.read() == data
    assert got.size == len(data) == os.path.getsize(path)
    assert got.checksum == hashlib.md5(data).hexdigest()
    assert got.multihash == hashlib.sha512(data).hexdigest()
    assert got.allocated <= 4 * B


def test_receive_limit(tmp_path):
    path = str(tmp_path / "f")
    open(path, "wb").close()
    with pytest.raises(upload.UploadTooLarge):
        upload.receive(path, io.BytesIO(b"a" * 100), chunk_size=10,
                       limit=99)


def test_staging_file_removed(tmp_path):
    with pytest.raises(RuntimeError):
        with upload.staging_file(str(tmp_path), "sd") as path:
            assert os.path.basename(path).startswith(".tmp-sd-upload-")
            raise RuntimeError
    assert os.listdir(tmp_path) == []


# The pipeline: hashing threads, holes, errors.

CHUNK = 4 * B


def _image(chunks=6):
    """Random and zero blocks, runs across chunk edges, a short tail."""
    rand = os.urandom(3 * B)
    return (rand + bytes(2 * B) + rand[:B] + bytes(5 * B) + rand
            + bytes(B + 7) + b"tail")[:chunks * CHUNK + 100]


def _staged(tmp_path):
    path = str(tmp_path / "f")
    open(path, "wb").close()
    return path


def _upload_threads():
    return [t for t in threading.enumerate()
            if t.name.startswith("upload-")]


class _Verifier:
    def __init__(self, fail_at=None):
        self.data = bytearray()
        self.threads = set()
        self.fail_at = fail_at

    def update(self, data):
        self.threads.add(threading.current_thread().name)
        if self.fail_at is not None and len(self.data) >= self.fail_at:
            raise RuntimeError("bad signature data")
        self.data += data


class _Reader:
    """Yields ``data`` in chunks; fails after ``fail_after`` reads."""

    def __init__(self, data, fail_after=None, kind=bytes):
        self.data, self.pos, self.reads = data, 0, 0
        self.fail_after, self.kind = fail_after, kind
        self.buf = bytearray()

    def read(self, size):
        if self.fail_after is not None and self.reads >= self.fail_after:
            raise OSError(errno.ECONNRESET, "client went away")
        self.reads += 1
        chunk = self.data[self.pos:self.pos + size]
        self.pos += len(chunk)
        if self.kind is bytearray:
            # One buffer, reused for every read, as a socket reader might.
            self.buf[:] = chunk
            return self.buf
        return self.kind(chunk)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_receive_digests_and_bytes(tmp_path, kind):
    data = _image()
    path = _staged(tmp_path)
    verifier = _Verifier()
    got = upload.receive(path, _Reader(data, kind=kind),
                         hashing_algo="sha512", chunk_size=CHUNK,
                         verifier=verifier, expected_size=len(data))
    with open(path, "rb") as f:
        assert f.read() == data
    assert got.size == len(data) == os.path.getsize(path)
    assert got.checksum == hashlib.md5(data).hexdigest()
    assert got.multihash == hashlib.sha512(data).hexdigest()
    # The verifier saw every byte, in order, on its own thread.
    assert bytes(verifier.data) == data
    assert verifier.threads == {"upload-verifier"}
    assert _upload_threads() == []


def test_receive_holes_are_not_allocated(tmp_path):
    data = b"d" * B + bytes(30 * B) + b"e" * B + bytes(30 * B)
    path = _staged(tmp_path)
    got = upload.receive(path, io.BytesIO(data), chunk_size=CHUNK)
    assert got.allocated == os.stat(path).st_blocks * 512
    assert got.allocated <= 4 * B
    with open(path, "rb") as f:
        assert f.read() == data


def test_receive_md5_multihash(tmp_path):
    data = _image(2)
    got = upload.receive(_staged(tmp_path), io.BytesIO(data),
                         hashing_algo="md5", chunk_size=CHUNK)
    assert got.checksum == got.multihash == hashlib.md5(data).hexdigest()


def test_receive_unknown_algo_starts_nothing(tmp_path):
    with pytest.raises(ValueError, match="unsupported hash type"):
        upload.receive(_staged(tmp_path), io.BytesIO(b"a"),
                       hashing_algo="nope")
    assert _upload_threads() == []


def test_receive_client_disconnects(tmp_path):
    path = _staged(tmp_path)
    with pytest.raises(OSError) as e:
        upload.receive(path, _Reader(_image(), fail_after=3),
                       chunk_size=CHUNK, verifier=_Verifier())
    assert e.value.errno == errno.ECONNRESET
    assert _upload_threads() == []


def test_receive_no_space_mid_upload(tmp_path, monkeypatch):
    real, writes = os.pwrite, []

    def pwrite(fd, data, offset):
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(offset)
        return real(fd, data, offset)

    monkeypatch.setattr(upload.os, "pwrite", pwrite)
    with pytest.raises(OSError) as e:
        upload.receive(_staged(tmp_path), io.BytesIO(os.urandom(8 * CHUNK)),
                       chunk_size=CHUNK)
    assert e.value.errno == errno.ENOSPC
    assert _upload_threads() == []


def test_receive_short_writes(tmp_path, monkeypatch):
    real = os.pwrite
    monkeypatch.setattr(upload.os, "pwrite",
                        lambda fd, data, off: real(fd, data[:1000], off))
    data = _image(2)
    path = _staged(tmp_path)
    upload.receive(path, io.BytesIO(data), chunk_size=CHUNK)
    with open(path, "rb") as f:
        assert f.read() == data


def test_receive_verifier_error(tmp_path):
    with pytest.raises(RuntimeError, match="bad signature"):
        upload.receive(_staged(tmp_path), io.BytesIO(_image()),
                       chunk_size=CHUNK, verifier=_Verifier(fail_at=CHUNK))
    assert _upload_threads() == []


@pytest.mark.parametrize("expected, sent, reported", [
    (100, 1000, 110),  # stops at the first chunk over the size
    (102, 101, 101),   # the client sent too little
])
def test_receive_size_mismatch(tmp_path, expected, sent, reported):
    with pytest.raises(upload.SizeMismatch) as e:
        upload.receive(_staged(tmp_path), io.BytesIO(b"a" * sent),
                       chunk_size=10, expected_size=expected)
    assert (e.value.expected, e.value.actual) == (expected, reported)
    assert _upload_threads() == []


def test_receive_unknown_size(tmp_path):
    got = upload.receive(_staged(tmp_path), io.BytesIO(b"a" * 10),
                         expected_size=0)
    assert got.size == 10


def test_receive_limit_stops_threads(tmp_path):
    with pytest.raises(upload.UploadTooLarge):
        upload.receive(_staged(tmp_path), io.BytesIO(_image()),
                       chunk_size=CHUNK, limit=CHUNK + 1,
                       verifier=_Verifier())
    assert _upload_threads() == []


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_data_runs_buffers(kind):
    buf = b"a" + bytes(2 * B) + b"b"
    assert list(upload.data_runs(kind(buf))) == [
        (0, B, True), (B, B, False), (2 * B, 2, True)]


@pytest.mark.parametrize("available", [True, False])
def test_receive_starts_writeback_early(tmp_path, monkeypatch, available):
    calls = []
    real = upload._SYNC_FILE_RANGE
    if available and real is None:
        pytest.skip("no sync_file_range here")

    def sync_file_range(fd, offset, length, flags):
        calls.append((offset, length))
        return real(fd, offset, length, flags)

    monkeypatch.setattr(upload, "_WRITEBACK_BYTES", 2 * CHUNK)
    monkeypatch.setattr(upload, "_SYNC_FILE_RANGE",
                        sync_file_range if available else None)
    data = os.urandom(3 * CHUNK) + bytes(3 * CHUNK) + b"x" * 100
    path = _staged(tmp_path)
    got = upload.receive(path, io.BytesIO(data), chunk_size=CHUNK)
    with open(path, "rb") as f:
        assert f.read() == data
    assert got.checksum == hashlib.md5(data).hexdigest()
    # Every 2 chunks, the range written since the last call; the rest is
    # left to the final fsync.
    assert calls == ([(0, 2 * CHUNK), (2 * CHUNK, 2 * CHUNK),
                      (4 * CHUNK, 2 * CHUNK)] if available else [])
