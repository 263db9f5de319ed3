"""Attached volumes: throughput through the export, and a live snapshot's
pause as a writer sees it.

A volume (raw base + qcow2 leaf, ``--size`` MiB, default 1024) is created
in a pool in a temporary directory on the disk under test (``--dir``),
attached (its qemu-storage-daemon serves the guest view), and exported as
LUN 1 of a tgtd target on 127.0.0.1 (the machine's tgtd, started if none
runs) with ``bsoflags direct`` (Cinder's ``iscsi_target_flags = direct``,
which the docs recommend: tgtd's page cache in front of the FUSE view
costs writes a third). ``qemu-img bench`` (``-t none``, 1 MiB requests,
queue depth 16, sequential) then reads and writes the same number of
bytes through:

- ``local``: a raw file of the same size in the same directory (the
  floor);
- ``view``: the daemon's FUSE view (what the target serves);
- ``iscsi``: the target, through libiscsi (``iscsi://``), as an initiator
  on this host would.

It prints MiB/s and the ratio to ``local`` against the targets (50% of
local for sequential read and write through the export). Then a writer
writes 64 KiB blocks through the view while the pool takes ``--snapshots``
live snapshots; it prints the writer's median and largest write latency
outside and during the snapshots against the target (under 100 ms of
stall). Not a test: it exits 0 when a target is missed::

    python bench/export.py [--size 1024] [--dir DIR] [--snapshots 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ovirt_cinder.storage import constants as sc  # noqa: E402
from ovirt_cinder.storage import pool as pool_mod  # noqa: E402
from ovirt_cinder.storage import validate  # noqa: E402
from tests import iscsi  # noqa: E402

MiB = sc.MiB
THROUGHPUT_TARGET = 0.5
STALL_TARGET_MS = 100.0
IQN = "iqn.2026-11.org.ovirt-cinder:bench-export"


def qemu_img_bench(target: str, size_mib: int, write: bool,
                   image_opts: bool = False) -> float:
    """MiB/s of a sequential ``qemu-img bench`` over ``size_mib``."""
    argv = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-n",
            "-c", str(size_mib), "-s", "1M", "-d", "16", "-S", "1M"]
    if write:
        argv += ["-w", "--pattern", "0x5a"]
    argv.append(target)
    start = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, check=True,
                         env={**os.environ, "LC_ALL": "C"}).stdout
    elapsed = time.monotonic() - start
    match = re.search(r"Run completed in ([\d.]+) seconds", out)
    seconds = float(match.group(1)) if match else elapsed
    return size_mib / seconds


def throughput(pool, sd_id, img_id, workdir, size_mib) -> dict:
    local = os.path.join(workdir, "local.raw")
    subprocess.run(["qemu-img", "create", "-f", "raw", local,
                    f"{size_mib}M"], check=True, capture_output=True)
    view = pool.attach(sd_id, img_id)
    tgtd = iscsi.Tgtd.ensure()
    try:
        # As Cinder's TgtAdm makes it with iscsi_target_flags = direct.
        tgtd.add_target(IQN, view, bsoflags="direct")
        url = iscsi.url(IQN)
        results = {}
        for name, target in (("local", local), ("view", view),
                             ("iscsi", url)):
            results[name] = (qemu_img_bench(target, size_mib, write=True),
                             qemu_img_bench(target, size_mib, write=False))
        return results
    finally:
        tgtd.delete_target(IQN)
        tgtd.stop()
        os.unlink(local)


class Writer(threading.Thread):
    def __init__(self, view: str) -> None:
        super().__init__(daemon=True)
        self.view = view
        self.stop_event = threading.Event()
        self.samples: list[tuple[float, float]] = []   # (start, seconds)

    def run(self) -> None:
        fd = os.open(self.view, os.O_WRONLY)
        data = b"\xa5" * (64 * 1024)
        offset, size = 0, os.fstat(fd).st_size
        try:
            while not self.stop_event.is_set():
                start = time.monotonic()
                os.pwrite(fd, data, offset)
                self.samples.append((start, time.monotonic() - start))
                offset = (offset + len(data)) % size
        finally:
            os.close(fd)


def snapshot_stall(pool, sd_id, img_id, count) -> tuple:
    view = pool.attach(sd_id, img_id)
    writer = Writer(view)
    writer.start()
    windows = []
    try:
        time.sleep(0.5)
        for _ in range(count):
            start = time.monotonic()
            pool.snapshot(sd_id, img_id, validate.new_uuid())
            windows.append((start, time.monotonic()))
            time.sleep(0.3)
    finally:
        writer.stop_event.set()
        writer.join()

    def during(t):
        return any(a <= t <= b for a, b in windows)

    inside = [s for t, s in writer.samples if during(t)]
    outside = [s for t, s in writer.samples if not during(t)]
    snap_ms = statistics.median((b - a) * 1000 for a, b in windows)
    return (statistics.median(outside) * 1000, max(outside) * 1000,
            statistics.median(inside or [0]) * 1000,
            max(inside or [0]) * 1000, snap_ms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB")
    parser.add_argument("--dir", help="directory on the disk under test")
    parser.add_argument("--snapshots", type=int, default=5)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="ovirt-export-bench-", dir=args.dir)
    run_path = tempfile.mkdtemp(prefix="oc-", dir="/tmp")
    pool = pool_mod.StoragePool.create(workdir, run_path=run_path)
    sd_id = pool.master.sd_id
    img_id = validate.new_uuid()
    try:
        base = pool.create_volume(sd_id, img_id, args.size * MiB,
                                  fmt=sc.VolumeFormat.RAW)
        subprocess.run(["qemu-io", "-f", "raw", "-c",
                        f"write -P 0x11 0 {args.size // 2}M", base.path],
                       check=True, capture_output=True)
        pool.snapshot(sd_id, img_id, validate.new_uuid())
        results = throughput(pool, sd_id, img_id, workdir, args.size)
        local_w, local_r = results["local"]
        print(f"sequential, {args.size} MiB, 1 MiB requests, qd 16 "
              f"(target: >= {THROUGHPUT_TARGET:.0%} of local)")
        print(f"{'path':8} {'write MiB/s':>12} {'ratio':>7} "
              f"{'read MiB/s':>11} {'ratio':>7}")
        for name, (w, r) in results.items():
            print(f"{name:8} {w:12.1f} {w / local_w:7.2f} "
                  f"{r:11.1f} {r / local_r:7.2f}")
        med_out, max_out, med_in, max_in, snap_ms = snapshot_stall(
            pool, sd_id, img_id, args.snapshots)
        print(f"\nlive snapshot (median {snap_ms:.1f} ms per snapshot) "
              f"as a 64 KiB writer through the view sees it "
              f"(target: stall < {STALL_TARGET_MS:.0f} ms)")
        print(f"  outside snapshots: median {med_out:.2f} ms, "
              f"max {max_out:.1f} ms")
        print(f"  during snapshots:  median {med_in:.2f} ms, "
              f"max {max_in:.1f} ms "
              f"{'ok' if max_in < STALL_TARGET_MS else 'MISS'}")
    finally:
        pool.detach(sd_id, img_id)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(run_path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
