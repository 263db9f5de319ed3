"""Concurrency torture: processes and threads on one image at once.

Three worker processes (tests/functional/torture_worker.py), two threads
each sharing one StoragePool, open the same pool with the same lock path
and for a bounded time run random snapshot, delete_snapshot, revert,
clone, extend and fsck.repair operations on the same image, while worker
0 also clones and copies a second, larger image of the same domain. Each
worker journals every acknowledged result and every clean failure; then
the parent recovers, and checks that what was acknowledged is there with
the recorded data, that nothing unacknowledged appeared, that the image
has one legal leaf and validates, and that fsck finds the pool clean.
"""

import collections
import contextlib
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
from taskflow.types import notifier

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import fsck
from ovirt_cinder.storage import lease
from ovirt_cinder.storage.pool import StoragePool
from tests import qemuio
from tests.functional.conftest import leftovers

MiB = sc.MiB
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

WORKERS = 3
THREADS = 2
DURATION = 20.0
LEASE_TIMEOUT = 4.0
# Acknowledged operations of each kind the run must reach at least.
MINIMUM = {"snapshot": 6, "delete_snapshot": 3, "revert": 2, "clone": 2,
           "extend": 2, "repair": 1, "long_clone": 1}


def digest(vol, scratch):
    """sha256 of a volume's whole guest view."""
    return qemuio.view_digest(vol.path, vol.qemu_format, scratch)


def open_pool(mounts, lock_path, timeout=60.0):
    manager = lease.LocalLeaseManager(lease_timeout=timeout,
                                      lock_path=lock_path)
    return StoragePool.open(mounts, lease_manager=manager)


@pytest.fixture
def world(tmp_path):
    """A pool whose image has two snapshots, and a larger second image."""
    mounts = [str(tmp_path / "mnt1"), str(tmp_path / "mnt2")]
    for m in mounts:
        os.mkdir(m)
    locks, scratch = str(tmp_path / "locks"), str(tmp_path / "scratch")
    os.mkdir(scratch)
    manager = lease.LocalLeaseManager(lock_path=locks)
    pool = StoragePool.create(mounts[0], lease_manager=manager)
    sd2 = pool.add_domain(mounts[1]).sd_id
    sd = pool.master.sd_id
    img, img2 = str(uuid.uuid4()), str(uuid.uuid4())
    pool.create_volume(sd, img, 16 * MiB, fmt=sc.VolumeFormat.COW)
    shas = {}
    for i in range(2):
        leaf = pool.leaf(sd, img)
        qemuio.write_pattern(leaf.path, leaf.qemu_format, i * 4 * MiB, MiB,
                             0x30 + i)
        snap = str(uuid.uuid4())
        shas[snap] = digest(pool.snapshot(sd, img, snap), scratch)
    pool.create_volume(sd, img2, 64 * MiB, fmt=sc.VolumeFormat.RAW)
    leaf2 = pool.leaf(sd, img2)
    for i in range(3):
        qemuio.write_pattern(leaf2.path, "raw", i * 20 * MiB, 8 * MiB,
                             0x50 + i)
    return {"mounts": mounts, "lock_path": locks, "scratch": scratch,
            "sd": sd, "sd2": sd2, "img": img, "img2": img2,
            "initial": shas, "img2_sha": digest(leaf2, scratch)}


