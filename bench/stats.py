"""Stats refresh time of the Cinder driver: the domain's counters against
the scan of every image's metadata they replace.

For each number of images (``--images``, default 1,000 and 10,000; try
``--images 1000,10000,50000``) the domain in one pool (``--dir``, default
``.bench`` in the repo; git-ignored) is filled up to that many images,
then it times, median of ``--repeat`` runs:

- ``scan``: :func:`counters.scan`, what the driver's ``_provisioned``
  did before the counters: read every ``.meta`` of every image, pick the
  template's or the leaf's capacity (a warm page cache: the best case);
- ``counters``: ``pool.domain_counters``, what it does now: one read of
  ``dom_md/ovirt-cinder-counters`` (target: under 50 ms at 50,000
  images, whatever the number);
- ``count a change``: what keeping the counters adds to each metadata
  change of an image (the image counted before and after, the record
  read and written, without fsync), for an image of ``--chain`` volumes;
- ``rebuild``: :func:`counters.rebuild` under the domain lease, what
  recovery and ``fsck --repair`` pay once (a scan and a write).

Images are written straight as directories of V5 volume records
(``--chain`` volumes each: a chain of snapshots under a leaf), without
data: the scan reads metadata only, and this fills 50,000 images in
seconds instead of the half hour that ``pool.create_volume`` takes. A few
real operations at the end check that the counters still match a scan.
Not a test: it prints ratios and exits 0 when a target is missed::

    python bench/stats.py [--images 1000,10000] [--chain 2]
        [--repeat 5] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

from ovirt_cinder.storage import constants as sc  # noqa: E402
from ovirt_cinder.storage import counters  # noqa: E402
from ovirt_cinder.storage import volmeta  # noqa: E402
from ovirt_cinder.storage.pool import StoragePool  # noqa: E402

MiB = sc.MiB
GiB = sc.GiB
TARGET_MS = 50.0
TARGET_IMAGES = 50_000


def new_id() -> str:
    return str(uuid.uuid4())


def timed(repeat: int, fn) -> float:
    """Median milliseconds of ``fn()``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def write_image(dom, chain: int) -> None:
    """One image of ``chain`` volume records (snapshots under a leaf),
    no data: what a scan reads."""
    img = new_id()
    directory = dom.image_dir(img)
    os.mkdir(directory)
    parent = sc.BLANK_UUID
    for i in range(chain):
        vol = new_id()
        leaf = i == chain - 1
        meta = volmeta.VolumeMetadata(
            domain=dom.sd_id, image=img, parent=parent, capacity=GiB,
            format=sc.VolumeFormat.COW if i else sc.VolumeFormat.RAW,
            type=sc.Preallocation.SPARSE,
            voltype=sc.VolumeType.LEAF if leaf else sc.VolumeType.INTERNAL,
            legality=sc.Legality.LEGAL, ctime=int(time.time()), sequence=i)
        with open(os.path.join(directory, vol + sc.META_EXT), "wb") as f:
            f.write(meta.to_bytes())
        parent = vol


class Bench:
    def __init__(self, work: str, chain: int, repeat: int) -> None:
        mount = os.path.join(work, "mnt")
        os.makedirs(mount)
        self.pool = StoragePool.create(mount)
        self.dom = self.pool.master
        self.sd_id = self.dom.sd_id
        self.chain, self.repeat = chain, repeat
        self.images = 0
        self.rows: list[tuple] = []

    def fill(self, count: int) -> None:
        start = time.perf_counter()
        for _ in range(count - self.images):
            write_image(self.dom, self.chain)
        secs = time.perf_counter() - start
        with self.pool.lease_manager.domain_lease(self.dom):
            counters.rebuild(self.dom)
        print(f"filled the domain to {count} images ({self.chain} volumes "
              f"each) in {secs:.1f} s", flush=True)
        self.images = count

    def measure(self) -> None:
        dom, pool = self.dom, self.pool
        # Warm the page cache first, as a stats refresh every minute does.
        expected = counters.scan(dom)
        assert pool.domain_counters(self.sd_id) == expected
        repeat = self.repeat if self.images <= 10_000 else \
            max(1, self.repeat // 2)
        scan = timed(repeat, lambda: counters.scan(dom))
        fast = timed(max(100, repeat), lambda: pool.domain_counters(
            self.sd_id))
        img = dom.list_images()[0]
        leases = pool.lease_manager

        def unchanged() -> None:
            # The image counted before and after a change (none here).
            with counters.accounting(dom, img):
                pass

        def write() -> None:
            # The record read and written, one count up and back.
            counters.update(dom, counters.Counters(volumes=1))
            counters.update(dom, counters.Counters(volumes=-1))

        with leases.domain_lease(dom):
            count = timed(50, unchanged) + timed(50, write) / 2
            rebuild = timed(max(1, repeat // 2),
                            lambda: counters.rebuild(dom))
        self.rows.append((self.images, expected.volumes, scan, fast,
                          count, rebuild))

    def operations(self) -> bool:
        """A few real operations; True if the counters match a scan."""
        pool, sd_id = self.pool, self.sd_id
        img = new_id()
        pool.create_volume(sd_id, img, GiB)
        pool.snapshot(sd_id, img, new_id())
        pool.extend(sd_id, img, 2 * GiB)
        clone = new_id()
        pool.clone(sd_id, img, clone)
        pool.delete_image(sd_id, img)
        pool.delete_image(sd_id, clone)
        return counters.read(self.dom).counters == counters.scan(self.dom)


def report(bench: Bench, matches: bool) -> None:
    head = ("images", "volumes", "scan ms", "counters ms", "scan/counters",
            "count a change ms", "rebuild ms", "target", "")
    fmt = "{:>7} {:>8} {:>9} {:>12} {:>14} {:>18} {:>11} {:>8} {}"
    print()
    print(fmt.format(*head))
    for images, volumes, scan, fast, count, rebuild in bench.rows:
        verdict = "ok" if fast < TARGET_MS else "MISS"
        print(fmt.format(images, volumes, f"{scan:.1f}", f"{fast:.3f}",
                         f"{scan / fast:.0f}x", f"{count:.2f}",
                         f"{rebuild:.1f}", f"<{TARGET_MS:.0f}ms", verdict))
    first, last = bench.rows[0], bench.rows[-1]
    if len(bench.rows) > 1:
        print(f"\n{last[0]} vs {first[0]} images: scan "
              f"{last[2] / first[2]:.1f}x, counters "
              f"{last[3] / first[3]:.2f}x")
    print(f"target: counters under {TARGET_MS:.0f} ms at {TARGET_IMAGES} "
          "images, independent of the number of images")
    print("counters match a scan after real operations:",
          "yes" if matches else "NO")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="1000,10000",
                        help="images in the domain when measuring")
    parser.add_argument("--chain", type=int, default=2,
                        help="volumes of each image")
    parser.add_argument("--repeat", type=int, default=5,
                        help="runs of each scan (median)")
    parser.add_argument("--dir", default=os.path.join(REPO, ".bench"),
                        help="where to make the work directory")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory")
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.images.split(","))
    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="stats-", dir=args.dir)
    print(f"work directory {work}", flush=True)
    try:
        bench = Bench(work, args.chain, args.repeat)
        for count in sizes:
            bench.fill(count)
            bench.measure()
        report(bench, bench.operations())
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
