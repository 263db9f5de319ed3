"""``make demo``: walk through the main operations on a local pool.

Builds a pool with two local-directory domains under ``./.demo`` (removed
and rebuilt on every run), writes real data with ``qemu-io``, and after
every step reads it back, printing what was done and how long it took.
Later sections show the same storage through the Glance store and the
Cinder driver, as glance-api and cinder-volume would call them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import fsck
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage.pool import StoragePool

GiB = sc.GiB
MiB = sc.MiB


class Walk:
    """Prints one line per step: number, elapsed ms, what happened."""

    def __init__(self) -> None:
        self.n = 0

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[list[str]]:
        self.n += 1
        notes: list[str] = []
        start = time.monotonic()
        yield notes
        ms = (time.monotonic() - start) * 1000
        print(f"{self.n:3d}. {ms:8.1f} ms  {title}")
        for note in notes:
            print(f"                   {note}")

    @staticmethod
    def section(title: str) -> None:
        print(f"\n== {title}")


def qemu_io(path: str, fmt: str, command: str) -> str:
    out = subprocess.run(["qemu-io", "-f", fmt, "-c", command, path],
                         capture_output=True, text=True, check=True).stdout
    if "Pattern verification failed" in out:
        raise SystemExit(f"DATA MISMATCH in {path}: {command}\n{out}")
    return out


def write(vol, offset: int, pattern: int, length: int = MiB) -> None:
    qemu_io(vol.path, vol.qemu_format,
            f"write -P {pattern:#x} {offset} {length}")


def verify(vol, offset: int, pattern: int, length: int = MiB) -> str:
    qemu_io(vol.path, vol.qemu_format,
            f"read -P {pattern:#x} {offset} {length}")
    return f"read back {length // MiB} MiB of {pattern:#04x} at " \
           f"{offset // MiB} MiB: ok"


def short(uid: str) -> str:
    return uid[:8]


def engine_walk(walk: Walk, root: str) -> tuple[StoragePool, str]:
    walk.section("storage engine (ovirt_cinder.storage)")
    mnt1, mnt2 = os.path.join(root, "mnt1"), os.path.join(root, "mnt2")
    os.makedirs(mnt1)
    os.makedirs(mnt2)
    with walk.step("create a pool with a local-directory master domain") \
            as notes:
        pool = StoragePool.create(mnt1, description="demo master")
        sd = pool.master.sd_id
        notes.append(f"pool {short(pool.pool_id)}, domain {short(sd)} "
                     f"in {pool.master.path}")
    img = str(uuid.uuid4())
    with walk.step("create a 1 GiB qcow2 volume (sparse)") as notes:
        vol = pool.create_volume(sd, img, GiB)
        notes.append(f"image {short(img)} volume {short(vol.vol_id)}: "
                     f"{os.stat(vol.path).st_blocks * 512 // 1024} KiB "
                     "allocated")
    snaps = []
    for i in range(3):
        write(pool.leaf(sd, img), i * MiB, 0x10 + i)
        snap = str(uuid.uuid4())
        with walk.step(f"snapshot {i + 1} (after writing 1 MiB of "
                       f"{0x10 + i:#04x} at {i} MiB)") as notes:
            pool.snapshot(sd, img, snap)
            notes.append(f"chain: {chain_text(pool, sd, img)}")
        snaps.append(snap)
    write(pool.leaf(sd, img), 3 * MiB, 0x13)
    with walk.step("delete the middle snapshot (merge)") as notes:
        pool.delete_snapshot(sd, img, snaps[1])
        notes.append(f"chain: {chain_text(pool, sd, img)}")
        notes.append(verify(pool.image(sd, img).find_snapshot(snaps[2]),
                            MiB, 0x11))
    with walk.step("revert to the first snapshot") as notes:
        leaf = pool.revert_to_snapshot(sd, img, snaps[0])
        notes.append(verify(leaf, 0, 0x10))
        qemu_io(leaf.path, "qcow2", f"read -P 0 {MiB} {MiB}")
        notes.append("data written after snapshot 1 is gone: ok")
    tmpl = make_template(walk, pool, sd, root)
    with walk.step("thin-clone the template (O(1), hard links)") as notes:
        clone = pool.thin_clone(sd, tmpl, str(uuid.uuid4()))
        notes.append(verify(clone, 0, 0x42))
        notes.append(f"new layer allocated: "
                     f"{qemuimg.allocated_bytes(clone.path, fmt='qcow2')} "
                     "bytes")
    with walk.step("full clone of snapshot 3 into a new image") as notes:
        full = pool.clone(sd, img, str(uuid.uuid4()), snap_id=snaps[2])
        notes.append(verify(full, 2 * MiB, 0x12))
    with walk.step("extend the volume to 2 GiB") as notes:
        leaf = pool.extend(sd, img, 2 * GiB)
        notes.append(f"capacity {leaf.meta.capacity // GiB} GiB, "
                     f"generation {leaf.meta.generation}")
    with walk.step("add a second domain and copy the image to it") as notes:
        dom2 = pool.add_domain(mnt2, description="demo second")
        tree = pool.copy_image(sd, img, dom2.sd_id)
        notes.append(f"{len(tree.volumes)} volumes, snapshots kept: "
                     f"{len(tree.snapshots())}")
        notes.append(verify(tree.leaf(), 0, 0x10))
    with walk.step("fsck the whole pool") as notes:
        report = fsck.check(pool)
        notes.append("clean" if report.clean else
                     f"{len(report.problems)} problems")
        if not report.clean:
            raise SystemExit("fsck found problems")
    return pool, tmpl


def make_template(walk: Walk, pool: StoragePool, sd: str,
                  root: str) -> str:
    src = os.path.join(root, "base.raw")
    qemuimg.create(src, "raw", GiB)
    qemu_io(src, "raw", f"write -P 0x42 0 {MiB}")
    tmpl = str(uuid.uuid4())
    with walk.step("import a 1 GiB raw image as a template") as notes:
        vol = pool.import_volume(sd, tmpl, src, "raw", GiB,
                                 voltype=sc.VolumeType.SHARED)
        notes.append(f"template {short(tmpl)}: {vol.meta.voltype}, "
                     f"{os.stat(vol.path).st_blocks * 512 // MiB} MiB "
                     "allocated")
    os.unlink(src)
    return tmpl


def chain_text(pool: StoragePool, sd: str, img: str) -> str:
    parts = []
    for v in pool.image(sd, img).chain():
        label = short(v.vol_id)
        if v.snapshot_id:
            label += f"(snap {short(v.snapshot_id)})"
        parts.append(f"{label} {v.meta.format}/{v.meta.voltype}")
    return " <- ".join(parts)


SECTIONS: list[Callable[[Walk, StoragePool, str], None]] = []


def _register_sections() -> None:
    """Add the Glance and Cinder sections if OpenStack is importable."""
    try:
        from ovirt_cinder import demo_openstack
    except ImportError as e:
        print(f"(Glance/Cinder sections skipped: {e})")
        return
    SECTIONS.extend(s for s in demo_openstack.SECTIONS if s not in SECTIONS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=os.path.join(os.getcwd(), ".demo"))
    args = parser.parse_args(argv)
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    tempfile.tempdir = args.dir
    _register_sections()
    walk = Walk()
    start = time.monotonic()
    pool, tmpl = engine_walk(walk, args.dir)
    for section in SECTIONS:
        section(walk, pool, tmpl)
    print(f"\nDone: {walk.n} steps in {time.monotonic() - start:.1f} s; "
          f"the pool is in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
