"""``make demo``, OpenStack part: the pool through Glance and Cinder.

Two sections :mod:`ovirt_cinder.demo` runs after the engine walk, on the
same pool:

* **Glance store** -- glance_store configured in-process with oslo.config
  as glance-api does in multi-store mode (``enabled_backends = demo:ovirt``,
  a ``[demo]`` section with ``ovirt_domain_paths`` and ``ovirt_pool_uuid``),
  the store loaded through the ``glance_store.drivers`` entry point
  ``ovirt`` (from a throw-away ``.dist-info`` in the demo directory when
  ovirt-cinder is not installed); a 1 GiB qcow2 image goes through
  ``add()``, ``get()`` and ``get_size()``.
* **Cinder driver** -- ``OvirtVolumeDriver`` built from a backend section
  of Cinder's global configuration and called as cinder-volume calls it,
  including ``clone_image`` from the Glance location above (O(1)).

Volumes and snapshots are real ``cinder.objects`` with every field the
driver reads set; they are never saved (there is no database). privsep
and os-brick run in-process, as in the functional tests.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import os
import shutil
import tempfile
import uuid
from typing import Any

# Imported here so that a missing OpenStack fails the import of this
# module (demo.py then skips the sections); the driver is imported after
# cinder.objects.register_all(), as cinder-volume does.
import glance_store
from cinder import context as cinder_context
from glance_store import location
from oslo_config import cfg

from ovirt_cinder import demo
from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import fsck
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage.pool import StoragePool

__all__ = ["SECTIONS", "glance_section", "cinder_section"]

GiB, MiB = sc.GiB, sc.MiB
GLANCE_BACKEND = "demo"
CINDER_BACKEND = "ovirt_demo"
HOST = f"demo-host@{CINDER_BACKEND}"
STORE_CLASS = "ovirt_cinder.glance.store:Store"

# What the Glance section leaves for the Cinder section.
_shared: dict[str, str] = {}


def _mounts(pool: StoragePool) -> list[str]:
    return sorted({d.mount for d in pool.domains.values()})


def _check_entry_point() -> str:
    """glance_store finds drivers by entry point: the package's own."""
    found = importlib.metadata.entry_points(group="glance_store.drivers",
                                            name="ovirt")
    if not any(ep.value == STORE_CLASS for ep in found):
        raise SystemExit("the glance_store.drivers entry point 'ovirt' is "
                         "not installed: run 'make venv' (pip install -e .)")
    return STORE_CLASS


def _glance_conf(pool: StoragePool) -> Any:
    """Glance's multi-store configuration, built as glance-api builds it."""
    conf = cfg.ConfigOpts()
    conf(args=[], default_config_files=[], default_config_dirs=[])
    conf.register_opt(cfg.DictOpt("enabled_backends"))
    conf.set_override("enabled_backends", {GLANCE_BACKEND: "ovirt"})
    glance_store.register_store_opts(conf)
    conf.set_override("default_backend", GLANCE_BACKEND,
                      group="glance_store")
    conf.set_override("ovirt_domain_paths", _mounts(pool),
                      group=GLANCE_BACKEND)
    conf.set_override("ovirt_pool_uuid", pool.pool_id, group=GLANCE_BACKEND)
    location.SCHEME_TO_CLS_BACKEND_MAP = {}
    glance_store.create_multi_stores(conf)
    return conf


def _make_qcow2(root: str) -> str:
    path = os.path.join(root, "glance-image.qcow2")
    qemuimg.create(path, "qcow2", GiB)
    demo.qemu_io(path, "qcow2", f"write -P 0x61 0 {4 * MiB}")
    demo.qemu_io(path, "qcow2", f"write -P 0x62 {512 * MiB} {MiB}")
    return path


