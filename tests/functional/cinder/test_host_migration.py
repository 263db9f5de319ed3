"""Host-assisted migration between two pools, checked by content.

Two drivers on two different storage pools (two backend sections). The
copy is done as Cinder 29's ``VolumeManager._copy_volume_data`` does it:
``initialize_connection`` of both volumes, os-brick's real ``local``
connector, ``volume_utils.copy_volume`` (the real ``dd``, sparse), then
``terminate_connection``. Only Cinder's root helper (sudo rootwrap, a
process boundary absent here) is replaced by ``env``: we run as root.
"""

import contextlib
import os
import shutil
import tempfile
import uuid
from unittest import mock

import pytest
from cinder import context as cinder_context
from cinder import exception
from cinder import objects

objects.register_all()

from cinder import utils  # noqa: E402
from cinder.tests.unit import fake_snapshot  # noqa: E402
from cinder.tests.unit import fake_volume  # noqa: E402
from cinder.volume import configuration  # noqa: E402
from cinder.volume import volume_utils  # noqa: E402
from oslo_config import cfg  # noqa: E402

from ovirt_cinder.cinder import driver as ovirt_driver  # noqa: E402
from ovirt_cinder.cinder import options  # noqa: E402
from ovirt_cinder.storage import constants as sc  # noqa: E402
from ovirt_cinder.storage import qemuimg  # noqa: E402
from ovirt_cinder.storage.pool import StoragePool  # noqa: E402
from tests import qemuio  # noqa: E402

MiB, GiB = sc.MiB, sc.GiB
CONF = cfg.CONF
SIZE_MB = 1024


def uid():
    return str(uuid.uuid4())


@pytest.fixture(autouse=True)
def _conf(tmp_path):
    CONF.set_override("image_conversion_dir", str(tmp_path / "conv"))
    CONF.set_override("lock_path", str(tmp_path / "locks"),
                      group="oslo_concurrency")
    with mock.patch.object(utils, "get_root_helper", return_value="env"):
        yield
    CONF.clear_override("image_conversion_dir")
    CONF.clear_override("lock_path", group="oslo_concurrency")


def make_driver(tmp_path, name, run_path):
    mount = tmp_path / name
    mount.mkdir()
    pool = StoragePool.create(str(mount), description=name)
    CONF.register_group(cfg.OptGroup(name))
    CONF.register_opts(options.OVIRT_OPTS, group=name)
    CONF.set_override("ovirt_domain_paths", [str(mount)], group=name)
    CONF.set_override("ovirt_pool_uuid", pool.pool_id, group=name)
    CONF.set_override("ovirt_run_path", run_path, group=name)
    CONF.set_override("ovirt_export_protocol", "local", group=name)
    CONF.set_override("ovirt_recovery_interval", 0, group=name)
    conf = configuration.Configuration([], config_group=name)
    drv = ovirt_driver.OvirtVolumeDriver(configuration=conf,
                                         host=f"host@{name}")
    drv.do_setup(None)
    drv.check_for_setup_error()
    return drv


@pytest.fixture
def drivers(tmp_path):
    names = (f"ovirt-{uid()[:8]}", f"ovirt-{uid()[:8]}")
    run_path = tempfile.mkdtemp(prefix="oc-", dir="/tmp")
    drvs = tuple(make_driver(tmp_path, n, run_path) for n in names)
    yield drvs
    assert no_daemons(drvs)
    shutil.rmtree(run_path, ignore_errors=True)
    for name in names:
        for opt in ("ovirt_domain_paths", "ovirt_pool_uuid",
                    "ovirt_run_path", "ovirt_export_protocol"):
            CONF.clear_override(opt, group=name)


def no_daemons(drvs):
    return all(not d.pool.attachments.images() for d in drvs)


@pytest.fixture
def ctx():
    return cinder_context.get_admin_context()


def new_volume(ctx, drv, size=1, **kw):
    vid = uid()
    return fake_volume.fake_volume_obj(
        ctx, id=vid, name=f"volume-{vid}", size=size,
        host=f"{drv.host}#{drv.pool.master.sd_id}", **kw)


def leaf(drv, volume):
    return drv.pool.leaf(drv._sd_id(volume), volume.name_id)


def write(drv, volume, offset, pattern):
    v = leaf(drv, volume)
    qemuio.write_pattern(v.path, v.qemu_format, offset, MiB, pattern)


