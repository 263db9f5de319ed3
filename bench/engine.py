"""Latency of the storage engine's operations, next to bare qemu-img and dd.

Runs, in one pool on one disk (``--dir``, default ``.bench`` in the repo;
git-ignored), for each fill (images already in the domain, ``--fill``)
and each virtual size (``--sizes``), ``--repeat`` times:

- ``create qcow2``, ``create raw``: a new sparse image
  (``pool.create_volume``), against bare ``qemu-img create``;
- ``snapshot``: ``pool.snapshot`` of an image, against
  ``qemu-img create -b`` of an overlay;
- ``merge``: ``pool.delete_snapshot`` of a snapshot holding ``--data``
  MiB whose child holds 1 MiB, against ``qemu-img commit`` of 1 MiB;
- ``clone``: ``pool.clone`` (full copy) of an image holding ``--data``
  MiB, against ``qemu-img convert`` of the same volume file (``dd
  conv=fsync`` of ``--data`` MiB is printed too). A copy costs what the
  data costs, not what the virtual size is;
- ``thin-clone``: ``pool.thin_clone`` of a template, against
  ``qemu-img create -b`` of an overlay.

Each fill has its own domain of the pool, on the same disk, filled by
``pool.create_volume`` of 1 MiB qcow2 images (the fill time is printed).
Creates are measured interleaved across the fills (one create in each
fill's domain per round), so that the ratio between fills compares the
same disk state and load; the other operations run fill after fill.
Prints one table (median and p90 in ms, the median's ratio to its
baseline, the target and whether it is met), then the ratio of create
latency at the largest fill to that at the smallest. Targets: snapshot
and thin clone under 50 ms at any size; create at 2,000 images within
1.2x of create at 100. Not a test: it exits 0 when targets are missed.
Run it by hand (or ``make bench``)::

    python bench/engine.py [--repeat 10] [--fill 100,2000]
        [--sizes 1G,10G] [--data 64] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

from ovirt_cinder.storage import constants as sc  # noqa: E402
from ovirt_cinder.storage.pool import StoragePool  # noqa: E402

MiB = 1024 * 1024
UNITS = {"K": 1024, "M": MiB, "G": 1024 * MiB, "T": 1024 ** 3 * 1024}
TARGET_MS = 50.0
CREATE_RATIO = 1.2
COW, RAW = sc.VolumeFormat.COW, sc.VolumeFormat.RAW
TARGETS = {"snapshot": TARGET_MS, "thin-clone": TARGET_MS}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text[-1:] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text)


def size_label(size: int) -> str:
    if size >= 1024 * MiB:
        return f"{size / (1024 * MiB):g}G"
    return f"{size / MiB:g}M"


def new_id() -> str:
    return str(uuid.uuid4())


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def write_data(path: str, fmt: str, offset: int, length: int) -> None:
    """Write ``length`` bytes of a non-zero pattern with qemu-io."""
    run("qemu-io", "-f", fmt, "-c", f"write -P 0xa5 {offset} {length}",
        path)


def measure(repeat: int, setup, op, teardown=None) -> list[float]:
    """Milliseconds of ``op(setup())``; setup and teardown are untimed."""
    times = []
    for _ in range(repeat):
        arg = setup() if setup else None
        start = time.perf_counter()
        result = op(arg)
        times.append((time.perf_counter() - start) * 1000)
        if teardown:
            teardown(arg, result)
    return times


def p90(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


class Bench:
    """One pool in ``work``, its master domain, and the result rows."""

    def __init__(self, work: str, repeat: int, data: int,
                 fills: list[int]) -> None:
        self.work, self.repeat, self.data = work, repeat, data
        self.rows: list[tuple] = []
        self.medians: dict[tuple, float] = {}
        # One domain per fill, all on the disk under test, so that creates
        # at every fill can be measured interleaved (the same disk state
        # and machine load for each), not one fill long after the other.
        self.domains: dict[int, str] = {}
        for fill in fills:
            mount = os.path.join(work, f"mnt-{fill}")
            os.makedirs(mount)
            if not self.domains:
                self.pool = StoragePool.create(mount)
                sd_id = self.pool.master.sd_id
            else:
                sd_id = self.pool.add_domain(mount).sd_id
            self.domains[fill] = sd_id
        self.sd_id = self.domains[fills[0]]

    # Helpers

    def image(self, size: int, fmt=COW, **kwargs) -> str:
        img = new_id()
        self.pool.create_volume(self.sd_id, img, size, fmt=fmt, **kwargs)
        return img

    def drop(self, img: str, *_: object) -> None:
        self.pool.delete_image(self.sd_id, img)

    def record(self, op: str, size: int, fill: object, times: list[float],
               baseline: str | None = None) -> None:
        median = statistics.median(times)
        self.medians[(op, size, fill)] = median
        base = self.medians.get((baseline, size, "-")) if baseline else None
        self.rows.append((op, size, fill, median, p90(times),
                          median / base if base else None, baseline,
                          TARGETS.get(op)))

    def fill(self, count: int) -> None:
        """Create ``count`` 1 MiB images in the domain of that fill."""
        self.sd_id = self.domains[count]
        todo = count
        start = time.perf_counter()
        for _ in range(todo):
            self.image(MiB)
        secs = time.perf_counter() - start
        if todo > 0:
            print(f"filled the domain to {count} images: {todo} creates "
                  f"in {secs:.1f} s ({secs / todo * 1000:.1f} ms each)",
                  flush=True)

    # Baselines: bare tools on the same disk

    def baselines(self, size: int) -> None:
        tmp = os.path.join(self.work, "tmp")
        os.makedirs(tmp, exist_ok=True)
        dst = os.path.join(tmp, "dst")
        base = os.path.join(tmp, "base.qcow2")
        run("qemu-img", "create", "-f", "qcow2", base, str(size))
        write_data(base, "qcow2", 0, self.data)
        raw = os.path.join(tmp, "data.raw")
        with open(raw, "wb") as f:
            f.write(os.urandom(self.data))

        def rm(*_: object) -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst)

        def create(fmt: str):
            return lambda _: run("qemu-img", "create", "-f", fmt, dst,
                                 str(size))

        def overlay(_=None) -> None:
            run("qemu-img", "create", "-f", "qcow2", "-b", base, "-F",
                "qcow2", dst)

        def commit_setup() -> None:
            overlay()
            write_data(dst, "qcow2", self.data, MiB)

        for name, setup, op in [
            ("qemu-img create qcow2", None, create("qcow2")),
            ("qemu-img create raw", None, create("raw")),
            ("qemu-img create -b", None, overlay),
            ("qemu-img commit", commit_setup,
             lambda _: run("qemu-img", "commit", "-d", dst)),
            ("qemu-img convert", None,
             lambda _: run("qemu-img", "convert", "-f", "qcow2", "-O",
                           "qcow2", base, dst)),
            ("dd conv=fsync", None,
             lambda _: run("dd", f"if={raw}", f"of={dst}", "bs=1M",
                           "conv=fsync", "status=none")),
        ]:
            self.record(name, size, "-",
                        measure(self.repeat, setup, op, rm))
        shutil.rmtree(tmp)

    # Engine operations

    def creates(self, size: int) -> None:
        """Create at every fill, interleaved: each round creates (and
        drops, untimed) one volume in each fill's domain in turn."""
        pool = self.pool
        for name, fmt, base in [("create qcow2", COW, "qemu-img create qcow2"),
                                ("create raw", RAW, "qemu-img create raw")]:
            times: dict[int, list[float]] = {f: [] for f in self.domains}
            for _ in range(self.repeat):
                for fill, sd_id in self.domains.items():
                    img = new_id()
                    start = time.perf_counter()
                    pool.create_volume(sd_id, img, size, fmt=fmt)
                    times[fill].append((time.perf_counter() - start) * 1000)
                    pool.delete_image(sd_id, img)
            for fill, measured in times.items():
                self.record(name, size, fill, measured, base)

    def operations(self, size: int, fill: int) -> None:
        self.sd_id = self.domains[fill]
        pool, sd_id, repeat = self.pool, self.sd_id, self.repeat

        def snapshot(img: str) -> str:
            pool.snapshot(sd_id, img, new_id())
            return img

        times = measure(repeat, lambda: self.image(size), snapshot,
                        lambda img, _: self.drop(img))
        self.record("snapshot", size, fill, times, "qemu-img create -b")

        def merge_setup() -> tuple[str, str]:
            img, snap = self.image(size), new_id()
            write_data(pool.leaf(sd_id, img).path, "qcow2", 0, self.data)
            pool.snapshot(sd_id, img, snap)
            write_data(pool.leaf(sd_id, img).path, "qcow2", self.data, MiB)
            return img, snap

        times = measure(repeat, merge_setup,
                        lambda arg: pool.delete_snapshot(sd_id, *arg),
                        lambda arg, _: self.drop(arg[0]))
        self.record("merge", size, fill, times, "qemu-img commit")

        src = self.image(size)
        write_data(pool.leaf(sd_id, src).path, "qcow2", 0, self.data)
        times = measure(repeat, new_id,
                        lambda img: pool.clone(sd_id, src, img), self.drop)
        self.drop(src)
        self.record("clone", size, fill, times, "qemu-img convert")

        tmpl = self.image(size, voltype=sc.VolumeType.SHARED)
        times = measure(repeat, new_id,
                        lambda img: pool.thin_clone(sd_id, tmpl, img),
                        self.drop)
        self.drop(tmpl)
        self.record("thin-clone", size, fill, times, "qemu-img create -b")


