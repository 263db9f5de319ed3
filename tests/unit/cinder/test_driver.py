"""OvirtVolumeDriver on a real two-domain pool with the real qemu-img.

Cinder objects are Cinder's own fakes (fake_volume, fake_snapshot); the
only stand-in is the Glance image service (tests.unit.cinder.fakes). Data
is written and checked by content with qemu-io.
"""

import contextlib
import logging
import os
import subprocess
import threading
import time
import uuid

import eventlet
import pytest
from cinder import exception
from cinder.tests.unit import fake_snapshot
from cinder.tests.unit import fake_volume
from oslo_config import cfg
from taskflow.types import notifier

from ovirt_cinder import opts
from ovirt_cinder.cinder import driver as ovirt_driver
from ovirt_cinder.cinder import options
from ovirt_cinder.storage import config as pool_config
from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import description
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fsck
from ovirt_cinder.storage import lease
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage.pool import StoragePool
from tests import damaged
from tests import ovirt_fixtures
from tests import qemuio

MiB, GiB = sc.MiB, sc.GiB


def uid():
    return str(uuid.uuid4())


def new_volume(ctx, sd_id, size=1, **kw):
    vid = uid()
    return fake_volume.fake_volume_obj(
        ctx, id=vid, name=f"volume-{vid}", size=size,
        host=f"host@ovirt1#{sd_id}", **kw)


def new_snapshot(ctx, volume):
    return fake_snapshot.fake_snapshot_obj(
        ctx, id=uid(), volume_id=volume.id, volume=volume,
        volume_size=volume.size)


def leaf(drv, volume):
    return drv.pool.leaf(drv._sd_id(volume), volume.name_id)


def write(drv, volume, offset, pattern):
    v = leaf(drv, volume)
    qemuio.write_pattern(v.path, v.qemu_format, offset, MiB, pattern)


def verify(drv, volume, offset, pattern):
    v = leaf(drv, volume)
    qemuio.verify_pattern(v.path, v.qemu_format, offset, MiB, pattern)


@pytest.fixture
def created(drv, ctx, sd1):
    volume = new_volume(ctx, sd1)
    drv.create_volume(volume)
    return volume


# Options

def test_options_in_backend_defaults(drv, config):
    names = {o.name for o in drv.get_driver_options()}
    assert {"ovirt_pool_uuid", "ovirt_domain_paths", "ovirt_volume_format",
            "ovirt_volume_allocation", "ovirt_lease_backend",
            "ovirt_host_id", "ovirt_io_timeout", "ovirt_flow_connection",
            "ovirt_lease_timeout", "ovirt_lock_path",
            "ovirt_qemu_img_timeout", "ovirt_copy_stall_timeout",
            "ovirt_file_owner", "ovirt_file_group", "ovirt_run_path",
            "ovirt_max_image_virtual_size_gb", "ovirt_export_protocol",
            "ovirt_copy_offload", "ovirt_recovery_interval",
            "ovirt_image_cache", "ovirt_image_cache_max_count",
            "ovirt_image_cache_max_size_gb"} == names
    # Set in backend_defaults, read through the backend section.
    assert config.ovirt_max_image_virtual_size_gb == 2
    assert config.ovirt_volume_format == "raw"


def test_list_opts():
    groups = dict(opts.list_opts())
    assert groups["backend_defaults"] == options.OVIRT_OPTS
    assert "helper_command" in {
        o.name for o in groups["ovirt_cinder_privileged"]}


def test_pool_options_are_the_shared_ones():
    # Declared once in the engine, shared with the Glance store and CLI.
    assert options.OVIRT_OPTS == [*pool_config.POOL_OPTS, *options.DRIVER_OPTS]
    assert options.OVIRT_OPTS[0] is pool_config.POOL_OPTS[0]


class RecordingLeases(lease.LocalLeaseManager):
    """Local leases that remember which domains were initialised."""

    def __init__(self):
        super().__init__()
        self.initialised = []

    def init_domain(self, domain):
        self.initialised.append(domain.sd_id)


def test_lease_backend_from_config(config, storage, monkeypatch, tmp_path):
    # The sanlock daemon is a process boundary: the real one is used by
    # tests/functional/sanlock; here only the configuration is checked.
    calls = []
    leases = RecordingLeases()

    def make(backend, host_id, io_timeout, *, lease_timeout, lock_path):
        calls.append((backend, host_id, io_timeout, lease_timeout,
                      lock_path))
        return leases

    monkeypatch.setattr(lease, "make_lease_manager", make)
    locks = str(tmp_path / "host-locks")
    for name, value in [("ovirt_lease_backend", "sanlock"),
                        ("ovirt_host_id", 7), ("ovirt_io_timeout", 3),
                        ("ovirt_lease_timeout", 4.5),
                        ("ovirt_lock_path", locks)]:
        cfg.CONF.set_override(name, value, group="backend_defaults")
    d = ovirt_driver.OvirtVolumeDriver(configuration=config)
    d.do_setup(None)
    assert calls == [("sanlock", 7, 3, 4.5, locks)]
    assert d.pool.lease_manager is leases
    assert sorted(leases.initialised) == sorted(storage.domains)


