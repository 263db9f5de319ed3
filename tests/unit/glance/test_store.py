"""The ovirt store on glance_store's own multi-store test base.

``MultiStoreBaseTest`` (glance_store/tests/base.py, shipped in the wheel;
it needs oslotest) gives the configuration helpers; the store is loaded
through the real ``glance_store.drivers`` entry point and
``create_multi_stores`` over a real pool in a temporary directory. Only
operating-system failures (ENOSPC, EACCES) are simulated, at the syscall.
"""

import errno
import hashlib
import io
import os
import uuid
from unittest import mock

import fixtures as test_fixtures
import glance_store
import pytest
from glance_store import exceptions
from glance_store import location
from glance_store import multi_backend
from glance_store.tests import base

from ovirt_cinder.glance import store as ovirt_store
from ovirt_cinder.glance import upload
from ovirt_cinder.storage import config
from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import lease
from ovirt_cinder.storage.pool import StoragePool
from tests.unit.glance import fixtures

DATA = b"I am a bootable image, I promise"


def uid():
    return str(uuid.uuid4())


class Verifier:
    def __init__(self):
        self.data = b""

    def update(self, data):
        self.data += data


class OvirtStoreTest(base.MultiStoreBaseTest):

    def setUp(self):
        super().setUp()
        tmp = self.useFixture(test_fixtures.TempDir()).path
        self.mount = os.path.join(tmp, "mnt")
        os.mkdir(self.mount)
        self.pool = StoragePool.create(self.mount)
        self.sd_id = self.pool.master.sd_id
        ep = fixtures.entry_point(os.path.join(tmp, "ep"))
        ep.__enter__()
        self.addCleanup(ep.__exit__, None, None, None)
        self.addCleanup(setattr, location, "SCHEME_TO_CLS_BACKEND_MAP", {})
        self.conf = fixtures.multi_store_conf(
            [self.mount], os.path.join(tmp, "files"),
            ovirt_chunk_size=upload.BLOCK_SIZE)
        self.addCleanup(self.conf.reset)
        self.store = fixtures.store_of()

    def add(self, data=DATA, img_id=None, **kw):
        return self.store.add(img_id or uid(), io.BytesIO(data), len(data),
                              "sha256", **kw)

    def loc(self, uri):
        return fixtures.location_of(uri, self.conf)

    def leftovers(self):
        found = [n for n in os.listdir(self.mount)
                 if n.startswith(sc.TEMP_PREFIX)]
        images = os.path.join(self.mount, self.sd_id, sc.IMAGES)
        return found + [n for n in os.listdir(images)
                        if n.startswith((sc.TEMP_PREFIX, sc.REMOVE_PREFIX))]

    # Loading and configuration

    def test_loaded_from_entry_point(self):
        self.assertIsInstance(self.store, ovirt_store.Store)
        self.assertEqual(("ovirt",), self.store.get_schemes())
        self.assertEqual(f"ovirt://{self.pool.pool_id}/",
                         self.store.url_prefix)
        self.assertTrue(self.store.is_capable(
            glance_store.capabilities.BitMasks.READ_RANDOM,
            glance_store.capabilities.BitMasks.WRITE_ACCESS))

    def test_options_in_multi_store_sample_config(self):
        groups = dict(multi_backend._list_config_opts())
        names = [o.name for o in groups["ovirt"]]
        self.assertEqual(["ovirt_pool_uuid", "ovirt_domain_paths",
                          "ovirt_lease_backend", "ovirt_host_id",
                          "ovirt_io_timeout", "ovirt_flow_connection",
                          "ovirt_lease_timeout", "ovirt_lock_path",
                          "ovirt_run_path", "ovirt_qemu_img_timeout",
                          "ovirt_copy_stall_timeout", "ovirt_file_owner",
                          "ovirt_file_group", "ovirt_store_domain",
                          "ovirt_max_image_size", "ovirt_chunk_size"],
                         names)
        for opt in groups["ovirt"]:
            self.assertIn("Possible values", opt.help)
            self.assertIn("Related options", opt.help)
        self.assertEqual([("ovirt", ovirt_store.OPTIONS)],
                         ovirt_store.list_opts())

    def test_pool_options_are_the_shared_ones(self):
        # Declared once in the engine: the same objects as Cinder's.
        self.assertEqual(
            [*config.POOL_OPTS, *ovirt_store.STORE_OPTS], ovirt_store.OPTIONS)
        for ours, shared in zip(ovirt_store.OPTIONS, config.POOL_OPTS,
                                strict=False):
            self.assertIs(shared, ours)

    def test_pool_options_reach_the_lease_manager(self):
        calls = []
        real = lease.make_lease_manager

        def make(backend, host_id=1, io_timeout=10, **kwargs):
            calls.append((backend, host_id, io_timeout, kwargs))
            return real("local", **kwargs)

        self.useFixture(test_fixtures.MockPatchObject(
            lease, "make_lease_manager", make))
        locks = os.path.join(
            self.useFixture(test_fixtures.TempDir()).path, "host-locks")
        self.config(ovirt_lease_backend="sanlock", ovirt_host_id=9,
                    ovirt_io_timeout=4, ovirt_lease_timeout=7.5,
                    ovirt_lock_path=locks, group=fixtures.BACKEND)
        store = ovirt_store.Store(self.conf, backend=fixtures.BACKEND)
        store.configure(re_raise_bsc=True)
        self.assertEqual([("sanlock", 9, 4, {"lease_timeout": 7.5,
                                             "lock_path": locks})], calls)
        self.assertEqual(locks, store.pool.lease_manager.lock_path)

    def test_bad_configuration_disables_add(self):
        self.config(ovirt_domain_paths=[self.mount + "-missing"],
                    group=fixtures.BACKEND)
        store = ovirt_store.Store(self.conf, backend=fixtures.BACKEND)
        self.assertRaises(exceptions.BadStoreConfiguration,
                          store.configure, re_raise_bsc=True)
        self.assertRaises(exceptions.StoreAddDisabled, store.add, uid(),
                          io.BytesIO(DATA), len(DATA), "sha256")

    def test_unknown_store_domain(self):
        self.config(ovirt_store_domain=uid(), group=fixtures.BACKEND)
        store = ovirt_store.Store(self.conf, backend=fixtures.BACKEND)
        self.assertRaises(exceptions.BadStoreConfiguration,
                          store.configure, re_raise_bsc=True)

    def test_store_domain_option(self):
        mount2 = self.mount + "2"
        os.mkdir(mount2)
        dom2 = self.pool.add_domain(mount2)
        self.config(ovirt_domain_paths=[self.mount, mount2],
                    ovirt_store_domain=dom2.sd_id, group=fixtures.BACKEND)
        store = ovirt_store.Store(self.conf, backend=fixtures.BACKEND)
        store.configure(re_raise_bsc=True)
        uri = store.add(uid(), io.BytesIO(DATA), len(DATA), "md5")[0]
        self.assertEqual(dom2.sd_id, uri.split("/")[3])

    # add

    def test_add_result(self):
        verifier = Verifier()
        img_id = uid()
        uri, size, checksum, multihash, meta = self.add(
            img_id=img_id, verifier=verifier)
        self.assertEqual(len(DATA), size)
        self.assertEqual(hashlib.md5(DATA).hexdigest(), checksum)
        self.assertEqual(hashlib.sha256(DATA).hexdigest(), multihash)
        self.assertEqual({"store": fixtures.BACKEND}, meta)
        self.assertEqual(DATA, verifier.data)
        loc = self.loc(uri).store_location
        self.assertEqual((self.pool.pool_id, self.sd_id, img_id),
                         (loc.pool_id, loc.sd_id, loc.img_id))
        vol = self.pool.image(self.sd_id, img_id).template()
        self.assertEqual(loc.vol_id, vol.vol_id)
        self.assertEqual(sc.VolumeFormat.RAW, vol.meta.format)
        self.assertEqual(512, vol.meta.capacity)
        self.assertEqual([], self.leftovers())

    def test_add_back_compat(self):
        result = self.store.add(uid(), io.BytesIO(DATA), len(DATA))
        self.assertEqual(4, len(result))
        self.assertEqual(hashlib.md5(DATA).hexdigest(), result[2])

    def test_add_sha512_unknown_size(self):
        result = self.store.add(uid(), io.BytesIO(DATA), 0, "sha512")
        self.assertEqual(len(DATA), result[1])
        self.assertEqual(hashlib.sha512(DATA).hexdigest(), result[3])

    def test_add_unknown_hashing_algo(self):
        self.assertRaises(exceptions.UnknownHashingAlgo, self.store.add,
                          uid(), io.BytesIO(DATA), len(DATA), "nope")
        self.assertEqual([], self.leftovers())

    def test_add_duplicate(self):
        img_id = uid()
        self.add(img_id=img_id)
        self.assertRaises(exceptions.Duplicate, self.add, img_id=img_id)
        self.assertEqual([], self.leftovers())

    def test_add_image_id_not_uuid(self):
        self.assertRaises(exceptions.BadStoreUri, self.add,
                          img_id="../../etc")

    def test_add_storage_full(self):
        with mock.patch.object(upload.os, "fsync",
                               side_effect=OSError(errno.ENOSPC, "full")):
            self.assertRaises(exceptions.StorageFull, self.add)
        self.assertEqual([], self.leftovers())
        self.assertEqual([], self.pool.list_images(self.sd_id))

    def test_add_write_denied(self):
        with mock.patch.object(upload.os, "fsync",
                               side_effect=OSError(errno.EACCES, "no")):
            self.assertRaises(exceptions.StorageWriteDenied, self.add)
        self.assertEqual([], self.leftovers())

    def test_add_read_error_leaves_nothing(self):
        class Broken(io.BytesIO):
            def read(self, size=-1):
                raise OSError(errno.EIO, "client went away")

        self.assertRaises(OSError, self.store.add, uid(), Broken(), 10,
                          "md5")
        self.assertEqual([], self.leftovers())
        self.assertEqual([], self.pool.list_images(self.sd_id))

    def test_add_over_limit(self):
        self.config(ovirt_max_image_size=512, group=fixtures.BACKEND)
        data = b"x" * (upload.BLOCK_SIZE * 3)
        with mock.patch.object(ovirt_store, "_QCOW2_SLACK", 0):
            self.assertRaises(ovirt_store.UnsafeImageRejected, self.add,
                              data)
        self.assertEqual([], self.leftovers())

    def test_add_sparse(self):
        block = upload.BLOCK_SIZE
        data = b"a" * block + bytes(8 * block) + b"b" * 10
        uri = self.add(data)[0]
        img_id = self.loc(uri).store_location.img_id
        path = self.pool.image(self.sd_id, img_id).template().path
        self.assertLess(os.stat(path).st_blocks * 512, 4 * block)
        image, size = self.store.get(self.loc(uri))
        self.assertEqual(data, b"".join(image))

    # get, get_size, delete

    def test_get_random_access(self):
        data = bytes(range(256)) * 1024
        uri = self.add(data)[0]
        image, size = self.store.get(self.loc(uri), offset=1000,
                                     chunk_size=70000)
        self.assertEqual(70000, size)
        self.assertEqual(data[1000:71000], b"".join(image))
        image, size = self.store.get(self.loc(uri), offset=len(data) - 5)
        self.assertEqual((5, data[-5:]), (size, b"".join(image)))

    def test_get_is_lazy(self):
        uri = self.add()[0]
        image, _ = self.store.get(self.loc(uri))
        # Nothing is opened until the first chunk is asked for.
        self.store.delete(self.loc(uri))
        self.assertRaises(FileNotFoundError, next, image)

    def test_get_size(self):
        uri = self.add()[0]
        self.assertEqual(len(DATA), self.store.get_size(self.loc(uri)))

    def test_not_found(self):
        uri = self.add()[0]
        pool_id, sd_id, img_id, vol_id = uri[len("ovirt://"):].split("/")
        for bad in (f"ovirt://{uid()}/{sd_id}/{img_id}/{vol_id}",
                    f"ovirt://{pool_id}/{uid()}/{img_id}/{vol_id}",
                    f"ovirt://{pool_id}/{sd_id}/{uid()}/{vol_id}",
                    f"ovirt://{pool_id}/{sd_id}/{img_id}/{uid()}"):
            loc = self.loc(bad)
            for op in (self.store.get, self.store.get_size,
                       self.store.delete):
                self.assertRaises(exceptions.NotFound, op, loc)

    def test_not_a_template(self):
        img_id = uid()
        vol = self.pool.create_volume(self.sd_id, img_id, sc.MiB)
        loc = self.loc(f"ovirt://{self.pool.pool_id}/{self.sd_id}/"
                       f"{img_id}/{vol.vol_id}")
        self.assertRaises(exceptions.NotFound, self.store.delete, loc)
        self.assertTrue(self.pool.domain(self.sd_id).has_image(img_id))

    def test_delete(self):
        uri = self.add()[0]
        self.store.delete(self.loc(uri))
        self.assertRaises(exceptions.NotFound, self.store.get,
                          self.loc(uri))
        self.assertRaises(exceptions.NotFound, self.store.delete,
                          self.loc(uri))
        self.assertEqual([], self.pool.list_images(self.sd_id))
        self.assertEqual([], self.leftovers())


