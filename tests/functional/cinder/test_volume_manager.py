"""The driver under Cinder's real VolumeManager, checked by content."""

import hashlib
import os
import uuid

import pytest
from cinder import exception
from cinder import objects
from cinder.volume import manager

from ovirt_cinder.cinder import image_cache
from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import description
from ovirt_cinder.storage import fsck
from ovirt_cinder.storage import qemuimg
from tests import damaged
from tests import qemuio
from tests.functional.cinder.conftest import BACKEND
from tests.functional.cinder.conftest import CONF
from tests.functional.cinder.conftest import new_volume

MiB, GiB = sc.MiB, sc.GiB


def leaf(mgr, volume):
    drv = mgr.driver
    volume.refresh()
    return drv.pool.leaf(drv._sd_id(volume), volume.name_id)


def write(mgr, volume, offset, pattern):
    v = leaf(mgr, volume)
    qemuio.write_pattern(v.path, v.qemu_format, offset, MiB, pattern)


def verify(mgr, volume, offset, pattern):
    v = leaf(mgr, volume)
    qemuio.verify_pattern(v.path, v.qemu_format, offset, MiB, pattern)


def test_service_reports_pools(volume_manager, storage):
    volume_manager._report_driver_status(None)
    stats = volume_manager.driver.get_volume_stats()
    assert {p["pool_name"] for p in stats["pools"]} == set(storage.domains)


def test_create_snapshot_clone_extend_delete(volume_manager, ctx, storage):
    mgr, sd_id = volume_manager, storage.master.sd_id
    volume = new_volume(ctx, sd_id)
    mgr.create_volume(ctx, volume)
    volume.refresh()
    assert volume.status == "available"
    write(mgr, volume, 0, 0x11)

    snap = objects.Snapshot(ctx, volume_id=volume.id, volume_size=1,
                            status="creating", user_id=ctx.user_id,
                            project_id=ctx.project_id)
    snap.create()
    mgr.create_snapshot(ctx, snap)
    snap.refresh()
    assert snap.status == "available"
    write(mgr, volume, 0, 0x12)

    from_snap = new_volume(ctx, sd_id, size=2, snapshot_id=snap.id)
    mgr.create_volume(ctx, from_snap,
                      request_spec=objects.RequestSpec(snapshot_id=snap.id))
    from_snap.refresh()
    assert from_snap.status == "available"
    verify(mgr, from_snap, 0, 0x11)

    clone = new_volume(ctx, sd_id, source_volid=volume.id)
    mgr.create_volume(ctx, clone, request_spec=objects.RequestSpec(
        source_volid=volume.id))
    verify(mgr, clone, 0, 0x12)

    volume.status, snap.status = "reverting", "restoring"
    volume.save()
    snap.save()
    mgr.revert_to_snapshot(ctx, volume, snap)
    verify(mgr, volume, 0, 0x11)

    mgr.extend_volume(ctx, volume, 3, None)
    volume.refresh()
    assert volume.size == 3 and leaf(mgr, volume).meta.capacity == 3 * GiB

    mgr.delete_snapshot(ctx, snap)
    for v in (volume, from_snap, clone):
        mgr.delete_volume(ctx, v)
    assert all(storage.list_images(s) == [] for s in storage.domains)


def test_create_from_image_and_upload(volume_manager, ctx, storage, images,
                                      tmp_path):
    mgr, sd_id = volume_manager, storage.master.sd_id
    src = str(tmp_path / "src.qcow2")
    qemuimg.create(src, "qcow2", 64 * MiB)
    qemuio.write_pattern(src, "qcow2", 0, MiB, 0x31)
    image_id = images.add_file(src, "qcow2", virtual_size=64 * MiB,
                               min_disk=0)
    volume = new_volume(ctx, sd_id)
    mgr.create_volume(ctx, volume, request_spec=objects.RequestSpec(
        image_id=image_id))
    volume.refresh()
    assert volume.status == "available", volume.status
    verify(mgr, volume, 0, 0x31)

    upload = images.add(b"", "raw")
    volume.status = "uploading"
    volume.save()
    mgr.copy_volume_to_image(ctx, volume.id, images.show(ctx, upload))
    out = tmp_path / "uploaded.raw"
    out.write_bytes(images.data[upload])
    qemuio.verify_pattern(str(out), "raw", 0, MiB, 0x31)


