"""Does the engine stay flat as a domain fills? A scale run to 50,000 images.

In one pool on one disk (``--dir``, default ``.bench/`` in the repo;
git-ignored), the domain is filled block by block (``--block`` images of
1 MiB qcow2, up to ``--images``). After each block it measures, with the
domain holding that many images:

- ``create``: p50 of the block's own creates (``pool.create_volume``);
- ``snapshot``: p50 of ``--repeat`` snapshots of images of the domain;
- ``delete``: p50 of ``--repeat`` deletes (``pool.delete_image``) of
  images made for it (the fill is unchanged);
- ``stats``: the Cinder driver's stats refresh of the domain (provisioned
  capacity as the driver computes it, and the domain's free space);
- ``start``: opening the pool and one recovery pass (what a service
  does when it starts);
- ``list/1k``: ``ovirt-storage image list SD --json`` in a new process,
  per 1,000 images of the domain (a listing prints every image: its cost
  per image is what must stay flat).

Prints one row per block (ms) and, for each column, the ratio of the last
block to the first against the target (1.1x: flat). Not a test: it exits
0 when a target is missed. The whole run (50,000 creates) takes about as
long as 50,000 creates take on the disk; ``--images`` and ``--block``
make it shorter::

    python bench/scale.py [--images 50000] [--block 5000] [--repeat 20]
"""

from __future__ import annotations

import argparse
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
warnings.filterwarnings("ignore")

from ovirt_cinder.cinder import driver as cinder_driver  # noqa: E402
from ovirt_cinder.storage.pool import StoragePool  # noqa: E402

MiB = 1024 ** 2
FLAT = 1.1
COLUMNS = ("create", "snapshot", "delete", "stats", "start",
           "list/1k")


def new_id() -> str:
    return str(uuid.uuid4())


def ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return ms(start)


class Scale:
    def __init__(self, work: str, repeat: int) -> None:
        self.mount = os.path.join(work, "mnt")
        os.makedirs(self.mount)
        self.pool = StoragePool.create(self.mount)
        self.sd_id = self.pool.master.sd_id
        self.repeat = repeat
        self.images: list[str] = []

    def create(self) -> float:
        img = new_id()
        took = timed(self.pool.create_volume, self.sd_id, img, MiB)
        self.images.append(img)
        return took

    def fill(self, count: int) -> float:
        """Create ``count`` images; the p50 of their creates."""
        return statistics.median(self.create() for _ in range(count))

    def snapshot(self) -> float:
        step = max(1, len(self.images) // self.repeat)
        targets = self.images[::step][:self.repeat]
        return statistics.median(
            timed(self.pool.snapshot, self.sd_id, img, new_id())
            for img in targets)

    def delete(self) -> float:
        made = []
        for _ in range(self.repeat):
            img = new_id()
            self.pool.create_volume(self.sd_id, img, MiB)
            made.append(img)
        return statistics.median(
            timed(self.pool.delete_image, self.sd_id, img) for img in made)

    def stats(self) -> float:
        def refresh() -> None:
            cinder_driver._provisioned(self.pool, self.sd_id)
            self.pool.domain(self.sd_id).stats()
        return statistics.median(timed(refresh) for _ in range(3))

    def start(self) -> float:
        def open_and_recover() -> None:
            pool = StoragePool.open([self.mount])
            pool.recover()
        return statistics.median(timed(open_and_recover) for _ in range(3))

    def image_list(self) -> float:
        cli = [sys.executable, "-m", "ovirt_cinder.cmd.storage", "-p",
               self.mount, "--json", "image", "list", self.sd_id]
        env = dict(os.environ, PYTHONPATH=REPO)

        def run() -> None:
            subprocess.run(cli, check=True, stdout=subprocess.DEVNULL,
                           env=env, cwd=REPO)
        return statistics.median(timed(run) for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--block", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--dir", default=os.path.join(REPO, ".bench"))
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="scale-", dir=args.dir)
    try:
        run(Scale(work, args.repeat), args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(scale: Scale, args: argparse.Namespace) -> None:
    fmt = "{:>8} " + " ".join("{:>10}" for _ in COLUMNS)
    print(fmt.format("images", *COLUMNS), flush=True)
    rows = []
    while len(scale.images) < args.images:
        block = min(args.block, args.images - len(scale.images))
        row = {"create": scale.fill(block), "snapshot": scale.snapshot(),
               "delete": scale.delete(), "stats": scale.stats(),
               "start": scale.start(),
               "list/1k": scale.image_list() * 1000 / len(scale.images)}
        rows.append(row)
        print(fmt.format(len(scale.images),
                         *(f"{row[c]:.1f}" for c in COLUMNS)), flush=True)
    if len(rows) < 2:
        return
    print(f"\nlast block / first block (target <= {FLAT}x):")
    for column in COLUMNS:
        ratio = rows[-1][column] / rows[0][column]
        verdict = "ok" if ratio <= FLAT else "MISS"
        print(f"  {column:12s} {ratio:6.2f}x {verdict}")


if __name__ == "__main__":
    main()
