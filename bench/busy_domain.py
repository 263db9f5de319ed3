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

Prints medians and p90 in ms for both phases, the busy/idle ratio, and
that ratio divided by the ``qemu-img create`` floor's own ratio, against
the target (1.5x): on a small machine two copies at disk speed take the
CPUs and the disk queue, and even bare ``qemu-img`` slows down; what the
engine must not add is waiting for the copies (a lease held during a
copy would show as seconds). Two floors are measured under the same load:
``qemu-img create`` (what CPU contention costs a short command) and a
``synced write`` (one metadata write: a small file written, fsynced and
renamed, its directory fsynced: what the disk queue costs each synced
write the engine must make). Not a test: it exits 0 when the target is
missed::

    python bench/busy_domain.py [--repeat 30] [--copies 2] [--data 256]
        [--hold-domain-lease]

``--hold-domain-lease`` makes each copy hold the domain lease throughout,
as earlier releases did, to show what the lease scopes changed.
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
from ovirt_cinder.storage import fileutil  # noqa: E402
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
                 data_mib: int, hold_domain_lease: bool = False) -> None:
        super().__init__(daemon=True)
        self.pool, self.sd_id, self.img_id = pool, sd_id, img_id
        self.data_mib = data_mib
        self.hold = hold_domain_lease
        self.stop = threading.Event()
        self.copies = 0
        self.seconds = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                dst = new_id()
                start = time.perf_counter()
                self.clone(dst)
                self.seconds += time.perf_counter() - start
                self.copies += 1
                self.pool.delete_image(self.sd_id, dst)
        except BaseException as e:  # reported by the main thread
            self.error = e

    def clone(self, dst: str) -> None:
        if not self.hold:
            self.pool.clone(self.sd_id, self.img_id, dst)
            return
        # The lease scope of earlier releases: the domain lease for the
        # whole copy.
        dom = self.pool.domain(self.sd_id)
        with self.pool.lease_manager.domain_lease(dom):
            self.pool.clone(self.sd_id, self.img_id, dst)


def measure(pool: StoragePool, sd_id: str, work: str,
            repeat: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"create": [], "snapshot": [],
                                       "qemu-img create": [],
                                       "synced write": []}
    target = pool.create_volume(sd_id, new_id(), GiB)
    for i in range(repeat):
        results["create"].append(timed(pool.create_volume, sd_id,
                                       new_id(), GiB))
        results["snapshot"].append(timed(pool.snapshot, sd_id,
                                         target.meta.image, new_id()))
        path = os.path.join(work, f"bare-{i}.qcow2")
        results["qemu-img create"].append(timed(qemu_img_create, path))
        os.unlink(path)
        results["synced write"].append(timed(
            fileutil.atomic_write, path, b"x" * 400))
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
    parser.add_argument("--hold-domain-lease", action="store_true",
                        help="hold the domain lease for each whole copy, "
                        "as earlier releases did, for comparison")
    parser.add_argument("--dir", default=os.path.join(REPO, ".bench",
                                                      "busy-domain"))
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    mount = os.path.join(args.dir, "mnt")
    os.makedirs(mount)
    leases = lease.LocalLeaseManager(
        lock_path=os.path.join(args.dir, "locks"), lease_timeout=600)
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
    copiers = [Copier(pool, sd_id, img, args.data, args.hold_domain_lease)
               for img in sources]
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
          f"{'busy med':>9} {'busy p90':>9} {'ratio':>6} {'/floor':>7}"
          "  target")
    ratios = {name: statistics.median(busy[name])
              / statistics.median(idle[name]) for name in idle}
    floor = ratios["qemu-img create"]
    for name in idle:
        ratio = ratios[name]
        relative = ratio / floor
        verdict = ""
        if name in ("create", "snapshot"):
            verdict = (f"/floor <= {TARGET}x "
                       f"{'ok' if relative <= TARGET else 'MISS'}")
        print(f"{name:<16} {statistics.median(idle[name]):9.1f} "
              f"{p90(idle[name]):9.1f} {statistics.median(busy[name]):9.1f} "
              f"{p90(busy[name]):9.1f} {ratio:5.2f}x {relative:6.2f}x  "
              f"{verdict}")
    for c in copiers:
        if c.copies:
            rate = c.copies * c.data_mib / c.seconds
            print(f"copier: {c.copies} clones of {c.data_mib} MiB, "
                  f"{rate:.0f} MiB/s each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