def print_report(bench: Bench, fills: list[int], sizes: list[int]) -> None:
    head = ("operation", "size", "volumes", "median ms", "p90 ms",
            "x baseline", "baseline", "target", "")
    fmt = "{:<22} {:>6} {:>7} {:>10} {:>8} {:>10}  {:<22} {:>7} {}"
    print()
    print(fmt.format(*head))
    for op, size, fill, median, p, ratio, base, target in bench.rows:
        verdict = "" if target is None else (
            "ok" if median < target else "MISS")
        print(fmt.format(
            op, size_label(size), fill, f"{median:.1f}", f"{p:.1f}",
            "" if ratio is None else f"{ratio:.2f}", base or "",
            "" if target is None else f"<{target:.0f}ms", verdict))
    print(f"\nclone, merge and the dd/convert baselines move "
          f"{bench.data // MiB} MiB of data; their cost follows the data,"
          " not the virtual size.")
    if len(fills) < 2:
        return
    lo, hi = fills[0], fills[-1]
    for size in sizes:
        for op in ("create qcow2", "create raw"):
            ratio = (bench.medians[(op, size, hi)]
                     / bench.medians[(op, size, lo)])
            verdict = "ok" if ratio <= CREATE_RATIO else "MISS"
            print(f"{op} at {size_label(size)}: {hi} vs {lo} volumes "
                  f"{ratio:.2f}x (target <= {CREATE_RATIO}x) {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=os.path.join(REPO, ".bench"),
                        help="where to make the work directory")
    parser.add_argument("--repeat", type=int, default=10,
                        help="runs of each operation (median and p90)")
    parser.add_argument("--fill", default="100,2000",
                        help="images in the domain before measuring")
    parser.add_argument("--sizes", default="1G,10G",
                        help="virtual sizes of the volumes")
    parser.add_argument("--data", type=int, default=64,
                        help="MiB of data in cloned and merged volumes")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory")
    args = parser.parse_args()
    fills = sorted(int(n) for n in args.fill.split(","))
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if min(sizes) < (args.data + 1) * MiB:
        parser.error("every size must hold --data MiB and 1 MiB more")
    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="engine-", dir=args.dir)
    print(f"work directory {work}; repeat {args.repeat}", flush=True)
    try:
        bench = Bench(work, args.repeat, args.data * MiB, fills)
        for size in sizes:
            bench.baselines(size)
        for fill in fills:
            bench.fill(fill)
        for size in sizes:
            bench.creates(size)
            for fill in fills:
                bench.operations(size, fill)
        print_report(bench, fills, sizes)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
