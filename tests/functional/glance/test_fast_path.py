"""End to end: a Glance upload into our store, then a Cinder volume from it.

The Cinder driver's ``clone_image`` gets the location our store returned
and must make the volume as an O(1) overlay on the template: its own layer
has almost nothing allocated, whatever the image's virtual size (10 GiB
here, with 2 MiB of data).
"""


import io
import threading
import uuid

import pytest
from cinder import context as cinder_context
from cinder import objects

objects.register_all()

from cinder.tests.unit import fake_volume  # noqa: E402
from cinder.volume import configuration  # noqa: E402
from oslo_config import cfg  # noqa: E402

from ovirt_cinder.cinder import driver as ovirt_driver  # noqa: E402
from ovirt_cinder.storage import constants as sc  # noqa: E402
from ovirt_cinder.storage import description  # noqa: E402
from ovirt_cinder.storage import fileutil  # noqa: E402
from ovirt_cinder.storage import fsck  # noqa: E402
from ovirt_cinder.storage import qemuimg  # noqa: E402
from tests import qemuio  # noqa: E402
from tests.functional.glance.conftest import staged_leftovers  # noqa: E402
from tests.unit.glance import fixtures  # noqa: E402

MiB, GiB = sc.MiB, sc.GiB
BACKEND = "ovirt1"


@pytest.fixture
def drv(glance_pool, tmp_path):
    conf = cfg.CONF
    conf.register_group(cfg.OptGroup(BACKEND))
    overrides = {"ovirt_domain_paths": [glance_pool.master.mount],
                 "ovirt_pool_uuid": glance_pool.pool_id,
                 "ovirt_recovery_interval": 0}
    for name, value in overrides.items():
        conf.set_override(name, value, group="backend_defaults")
    conf.set_override("lock_path", str(tmp_path / "locks"),
                      group="oslo_concurrency")
    d = ovirt_driver.OvirtVolumeDriver(
        configuration=configuration.Configuration([], config_group=BACKEND),
        host=f"host@{BACKEND}")
    d.do_setup(None)
    yield d
    for name in overrides:
        conf.clear_override(name, group="backend_defaults")
    conf.clear_override("lock_path", group="oslo_concurrency")


