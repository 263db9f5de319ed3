"""Volumes from a plain Glance image: the driver's image cache against a
copy per volume and against ``qemu-img convert``.

Makes a qcow2 image of ``--size`` GiB virtual holding ``--data`` MiB of
random data, puts it in an in-memory Glance stand-in (the image service
the driver downloads from; the download is a file write, as Cinder's
``image_utils.fetch`` to ``image_conversion_dir`` is), and times on a real
pool in ``--dir`` (default ``.bench/`` in the repo, git-ignored):

- ``uncached``: ``copy_image_to_volume`` into a new volume (the path of
  every volume without the cache: download, inspection, conversion);
- ``first``: ``clone_image`` of the image when it is not cached
  (download, inspection, conversion into the cache entry, overlay);
- ``later``: ``clone_image`` of the cached image (an overlay);
- ``convert``: ``qemu-img convert`` of the image file into the domain's
  filesystem (the floor of any full copy).

Prints the median of ``--repeat`` runs in ms and the ratios; the target
of a later volume is 50 ms. Not a test: it exits 0 when a target is
missed::

    python bench/image_cache.py [--size 10] [--data 2048] [--repeat 5]
"""

from __future__ import annotations

import argparse
import hashlib
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

from cinder import context as cinder_context  # noqa: E402
from cinder import objects  # noqa: E402

objects.register_all()

from cinder.tests.unit import fake_volume  # noqa: E402
from cinder.volume import configuration  # noqa: E402
from oslo_config import cfg  # noqa: E402

from ovirt_cinder.cinder import driver as ovirt_driver  # noqa: E402
from ovirt_cinder.storage.pool import StoragePool  # noqa: E402

MiB, GiB = 1024 ** 2, 1024 ** 3
TARGET_LATER_MS = 50.0


class Glance:
    """The image service the driver downloads from (a file's bytes)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.temp_images = None
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha512").hexdigest()
        self.meta = {"id": str(uuid.uuid4()), "disk_format": "qcow2",
                     "container_format": "bare", "status": "active",
                     "os_hash_algo": "sha512", "os_hash_value": digest,
                     "size": os.path.getsize(path), "properties": {}}

    def show(self, context, image_id):
        return dict(self.meta)

    def download(self, context, image_id, data):
        with open(self.path, "rb") as f:
            shutil.copyfileobj(f, data, 4 * MiB)


def make_image(path: str, size_gb: int, data_mb: int) -> None:
    chunk = os.urandom(MiB)
    raw = path + ".raw"
    with open(raw, "wb") as f:
        for _ in range(data_mb):
            f.write(chunk)
    for argv in (["convert", "-f", "raw", "-O", "qcow2", raw, path],
                 ["resize", "-f", "qcow2", path, f"{size_gb}G"]):
        subprocess.run(["qemu-img", *argv], check=True,
                       capture_output=True)
    os.unlink(raw)


def driver(work: str, mount: str, pool: StoragePool):
    conf = cfg.CONF
    conf.register_group(cfg.OptGroup("bench"))
    for name, value in {"ovirt_domain_paths": [mount],
                        "ovirt_pool_uuid": pool.pool_id,
                        "ovirt_recovery_interval": 0,
                        "ovirt_max_image_virtual_size_gb": 1024}.items():
        conf.set_override(name, value, group="backend_defaults")
    conf.set_override("image_conversion_dir", os.path.join(work, "conv"))
    conf.set_override("lock_path", os.path.join(work, "locks"),
                      group="oslo_concurrency")
    drv = ovirt_driver.OvirtVolumeDriver(
        configuration=configuration.Configuration([], config_group="bench"),
        host="bench@bench")
    drv.do_setup(None)
    return drv


def timed(fn, *args) -> float:
    start = time.monotonic()
    fn(*args)
    return (time.monotonic() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10, help="GiB")
    parser.add_argument("--data", type=int, default=2048, help="MiB")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=os.path.join(REPO, ".bench"))
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="image-cache-", dir=args.dir)
    try:
        run(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: str, args: argparse.Namespace) -> None:
    mount = os.path.join(work, "mnt")
    os.makedirs(mount)
    pool = StoragePool.create(mount)
    sd_id = pool.master.sd_id
    src = os.path.join(work, "image.qcow2")
    make_image(src, args.size, args.data)
    drv = driver(work, mount, pool)
    ctx = cinder_context.get_admin_context()

    def new_volume():
        vid = str(uuid.uuid4())
        return fake_volume.fake_volume_obj(
            ctx, id=vid, name=f"volume-{vid}", size=args.size,
            host=f"bench@bench#{sd_id}")

    times: dict[str, list[float]] = {k: [] for k in
                                     ("convert", "uncached", "first",
                                      "later")}
    for _ in range(args.repeat):
        glance = Glance(src)   # a new image id: not cached
        dst = os.path.join(pool.domain(sd_id).path, "convert.raw")
        times["convert"].append(timed(
            subprocess.run, ["qemu-img", "convert", "-f", "qcow2", "-O",
                             "qcow2", src, dst]))
        os.unlink(dst)
        volume = new_volume()
        drv.create_volume(volume)
        times["uncached"].append(timed(drv.copy_image_to_volume, ctx,
                                       volume, glance, glance.meta["id"]))
        drv.delete_volume(volume)
        for name in ("first", "later"):
            times[name].append(timed(drv.clone_image, ctx, new_volume(),
                                     None, glance.meta, glance))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.size} GiB qcow2 image, {args.data} MiB data; median of "
          f"{args.repeat} (ms)")
    print(f"{'qemu-img convert':22s} {med['convert']:10.1f}")
    for name in ("uncached", "first"):
        print(f"{name:22s} {med[name]:10.1f}  "
              f"{med[name] / med['convert']:.2f}x convert")
    ok = "ok" if med["later"] <= TARGET_LATER_MS else "MISSED"
    print(f"{'later':22s} {med['later']:10.1f}  "
          f"{med['later'] / med['uncached']:.4f}x uncached; target "
          f"{TARGET_LATER_MS:.0f} ms {ok}")


if __name__ == "__main__":
    main()
