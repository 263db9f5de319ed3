"""A volume from a snapshot: the engine, bare qemu-img and Cinder's NFS driver.

In one pool on one disk (``--dir``, default ``.bench`` in the repo;
git-ignored), for each format (``--formats``, default ``raw,qcow2``) an
image of ``--size`` holding ``--data`` MiB (a non-zero pattern written
with qemu-io) is snapshotted; then, ``--repeat`` times, in a rotating
order so that the disk's mood spreads over all of them:

- ``ours``: ``pool.clone(snap_id=...)`` into a new sparse image of the
  same format (what ``OvirtVolumeDriver.create_volume_from_snapshot``
  runs): flow, logbook, leases, metadata, the copy;
- ``qemu-img convert``: bare ``qemu-img convert -f F -O F`` of the
  snapshot's volume to a new file on the same disk, in qemu-img's
  default cache mode for convert, ``unsafe``: the data is left in the
  page cache, never flushed (not durable when qemu-img exits);
- ``... -t none -W``: the same with O_DIRECT writes, out of order, and
  the fdatasync at close: the durable copy ``ours`` runs, bare;
- ``dd conv=fsync``: the first ``--data`` MiB of the snapshot's file
  written and fsynced, what the disk allows a durable copy;
- ``peer``: Cinder's NFS driver (``_create_volume_from_snapshot``, run
  in-process on a "share" directory on the same disk; mounting and share
  selection stubbed out) from a snapshot laid out as it lays one out: the
  same volume file, hard-linked as ``volume-<id>``, under a qcow2 overlay
  ``volume-<id>.<snap>`` named in ``volume-<id>.info``. Its target is raw
  unless ``nfs_qcow2_volumes`` (set for the qcow2 row).

Every new volume is removed, and the disk synced, between runs, untimed.
Prints the runs, their medians and the ratios: targets ``ours <= peer``
and ``ours <= 1.1x qemu-img convert`` (the second ratio, to the durable
bare copy, is the engine's own overhead); for ``ours`` also the median time
spent in ``qemu-img convert`` and in everything else. Not a test: it
exits 0 when targets are missed. Run it by hand::

    python bench/volume_from_snapshot.py [--data 2048] [--repeat 5]
        [--size 4G] [--formats raw,qcow2] [--no-peer] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
import uuid
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

from ovirt_cinder.storage import constants as sc  # noqa: E402
from ovirt_cinder.storage import qemuimg  # noqa: E402
from ovirt_cinder.storage.pool import StoragePool  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
CHUNK = 256 * MiB
FORMATS = {"raw": sc.VolumeFormat.RAW, "qcow2": sc.VolumeFormat.COW}
PEER_RATIO = 1.0
BARE_RATIO = 1.1
SHARE = "127.0.0.1:/bench"
BARE = "qemu-img convert"
BARE_DURABLE = "... -t none -W"
DD = "dd conv=fsync"


def new_id() -> str:
    return str(uuid.uuid4())


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def write_data(path: str, fmt: str, length: int) -> None:
    """Write ``length`` bytes of a non-zero pattern with qemu-io."""
    commands = []
    for offset in range(0, length, CHUNK):
        size = min(CHUNK, length - offset)
        commands += ["-c", f"write -P 0xa5 {offset} {size}"]
    run("qemu-io", "-f", fmt, *commands, path)


def settle() -> None:
    """Write back and discard what the last run left behind."""
    os.sync()
    time.sleep(0.5)


class ConvertTimer:
    """Seconds spent in each qemu-img subcommand, by wrapping the one
    function that runs qemu-img."""

    def __init__(self) -> None:
        self.spent: collections.Counter[str] = collections.Counter()
        self._execute = qemuimg._execute

    def __enter__(self) -> ConvertTimer:
        def timed(args, **kwargs):
            start = time.perf_counter()
            try:
                return self._execute(args, **kwargs)
            finally:
                self.spent[args[0]] += time.perf_counter() - start
        qemuimg._execute = timed
        return self

    def __exit__(self, *_: object) -> None:
        qemuimg._execute = self._execute


class PeerVolume(types.SimpleNamespace):
    """What Cinder's NFS driver reads and calls on a volume object."""

    @contextlib.contextmanager
    def obj_as_admin(self):
        yield

    def save(self) -> None:
        pass


