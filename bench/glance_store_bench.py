"""Add and get throughput of the ovirt Glance store.

Runs, on one disk (``--dir``, default a new directory under the current
one), for a random image and a half-zero image:

- ``dd``: ``dd bs=4M conv=fsync`` copy of the image file (the disk's
  write speed with a plain copy) and ``dd`` of it to /dev/null;
- ``file``: glance_store's filesystem store, add and get;
- ``ovirt``: our store (sparse receive, inspection, publish), add and get.

Prints a table of seconds, MiB/s, allocated MiB and the ratio of each
time to dd's and to the filesystem store's. Not a test: run it by hand::

    python bench/glance_store_bench.py [--dir DIR] [--scale 0.25] \
        [--hashing-algo sha512]

``--scale`` shrinks the images (1 GiB random and 4 GiB half zero at 1);
``--hashing-algo`` is the multihash both stores compute (Glance's default
``sha512``; both also compute md5).
Reads may be served from the page cache: drop caches between runs
(``echo 3 > /proc/sys/vm/drop_caches``) for cold numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from ovirt_cinder.storage.pool import StoragePool  # noqa: E402
from tests.unit.glance import fixtures  # noqa: E402

MiB = 1024 * 1024
CHUNK = 4 * MiB


def make_random(path: str, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // CHUNK):
            f.write(os.urandom(CHUNK))


def make_half_zero(path: str, size: int) -> None:
    """Alternating 4 MiB of random data and 4 MiB of written zeros."""
    zeros = bytes(CHUNK)
    with open(path, "wb") as f:
        for i in range(size // CHUNK):
            f.write(os.urandom(CHUNK) if i % 2 == 0 else zeros)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def timed(func):
    start = time.monotonic()
    result = func()
    return time.monotonic() - start, result


def bench_dd(src: str, work: str) -> list[tuple[str, float, int]]:
    dst = os.path.join(work, "dd-copy")
    add, _ = timed(lambda: subprocess.run(
        ["dd", f"if={src}", f"of={dst}", "bs=4M", "conv=fsync",
         "status=none"], check=True))
    get, _ = timed(lambda: subprocess.run(
        ["dd", f"if={dst}", "of=/dev/null", "bs=4M", "status=none"],
        check=True))
    size = allocated(dst)
    os.unlink(dst)
    return [("add", add, size), ("get", get, size)]


def bench_store(store, conf, src: str, path_of, algo: str) -> list:
    with open(src, "rb") as f:
        add, result = timed(lambda: store.add(
            str(uuid.uuid4()), f, os.path.getsize(src), algo))
    uri = result[0]
    loc = fixtures.location_of(uri, conf, backend=path_of[0])
    size = allocated(path_of[1](uri))

    def read_all():
        image, _ = store.get(loc)
        for _chunk in image:
            pass

    get, _ = timed(read_all)
    store.delete(loc)
    return [("add", add, size), ("get", get, size)]


def ovirt_path(pool):
    def path(uri):
        _, sd_id, img_id, _ = uri[len("ovirt://"):].split("/")
        return pool.image(sd_id, img_id).template().path
    return path


def run(work: str, scale: float, algo: str) -> None:
    mount = os.path.join(work, "mnt")
    files = os.path.join(work, "files")
    os.makedirs(mount)
    os.makedirs(files)
    pool = StoragePool.create(mount)
    images = [("random", int(1024 * scale) * MiB, make_random),
              ("half-zero", int(4096 * scale) * MiB, make_half_zero)]
    rows = []
    with fixtures.entry_point(os.path.join(work, "ep")):
        conf = fixtures.multi_store_conf([mount], files)
        ovirt = fixtures.store_of()
        file_store = fixtures.store_of("file1", "file")
        for name, size, make in images:
            src = os.path.join(work, name)
            make(src, size)
            results = {
                "dd": bench_dd(src, work),
                "file": bench_store(file_store, conf, src, (
                    "file1", lambda uri: uri[len("file://"):]), algo),
                "ovirt": bench_store(ovirt, conf, src, (
                    "fast", ovirt_path(pool)), algo),
            }
            os.unlink(src)
            for tool, ops in results.items():
                for (op, secs, alloc), (_, dd_secs, _), (_, f_secs, _) in \
                        zip(ops, results["dd"], results["file"]):
                    rows.append((name, size, tool, op, secs, alloc,
                                 secs / dd_secs if dd_secs else 0.0,
                                 secs / f_secs if f_secs else 0.0))
    print_table(rows)


def print_table(rows) -> None:
    head = ("image", "size MiB", "store", "op", "seconds", "MiB/s",
            "alloc MiB", "x dd", "x file")
    print("{:<10} {:>9} {:<6} {:<4} {:>8} {:>8} {:>10} {:>6} {:>6}".format(
        *head))
    for name, size, tool, op, secs, alloc, ratio, file_ratio in rows:
        print(f"{name:<10} {size // MiB:>9} {tool:<6} {op:<4} "
              f"{secs:>8.2f} {size / MiB / secs if secs else 0:>8.0f} "
              f"{alloc // MiB:>10} {ratio:>6.2f} {file_ratio:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=".",
                        help="where to make the work directory")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="image size factor (1 = 1 GiB and 4 GiB)")
    parser.add_argument("--hashing-algo", default="sha512",
                        help="multihash algorithm (Glance's default)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix=".glance-bench-", dir=args.dir)
    try:
        run(work, args.scale, args.hashing_algo)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