def test_manage_unmanage(volume_manager, ctx, storage):
    mgr, sd_id = volume_manager, storage.master.sd_id
    img = "6a0f5d8e-0a41-4b1d-9a36-1b3c2f0e7d11"
    vol = storage.create_volume(sd_id, img, GiB)
    qemuio.write_pattern(vol.path, vol.qemu_format, 0, MiB, 0x41)
    volume = new_volume(ctx, sd_id, size=0)
    volume.status = "managing"
    volume.save()
    mgr.manage_existing(ctx, volume, {"source-name": img})
    volume.refresh()
    assert volume.status == "available" and volume.size == 1
    assert volume.name_id == img
    verify(mgr, volume, 0, 0x41)
    mgr.delete_volume(ctx, volume, unmanage_only=True)
    assert storage.list_images(sd_id) == [img]


def test_manageable_listings_build_cinder_objects(volume_manager, ctx,
                                                  storage):
    # cinder-api asks with want_objects=True; Cinder's objects check the
    # field types the driver returns (extra_info must be a dict).
    mgr, sd_id = volume_manager, storage.master.sd_id
    img = "0c3b8a52-7f7e-4d55-8f0e-5b0d6a2c9e41"
    storage.create_volume(sd_id, img, GiB)
    listed = mgr.get_manageable_volumes(ctx, None, 10, 0, ["size"], ["asc"],
                                        want_objects=True)
    assert all(isinstance(e, objects.ManageableVolume) for e in listed)
    entry = next(e for e in listed if e.reference == {"source-name": img})
    entry.obj_to_primitive()  # what the RPC reply carries
    assert entry.safe_to_manage and entry.size == 1
    assert entry.extra_info == {"domain": sd_id}

    volume = new_volume(ctx, sd_id)
    mgr.create_volume(ctx, volume)
    known = objects.Snapshot(ctx, volume_id=volume.id, volume_size=1,
                             status="creating", user_id=ctx.user_id,
                             project_id=ctx.project_id)
    known.create()
    mgr.create_snapshot(ctx, known)
    snap_id = "4f1c2e7a-9b1d-4c3e-8a5f-2d6b7c8e9f10"
    storage.snapshot(sd_id, volume.name_id, snap_id)
    snaps = mgr.get_manageable_snapshots(ctx, None, 10, 0, ["size"],
                                         ["asc"], want_objects=True)
    assert all(isinstance(s, objects.ManageableSnapshot) for s in snaps)
    [snap] = [s for s in snaps if s.reference == {"source-name": snap_id}]
    snap.obj_to_primitive()
    assert snap.safe_to_manage and snap.source_reference == {
        "source-id": volume.id}
    assert snap.extra_info["domain"] == sd_id


def test_migrate_between_domains(volume_manager, ctx, storage):
    mgr = volume_manager
    sd1 = storage.master.sd_id
    sd2 = next(s for s in storage.domains if s != sd1)
    volume = new_volume(ctx, sd1)
    mgr.create_volume(ctx, volume)
    write(mgr, volume, 0, 0x51)
    volume.refresh()
    caps = mgr.driver.get_volume_stats(refresh=True)["pools"][0]
    host = {"host": f"{volume.host.split('#')[0]}#{sd2}",
            "capabilities": caps}
    volume.migration_status = "starting"
    volume.save()
    mgr.migrate_volume(ctx, volume, host, force_host_copy=False)
    volume.refresh()
    assert volume.host.endswith(sd2), volume.migration_status
    assert storage.list_images(sd1) == []
    verify(mgr, volume, 0, 0x51)


def create_from_image(mgr, ctx, sd_id, image_id, refused=False):
    volume = new_volume(ctx, sd_id)
    spec = objects.RequestSpec(image_id=image_id)
    if refused:
        with pytest.raises(exception.ImageUnacceptable) as e:
            mgr.create_volume(ctx, volume, request_spec=spec)
        # The message names the image, not the download in
        # image_conversion_dir.
        assert image_id in str(e.value)
        assert CONF.image_conversion_dir not in str(e.value)
        assert "image_fetch_" not in str(e.value)
    else:
        mgr.create_volume(ctx, volume, request_spec=spec)
    volume.refresh()
    return volume


def conversion_leftovers():
    conv = CONF.image_conversion_dir
    return os.listdir(conv) if os.path.isdir(conv) else []