def glance_section(walk: demo.Walk, pool: StoragePool, tmpl: str) -> None:
    """Upload, read back and size an image through the ovirt store."""
    walk.section("Glance store (ovirt_cinder.glance.store)")
    root = tempfile.mkdtemp(prefix="glance-")
    with walk.step("configure glance_store: enabled_backends = "
                   f"{GLANCE_BACKEND}:ovirt") as notes:
        notes.append(f"entry point: ovirt = {_check_entry_point()}")
        conf = _glance_conf(pool)
        store = location.SCHEME_TO_CLS_BACKEND_MAP["ovirt"][
            GLANCE_BACKEND]["store"]
        notes.append(f"{type(store).__module__}.{type(store).__name__}, "
                     f"domains: {', '.join(_mounts(pool))}")
    src = _make_qcow2(root)
    image_id = str(uuid.uuid4())
    with walk.step("add() a 1 GiB qcow2 image (5 MiB of data)") as notes, \
            open(src, "rb") as f:
        uri, size, checksum, multihash, meta = store.add(
            image_id, f, os.path.getsize(src), "sha256")
        sd_id = pool.find_image(image_id)
        vol = pool.image(sd_id, image_id).template()
        notes.append(f"location {uri}")
        notes.append(f"size {size} bytes, md5 {checksum}, store "
                     f"{meta.get('store')}")
        notes.append(f"sha256 {multihash[:16]}..., template "
                     f"{vol.meta.format}/{vol.meta.voltype}, "
                     f"{os.stat(vol.path).st_blocks * 512 // 1024} KiB "
                     "allocated")
        notes.append(demo.verify(vol, 0, 0x61, 4 * MiB))
    loc = location.get_location_from_uri_and_backend(
        uri, GLANCE_BACKEND, conf=conf)
    with walk.step("get() 64 KiB at offset 256 KiB; get_size()") as notes:
        offset, length = 256 * 1024, 64 * 1024
        chunks, got_len = store.get(loc, offset=offset, chunk_size=length)
        data = b"".join(chunks)
        with open(src, "rb") as f:
            f.seek(offset)
            expected = f.read(length)
        if data != expected or got_len != length:
            raise SystemExit("DATA MISMATCH: glance get() returned other "
                             "bytes than were uploaded")
        notes.append(f"{len(data)} bytes equal to the uploaded file: ok")
        notes.append(f"get_size: {store.get_size(loc)} bytes")
    _shared["image_uri"] = uri
    _shared["image_id"] = image_id


def _cinder_driver(pool: StoragePool, root: str) -> Any:
    """The driver of a ``[ovirt_demo]`` backend, as cinder-volume makes it."""
    from cinder import objects
    objects.register_all()
    from cinder import privsep as cinder_privsep
    from cinder.volume import configuration
    from os_brick.privileged import default as brick_privileged

    from ovirt_cinder.cinder import driver as ovirt_driver
    from ovirt_cinder.cinder import options

    conf = cfg.CONF
    options.register(conf)
    conf([], project="cinder", default_config_files=[],
         default_config_dirs=[])
    conf.set_override("image_conversion_dir", os.path.join(root, "conv"))
    conf.set_override("lock_path", os.path.join(root, "locks"),
                      group="oslo_concurrency")
    conf.register_group(cfg.OptGroup(CINDER_BACKEND))
    # Attached volumes are served to this host itself (no initiator):
    # their daemons live in a short directory (unix socket paths).
    run_path = tempfile.mkdtemp(prefix="ovirt-demo-", dir="/tmp")
    atexit.register(shutil.rmtree, run_path, True)
    for name, value in {"volume_backend_name": CINDER_BACKEND,
                        "ovirt_domain_paths": _mounts(pool),
                        "ovirt_pool_uuid": pool.pool_id,
                        "ovirt_export_protocol": "local",
                        "ovirt_run_path": run_path}.items():
        conf.set_override(name, value, group="backend_defaults")
    # Root without sudo: privileged calls run in-process.
    cinder_privsep.sys_admin_pctxt.set_client_mode(False)
    brick_privileged.set_client_mode(False)
    config = configuration.Configuration([], config_group=CINDER_BACKEND)
    return ovirt_driver.OvirtVolumeDriver(configuration=config, host=HOST)