@contextlib.contextmanager
def attached(drv, volume):
    """create_export, initialize_connection and os-brick connect, as the
    manager does; undone in reverse."""
    props = volume_utils.brick_get_connector_properties(False, False)
    drv.create_export(None, volume, props)
    conn = drv.initialize_connection(volume, props)
    connector = volume_utils.brick_get_connector(
        conn["driver_volume_type"], conn=conn)
    device = connector.connect_volume(conn["data"])
    assert connector.check_valid_device(device["path"], True)
    try:
        yield device["path"]
    finally:
        connector.disconnect_volume(conn["data"], device, force=True)
        drv.terminate_connection(volume, props, force=True)
        drv.remove_export(None, volume)


def migrate(ctx, src_drv, dst_drv, src):
    """Cinder's generic copy of ``src`` into a new volume of dst_drv."""
    src.migration_status = "migrating"
    dst = new_volume(ctx, dst_drv, size=src.size,
                     migration_status=f"target:{src.id}")
    dst_drv.create_volume(dst)
    with attached(dst_drv, dst) as dst_path, \
            attached(src_drv, src) as src_path:
        volume_utils.copy_volume(src_path, dst_path, src.size * 1024,
                                 "1M", sparse=True)
    return dst


def verify_raw(drv, volume, patterns):
    """The destination is one raw volume with ``patterns`` and zeros."""
    tree = drv.pool.image(drv._sd_id(volume), volume.name_id)
    assert len(tree.chain()) == 1
    v = tree.leaf()
    assert v.meta.format == sc.VolumeFormat.RAW
    assert os.path.getsize(v.path) == volume.size * GiB
    end = 0
    for offset, pattern in sorted(patterns.items()):
        if offset > end:
            qemuio.verify_zero(v.path, "raw", end, offset - end)
        qemuio.verify_pattern(v.path, "raw", offset, MiB, pattern)
        end = offset + MiB
    qemuio.verify_zero(v.path, "raw", end, volume.size * GiB - end)





def test_chain(drivers, ctx):
    src_drv, dst_drv = drivers
    src = new_volume(ctx, src_drv)
    src_drv.create_volume(src)
    write(src_drv, src, 0, 0x11)
    write(src_drv, src, 10 * MiB, 0x12)
    src_drv.create_snapshot(fake_snapshot.fake_snapshot_obj(
        ctx, id=uid(), volume_id=src.id, volume=src, volume_size=1))
    write(src_drv, src, 10 * MiB, 0x13)
    write(src_drv, src, 512 * MiB, 0x14)
    assert len(src_drv.pool.image(src_drv._sd_id(src),
                                  src.name_id).chain()) == 2
    dst = migrate(ctx, src_drv, dst_drv, src)
    verify_raw(dst_drv, dst, {0: 0x11, 10 * MiB: 0x13, 512 * MiB: 0x14})
    assert no_daemons(drivers)


def test_qcow2_volume(drivers, ctx):
    src_drv, dst_drv = drivers
    src_drv.configuration.ovirt_volume_format = "qcow2"
    CONF.set_override("ovirt_volume_format", "qcow2",
                      group=src_drv.configuration.config_group)
    src = new_volume(ctx, src_drv)
    src_drv.create_volume(src)
    assert leaf(src_drv, src).meta.format == sc.VolumeFormat.COW
    write(src_drv, src, 3 * MiB, 0x21)
    write(src_drv, src, GiB - MiB, 0x22)
    dst = migrate(ctx, src_drv, dst_drv, src)
    verify_raw(dst_drv, dst, {3 * MiB: 0x21, GiB - MiB: 0x22})
    CONF.clear_override("ovirt_volume_format",
                        group=src_drv.configuration.config_group)