# Create, delete

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_create_volume(drv, ctx, sd2, fmt, config):
    cfg.CONF.set_override("ovirt_volume_format", fmt,
                          group="backend_defaults")
    volume = new_volume(ctx, sd2, size=2)
    drv.create_volume(volume)
    v = leaf(drv, volume)
    assert drv.pool.find_image(volume.name_id) == sd2
    assert v.qemu_format == fmt and v.meta.capacity == 2 * GiB
    write(drv, volume, 0, 0x41)
    verify(drv, volume, 0, 0x41)


def test_create_volume_for_migration_keeps_its_format(drv, ctx, sd1,
                                                     config):
    # Cinder's copy writes the guest's bytes through the target's view.
    cfg.CONF.set_override("ovirt_volume_format", "qcow2",
                          group="backend_defaults")
    volume = new_volume(ctx, sd1, migration_status=f"target:{uid()}")
    drv.create_volume(volume)
    assert leaf(drv, volume).qemu_format == "qcow2"


def test_create_volume_unknown_pool(drv, ctx):
    with pytest.raises(exception.InvalidHost):
        drv.create_volume(new_volume(ctx, uid()))


def test_delete_volume(drv, created):
    drv.delete_volume(created)
    assert drv.pool.list_images(drv.pool.master.sd_id) == []
    drv.delete_volume(created)  # already gone


def test_delete_volume_whose_image_is_gone(drv, ctx, storage, sd1,
                                          created):
    # Cinder calls remove_export before delete_volume: neither may fail
    # for a volume whose image someone removed, or it is undeletable.
    storage.delete_image(sd1, created.name_id)
    drv.remove_export(ctx, created)
    drv.delete_volume(created)
    assert storage.list_images(sd1) == []


def test_delete_volume_with_snapshot_is_busy(drv, ctx, created):
    drv.create_snapshot(new_snapshot(ctx, created))
    with pytest.raises(exception.VolumeIsBusy):
        drv.delete_volume(created)
    assert drv.pool.list_images(drv.pool.master.sd_id) == [created.name_id]


def test_snapshot_of_a_volume_another_operation_holds_is_busy(drv, ctx,
                                                             created):
    """An image lease held elsewhere: a retryable VolumeIsBusy once the
    lease wait runs out, and nothing changed."""
    pool = drv.pool
    dom = pool.domain(pool.find_image(created.name_id))
    pool.lease_manager.lease_timeout = 0.2
    held = threading.Event()
    done = threading.Event()

    def hold():
        with pool.lease_manager.image_lease(dom, created.name_id):
            held.set()
            done.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        with pytest.raises(exception.VolumeIsBusy):
            drv.create_snapshot(new_snapshot(ctx, created))
    finally:
        done.set()
        holder.join()
    assert pool.image(dom.sd_id, created.name_id).snapshots() == {}


def test_deleted_data_not_readable(drv, ctx, sd1, created):
    write(drv, created, 0, 0x55)
    path = leaf(drv, created).path
    drv.delete_volume(created)
    again = new_volume(ctx, sd1)
    drv.create_volume(again)
    assert not os.path.exists(path)
    v = leaf(drv, again)
    qemuio.verify_zero(v.path, v.qemu_format, 0, 4 * MiB)


def test_name_id_is_the_image(drv, ctx, sd1):
    volume = new_volume(ctx, sd1, _name_id=uid())
    drv.create_volume(volume)
    assert drv.pool.list_images(sd1) == [volume._name_id]


# Snapshots, clones, extend, revert

def test_snapshot_and_volume_from_snapshot_larger(drv, ctx, sd2, created):
    write(drv, created, 0, 0x01)
    snap = new_snapshot(ctx, created)
    drv.create_snapshot(snap)
    write(drv, created, 0, 0x02)
    clone = new_volume(ctx, sd2, size=2)
    drv.create_volume_from_snapshot(clone, snap)
    verify(drv, clone, 0, 0x01)
    assert leaf(drv, clone).meta.capacity == 2 * GiB
    verify(drv, created, 0, 0x02)
    drv.delete_snapshot(snap)
    verify(drv, created, 0, 0x02)
    drv.delete_snapshot(snap)  # already gone
    drv.delete_volume(created)


def test_clone(drv, ctx, sd1, created):
    write(drv, created, MiB, 0x07)
    clone = new_volume(ctx, sd1, size=3)
    drv.create_cloned_volume(clone, created)
    verify(drv, clone, MiB, 0x07)
    write(drv, clone, MiB, 0x08)
    verify(drv, created, MiB, 0x07)
    assert leaf(drv, clone).meta.capacity == 3 * GiB


def test_extend(drv, created):
    write(drv, created, 0, 0x03)
    drv.extend_volume(created, 4)
    assert leaf(drv, created).meta.capacity == 4 * GiB
    verify(drv, created, 0, 0x03)


def test_revert_to_snapshot(drv, ctx, created):
    write(drv, created, 0, 0x0a)
    snap = new_snapshot(ctx, created)
    drv.create_snapshot(snap)
    write(drv, created, 0, 0x0b)
    drv.revert_to_snapshot(ctx, created, snap)
    verify(drv, created, 0, 0x0a)


def test_snapshot_missing_volume(drv, ctx, sd1):
    volume = new_volume(ctx, sd1)
    with pytest.raises(exception.VolumeNotFound):
        drv.create_snapshot(new_snapshot(ctx, volume))


# Attach