# Raw bytes are all hashed on upload (md5 + sha256, ~6 s/GiB here), so
# the raw case is smaller; the qcow2 file of a 10 GiB disk is a few MiB.
@pytest.mark.parametrize("fmt, gib", [("qcow2", 10), ("raw", 1)])
def test_clone_image_is_thin(glance_store, glance_pool, drv, tmp_path, fmt,
                             gib):
    size = gib * GiB
    src = str(tmp_path / f"src.{fmt}")
    qemuimg.create(src, fmt, size)
    qemuio.write_pattern(src, fmt, 0, MiB, 0x5a)
    qemuio.write_pattern(src, fmt, size - MiB, MiB, 0xa5)
    with open(src, "rb") as f:
        uri = glance_store.add(str(uuid.uuid4()), f, 0, "sha256")[0]

    ctx = cinder_context.get_admin_context()
    sd_id = glance_pool.master.sd_id
    vid = str(uuid.uuid4())
    volume = fake_volume.fake_volume_obj(
        ctx, id=vid, name=f"volume-{vid}", size=gib,
        host=f"host@{BACKEND}#{sd_id}")
    locations = (uri, [{"url": uri, "metadata": {"store": "fast"}}])

    meta = {"disk_format": fmt, "container_format": "bare"}
    assert drv.clone_image(ctx, volume, locations, meta, None) == (None,
                                                                  True)

    leaf = glance_pool.leaf(sd_id, volume.name_id)
    assert leaf.parent is not None
    assert leaf.meta.capacity == size
    assert fileutil.allocated_bytes(leaf.path) < MiB
    qemuio.verify_pattern(leaf.path, "qcow2", 0, MiB, 0x5a)
    qemuio.verify_pattern(leaf.path, "qcow2", size - MiB, MiB, 0xa5)
    qemuio.verify_zero(leaf.path, "qcow2", size // 2, MiB)


def test_other_store_location_not_cloned(drv):
    ctx = cinder_context.get_admin_context()
    volume = fake_volume.fake_volume_obj(ctx, id=str(uuid.uuid4()), size=1)
    loc = ("file:///var/lib/glance/images/x", [])
    assert drv.clone_image(ctx, volume, loc, {}, None) == (None, False)


# Another domain: the driver copies the template there, once.


@pytest.fixture
def second_domain(glance_pool):
    """A second domain in the same mount, so the store and the driver
    (both configured with that mount) see it; made before either opens
    the pool."""
    return glance_pool.add_domain(glance_pool.master.mount).sd_id


def upload(store, path):
    with open(path, "rb") as f:
        return store.add(str(uuid.uuid4()), f, 0, "sha256")[0]


def new_volume(sd_id, size=1):
    ctx = cinder_context.get_admin_context()
    vid = str(uuid.uuid4())
    return fake_volume.fake_volume_obj(
        ctx, id=vid, name=f"volume-{vid}", size=size,
        host=f"host@{BACKEND}#{sd_id}")


QCOW2_META = {"disk_format": "qcow2", "container_format": "bare"}


def clone_concurrently(drv, uri, volumes):
    ctx = cinder_context.get_admin_context()
    locations = (uri, [{"url": uri, "metadata": {"store": "fast"}}])
    barrier = threading.Barrier(len(volumes))
    results, failures = [], []

    def first_use(volume):
        barrier.wait()
        try:
            results.append(drv.clone_image(ctx, volume, locations,
                                           QCOW2_META, None))
        except Exception as e:  # noqa: BLE001 -- reported below
            failures.append(e)

    threads = [threading.Thread(target=first_use, args=(v,))
               for v in volumes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert results == [(None, True)] * len(volumes)


def qcow2_source(tmp_path):
    src = str(tmp_path / "src.qcow2")
    qemuimg.create(src, "qcow2", 64 * MiB)
    qemuio.write_pattern(src, "qcow2", 0, MiB, 0x5a)
    return src


def test_template_copy_goes_with_the_last_volume(
        second_domain, glance_store, glance_conf, glance_pool, drv,
        tmp_path):
    uri = upload(glance_store, qcow2_source(tmp_path))
    img_id = uri.split("/")[-2]
    volumes = [new_volume(second_domain) for _ in range(3)]
    clone_concurrently(drv, uri, volumes)
    images = glance_pool.list_images(second_domain)
    assert sorted(images) == sorted([img_id, *(v.name_id for v in volumes)])
    copy = glance_pool.image(second_domain, img_id).template()
    assert description.get(copy.meta.description, "copy") == \
        glance_pool.master.sd_id

    # Glance deletes the image: gone from the store's domain at once; the
    # copy stays while volumes use it ...
    glance_store.delete(fixtures.location_of(uri, glance_conf))
    assert img_id not in glance_pool.list_images(glance_pool.master.sd_id)
    assert glance_pool.domain(second_domain).has_image(img_id)
    for volume in volumes:
        leaf = glance_pool.leaf(second_domain, volume.name_id)
        qemuio.verify_pattern(leaf.path, "qcow2", 0, MiB, 0x5a)
        drv.delete_volume(volume)
    # ... and goes with the last one.
    assert glance_pool.list_images(second_domain) == []
    assert staged_leftovers(glance_pool) == []
    assert fsck.check(glance_pool).clean


def test_glance_delete_removes_unused_template_copy(
        second_domain, glance_store, glance_conf, glance_pool, drv,
        tmp_path):
    uri = upload(glance_store, qcow2_source(tmp_path))
    img_id = uri.split("/")[-2]
    volumes = [new_volume(second_domain) for _ in range(2)]
    clone_concurrently(drv, uri, volumes)
    for volume in volumes:
        drv.delete_volume(volume)
    # Glance still has the image: the copy is kept for the next volume.
    assert glance_pool.list_images(second_domain) == [img_id]
    glance_store.delete(fixtures.location_of(uri, glance_conf))
    assert glance_pool.list_images(second_domain) == []
    assert glance_pool.list_images(glance_pool.master.sd_id) == []
    assert fsck.check(glance_pool).clean


@pytest.mark.parametrize("disk_format", ["iso", "raw"])
def test_iso_upload_not_cloned(glance_store, glance_pool, drv, disk_format):
    data = bytearray(64 * 1024)
    data[0x8001:0x8006] = b"CD001"
    uri = glance_store.add(str(uuid.uuid4()), io.BytesIO(bytes(data)),
                           len(data), "sha256")[0]
    volume = new_volume(glance_pool.master.sd_id)
    meta = {"disk_format": disk_format, "container_format": "bare"}
    ctx = cinder_context.get_admin_context()
    assert drv.clone_image(ctx, volume, (uri, []), meta, None) == (None,
                                                                   False)
    assert glance_pool.list_images(glance_pool.master.sd_id) == [
        uri.split("/")[-2]]
