"""Uploads through the ovirt store: checksums, holes, and what errors leave.

The store's results are compared with glance_store's own filesystem store
on the same bytes (md5 checksum and multihash, as Glance records them).
"""

import errno
import io
import os
import threading
import uuid

import pytest
from glance_store import exceptions

from ovirt_cinder.glance import upload
from ovirt_cinder.storage import constants as sc
from tests.functional.glance.conftest import staged_leftovers
from tests.unit.glance import fixtures

MiB = sc.MiB


def uid():
    return str(uuid.uuid4())


def mixed_image():
    """9 MiB: random data, 64 KiB-aligned and odd zero runs, a tail."""
    rand = os.urandom(MiB)
    return (rand * 2 + bytes(3 * MiB) + rand[:70000] + bytes(2 * MiB)
            + rand + bytes(MiB - 70000 + 12) + b"end")


class Verifier:
    def __init__(self):
        self.data = bytearray()

    def update(self, data):
        self.data += data


class Disconnecting(io.BytesIO):
    """A client that goes away after ``after`` bytes."""

    def __init__(self, data, after):
        super().__init__(data)
        self.after = after

    def read(self, size=-1):
        if self.tell() >= self.after:
            raise OSError(errno.ECONNRESET, "Connection reset by peer")
        return super().read(size)


def no_image(pool):
    return all(pool.list_images(sd) == [] for sd in pool.domains)


def upload_threads():
    return [t for t in threading.enumerate()
            if t.name.startswith("upload-")]


@pytest.mark.parametrize("algo", ["sha512", "sha256"])
def test_same_results_as_filesystem_store(glance_store, glance_conf,
                                          glance_pool, algo):
    data = mixed_image()
    file_store = fixtures.store_of("file1", "file")
    ours_verifier, theirs_verifier = Verifier(), Verifier()
    ours = glance_store.add(uid(), io.BytesIO(data), len(data), algo,
                            verifier=ours_verifier)
    theirs = file_store.add(uid(), io.BytesIO(data), len(data), algo,
                            verifier=theirs_verifier)
    assert ours[1:4] == theirs[1:4]
    assert ours_verifier.data == theirs_verifier.data == data
    image, size = glance_store.get(fixtures.location_of(ours[0],
                                                        glance_conf))
    assert b"".join(image) == data and size == len(data)
    _, sd_id, img_id, _ = ours[0][len("ovirt://"):].split("/")
    path = glance_pool.image(sd_id, img_id).template().path
    # 4 MiB of data (+ the odd tail's partial blocks): the zeros are holes.
    assert os.stat(path).st_blocks * 512 <= 4 * MiB + 256 * 1024
    assert staged_leftovers(glance_pool) == []
    assert upload_threads() == []


@pytest.mark.parametrize("declared", [1, 9 * MiB, 20 * MiB])
def test_size_mismatch_leaves_nothing(glance_store, glance_pool, declared):
    data = mixed_image()
    img_id = uid()
    with pytest.raises(exceptions.Invalid) as e:
        glance_store.add(img_id, io.BytesIO(data), declared, "sha512")
    assert "size mismatch" in str(e.value) and img_id in str(e.value)
    assert ".tmp-" not in str(e.value)
    assert staged_leftovers(glance_pool) == []
    assert no_image(glance_pool)
    assert upload_threads() == []


def test_client_disconnect_mid_upload_leaves_nothing(glance_store,
                                                     glance_pool):
    data = mixed_image()
    with pytest.raises(OSError):
        glance_store.add(uid(), Disconnecting(data, 5 * MiB), len(data),
                         "sha512", verifier=Verifier())
    assert staged_leftovers(glance_pool) == []
    assert no_image(glance_pool)
    assert upload_threads() == []


def test_no_space_mid_upload_leaves_nothing(glance_store, glance_pool,
                                            monkeypatch):
    real, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if offset >= 4 * MiB:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(upload.os, "pwrite", pwrite)
    data = os.urandom(10 * MiB)
    with pytest.raises(exceptions.StorageFull):
        glance_store.add(uid(), io.BytesIO(data), len(data), "sha512")
    assert calls  # the failure came from a write, mid-upload
    assert staged_leftovers(glance_pool) == []
    assert no_image(glance_pool)
    assert upload_threads() == []


def test_verifier_error_leaves_nothing(glance_store, glance_pool):
    class Failing:
        def update(self, data):
            raise RuntimeError("signature data refused")

    data = mixed_image()
    with pytest.raises(RuntimeError):
        glance_store.add(uid(), io.BytesIO(data), len(data), "sha512",
                         verifier=Failing())
    assert staged_leftovers(glance_pool) == []
    assert no_image(glance_pool)
    assert upload_threads() == []
