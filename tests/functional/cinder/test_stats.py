"""The driver's pool stats: provisioned capacity from the domains'
counters, the same value a scan of the images gives, and a scan when
the counters are bad."""

import os

from cinder import objects

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import counters
from tests.functional.cinder.conftest import new_volume

GiB = sc.GiB


def pools(mgr):
    stats = mgr.driver.get_volume_stats(refresh=True)
    return {p["pool_name"]: p for p in stats["pools"]}


def test_provisioned_from_counters(volume_manager, ctx, storage):
    mgr = volume_manager
    sd1 = storage.master.sd_id
    sd2 = next(s for s in storage.domains if s != sd1)
    volumes = []
    for size in (1, 2):
        volume = new_volume(ctx, sd1, size=size)
        mgr.create_volume(ctx, volume)
        volumes.append(volume)
    mgr.extend_volume(ctx, volumes[0], 3, None)
    snap = objects.Snapshot(ctx, volume_id=volumes[1].id, volume_size=2,
                            status="creating", user_id=ctx.user_id,
                            project_id=ctx.project_id)
    snap.create()
    mgr.create_snapshot(ctx, snap)

    found = pools(mgr)
    assert found[sd1]["provisioned_capacity_gb"] == 5.0
    assert found[sd2]["provisioned_capacity_gb"] == 0.0
    for sd_id, dom in storage.domains.items():
        # The value a scan of every image gives, as before the counters.
        assert found[sd_id]["provisioned_capacity_gb"] == round(
            counters.scan(dom).provisioned / GiB, 2)
        assert counters.read(dom).counters == counters.scan(dom)

    # A damaged record: the same value from a scan; the driver does not
    # write it (an operation or fsck --repair does).
    path = storage.master.dom_md(sc.COUNTERS)
    with open(path, "r+b") as f:
        f.truncate(10)
        damaged = (f.seek(0), f.read())[1]
    assert pools(mgr)[sd1]["provisioned_capacity_gb"] == 5.0
    with open(path, "rb") as f:
        assert f.read() == damaged

    mgr.delete_snapshot(ctx, snap)
    mgr.delete_volume(ctx, volumes[1])
    assert pools(mgr)[sd1]["provisioned_capacity_gb"] == 3.0
    assert counters.read(storage.master).counters == counters.scan(
        storage.master)
    os.unlink(path)
    assert pools(mgr)[sd1]["provisioned_capacity_gb"] == 3.0
