"""One process of the concurrency torture test (test_torture.py).

::

    python -m tests.functional.torture_worker CONFIG INDEX

CONFIG is a JSON file written by the test (mounts, lock path, ids,
duration, ...). The worker opens the pool with the shared lock path, says
it is ready (``<journal_dir>/ready-INDEX``), waits for ``<journal_dir>/go``
and runs ``threads`` threads of random operations on the same image until
the deadline; worker 0 also runs a thread of long copies of a second
image. Every result goes to ``<journal_dir>/journal-INDEX.jsonl``, one
JSON object a line: ``op``, ``worker``, ``pid``, ``thread``, ``t0``,
``t1`` (wall clock), ``ok`` (True: acknowledged, False: failed, None:
skipped), ``error`` (class name) and ``allowed``, and what the operation
made (``snap`` and the ``sha`` of its view, ``clone``...).

The view of a new snapshot is hashed under the image lease right after
the snapshot returned, so it is the view the caller was promised.
"""

import json
import os
import random
import sys
import threading
import time
import traceback
import uuid

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fsck
from ovirt_cinder.storage import lease
from ovirt_cinder.storage.pool import StoragePool
from tests import qemuio

MiB = sc.MiB
KiB = 1024
# Data patterns go below this offset (the smallest capacity).
DATA_END = 16 * MiB
MAX_CAPACITY = 32 * MiB
MAX_SNAPSHOTS = 8

# Failures a concurrent caller must expect, by operation.
ALLOWED = (errors.LeaseTimeout, errors.ImageIsBusy, errors.SnapshotNotFound)


class Skip(Exception):
    """Nothing to do (no snapshot to pick, capacity reached...)."""


def digest(vol, scratch):
    """sha256 of a volume's whole guest view."""
    return qemuio.view_digest(vol.path, vol.qemu_format, scratch)


def open_pool(cfg):
    manager = lease.LocalLeaseManager(lease_timeout=cfg["lease_timeout"],
                                      lock_path=cfg["lock_path"])
    return StoragePool.open(cfg["mounts"], lease_manager=manager)