def test_target_keeps_its_format(drivers, ctx):
    """A retype to a qcow2 type migrates into a qcow2 volume: the copy
    writes the guest's bytes through the target's view."""
    src_drv, dst_drv = drivers
    CONF.set_override("ovirt_volume_format", "qcow2",
                      group=dst_drv.configuration.config_group)
    try:
        src = new_volume(ctx, src_drv)
        src_drv.create_volume(src)
        write(src_drv, src, 0, 0x51)
        src_drv.create_snapshot(fake_snapshot.fake_snapshot_obj(
            ctx, id=uid(), volume_id=src.id, volume=src, volume_size=1))
        write(src_drv, src, 300 * MiB, 0x52)
        dst = migrate(ctx, src_drv, dst_drv, src)
    finally:
        CONF.clear_override("ovirt_volume_format",
                            group=dst_drv.configuration.config_group)
    tree = dst_drv.pool.image(dst_drv._sd_id(dst), dst.name_id)
    assert len(tree.chain()) == 1
    v = tree.leaf()
    assert v.meta.format == sc.VolumeFormat.COW
    qemuio.verify_pattern(v.path, "qcow2", 0, MiB, 0x51)
    qemuio.verify_pattern(v.path, "qcow2", 300 * MiB, MiB, 0x52)
    qemuio.verify_zero(v.path, "qcow2", MiB, 299 * MiB)
    # Sparse: the zeros were not written.
    assert qemuimg.allocated_bytes(v.path, fmt="qcow2") < 16 * MiB


def test_attached_volume_is_not_migrated_by_the_driver(drivers, ctx):
    src_drv = drivers[0]
    src = new_volume(ctx, src_drv, attach_status="attached")
    src_drv.create_volume(src)
    host = {"host": "other@ovirt#x", "capabilities": {}}
    assert src_drv.migrate_volume(ctx, src, host) == (False, None)


def test_thin_clone_of_template(drivers, ctx, tmp_path):
    src_drv, dst_drv = drivers
    pool, sd_id = src_drv.pool, src_drv.pool.master.sd_id
    image = str(tmp_path / "image.qcow2")
    qemuimg.create(image, "qcow2", 256 * MiB)
    qemuio.write_pattern(image, "qcow2", 0, MiB, 0x31)
    qemuio.write_pattern(image, "qcow2", 100 * MiB, MiB, 0x32)
    tmpl_img = uid()
    pool.import_volume(sd_id, tmpl_img, image, "qcow2", 256 * MiB,
                       voltype=sc.VolumeType.SHARED)
    src = new_volume(ctx, src_drv)
    pool.thin_clone(sd_id, tmpl_img, src.name_id, size=GiB)
    write(src_drv, src, 100 * MiB, 0x33)
    write(src_drv, src, 700 * MiB, 0x34)
    dst = migrate(ctx, src_drv, dst_drv, src)
    verify_raw(dst_drv, dst, {0: 0x31, 100 * MiB: 0x33, 700 * MiB: 0x34})
    # The template and the source are untouched.
    qemuio.verify_pattern(leaf(src_drv, src).path, "qcow2", 100 * MiB,
                          MiB, 0x33)
    assert pool.image(sd_id, tmpl_img).template() is not None


def test_view_is_the_guest_view_and_goes_on_detach(drivers, ctx):
    src_drv = drivers[0]
    src = new_volume(ctx, src_drv)
    src_drv.create_volume(src)
    src_drv.create_snapshot(fake_snapshot.fake_snapshot_obj(
        ctx, id=uid(), volume_id=src.id, volume=src, volume_size=1))
    write(src_drv, src, 5 * MiB, 0x41)
    with attached(src_drv, src) as path:
        assert path.startswith(src_drv.pool.attachments.root)
        assert os.path.getsize(path) == GiB
        with open(path, "rb") as f:
            f.seek(5 * MiB)
            assert f.read(MiB) == b"\x41" * MiB
    assert not os.path.exists(path)
    assert no_daemons(drivers)


def test_missing_source_is_a_cinder_error(drivers, ctx):
    src_drv = drivers[0]
    src = new_volume(ctx, src_drv)
    with pytest.raises(exception.VolumeNotFound):
        src_drv.create_export(ctx, src, {})
    assert no_daemons(drivers)


def test_failed_export_leaves_no_daemon(drivers, ctx):
    src_drv = drivers[0]
    src = new_volume(ctx, src_drv)
    src_drv.create_volume(src)
    src_drv.create_snapshot(fake_snapshot.fake_snapshot_obj(
        ctx, id=uid(), volume_id=src.id, volume=src, volume_size=1))
    os.unlink(leaf(src_drv, src).path)  # the chain is broken
    with pytest.raises(exception.VolumeBackendAPIException):
        src_drv.create_export(ctx, src, {})
    assert no_daemons(drivers)
