"""End to end: a Glance upload into our store, then a Cinder volume from it.

The Cinder driver's ``clone_image`` gets the location our store returned
and must make the volume as an O(1) overlay on the template: its own layer
has almost nothing allocated, whatever the image's virtual size (10 GiB
here, with 2 MiB of data).
"""


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
from ovirt_cinder.storage import fileutil  # noqa: E402
from ovirt_cinder.storage import qemuimg  # noqa: E402
from tests import qemuio  # noqa: E402

MiB, GiB = sc.MiB, sc.GiB
BACKEND = "ovirt1"


@pytest.fixture
def drv(glance_pool, tmp_path):
    conf = cfg.CONF
    conf.register_group(cfg.OptGroup(BACKEND))
    overrides = {"ovirt_domain_paths": [glance_pool.master.mount],
                 "ovirt_pool_uuid": glance_pool.pool_id}
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

    assert drv.clone_image(ctx, volume, locations, {}, None) == (None, True)

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
