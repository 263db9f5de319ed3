"""Small operations on a domain while long copies run on the same domain.

The lease scopes of doc/source/contributor/leases.rst promise that a long
copy holds only its images' leases, and the domain's SDM lease only for
its metadata writes, so small operations on other images of the domain
keep their latency. This measures it, in one pool on one disk (``--dir``,
default ``.bench/busy-domain`` in the repo; git-ignored):

1. idle: ``--repeat`` times ``pool.create_volume`` (qcow2, 1 GiB) and
   ``pool.snapshot`` of other images, next to bare ``qemu-img create``;
2. busy: the same while ``--copies`` threads each clone an image holding
   ``--data`` MiB into the same domain, again and again, until the
   measurement ends (the copies' own throughput is printed).

Prints medians and p90 in ms for both phases, and the busy/idle ratio
against the target (1.5x). ``qemu-img create`` is measured under the same
load: its ratio shows what the disk and CPU contention alone cost, the
rest is the engine's. Not a test: it exits 0 when the target is missed::

    python bench/busy_domain.py [--repeat 30] [--copies 2] [--data 256]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

from ovirt_cinder.storage import constants as sc  # noqa: E402
from ovirt_cinder.storage import lease  # noqa: E402
from ovirt_cinder.storage.pool import StoragePool  # noqa: E402

MiB = sc.MiB
GiB = sc.GiB
TARGET = 1.5


def new_id() -> str:
    return str(uuid.uuid4())


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return (time.perf_counter() - start) * 1000


def qemu_img_create(path: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path,
                    str(GiB)], check=True)


def fill(path: str, data_mib: int) -> None:
    """Write ``data_mib`` MiB of non-zero data into a raw volume."""
    block = os.urandom(MiB)
    with open(path, "r+b") as f:
        for _ in range(data_mib):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


class Copier(threading.Thread):
    """Clones one image again and again until stopped."""

    def __init__(self, pool: StoragePool, sd_id: str, img_id: str,
                 data_mib: int) -> None:
        super().__init__(daemon=True)
        self.pool, self.sd_id, self.img_id = pool, sd_id, img_id
        self.data_mib = data_mib
        self.stop = threading.Event()
        self.copies = 0
        self.seconds = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                dst = new_id()
                start = time.perf_counter()
                self.pool.clone(self.sd_id, self.img_id, dst)
                self.seconds += time.perf_counter() - start
                self.copies += 1
                self.pool.delete_image(self.sd_id, dst)
        except BaseException as e:  # reported by the main thread
            self.error = e


def measure(pool: StoragePool, sd_id: str, work: str,
            repeat: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"create": [], "snapshot": [],
                                       "qemu-img create": []}
    target = pool.create_volume(sd_id, new_id(), GiB)
    for i in range(repeat):
        results["create"].append(timed(pool.create_volume, sd_id,
                                       new_id(), GiB))
        results["snapshot"].append(timed(pool.snapshot, sd_id,
                                         target.meta.image, new_id()))
        path = os.path.join(work, f"bare-{i}.qcow2")
        results["qemu-img create"].append(timed(qemu_img_create, path))
        os.unlink(path)
    return results


def p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--data", type=int, default=256,
                        help="MiB of data in each copied image")
    parser.add_argument("--dir", default=os.path.join(REPO, ".bench",
                                                      "busy-domain"))
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    mount = os.path.join(args.dir, "mnt")
    os.makedirs(mount)
    leases = lease.LocalLeaseManager(
        lock_path=os.path.join(args.dir, "locks"))
    pool = StoragePool.create(mount, lease_manager=leases)
    sd_id = pool.master.sd_id
    for dom in pool.domains.values():
        dom.copy_offload = False    # a real copy, not a reflink

    sources = []
    for _ in range(args.copies):
        vol = pool.create_volume(sd_id, new_id(), args.data * MiB,
                                 fmt=sc.VolumeFormat.RAW)
        fill(vol.path, args.data)
        sources.append(vol.meta.image)

    idle = measure(pool, sd_id, args.dir, args.repeat)
    copiers = [Copier(pool, sd_id, img, args.data) for img in sources]
    for c in copiers:
        c.start()
    time.sleep(0.5)     # let the copies start
    busy = measure(pool, sd_id, args.dir, args.repeat)
    for c in copiers:
        c.stop.set()
    for c in copiers:
        c.join()
        if c.error is not None:
            raise c.error

    print(f"{args.copies} copies of {args.data} MiB running on the same "
          f"domain; {args.repeat} runs each; ms")
    print(f"{'operation':<16} {'idle med':>9} {'idle p90':>9} "
          f"{'busy med':>9} {'busy p90':>9} {'ratio':>6}  target")
    for name in idle:
        i_med, b_med = statistics.median(idle[name]), \
            statistics.median(busy[name])
        ratio = b_med / i_med
        verdict = "" if name.startswith("qemu") else (
            f"<= {TARGET}x {'ok' if ratio <= TARGET else 'MISS'}")
        print(f"{name:<16} {i_med:9.1f} {p90(idle[name]):9.1f} "
              f"{b_med:9.1f} {p90(busy[name]):9.1f} {ratio:5.2f}x  "
              f"{verdict}")
    for c in copiers:
        if c.copies:
            rate = c.copies * c.data_mib / c.seconds
            print(f"copier: {c.copies} clones of {c.data_mib} MiB, "
                  f"{rate:.0f} MiB/s each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
