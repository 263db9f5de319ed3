"""Receiving uploads into sparse staging files (real files in tmp_path)."""

import hashlib
import io
import os

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