# Damage qemu-img info accepts: Cinder's own probe of the download passes
# and our inspection's qemu-img check finds it. (A header qemu-img cannot
# open is refused by Cinder's probe before the driver sees it.)
@pytest.mark.parametrize("damage", ["l1_past_eof",
                                    "refcount_table_out_of_range",
                                    "truncated", "l2_over_l1"])
def test_create_from_damaged_image(volume_manager, ctx, storage, images,
                                   tmp_path, damage):
    mgr, sd_id = volume_manager, storage.master.sd_id
    src = damaged.DAMAGES[damage](str(tmp_path / "damaged.qcow2"))
    image_id = images.add_file(src, "qcow2", virtual_size=damaged.SIZE,
                               min_disk=0)
    volume = create_from_image(mgr, ctx, sd_id, image_id, refused=True)
    assert volume.status == "error"
    assert conversion_leftovers() == []
    mgr.delete_volume(ctx, volume)
    assert all(storage.list_images(s) == [] for s in storage.domains)
    assert fsck.check(storage).clean


def ovirt_template(storage, sd_id, tmp_path, fmt):
    src = str(tmp_path / f"tmpl.{fmt}")
    qemuimg.create(src, fmt, 64 * MiB)
    qemuio.write_pattern(src, fmt, 0, MiB, 0x61)
    img = str(uuid.uuid4())
    vol = storage.import_volume(
        sd_id, img, src, fmt, 64 * MiB, voltype=sc.VolumeType.SHARED,
        fmt=sc.VolumeFormat.COW if fmt == "qcow2" else sc.VolumeFormat.RAW,
        description=description.update("", tmpl=img, fmt=fmt))
    url = f"ovirt://{storage.pool_id}/{sd_id}/{img}/{vol.vol_id}"
    return src, url


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_create_from_ovirt_image_is_a_thin_clone(volume_manager, ctx,
                                                 storage, images, tmp_path,
                                                 fmt):
    mgr, sd_id = volume_manager, storage.master.sd_id
    src, url = ovirt_template(storage, sd_id, tmp_path, fmt)
    image_id = images.add_file(
        src, fmt, virtual_size=64 * MiB, min_disk=0, direct_url=url,
        locations=[{"url": url, "metadata": {}}])
    volume = create_from_image(mgr, ctx, sd_id, image_id)
    assert volume.status == "available"
    assert leaf(mgr, volume).parent is not None
    verify(mgr, volume, 0, 0x61)


def test_create_from_mismatched_ovirt_image_is_not_cloned(
        volume_manager, ctx, storage, images, tmp_path):
    # Glance says qcow2, the template is raw: no overlay; Cinder's own
    # path downloads the bytes and the inspection refuses them.
    mgr, sd_id = volume_manager, storage.master.sd_id
    src, url = ovirt_template(storage, sd_id, tmp_path, "raw")
    image_id = images.add_file(
        src, "qcow2", virtual_size=64 * MiB, min_disk=0, direct_url=url,
        locations=[{"url": url, "metadata": {}}])
    volume = create_from_image(mgr, ctx, sd_id, image_id, refused=True)
    assert volume.status == "error"
    assert conversion_leftovers() == []
    mgr.delete_volume(ctx, volume)
    assert len(storage.list_images(sd_id)) == 1     # the template
    assert fsck.check(storage).clean


def test_plain_image_is_cached_once(volume_manager, ctx, storage, images,
                                    tmp_path):
    """A Glance image of another store: the first volume converts it into
    a cache entry, later volumes are thin clones of it, and each keeps
    its data after the others are gone."""
    mgr, sd_id = volume_manager, storage.master.sd_id
    src = str(tmp_path / "plain.qcow2")
    qemuimg.create(src, "qcow2", 64 * MiB)
    qemuio.write_pattern(src, "qcow2", 0, MiB, 0x71)
    with open(src, "rb") as f:
        digest = hashlib.sha512(f.read()).hexdigest()
    image_id = images.add_file(src, "qcow2", virtual_size=64 * MiB,
                               min_disk=0, os_hash_algo="sha512",
                               os_hash_value=digest)
    volumes = [create_from_image(mgr, ctx, sd_id, image_id)
               for _ in range(3)]
    entry = image_cache.entry_id(images.show(ctx, image_id), 1)
    tmpl = storage.image(sd_id, entry).template()
    for volume in volumes:
        assert volume.status == "available"
        assert volume.bootable
        assert leaf(mgr, volume).parent == tmpl.vol_id
        verify(mgr, volume, 0, 0x71)
    write(mgr, volumes[0], 0, 0x72)
    verify(mgr, volumes[1], 0, 0x71)

    upload = images.add(b"", "raw")
    volumes[0].status = "uploading"
    volumes[0].save()
    mgr.copy_volume_to_image(ctx, volumes[0].id, images.show(ctx, upload))
    out = tmp_path / "uploaded.raw"
    out.write_bytes(images.data[upload])
    qemuio.verify_pattern(str(out), "raw", 0, MiB, 0x72)
    assert os.path.getsize(out) == GiB

    for volume in volumes:
        mgr.delete_volume(ctx, volume)
    assert storage.list_images(sd_id) == [entry]
    assert conversion_leftovers() == []
    assert fsck.check(storage).clean