def test_initialize_connection_nfs(drv, ctx, storage, mounts, tmp_path):
    cfg.CONF.set_override("ovirt_export_protocol", "nfs",
                          group="backend_defaults")
    mount = tmp_path / "nfs"
    mount.mkdir()
    dom = storage.add_domain(str(mount), domain_type=sc.DomainType.NFS)
    dom.write_metadata(dom.metadata.replace(remote_path="srv:/export"))
    cfg.CONF.set_override("ovirt_domain_paths", [*mounts, str(mount)],
                          group="backend_defaults")
    drv.do_setup(None)
    volume = new_volume(ctx, dom.sd_id)
    drv.create_volume(volume)
    conn = drv.initialize_connection(volume, {})
    name = f"{dom.sd_id}/images/{volume.name_id}/{leaf(drv, volume).vol_id}"
    assert conn == {"driver_volume_type": "nfs", "data": {
        "export": "srv:/export", "name": name, "format": "raw"}}
    assert os.path.exists(os.path.join(str(mount), name))
    # Nova opens the files: no snapshot or extend behind the guest.
    volume.attach_status = "attached"
    with pytest.raises(exception.InvalidVolume, match="attached over NFS"):
        drv.create_snapshot(new_snapshot(ctx, volume))
    with pytest.raises(exception.InvalidVolume, match="attached over NFS"):
        drv.extend_volume(volume, 2)


def test_initialize_connection_nfs_domain_from_cli(
        drv, ctx, storage, mounts, tmp_path, monkeypatch, capsys):
    # An NFS domain as the admin creates it: the export is the
    # REMOTE_PATH given to `ovirt-storage domain create`.
    from ovirt_cinder.cmd import storage as cli

    monkeypatch.setattr(cli, "DEFAULT_CONFIG_FILE", str(tmp_path / "none"))
    cfg.CONF.set_override("ovirt_export_protocol", "nfs",
                          group="backend_defaults")
    mount = tmp_path / "nfs"
    mount.mkdir()
    code = cli.main(["-p", mounts[0], "--pool-id", storage.pool_id,
                     "--lock-path", str(tmp_path / "cli-locks"), "domain",
                     "create", "--path", str(mount), "--type", "NFS",
                     "--remote-path", "127.0.0.1:/exports/a", "--json"])
    assert code == 0, capsys.readouterr()
    cfg.CONF.set_override("ovirt_domain_paths", [*mounts, str(mount)],
                          group="backend_defaults")
    drv.do_setup(None)
    [sd_id] = os.listdir(mount)
    volume = new_volume(ctx, sd_id)
    drv.create_volume(volume)
    conn = drv.initialize_connection(volume, {})
    assert conn["driver_volume_type"] == "nfs"
    assert conn["data"]["export"] == "127.0.0.1:/exports/a"
    assert conn["data"]["name"].startswith(f"{sd_id}/images/")


# Stats

def test_stats_pool_per_domain(drv, sd1, sd2, created):
    stats = drv.get_volume_stats(refresh=True)
    assert stats["storage_protocol"] == "iSCSI"
    assert stats["volume_backend_name"] == "OvirtVolumeDriver"
    pools = {p["pool_name"]: p for p in stats["pools"]}
    assert set(pools) == {sd1, sd2}
    p = pools[sd1]
    assert p["provisioned_capacity_gb"] == 1
    assert pools[sd2]["provisioned_capacity_gb"] == 0
    assert p["total_capacity_gb"] >= p["free_capacity_gb"] > 0
    assert p["thin_provisioning_support"] is True
    assert p["max_over_subscription_ratio"] == 20.0
    assert p["multiattach"] is False
    assert p["online_extend_support"] is True
    assert p["ovirt_domain_version"] == 5


def test_stats_old_domain_takes_no_new_volumes(drv, sd2):
    """A V4 domain is served (read, managed) but reports no free space,
    so the scheduler puts no new volume there until it is upgraded."""
    dom = drv.pool.domain(sd2)
    ovirt_fixtures.downgrade(dom, 4)
    pools = {p["pool_name"]: p
             for p in drv.get_volume_stats(refresh=True)["pools"]}
    assert pools[sd2]["ovirt_domain_version"] == 4
    assert pools[sd2]["free_capacity_gb"] == 0
    assert pools[sd2]["total_capacity_gb"] > 0
    drv.pool.upgrade_domain(sd2)
    pools = {p["pool_name"]: p
             for p in drv.get_volume_stats(refresh=True)["pools"]}
    assert pools[sd2]["free_capacity_gb"] > 0


# Images

def make_image(tmp_path, fmt, pattern, size=16 * MiB, **create):
    path = str(tmp_path / f"src.{fmt}")
    qemuimg.create(path, fmt, size, **create)
    qemuio.write_pattern(path, fmt, 0, MiB, pattern)
    return path


@pytest.mark.parametrize("damage", sorted(damaged.DAMAGES))
def test_copy_image_damaged_refused(drv, ctx, images, created, tmp_path,
                                    damage):
    path = damaged.DAMAGES[damage](str(tmp_path / "damaged.qcow2"))
    image_id = images.add_file(path, "qcow2")
    with pytest.raises(exception.ImageUnacceptable) as e:
        drv.copy_image_to_volume(ctx, created, images, image_id)
    assert image_id in str(e.value)
    # Neither the download nor Cinder's conversion directory is named.
    assert "ovirt_image_" not in str(e.value)
    assert cfg.CONF.image_conversion_dir not in str(e.value)
    if damage in damaged.CHECK_FINDS:
        assert "damaged" in str(e.value)
    assert_refused(drv, ctx, images, created, image_id)
    drv.delete_volume(created)
    assert all(drv.pool.list_images(s) == [] for s in drv.pool.domains)
    assert fsck.check(drv.pool).clean