class Peer:
    """Cinder's NFS driver on a directory: one share, no mount."""

    def __init__(self, work: str, qcow2: bool) -> None:
        from cinder import privsep
        from cinder.volume import configuration
        from cinder.volume.drivers import nfs
        from oslo_config import cfg

        privsep.sys_admin_pctxt.set_client_mode(False)
        logging.getLogger("cinder").setLevel(logging.ERROR)
        group = f"bench_nfs_{uuid.uuid4().hex[:8]}"
        conf = configuration.Configuration(nfs.nfs_opts, config_group=group)
        cfg.CONF.set_override("nfs_mount_point_base", work, group=group)
        cfg.CONF.set_override("nfs_qcow2_volumes", qcow2, group=group)
        self.driver = nfs.NfsDriver(configuration=conf)
        self.driver._execute_as_root = False
        self.driver._ensure_shares_mounted = lambda: None
        self.driver._find_share = lambda volume: SHARE
        self.mount = self.driver._get_mount_point_for_share(SHARE)
        os.makedirs(self.mount)

    def volume(self, size: int) -> PeerVolume:
        vol_id = new_id()
        return PeerVolume(id=vol_id, name=f"volume-{vol_id}",
                          size=size // GiB, provider_location=SHARE,
                          encryption_key_id=None, admin_metadata={},
                          obj_context=None)

    def snapshot_of(self, path: str, fmt: str, size: int):
        """A snapshot over ``path`` (hard-linked), as the driver makes
        one: the frozen file under a qcow2 overlay named in the info."""
        src = self.volume(size)
        base = os.path.join(self.mount, src.name)
        os.link(path, base)
        snap = types.SimpleNamespace(id=new_id(), volume=src,
                                     status="available",
                                     volume_size=src.size)
        top = f"{src.name}.{snap.id}"
        run("qemu-img", "create", "-f", "qcow2", "-b", src.name, "-F", fmt,
            os.path.join(self.mount, top))
        with open(base + ".info", "w") as f:
            json.dump({"active": top, snap.id: top}, f)
        return snap

    def create_from(self, snap, size: int) -> str:
        vol = self.volume(size)
        self.driver._create_volume_from_snapshot(vol, snap)
        return os.path.join(self.mount, vol.name)


class Case:
    """One format: a snapshot holding the data and the three ways to
    make a volume from it."""

    def __init__(self, bench: Bench, fmt: str) -> None:
        self.bench, self.fmt = bench, fmt
        pool, sd_id = bench.pool, bench.sd_id
        self.img_id, self.snap_id = new_id(), new_id()
        pool.create_volume(sd_id, self.img_id, bench.size,
                           fmt=FORMATS[fmt])
        write_data(pool.leaf(sd_id, self.img_id).path, fmt, bench.data)
        pool.snapshot(sd_id, self.img_id, self.snap_id)
        self.snap_path = pool.image(sd_id, self.img_id).find_snapshot(
            self.snap_id).path
        self.dst = os.path.join(bench.tmp, f"bare.{fmt}")
        self.peer = None
        if bench.with_peer:
            peer_dir = os.path.join(bench.work, f"peer-{fmt}")
            self.peer = Peer(peer_dir, qcow2=fmt == "qcow2")
            self.peer_snap = self.peer.snapshot_of(self.snap_path, fmt,
                                                   bench.size)
        self.times: dict[str, list[float]] = collections.defaultdict(list)
        self.split: dict[str, list[float]] = collections.defaultdict(list)

    def ours(self) -> None:
        pool, sd_id = self.bench.pool, self.bench.sd_id
        img = new_id()
        with ConvertTimer() as timer:
            start = time.perf_counter()
            pool.clone(sd_id, self.img_id, img, snap_id=self.snap_id)
            total = time.perf_counter() - start
        self.times["ours"].append(total)
        self.split["convert"].append(timer.spent["convert"])
        self.split["rest"].append(total - timer.spent["convert"])
        pool.delete_image(sd_id, img)

    def bare(self, name: str = BARE, *options: str) -> None:
        start = time.perf_counter()
        run("qemu-img", "convert", "-f", self.fmt, "-O", self.fmt,
            *options, self.snap_path, self.dst)
        self.times[name].append(time.perf_counter() - start)
        os.unlink(self.dst)

    def bare_durable(self) -> None:
        self.bare(BARE_DURABLE, "-t", "none", "-W")

    def dd(self) -> None:
        """What writing the data costs: the disk's bound."""
        start = time.perf_counter()
        run("dd", f"if={self.snap_path}", f"of={self.dst}", "bs=1M",
            f"count={self.bench.data // MiB}", "conv=fsync",
            "status=none")
        self.times[DD].append(time.perf_counter() - start)
        os.unlink(self.dst)

    def peer_run(self) -> None:
        start = time.perf_counter()
        path = self.peer.create_from(self.peer_snap, self.bench.size)
        self.times["peer"].append(time.perf_counter() - start)
        os.unlink(path)

    def contenders(self) -> list:
        found = [self.ours, self.bare, self.bare_durable, self.dd]
        if self.peer is not None:
            found.append(self.peer_run)
        return found