def start_clustered(ctx, host, cluster):
    service = objects.Service(ctx, host=host, cluster_name=cluster,
                              binary="cinder-volume", topic="cinder-volume",
                              report_count=0, availability_zone="nova")
    service.create()
    # Cinder refuses a clustered driver without SUPPORTS_ACTIVE_ACTIVE.
    mgr = manager.VolumeManager(service_name=BACKEND, host=host,
                                cluster=cluster)
    mgr.init_host(service_id=service.id)
    assert mgr.driver.initialized
    assert mgr.driver.cluster_name == cluster
    return mgr


def test_clustered_services_serve_one_pool(cinder_conf, ctx, images,
                                           storage, caplog):
    """Two cinder-volume services of one cluster (active-active): a
    volume created through one is snapshotted, extended and cleaned up
    through the other, with its data kept."""
    cluster = f"ovirt-cluster@{BACKEND}"
    first, second = (start_clustered(ctx, f"{name}@{BACKEND}", cluster)
                     for name in ("host-a", "host-b"))
    # Exports (``local`` here) are host-local: each service says so.
    assert caplog.text.count(f"Cluster {cluster}: attached volumes") == 2
    sd_id = storage.master.sd_id
    volume = objects.Volume(
        ctx, host=f"host-a@{BACKEND}#{sd_id}",
        cluster_name=f"{cluster}#{sd_id}", size=1, status="creating",
        attach_status="detached", user_id=ctx.user_id,
        project_id=ctx.project_id)
    volume.create()
    first.create_volume(ctx, volume)
    volume.refresh()
    assert volume.status == "available"
    write(first, volume, 0, 0x51)

    snap = objects.Snapshot(ctx, volume_id=volume.id, volume_size=1,
                            status="creating", user_id=ctx.user_id,
                            project_id=ctx.project_id)
    snap.create()
    second.create_snapshot(ctx, snap)
    snap.refresh()
    assert snap.status == "available"
    write(second, volume, 0, 0x52)
    second.extend_volume(ctx, volume, 2, None)
    volume.refresh()
    assert volume.size == 2
    assert leaf(first, volume).meta.capacity == 2 * GiB
    verify(first, volume, 0, 0x52)

    # A retype in place through the other service (to a type that
    # differs, so that Cinder asks the driver): the scheduler named
    # host-b, the volume did not move and keeps its host.
    new_type = objects.VolumeType(ctx, name=f"t-{uuid.uuid4()}",
                                  extra_specs={"tier": "gold"},
                                  is_public=True,
                                  projects=[], description="")
    new_type.create()
    volume.refresh()
    volume.status, volume.previous_status = "retyping", "available"
    volume.save()
    caps = second.driver.get_volume_stats(refresh=True)["pools"][0]
    second.retype(ctx, volume, new_type.id, {
        "host": f"host-b@{BACKEND}#{sd_id}",
        "cluster_name": f"{cluster}#{sd_id}", "capabilities": caps},
        migration_policy="never")
    volume.refresh()
    assert volume.status == "available"
    assert volume.volume_type_id == new_type.id
    assert volume.host == f"host-a@{BACKEND}#{sd_id}"
    verify(first, volume, 0, 0x52)

    second.delete_snapshot(ctx, snap)
    verify(first, volume, 0, 0x52)
    first.delete_volume(ctx, volume)
    assert storage.list_images(sd_id) == []
    assert fsck.check(storage).clean