def test_copy_image_leaks_accepted(drv, ctx, images, created, tmp_path):
    path = damaged.leaked(str(tmp_path / "leaked.qcow2"))
    drv.copy_image_to_volume(ctx, created, images,
                             images.add_file(path, "qcow2"))
    verify(drv, created, 0, 0x5a)


def test_import_error_hides_the_download(drv, ctx, images, created,
                                         tmp_path, monkeypatch):
    image_id = images.add_file(make_image(tmp_path, "raw", 0x33), "raw")
    seen = []

    def failing(self, sd_id, img_id, src, *args, **kwargs):
        seen.append(src)
        raise errors.QemuImgError(cmd="convert", rc=1, out="", argv=[],
                                  err=f"qemu-img: Could not open '{src}'")

    monkeypatch.setattr(StoragePool, "import_volume", failing)
    with pytest.raises(exception.VolumeBackendAPIException) as e:
        drv.copy_image_to_volume(ctx, created, images, image_id)
    assert seen and seen[0] not in str(e.value)
    assert os.path.basename(seen[0]) not in str(e.value)
    assert f"image {image_id}" in str(e.value)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_copy_image_to_volume(drv, ctx, images, created, tmp_path, fmt):
    image_id = images.add_file(make_image(tmp_path, fmt, 0x33), fmt)
    drv.copy_image_to_volume(ctx, created, images, image_id)
    verify(drv, created, 0, 0x33)
    assert leaf(drv, created).meta.capacity == GiB


def assert_refused(drv, ctx, images, volume, image_id):
    before = leaf(drv, volume)
    with pytest.raises(exception.ImageUnacceptable):
        drv.copy_image_to_volume(ctx, volume, images, image_id)
    assert leaf(drv, volume) == before
    qemuio.verify_zero(before.path, before.qemu_format, 0, MiB)
    conv = cfg.CONF.image_conversion_dir
    assert not os.path.exists(conv) or os.listdir(conv) == []


def test_copy_image_backing_file_refused(drv, ctx, images, created,
                                         tmp_path):
    base = make_image(tmp_path, "raw", 0x44)
    top = str(tmp_path / "top.qcow2")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", base,
                    "-F", "raw", top], check=True, capture_output=True)
    assert_refused(drv, ctx, images, created, images.add_file(top, "qcow2"))


def test_copy_image_format_mismatch_refused(drv, ctx, images, created,
                                            tmp_path):
    path = make_image(tmp_path, "qcow2", 0x44)
    assert_refused(drv, ctx, images, created, images.add_file(path, "raw"))


def test_copy_image_too_large_refused(drv, ctx, images, created,
                                      tmp_path):
    path = make_image(tmp_path, "qcow2", 0x44, size=3 * GiB)
    assert_refused(drv, ctx, images, created,
                   images.add_file(path, "qcow2"))


@pytest.mark.parametrize("disk_format", ["raw", "qcow2"])
def test_copy_volume_to_image_chain(drv, ctx, images, created, tmp_path,
                                    disk_format):
    write(drv, created, 0, 0x21)
    drv.create_snapshot(new_snapshot(ctx, created))
    write(drv, created, MiB, 0x22)
    image_id = images.add(b"", disk_format)
    created.glance_metadata = {}
    drv.copy_volume_to_image(ctx, created, images, images.show(ctx,
                                                                image_id))
    out = tmp_path / "uploaded"
    out.write_bytes(images.data[image_id])
    info = qemuimg.info(str(out))
    assert info.format == disk_format and info.backing_filename is None
    qemuio.verify_pattern(str(out), disk_format, 0, MiB, 0x21)
    qemuio.verify_pattern(str(out), disk_format, MiB, MiB, 0x22)


def make_template(storage, sd_id, tmp_path, fmt="raw", detected=None):
    """A template as the Glance store makes it (``detected`` is the
    format it records; None: none, as ``volume import --template``)."""
    src = make_image(tmp_path, fmt, 0x5a)
    img = uid()
    desc = description.update("", tmpl=img, fmt=detected) if detected \
        else ""
    vol = storage.import_volume(sd_id, img, src, fmt, 16 * MiB,
                                fmt=ovirt_driver._FORMATS[fmt],
                                voltype=sc.VolumeType.SHARED,
                                description=desc)
    return f"ovirt://{storage.pool_id}/{sd_id}/{img}/{vol.vol_id}", img


def image_meta(disk_format="raw", container_format="bare"):
    return {"disk_format": disk_format,
            "container_format": container_format}


def locations_of(url):
    return (url, [{"url": url, "metadata": {}}])