def _volume(ctx: Any, sd_id: str, size: int) -> Any:
    from cinder import objects
    vid = str(uuid.uuid4())
    return objects.Volume(
        ctx, id=vid, _name_id=None, size=size, host=f"{HOST}#{sd_id}",
        status="creating", attach_status="detached", volume_type_id=None,
        migration_status=None, provider_location=None,
        user_id=ctx.user_id, project_id=ctx.project_id)


def _snapshot(ctx: Any, volume: Any) -> Any:
    from cinder import objects
    return objects.Snapshot(
        ctx, id=str(uuid.uuid4()), volume_id=volume.id, volume=volume,
        volume_size=volume.size, provider_location=None, status="creating")


def _leaf(drv: Any, volume: Any) -> Any:
    return drv.pool.leaf(drv.pool.find_image(volume.name_id),
                         volume.name_id)


def _zero(vol: Any, offset: int) -> str:
    demo.qemu_io(vol.path, vol.qemu_format, f"read -P 0 {offset} {MiB}")
    return f"zeros at {offset // MiB} MiB: ok"


def cinder_section(walk: demo.Walk, pool: StoragePool, tmpl: str) -> None:
    """Drive OvirtVolumeDriver through cinder-volume's calls."""
    walk.section("Cinder driver (ovirt_cinder.cinder.driver)")
    root = tempfile.mkdtemp(prefix="cinder-")
    sd1, sd2 = pool.master.sd_id, next(
        s for s in sorted(pool.domains) if s != pool.master.sd_id)
    with walk.step("do_setup + check_for_setup_error "
                   f"([{CINDER_BACKEND}] backend)") as notes:
        drv = _cinder_driver(pool, root)
        drv.do_setup(None)
        drv.check_for_setup_error()
        notes.append(f"pool {demo.short(drv.pool.pool_id)} with "
                     f"{len(drv.pool.domains)} domains")
    with walk.step("get_volume_stats: one Cinder pool per domain") as notes:
        stats = drv.get_volume_stats(refresh=True)
        for p in stats["pools"]:
            notes.append(
                f"{p['pool_name']}: total {p['total_capacity_gb']} GiB, "
                f"free {p['free_capacity_gb']} GiB, provisioned "
                f"{p['provisioned_capacity_gb']} GiB")
    ctx = cinder_context.get_admin_context()
    vols = _volume_walk(walk, drv, ctx, sd1, sd2)
    _image_walk(walk, drv, ctx, sd1, vols)
    with walk.step("fsck the whole pool after the Cinder calls") as notes:
        report = fsck.check(drv.pool)
        notes.append("clean" if report.clean else
                     f"{len(report.problems)} problems")
        if not report.clean:
            raise SystemExit("fsck found problems")