class Worker:

    def __init__(self, cfg, index):
        self.cfg = cfg
        self.index = index
        self.pool = open_pool(cfg)
        self.sd, self.img = cfg["sd"], cfg["img"]
        self.dom = self.pool.domain(self.sd)
        self.scratch = os.path.join(cfg["scratch"], f"w{index}")
        os.makedirs(self.scratch, exist_ok=True)
        self.journal_path = os.path.join(cfg["journal_dir"],
                                         f"journal-{index}.jsonl")
        self._journal = open(self.journal_path, "a")
        self._jlock = threading.Lock()
        self.clones = []            # my acknowledged clones of img
        self._clones_lock = threading.Lock()
        self.deadline = None

    # Plumbing

    def write(self, rec):
        with self._jlock:
            self._journal.write(json.dumps(rec) + "\n")
            self._journal.flush()

    def record(self, kind, fn, *args):
        rec = {"op": kind, "worker": self.index, "pid": os.getpid(),
               "thread": threading.current_thread().name,
               "t0": time.time()}
        try:
            fn(rec, *args)
            rec["ok"] = True
        except Skip as e:
            rec["ok"] = None
            rec["skip"] = str(e)
        except Exception as e:
            rec["ok"] = False
            rec["error"] = type(e).__name__
            rec["msg"] = str(e)[:1000]
            rec["allowed"] = allowed(kind, e)
            if not rec["allowed"]:
                rec["tb"] = traceback.format_exc()[-6000:]
        rec["t1"] = time.time()
        self.write(rec)
        return rec

    def lease(self, img_id=None):
        return self.pool.lease_manager.image_lease(self.dom,
                                                   img_id or self.img)

    def not_busy(self):
        """Refuse, as the engine would, while a flow on the image is
        unfinished (its chain may be half changed until recovery)."""
        if (self.sd, self.img) in self.pool.runner.busy_images():
            raise errors.ImageIsBusy(img_id=self.img,
                                     reason="unfinished flow (torture)")

    def snapshot_ids(self, rec):
        """The image's snapshots, read without a lease first, as readers
        like the Cinder driver's stats do; a failed lockless read is
        recorded and the read is redone under the image lease."""
        try:
            return sorted(self.pool.image(self.sd, self.img).snapshots())
        except Exception as e:
            rec["lockless_read_error"] = f"{type(e).__name__}: {e}"[:300]
        with self.lease():
            return sorted(self.pool.image(self.sd, self.img).snapshots())

    def pick_snapshot(self, rng, rec):
        snaps = self.snapshot_ids(rec)
        if not snaps:
            raise Skip("no snapshot")
        return rng.choice(snaps)

    # Operations on the tortured image

    def op_snapshot(self, rec, rng):
        snap = str(uuid.uuid4())
        rec["snap"] = snap
        with self.lease():
            self.not_busy()
            leaf = self.pool.leaf(self.sd, self.img)
            length = rng.choice([64 * KiB, 256 * KiB, MiB])
            offset = rng.randrange(0, DATA_END - length, 64 * KiB)
            pattern = rng.randrange(1, 255)
            rec["write"] = [offset, length, pattern]
            qemuio.write_pattern(leaf.path, leaf.qemu_format, offset,
                                 length, pattern)
            vol = self.pool.snapshot(self.sd, self.img, snap)
            rec["vol"] = vol.vol_id
            rec["sha"] = digest(vol, self.scratch)

    def op_delete_snapshot(self, rec, rng):
        snap = self.pick_snapshot(rng, rec)
        rec["snap"] = snap
        self.pool.delete_snapshot(self.sd, self.img, snap)

    def op_revert(self, rec, rng):
        snap = self.pick_snapshot(rng, rec)
        rec["snap"] = snap
        with self.lease():
            vol = self.pool.revert_to_snapshot(self.sd, self.img, snap)
            rec["leaf_sha"] = digest(vol, self.scratch)

    def op_clone(self, rec, rng):
        new = str(uuid.uuid4())
        rec["clone"] = new
        if rng.random() < 0.5:
            snap = self.pick_snapshot(rng, rec)
            rec["snap"] = snap
            self.pool.clone(self.sd, self.img, new, snap_id=snap)
        else:
            with self.lease():
                self.pool.clone(self.sd, self.img, new)
                leaf = self.pool.leaf(self.sd, self.img)
                rec["sha"] = digest(leaf, self.scratch)
        with self._clones_lock:
            self.clones.append(new)

    def op_delete_clone(self, rec, rng):
        with self._clones_lock:
            if not self.clones:
                raise Skip("no clone")
            new = self.clones.pop(rng.randrange(len(self.clones)))
        rec["clone"] = new
        try:
            self.pool.delete_image(self.sd, new)
        except Exception:
            with self._clones_lock:
                self.clones.append(new)
            raise

    def op_extend(self, rec, rng):
        with self.lease():
            self.not_busy()
            cap = self.pool.leaf(self.sd, self.img).meta.capacity
            if cap + MiB > MAX_CAPACITY:
                raise Skip(f"capacity {cap}")
            rec["size"] = cap + MiB
            self.pool.extend(self.sd, self.img, cap + MiB)

    def op_repair(self, rec, rng):
        report = fsck.repair(self.pool)
        rec["recovered"] = report.recovered
        rec["repaired"] = [p.as_dict() for p in report.repaired]
        rec["problems"] = len(report.problems)
        failed = [r for r in report.recovered if r[1] == "FAILED"]
        if failed:
            raise AssertionError(f"recovery failed: {failed}")

    def choose(self, rng):
        snaps = len(self.pool.image(self.sd, self.img).snapshots()) \
            if rng.random() < 0.3 else None
        if snaps is not None and snaps >= MAX_SNAPSHOTS:
            return "delete_snapshot"
        return rng.choices(
            ["snapshot", "delete_snapshot", "revert", "clone",
             "delete_clone", "extend", "repair"],
            weights=[30, 20, 12, 10, 6, 10, 7])[0]

    def main_loop(self, seed):
        rng = random.Random(seed)
        while time.time() < self.deadline:
            try:
                kind = self.choose(rng)
            except errors.StorageError:
                kind = "snapshot"
            self.record(kind, getattr(self, f"op_{kind}"), rng)

    # Long copies of the second image, meanwhile

    def op_long_clone(self, rec, rng):
        new = str(uuid.uuid4())
        rec["clone"] = new
        self.pool.clone(self.sd, self.cfg["img2"], new)

    def op_long_copy(self, rec, rng):
        self.pool.copy_image(self.sd, self.cfg["img2"], self.cfg["sd2"])
        rec["copy"] = self.cfg["img2"]

    def op_long_uncopy(self, rec, rng):
        rec["copy"] = self.cfg["img2"]
        if not self.pool.delete_image(self.cfg["sd2"], self.cfg["img2"]):
            raise AssertionError("the copy was not there")

    def op_long_delete(self, rec, rng, img_id):
        rec["clone"] = img_id
        self.pool.delete_image(self.sd, img_id)

    def long_loop(self, seed):
        rng = random.Random(seed)
        made = []
        copied = False
        while time.time() < self.deadline:
            if copied:
                rec = self.record("long_uncopy", self.op_long_uncopy, rng)
                copied = not rec["ok"]
            elif rng.random() < 0.6:
                rec = self.record("long_clone", self.op_long_clone, rng)
                if rec["ok"]:
                    made.append(rec["clone"])
                if len(made) > 2:
                    self.record("long_delete", self.op_long_delete, rng,
                                made.pop(0))
            else:
                rec = self.record("long_copy", self.op_long_copy, rng)
                copied = bool(rec["ok"])

    def run(self):
        cfg = self.cfg
        open(os.path.join(cfg["journal_dir"], f"ready-{self.index}"),
             "w").close()
        go = os.path.join(cfg["journal_dir"], "go")
        limit = time.time() + 120
        while not os.path.exists(go):
            if time.time() > limit:
                raise SystemExit("no go")
            time.sleep(0.01)
        self.deadline = time.time() + cfg["duration"]
        seed = cfg["seed"] * 1000 + self.index * 10
        threads = [threading.Thread(target=self.main_loop, args=(seed + t,),
                                    name=f"w{self.index}t{t}")
                   for t in range(cfg["threads"])]
        if self.index == 0:
            threads.append(threading.Thread(target=self.long_loop,
                                            args=(seed + 9,),
                                            name=f"w{self.index}long"))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._journal.close()


def allowed(kind, e):
    if isinstance(e, ALLOWED):
        return True
    # A snapshot id that exists (not expected with fresh uuids).
    return (kind == "snapshot" and isinstance(e, errors.InvalidOperation)
            and "exists" in str(e))


def main():
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    Worker(cfg, int(sys.argv[2])).run()


if __name__ == "__main__":
    main()