class Bench:
    def __init__(self, work: str, size: int, data: int,
                 with_peer: bool) -> None:
        self.work, self.size, self.data = work, size, data
        self.with_peer = with_peer
        mount = os.path.join(work, "mnt")
        os.makedirs(mount)
        self.pool = StoragePool.create(mount)
        self.sd_id = self.pool.master.sd_id
        self.tmp = os.path.join(work, "bare")
        os.makedirs(self.tmp)

    def measure(self, case: Case, repeat: int) -> None:
        contenders = case.contenders()
        for i in range(repeat):
            shift = i % len(contenders)
            for op in contenders[shift:] + contenders[:shift]:
                settle()
                op()


def median(times: list[float]) -> float:
    return statistics.median(times)


def report(case: Case) -> None:
    times = case.times
    print(f"\n{case.fmt} from a snapshot holding "
          f"{case.bench.data // MiB} MiB (virtual {case.bench.size // MiB}"
          " MiB):")
    for name, runs in times.items():
        runs_s = " ".join(f"{t:.2f}" for t in runs)
        print(f"  {name:<17} median {median(runs):6.2f} s   [{runs_s}]")
    print(f"  ours: qemu-img convert {median(case.split['convert']):.2f} s,"
          f" the rest {median(case.split['rest']):.3f} s (medians)")
    ours = median(times["ours"])
    bare = median(times[BARE])
    verdict = "ok" if ours <= BARE_RATIO * bare else "MISS"
    print(f"  ours / qemu-img convert {ours / bare:.2f}x "
          f"(target <= {BARE_RATIO}x) {verdict}; ours / qemu-img convert "
          f"-t none -W {ours / median(times[BARE_DURABLE]):.2f}x")
    if "peer" in times:
        peer = median(times["peer"])
        verdict = "ok" if ours <= PEER_RATIO * peer else "MISS"
        print(f"  ours / peer {ours / peer:.2f}x (target <= "
              f"{PEER_RATIO}x) {verdict}; peer / qemu-img convert "
              f"{peer / bare:.2f}x")


def parse_size(text: str) -> int:
    units = {"M": MiB, "G": GiB}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text[-1:] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=os.path.join(REPO, ".bench"),
                        help="where to make the work directory")
    parser.add_argument("--repeat", type=int, default=5,
                        help="runs of each contender (median)")
    parser.add_argument("--data", type=int, default=2048,
                        help="MiB of data in the snapshot")
    parser.add_argument("--size", default="4G",
                        help="virtual size of the volumes (whole GiB)")
    parser.add_argument("--formats", default="raw,qcow2",
                        help="formats of the source and the new volume")
    parser.add_argument("--no-peer", dest="peer", action="store_false",
                        help="leave out Cinder's NFS driver")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory")
    args = parser.parse_args()
    size = parse_size(args.size)
    if size % GiB or size < args.data * MiB:
        parser.error("--size must be whole GiB holding --data MiB")
    formats = args.formats.split(",")
    if set(formats) - set(FORMATS):
        parser.error(f"formats are {', '.join(FORMATS)}")
    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="vfs-", dir=args.dir)
    print(f"work directory {work}; repeat {args.repeat}", flush=True)
    try:
        bench = Bench(work, size, args.data * MiB, args.peer)
        for fmt in formats:
            case = Case(bench, fmt)
            bench.measure(case, args.repeat)
            report(case)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