@pytest.mark.parametrize("same_domain", [True, False])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_clone_image(drv, ctx, storage, sd1, sd2, tmp_path, same_domain,
                     fmt):
    url, tmpl_img = make_template(storage, sd1, tmp_path, fmt, fmt)
    volume = new_volume(ctx, sd1 if same_domain else sd2)
    assert drv.clone_image(ctx, volume, locations_of(url), image_meta(fmt),
                           None) == (None, True)
    v = leaf(drv, volume)
    assert v.parent is not None and v.meta.capacity == GiB
    verify(drv, volume, 0, 0x5a)
    assert drv.pool.domain(drv._sd_id(volume)).has_image(tmpl_img)


def test_clone_image_of_a_cli_template(drv, ctx, storage, sd1, tmp_path):
    # ``volume import --template`` records no detected format: the
    # volume's format is the real one.
    url, _ = make_template(storage, sd1, tmp_path, "qcow2")
    volume = new_volume(ctx, sd1)
    assert drv.clone_image(ctx, volume, locations_of(url),
                           image_meta("qcow2"), None) == (None, True)


@pytest.mark.parametrize("fmt, detected, meta", [
    # Not a copy-on-write base, whatever Glance says.
    ("raw", "iso", image_meta("iso")),
    ("raw", "iso", image_meta("raw")),
    ("raw", "vmdk", image_meta("vmdk")),
    ("raw", "vhd", image_meta("vhd")),
    # A base, but Glance's metadata disagrees with it.
    ("raw", "raw", image_meta("raw", "ova")),
    ("raw", "raw", image_meta("raw", "ovf")),
    ("raw", "raw", image_meta("qcow2")),
    ("qcow2", "qcow2", image_meta("raw")),
    ("raw", "raw", {}),
    # Recorded format and volume format disagree.
    ("raw", "qcow2", image_meta("qcow2")),
])
def test_clone_image_not_a_cow_base(drv, ctx, storage, sd1, sd2, tmp_path,
                                    fmt, detected, meta):
    url, tmpl_img = make_template(storage, sd1, tmp_path, fmt, detected)
    for sd_id in (sd1, sd2):
        volume = new_volume(ctx, sd_id)
        # Not cloned: Cinder's own path downloads, inspects, converts.
        assert drv.clone_image(ctx, volume, locations_of(url), meta,
                               None) == (None, False)
        assert not drv.pool.domain(sd_id).has_image(volume.name_id)
    assert storage.list_images(sd1) == [tmpl_img]
    assert storage.list_images(sd2) == []


def test_clone_image_iso_disktype_not_a_base(drv, ctx, storage, sd1,
                                             tmp_path):
    src = make_image(tmp_path, "raw", 0x5a)
    img = uid()
    vol = storage.adopt_volume(sd1, img, src, 16 * MiB,
                               voltype=sc.VolumeType.SHARED,
                               disktype=sc.DiskType.ISOF)
    url = f"ovirt://{storage.pool_id}/{sd1}/{img}/{vol.vol_id}"
    assert drv.clone_image(ctx, new_volume(ctx, sd1), locations_of(url),
                           image_meta("raw"), None) == (None, False)