# StoreLocation

IDS = [str(uuid.uuid4()) for _ in range(4)]
GOOD = "ovirt://" + "/".join(IDS)


def parse(uri):
    loc = ovirt_store.StoreLocation({}, None)
    loc.parse_uri(uri)
    return loc


def test_location_round_trip():
    loc = parse(GOOD)
    assert (loc.pool_id, loc.sd_id, loc.img_id, loc.vol_id) == tuple(IDS)
    assert loc.get_uri() == GOOD
    specs = dict(zip(("pool_id", "sd_id", "img_id", "vol_id"), IDS))
    assert ovirt_store.StoreLocation(specs, None).get_uri() == GOOD
    assert parse(parse(GOOD).get_uri()).get_uri() == GOOD


@pytest.mark.parametrize("uri", [
    "",
    "ovirt://",
    "file:///" + "/".join(IDS),
    "OVIRT://" + "/".join(IDS),
    "ovirt://" + "/".join(IDS[:3]),
    "ovirt://" + "/".join(IDS) + "/",
    "ovirt://" + "/".join(IDS + [IDS[0]]),
    "ovirt://" + "/".join(IDS) + "?x=1",
    "ovirt://" + "/".join(IDS) + "#f",
    "ovirt://" + "/".join(IDS[:3] + [".."]),
    "ovirt://" + "/".join(IDS[:3] + ["../" + IDS[3]]),
    "ovirt://" + "/".join(IDS[:3] + [IDS[3].upper()]),
    "ovirt://" + "/".join(IDS[:3] + [IDS[3].replace("-", "")]),
    "ovirt://user@" + "/".join(IDS),
    "ovirt:///" + "/".join(IDS),
    "ovirt://" + "//".join(IDS),
    "ovirt://" + "/".join(IDS) + "\n",
])
def test_location_rejects(uri):
    with pytest.raises(exceptions.BadStoreUri):
        parse(uri)


def test_location_rejects_bad_specs():
    with pytest.raises(exceptions.BadStoreUri):
        ovirt_store.StoreLocation({"pool_id": "x", "sd_id": IDS[1],
                                   "img_id": IDS[2], "vol_id": IDS[3]},
                                  None)