def run_workers(tmp_path, world):
    journal_dir = str(tmp_path / "journals")
    os.mkdir(journal_dir)
    cfg = dict(world, journal_dir=journal_dir, duration=DURATION,
               threads=THREADS, lease_timeout=LEASE_TIMEOUT,
               seed=int(os.environ.get("TORTURE_SEED", time.time())))
    cfg_path = str(tmp_path / "torture.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = []
    for i in range(WORKERS):
        out = open(os.path.join(journal_dir, f"out-{i}.txt"), "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.functional.torture_worker",
             cfg_path, str(i)], cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT))
        out.close()
    try:
        limit = time.time() + 60
        while not all(os.path.exists(os.path.join(journal_dir,
                                                  f"ready-{i}"))
                      for i in range(WORKERS)):
            assert all(p.poll() is None for p in procs), outputs(journal_dir)
            assert time.time() < limit, "workers did not start"
            time.sleep(0.05)
        open(os.path.join(journal_dir, "go"), "w").close()
        for p in procs:
            p.wait(timeout=DURATION + 120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * WORKERS, \
        outputs(journal_dir)
    records = []
    for i in range(WORKERS):
        with open(os.path.join(journal_dir, f"journal-{i}.jsonl")) as f:
            records += [json.loads(line) for line in f]
    return cfg, records


def outputs(journal_dir):
    text = []
    for i in range(WORKERS):
        path = os.path.join(journal_dir, f"out-{i}.txt")
        if os.path.exists(path):
            with open(path) as f:
                text.append(f"--- worker {i}\n{f.read()[-3000:]}")
    return "\n".join(text)


def acked(records, kind):
    return [r for r in records if r["op"] == kind and r["ok"]]


def overlaps(a, b):
    return a["t0"] < b["t1"] and b["t0"] < a["t1"]


def summary(records):
    kinds = collections.Counter(r["op"] for r in records if r["ok"])
    failures = collections.Counter(f"{r['op']}:{r['error']}"
                                   for r in records if r["ok"] is False)
    lockless = collections.Counter(
        r["lockless_read_error"].split(":")[0] for r in records
        if "lockless_read_error" in r)
    return kinds, failures, lockless


def test_torture(tmp_path, world):
    cfg, records = run_workers(tmp_path, world)
    kinds, failures, lockless = summary(records)
    ok = [r for r in records if r["ok"]]
    cross = sum(1 for a, b in itertools.combinations(ok, 2)
                if a["pid"] != b["pid"] and overlaps(a, b))
    long_ops = [r for r in ok if r["op"].startswith("long_")]
    img_ops = [r for r in ok if not r["op"].startswith("long_")]
    parallel = sum(1 for a in long_ops for b in img_ops
                   if a["pid"] != b["pid"] and overlaps(a, b))
    print(f"\ntorture seed {cfg['seed']}: acknowledged {dict(kinds)}; "
          f"failures {dict(failures)}; cross-process overlaps {cross}, "
          f"second image vs first {parallel}; lockless read errors "
          f"{dict(lockless)}")

    # Every failure is one a concurrent caller must expect.
    unexpected = [r for r in records if r["ok"] is False
                  and not r["allowed"] and r["error"] !=
                  "OperationIncomplete"]
    assert not unexpected, "\n".join(
        f"{r['op']} in {r['thread']}: {r.get('tb') or r['msg']}"
        for r in unexpected[:3])

    # Operations past their point of no return are finished by recovery.
    pool = open_pool(cfg["mounts"], cfg["lock_path"])
    outcomes = pool.recover()
    assert all(o in ("SUCCESS", "REVERTED") for _, o in outcomes), outcomes
    assert list(pool.runner.unfinished()) == []
    incomplete = [r for r in records if r.get("error") ==
                  "OperationIncomplete"]

    # The image: one legal leaf, a healthy chain, valid data.
    sd, img, scratch = cfg["sd"], cfg["img"], cfg["scratch"]
    tree = pool.image(sd, img)
    assert tree.problems() == []
    tree.validate()
    assert tree.leaf().legal

    # Snapshots: every acknowledged one that no one deleted is there
    # with the data it had; nothing else is.
    shas = dict(cfg["initial"])
    shas.update({r["snap"]: r["sha"] for r in acked(records, "snapshot")})
    deleted = {r["snap"] for r in acked(records, "delete_snapshot")}
    maybe = {r["snap"] for r in incomplete if r["op"] == "delete_snapshot"}
    present = tree.snapshots()
    assert set(present) <= set(shas) - deleted, "unexpected snapshots"
    for snap, sha in shas.items():
        if snap in deleted or snap in maybe:
            continue
        assert snap in present, f"acknowledged snapshot {snap} vanished"
        assert digest(present[snap], scratch) == sha, f"data of {snap}"
    owners = [v.snapshot_id for v in tree.own_volumes() if v.snapshot_id]
    assert len(owners) == len(set(owners))

    # A revert gave the snapshot's view.
    for r in acked(records, "revert"):
        assert r["leaf_sha"] == shas[r["snap"]], r

    # Clones: each acknowledged and not deleted clone is readable and
    # holds the view it was made from; no other image appeared.
    live = {r["clone"]: r for r in acked(records, "clone")}
    for r in acked(records, "delete_clone"):
        live.pop(r["clone"])
    long_live = {r["clone"] for r in acked(records, "long_clone")}
    long_live -= {r["clone"] for r in acked(records, "long_delete")}
    expected = {img, cfg["img2"], *live, *long_live}
    assert set(pool.list_images(sd)) == expected
    for clone_id, r in live.items():
        clone = pool.image(sd, clone_id)
        clone.validate()
        want = r["sha"] if "sha" in r else shas[r["snap"]]
        assert digest(clone.leaf(), scratch) == want, r
    for clone_id in long_live:
        clone = pool.image(sd, clone_id)
        clone.validate()
        assert digest(clone.leaf(), scratch) == cfg["img2_sha"]
    assert digest(pool.leaf(sd, cfg["img2"]), scratch) == cfg["img2_sha"]
    for img_id in pool.list_images(cfg["sd2"]):
        assert img_id == cfg["img2"]
        assert digest(pool.leaf(cfg["sd2"], img_id), scratch) == \
            cfg["img2_sha"]

    report = fsck.check(pool)
    assert report.clean, [p.as_dict() for p in report.problems]
    for dom in pool.domains.values():
        assert leftovers(dom.path) == []

    # It was a torture: operations of different processes overlapped,
    # the second image's copies ran while the first image changed, and
    # every kind of operation got through.
    assert cross > 0
    assert parallel > 0
    for kind, n in MINIMUM.items():
        assert kinds[kind] >= n, (kind, dict(kinds))


def test_simultaneous_snapshots(tmp_path):
    """Eight threads snapshot one image at once: all succeed, in turn."""
    mount = str(tmp_path / "mnt1")
    os.mkdir(mount)
    manager = lease.LocalLeaseManager(lock_path=str(tmp_path / "locks"))
    pool = StoragePool.create(mount, lease_manager=manager)
    sd, img = pool.master.sd_id, str(uuid.uuid4())
    pool.create_volume(sd, img, 16 * MiB)
    ids = [str(uuid.uuid4()) for _ in range(8)]
    barrier = threading.Barrier(len(ids))
    errors = []

    def snap(snap_id):
        barrier.wait()
        try:
            pool.snapshot(sd, img, snap_id)
        except Exception as e:      # reported below
            errors.append(e)

    threads = [threading.Thread(target=snap, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    tree = pool.image(sd, img)
    assert len(tree.volumes) == 9
    assert tree.problems() == []
    tree.validate()
    assert len(tree.chain()) == 9
    owners = sorted(v.snapshot_id for v in tree.own_volumes()
                    if v.snapshot_id)
    assert owners == sorted(ids)
    assert fsck.check(pool).clean
    assert leftovers(pool.master.path) == []


def test_repair_leaves_running_operations_alone(tmp_path):
    """fsck.repair while a snapshot is half made (its new volume still
    ILLEGAL, the leaf already frozen) must not take the new volume for
    garbage: the snapshot holds the image lease, so repair leaves it."""
    mount = str(tmp_path / "mnt1")
    os.mkdir(mount)
    armed, reached, resume = (threading.Event(), threading.Event(),
                              threading.Event())

    @contextlib.contextmanager
    def pause(engine):
        def on_change(event, details):
            if armed.is_set() and event == "RUNNING" and \
                    details.get("task_name") == "legalize":
                reached.set()
                resume.wait(30)
        engine.atom_notifier.register(notifier.Notifier.ANY, on_change)
        try:
            yield
        finally:
            engine.atom_notifier.deregister(notifier.Notifier.ANY,
                                            on_change)

    manager = lease.LocalLeaseManager(lease_timeout=1.0,
                                      lock_path=str(tmp_path / "locks"))
    pool = StoragePool.create(mount, lease_manager=manager,
                              listeners=[pause])
    sd, img = pool.master.sd_id, str(uuid.uuid4())
    pool.create_volume(sd, img, 16 * MiB)
    armed.set()
    snap = str(uuid.uuid4())
    failures = []

    def snapshot():
        try:
            pool.snapshot(sd, img, snap)
        except Exception as e:      # reported below
            failures.append(e)

    thread = threading.Thread(target=snapshot)
    thread.start()
    try:
        assert reached.wait(30)
        report = fsck.repair(pool)
        # The half-made snapshot is reported, not touched.
        assert not report.clean
        assert report.repaired == []
    finally:
        resume.set()
        thread.join()
    assert failures == []
    tree = pool.image(sd, img)
    assert list(tree.snapshots()) == [snap]
    assert tree.problems() == []
    assert fsck.check(pool).clean


# A process whose pool first needs the engine in a worker thread, as a
# torture worker's does: the pool is opened without it (no TaskFlow, no
# eventlet yet), then a thread creates a volume. Prints whether the
# thread could be joined, and the pool's images.
_FIRST_USE_IN_THREAD = """\
import sys, threading
from ovirt_cinder.storage import lease
from ovirt_cinder.storage.pool import StoragePool
mount, locks, img = sys.argv[1:]
manager = lease.LocalLeaseManager(lock_path=locks)
pool = StoragePool.create(mount, lease_manager=manager)
assert "eventlet" not in sys.modules, "the engine is already imported"
sd = pool.master.sd_id
thread = threading.Thread(target=pool.create_volume, args=(sd, img, 2**20))
thread.start()
thread.join(30)
print("alive" if thread.is_alive() else "joined", pool.list_images(sd))
"""


def test_engine_first_imported_in_a_thread(tmp_path):
    """The thread ends and the process exits: eventlet's import, which once
    kept the importing thread from ever being joined, runs in a thread of
    its own (see pool.load_engine)."""
    mount = tmp_path / "mnt1"
    mount.mkdir()
    img = str(uuid.uuid4())
    proc = subprocess.run(
        [sys.executable, "-c", _FIRST_USE_IN_THREAD, str(mount),
         str(tmp_path / "locks"), img],
        capture_output=True, text=True, cwd=ROOT, timeout=90,
        env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == f"joined ['{img}']", proc.stdout