def _volume_walk(walk: demo.Walk, drv: Any, ctx: Any, sd1: str,
                 sd2: str) -> dict[str, Any]:
    vol = _volume(ctx, sd1, 1)
    with walk.step("create_volume (1 GiB, raw, sparse)") as notes:
        drv.create_volume(vol)
        leaf = _leaf(drv, vol)
        notes.append(f"volume {demo.short(vol.id)}: {leaf.meta.format}, "
                     f"{leaf.meta.capacity // GiB} GiB")
    demo.write(_leaf(drv, vol), 0, 0x51)
    snap = _snapshot(ctx, vol)
    with walk.step("create_snapshot (after writing 0x51 at 0 MiB)") as notes:
        drv.create_snapshot(snap)
        notes.append(f"snapshot {demo.short(snap.id)}: chain "
                     f"{len(drv.pool.image(sd1, vol.name_id).chain())}")
    demo.write(_leaf(drv, vol), MiB, 0x52)
    from_snap = _volume(ctx, sd1, 2)
    with walk.step("create_volume_from_snapshot (2 GiB)") as notes:
        drv.create_volume_from_snapshot(from_snap, snap)
        leaf = _leaf(drv, from_snap)
        notes.append(f"capacity {leaf.meta.capacity // GiB} GiB")
        notes.append(demo.verify(leaf, 0, 0x51))
        notes.append(_zero(leaf, MiB) + " (written after the snapshot)")
    cloned = _volume(ctx, sd2, 1)
    with walk.step("create_cloned_volume into the second domain") as notes:
        drv.create_cloned_volume(cloned, vol)
        sd_id = drv.pool.find_image(cloned.name_id)
        notes.append(f"in domain {demo.short(sd_id)}")
        notes.append(demo.verify(_leaf(drv, cloned), MiB, 0x52))
    with walk.step("extend_volume to 2 GiB") as notes:
        drv.extend_volume(vol, 2)
        vol.size = 2
        notes.append(f"capacity {_leaf(drv, vol).meta.capacity // GiB} GiB")
    with walk.step("revert_to_snapshot") as notes:
        drv.revert_to_snapshot(ctx, vol, snap)
        leaf = _leaf(drv, vol)
        notes.append(demo.verify(leaf, 0, 0x51))
        notes.append(_zero(leaf, MiB))
        notes.append(f"capacity kept at {leaf.meta.capacity // GiB} GiB")
    return {"vol": vol, "snap": snap, "from_snap": from_snap,
            "cloned": cloned}


def _image_walk(walk: demo.Walk, drv: Any, ctx: Any, sd1: str,
                vols: dict[str, Any]) -> None:
    uri = _shared.get("image_uri")
    if uri:
        from_image = _volume(ctx, sd1, 1)
        with walk.step("clone_image from the Glance location") as notes:
            meta = {"id": _shared["image_id"], "disk_format": "qcow2",
                    "container_format": "bare"}
            _, cloned = drv.clone_image(
                ctx, from_image, (uri, [{"url": uri, "metadata": {}}]),
                meta, None)
            leaf = _leaf(drv, from_image)
            notes.append(f"cloned: {cloned}; new layer allocated: "
                         f"{qemuimg.allocated_bytes(leaf.path, fmt='qcow2')}"
                         " bytes")
            notes.append(demo.verify(leaf, 0, 0x61, 4 * MiB))
        vols["from_image"] = from_image
    with walk.step("create_export + initialize_connection (the volume "
                   "from the snapshot, served by its daemon)") as notes:
        connector = {"host": "demo-host", "initiator": None}
        drv.create_export(ctx, vols["from_snap"], connector)
        info = drv.initialize_connection(vols["from_snap"], connector)
        notes.append(f"{info}")
        with open(info["data"]["device_path"], "rb") as f:
            ok = f.read(MiB) == b"\x51" * MiB
        notes.append(f"read 1 MiB of 0x51 at 0 through the view: "
                     f"{'ok' if ok else 'MISMATCH'}")
        drv.terminate_connection(vols["from_snap"], connector)
        drv.remove_export(ctx, vols["from_snap"])
        if not ok:
            raise AssertionError("the view does not hold the volume's data")
    with walk.step("delete_snapshot (merge into the leaf)") as notes:
        drv.delete_snapshot(vols["snap"])
        vol = vols["vol"]
        notes.append(f"chain {len(drv.pool.image(sd1, vol.name_id).chain())}"
                     f"; {demo.verify(_leaf(drv, vol), 0, 0x51)}")
    names = ("vol", "from_snap", "cloned", "from_image")
    with walk.step("delete_volume (every volume made here)") as notes:
        deleted = [vols[n] for n in names if n in vols]
        for volume in deleted:
            drv.delete_volume(volume)
        images = {i for sd in drv.pool.domains
                  for i in drv.pool.list_images(sd)}
        left = [v.id for v in deleted if v.name_id in images]
        notes.append(f"deleted {len(deleted)} volumes, {len(left)} left")


SECTIONS = [glance_section, cinder_section]