def test_clone_image_concurrent_first_use_in_another_domain(
        drv, ctx, storage, sd1, sd2, tmp_path):
    url, tmpl_img = make_template(storage, sd1, tmp_path, "raw", "raw")
    volumes = [new_volume(ctx, sd2) for _ in range(3)]
    barrier = threading.Barrier(len(volumes))
    results, failures = [], []

    def first_use(volume):
        barrier.wait()
        try:
            results.append(drv.clone_image(ctx, volume, locations_of(url),
                                           image_meta("raw"), None))
        except Exception as e:  # noqa: BLE001 -- reported below
            failures.append(e)

    threads = [threading.Thread(target=first_use, args=(v,))
               for v in volumes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert results == [(None, True)] * 3
    # One copy, marked as a copy of the original in sd1, linked by all.
    assert sorted(storage.list_images(sd2)) == sorted(
        [tmpl_img, *(v.name_id for v in volumes)])
    copy = storage.image(sd2, tmpl_img).template()
    assert description.get(copy.meta.description, "copy") == sd1
    assert description.get(copy.meta.description, "tmpl") == tmpl_img
    assert os.stat(copy.path).st_nlink == 4
    for volume in volumes:
        verify(drv, volume, 0, 0x5a)
        assert leaf(drv, volume).parent == copy.vol_id

    # Glance deletes the image (in its own domain): the copy serves the
    # volumes until the last of them goes, then it goes too.
    storage.delete_image(sd1, tmpl_img)
    for volume in volumes:
        assert storage.domain(sd2).has_image(tmpl_img)
        verify(drv, volume, 0, 0x5a)
        drv.delete_volume(volume)
    assert storage.list_images(sd2) == []
    assert storage.list_images(sd1) == []
    assert fsck.check(storage).clean


def test_template_copy_kept_while_glance_has_the_image(drv, ctx, storage,
                                                        sd1, sd2, tmp_path):
    url, tmpl_img = make_template(storage, sd1, tmp_path, "raw", "raw")
    volume = new_volume(ctx, sd2)
    drv.clone_image(ctx, volume, locations_of(url), image_meta("raw"), None)
    drv.delete_volume(volume)
    # The next volume in sd2 reuses the copy: it stays.
    assert storage.list_images(sd2) == [tmpl_img]
    assert not storage.collect_template_copy(sd2, tmpl_img)
    # Once Glance deleted the image, an unused copy is garbage.
    storage.delete_image(sd1, tmpl_img)
    assert storage.collect_template_copy(sd2, tmpl_img)
    assert storage.list_images(sd2) == []
    assert fsck.check(storage).clean


def test_plain_template_copy_never_collected(drv, ctx, storage, sd1, sd2,
                                             tmp_path):
    # An admin's ``image copy`` of a template is not the driver's copy.
    _, tmpl_img = make_template(storage, sd1, tmp_path, "raw", "raw")
    storage.copy_image(sd1, tmpl_img, sd2)
    storage.delete_image(sd1, tmpl_img)
    assert not storage.collect_template_copy(sd2, tmpl_img)
    assert storage.list_images(sd2) == [tmpl_img]


def test_clone_image_other_location(drv, ctx, sd1):
    volume = new_volume(ctx, sd1)
    loc = ("file:///tmp/x", [{"url": "ovirt://bad", "metadata": {}}])
    assert drv.clone_image(ctx, volume, loc, {}, None) == (None, False)
    assert drv.clone_image(ctx, volume, None, {}, None) == (None, False)


def test_parse_location():
    ids = [uid() for _ in range(4)]
    assert ovirt_driver.parse_location("ovirt://" + "/".join(ids)) == \
        tuple(ids)
    assert ovirt_driver.parse_location("rbd://a/b/c/d") is None


# Manage


class CinderDB:
    """What Cinder's database holds for the driver's lookups (the unit
    tests have no database): volumes of the backend, snapshots by
    volume."""

    def __init__(self):
        self.volumes = []
        self.snapshots = {}


@pytest.fixture
def cinder_db(drv, monkeypatch):
    db = CinderDB()
    monkeypatch.setattr(drv, "_cinder_volumes", lambda: list(db.volumes))
    monkeypatch.setattr(drv, "_cinder_snapshots",
                        lambda vid: list(db.snapshots.get(vid, [])))
    return db


def test_manage_existing(drv, ctx, storage, sd1, cinder_db):
    img = uid()
    vol = storage.create_volume(sd1, img, GiB + MiB)
    qemuio.write_pattern(vol.path, vol.qemu_format, 0, MiB, 0x61)
    volume = new_volume(ctx, sd1, size=2)
    ref = {"source-name": img}
    listed = drv.get_manageable_volumes([], None, 10, 0, ["size"], ["asc"])
    assert [e["reference"] for e in listed] == [ref]
    assert listed[0]["safe_to_manage"] is True
    assert drv.manage_existing_get_size(volume, ref) == 2
    update = drv.manage_existing(volume, ref)
    assert update == {"_name_id": img}
    volume.update(update)
    verify(drv, volume, 0, 0x61)
    assert leaf(drv, volume).meta.capacity == 2 * GiB
    listed = drv.get_manageable_volumes([volume], None, 10, 0, ["size"],
                                        ["asc"])
    assert listed[0]["safe_to_manage"] is False
    assert listed[0]["cinder_id"] == volume.id
    drv.unmanage(volume)
    assert storage.list_images(sd1) == [img]


def test_manage_existing_refuses_an_image_in_use(drv, ctx, storage, sd1,
                                                 cinder_db):
    # Two volumes on one image: deleting either would destroy the other's
    # data.
    img = uid()
    storage.create_volume(sd1, img, GiB)
    owner = new_volume(ctx, sd1)
    owner.update({"_name_id": img})
    cinder_db.volumes = [owner]
    with pytest.raises(exception.ManageExistingInvalidReference,
                       match=owner.id):
        drv.manage_existing_get_size(new_volume(ctx, sd1),
                                     {"source-name": img})
    # The owner itself (a retried manage) is not refused.
    assert drv.manage_existing_get_size(owner, {"source-name": img}) == 1


@pytest.mark.parametrize("ref", [{"source-name": "nope"},
                                 {"source-name": str(uuid.uuid4())}])
def test_manage_existing_bad_reference(drv, ctx, sd1, ref, cinder_db):
    with pytest.raises(exception.ManageExistingInvalidReference):
        drv.manage_existing_get_size(new_volume(ctx, sd1), ref)


def test_manage_existing_snapshot(drv, ctx, storage, sd1, created,
                                  cinder_db):
    snap_id = uid()
    storage.snapshot(sd1, created.name_id, snap_id)
    assert drv.get_manageable_snapshots(
        [], None, 10, 0, ["size"], ["asc"]) == []
    # Listed once Cinder has the volume, though not one of its snapshots.
    cinder_db.volumes = [created]
    [entry] = drv.get_manageable_snapshots(
        [], None, 10, 0, ["size"], ["asc"])
    assert entry["reference"] == {"source-name": snap_id}
    assert entry["safe_to_manage"] is True
    assert entry["source_reference"] == {"source-id": created.id}
    snap = new_snapshot(ctx, created)
    ref = {"source-name": snap_id}
    assert drv.manage_existing_snapshot_get_size(snap, ref) == 1
    update = drv.manage_existing_snapshot(snap, ref)
    assert update == {"provider_location": snap_id}
    snap.update(update)
    # A second Cinder snapshot on the same storage snapshot is refused.
    cinder_db.snapshots[created.id] = [snap]
    with pytest.raises(exception.ManageExistingInvalidReference,
                       match=snap.id):
        drv.manage_existing_snapshot(new_snapshot(ctx, created), ref)
    drv.unmanage_snapshot(snap)
    drv.delete_snapshot(snap)
    assert storage.image(sd1, created.name_id).snapshots() == {}


# Migration

def test_migrate_volume_between_domains(drv, ctx, sd1, sd2, created):
    write(drv, created, 0, 0x71)
    drv.create_snapshot(new_snapshot(ctx, created))
    caps = drv.get_volume_stats(refresh=True)["pools"][0]
    host = {"host": f"host@ovirt1#{sd2}", "capabilities": caps}
    assert drv.migrate_volume(ctx, created, host) == (True, None)
    assert drv.pool.find_image(created.name_id) == sd2
    assert drv.pool.list_images(sd1) == []
    created.host = host["host"]
    verify(drv, created, 0, 0x71)


def test_migrate_volume_leaves_no_template_copy(drv, ctx, storage, sd1,
                                                sd2, tmp_path):
    # A volume from an image in sd2 (over a copy of the sd1 template),
    # whose Glance image is gone, migrates back to sd1 and back again.
    url, tmpl_img = make_template(storage, sd1, tmp_path, "raw", "raw")
    volume = new_volume(ctx, sd2)
    drv.clone_image(ctx, volume, locations_of(url), image_meta("raw"), None)
    caps = drv.get_volume_stats(refresh=True)["pools"][0]
    storage.delete_image(sd1, tmpl_img)
    for dst, src in ((sd1, sd2), (sd2, sd1)):
        host = {"host": f"host@ovirt1#{dst}", "capabilities": caps}
        assert drv.migrate_volume(ctx, volume, host) == (True, None)
        volume.host = host["host"]
        verify(drv, volume, 0, 0x5a)
        # The copy the volume left behind went with it.
        assert storage.list_images(src) == []
    drv.delete_volume(volume)
    assert storage.list_images(sd1) == storage.list_images(sd2) == []
    assert fsck.check(storage).clean


def test_migrate_volume_other_backend(drv, ctx, sd2, created):
    host = {"host": f"other@b#{sd2}",
            "capabilities": {"location_info": "ovirt:" + uid()}}
    assert drv.migrate_volume(ctx, created, host) == (False, None)


def test_retype_format_change_needs_migration(drv, ctx, sd2, created):
    diff = {"extra_specs": {"ovirt:volume_format": ("raw", "qcow2")}}
    host = {"host": f"host@ovirt1#{sd2}", "capabilities": {}}
    assert drv.retype(ctx, created, None, diff, host) == (False, None)


def test_flow_logbook_in_a_database(config, storage, tmp_path):
    url = f"sqlite:///{tmp_path}/flows.sqlite"
    cfg.CONF.set_override("ovirt_flow_connection", url,
                          group="backend_defaults")
    d = ovirt_driver.OvirtVolumeDriver(configuration=config)
    d.do_setup(None)
    assert d.pool.runner.backend.__class__.__name__ == "SQLAlchemyBackend"
    assert os.path.exists(tmp_path / "flows.sqlite")
    assert not os.listdir(os.path.join(storage.master.master_dir))


@contextlib.contextmanager
def _interrupt_first_task(engine):
    """A flow listener: stop as the first task starts (a crash)."""
    def on_change(event_type, details):
        if event_type == "RUNNING":
            raise KeyboardInterrupt
    engine.atom_notifier.register(notifier.Notifier.ANY, on_change)
    try:
        yield
    finally:
        engine.atom_notifier.deregister(notifier.Notifier.ANY, on_change)


def test_do_setup_recovers_unfinished_work(config, storage, mounts,
                                           tmp_path):
    url = f"sqlite:///{tmp_path}/flows.sqlite"
    locks = str(tmp_path / "host-locks")
    for name, value in [("ovirt_flow_connection", url),
                        ("ovirt_lock_path", locks)]:
        cfg.CONF.set_override(name, value, group="backend_defaults")
    crashed = StoragePool.open(
        mounts, flow_connection=url, listeners=[_interrupt_first_task],
        lease_manager=lease.LocalLeaseManager(lock_path=locks))
    with pytest.raises(KeyboardInterrupt):
        crashed.create_volume(storage.master.sd_id, uid(), MiB)
    assert len(list(crashed.runner.unfinished())) == 1
    d = ovirt_driver.OvirtVolumeDriver(configuration=config)
    d.do_setup(None)
    assert list(d.pool.runner.unfinished()) == []


# Active-active: the periodic recovery pass


def test_driver_supports_active_active():
    # Cinder's VolumeManager refuses a clustered service otherwise.
    assert ovirt_driver.OvirtVolumeDriver.SUPPORTS_ACTIVE_ACTIVE is True


def test_no_periodic_recovery_with_interval_zero(drv, config):
    assert config.ovirt_recovery_interval == 0
    assert drv._recovery is None


def leave_create_volume(mounts, sd_id, locks):
    """A flow of this host left unfinished (another cinder-volume process
    of the host crashed in it): the book names a new image; its id."""
    crashed = StoragePool.open(
        mounts, listeners=[_interrupt_first_task],
        lease_manager=lease.LocalLeaseManager(lock_path=locks))
    img = uid()
    with pytest.raises(KeyboardInterrupt):
        crashed.create_volume(sd_id, img, MiB)
    assert len(list(crashed.runner.unfinished())) == 1
    return img


@pytest.fixture
def host_locks(tmp_path):
    """The host's image locks in tmp_path, for the driver and the
    "crashed" process alike."""
    locks = str(tmp_path / "host-locks")
    cfg.CONF.set_override("ovirt_lock_path", locks,
                          group="backend_defaults")
    yield locks
    cfg.CONF.clear_override("ovirt_lock_path", group="backend_defaults")


def test_periodic_recovery_finishes_a_flow_left_after_setup(
        config, storage, mounts, host_locks, caplog):
    d = ovirt_driver.OvirtVolumeDriver(configuration=config)
    d.do_setup(None)
    sd_id = storage.master.sd_id
    img = leave_create_volume(mounts, sd_id, host_locks)
    with pytest.raises(errors.ImageIsBusy):
        d.pool.snapshot(sd_id, img, uid())

    with caplog.at_level(logging.INFO, logger=ovirt_driver.__name__):
        d._recover_pending()

    assert list(d.pool.runner.unfinished()) == []
    # The flow was finished: the image is there, whole and usable.
    vol = d.pool.leaf(sd_id, img)
    assert vol.legal
    assert vol.meta.capacity == MiB
    assert qemuimg.info(vol.path, vol.qemu_format).virtual_size == MiB
    assert fsck.check(d.pool).clean
    assert "Periodic recovery of storage flow create_image: SUCCESS" in \
        caplog.text


def test_periodic_recovery_leaves_a_running_flow_quickly(
        config, storage, mounts, host_locks):
    """A book whose flow still runs in this process comes back BUSY after
    the short wait, and is finished by a later pass."""
    d = ovirt_driver.OvirtVolumeDriver(configuration=config)
    d.do_setup(None)
    sd_id = storage.master.sd_id
    img = leave_create_volume(mounts, sd_id, host_locks)
    held, release = threading.Event(), threading.Event()

    def running_flow():
        with d.pool.lease_manager.image_lease(d.pool.domain(sd_id), img):
            held.set()
            release.wait(30)

    flow = threading.Thread(target=running_flow)
    flow.start()
    try:
        assert held.wait(10)
        start = time.monotonic()
        d._recover_pending()
        assert time.monotonic() - start < 10   # not ovirt_lease_timeout
        assert len(list(d.pool.runner.unfinished())) == 1
    finally:
        release.set()
        flow.join()
    d._recover_pending()
    assert list(d.pool.runner.unfinished()) == []
    assert d.pool.leaf(sd_id, img).legal


@pytest.mark.parametrize("error", [
    errors.DomainNotFound(sd_id="master of the pool"),
    OSError(5, "Input/output error"),
])
def test_periodic_recovery_logs_instead_of_raising(drv, monkeypatch, caplog,
                                                   error):
    # A looping call whose function raises never runs again.
    def recover(lease_timeout=None):
        raise error

    monkeypatch.setattr(drv.pool, "recover", recover)
    with caplog.at_level(logging.ERROR, logger=ovirt_driver.__name__):
        drv._recover_pending()
    record, = [r for r in caplog.records
               if r.name == ovirt_driver.__name__]
    assert "Periodic recovery" in record.getMessage()
    assert record.exc_info[1] is error


def test_periodic_recovery_runs_every_interval(config, storage, mounts,
                                               host_locks):
    """With ovirt_recovery_interval set, do_setup starts a looping call
    that finishes, by itself, a flow left after the service started."""
    cfg.CONF.set_override("ovirt_recovery_interval", 1,
                          group="backend_defaults")
    d = ovirt_driver.OvirtVolumeDriver(configuration=config)
    d.do_setup(None)
    try:
        assert d._recovery is not None
        img = leave_create_volume(mounts, storage.master.sd_id, host_locks)
        deadline = time.monotonic() + 20
        while list(d.pool.runner.unfinished()):
            assert time.monotonic() < deadline, "no recovery pass ran"
            eventlet.sleep(0.1)     # the looping call is a green thread
        assert d.pool.leaf(storage.master.sd_id, img).legal
        # Setting up again replaces the loop; stopping it is for good.
        first = d._recovery
        d.do_setup(None)
        assert d._recovery is not first
    finally:
        d._stop_recovery()
    assert d._recovery is None


@pytest.mark.parametrize("target_cluster,kept", [
    ("cluster@ovirt1", True), ("other@ovirt1", False), (None, False)])
def test_retype_in_place_keeps_the_host_within_a_cluster(
        drv, ctx, sd1, target_cluster, kept):
    # Cinder records the scheduler's pick among a cluster's services as
    # the volume's host unless the driver says otherwise: a volume that
    # did not move keeps its host.
    volume = new_volume(ctx, sd1, cluster_name="cluster@ovirt1")
    volume.host = f"a@ovirt1#{sd1}"
    drv.create_volume(volume)
    write(drv, volume, 0, 0x19)
    caps = drv.get_volume_stats(refresh=True)["pools"][0]
    host = {"host": f"b@ovirt1#{sd1}", "cluster_name": target_cluster,
            "capabilities": caps}
    update = {"host": volume.host} if kept else None
    assert drv.retype(ctx, volume, None, {}, host) == (True, update)
    assert drv.migrate_volume(ctx, volume, host) == (True, update)
    assert drv.pool.find_image(volume.name_id) == sd1
    verify(drv, volume, 0, 0x19)
