"""A domain's counters against a scan of its images, on real files.

After every kind of operation, after steps that fail, after processes
killed between a metadata change and its count (and while reverting),
and after threads and processes change one domain at once, the record
(``dom_md/ovirt-cinder-counters``) holds what a scan counts. fsck
reports a missing, damaged or wrong record and repair rewrites it;
readers fall back to a scan and never write.
"""

import logging
import os
import shutil
import subprocess
import sys
import threading
import uuid

import pytest

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import counters
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fsck
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage.pool import StoragePool
from tests import ovirt_fixtures
from tests import ovirt_rules
from tests.functional import faults
from tests.functional.conftest import assert_counters
from tests.functional.faults import OPS
from tests.functional.faults import copy_world
from tests.functional.faults import failing_step
from tests.functional.faults import open_pool

MiB = sc.MiB
SIZE = 16 * MiB
FORMATS = [sc.VolumeFormat.RAW, sc.VolumeFormat.COW]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def uid():
    return str(uuid.uuid4())


def stored(dom):
    return counters.read(dom).counters


def check(pool, **expected):
    """The record of every domain equals a scan; ``expected``: the
    record of a domain, by id, as (images, volumes, provisioned)."""
    assert_counters(pool)
    for sd_id, values in expected.items():
        assert stored(pool.domain(sd_id)) == counters.Counters(*values)


def counters_problems(pool):
    return [p for p in fsck.check(pool).problems if p.kind == "counters"]


# A new domain


def test_new_domain_has_zero_counters(pool, mount2):
    dom2 = pool.add_domain(mount2)
    for dom in (pool.master, dom2):
        assert counters.read(dom) == counters.Record(counters.Counters(), 0)
        ovirt_rules.assert_domain(dom.path)


# Every operation


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_operation_keeps_counters(pool, mount2, tmp_path, fmt):
    sd = pool.master.sd_id
    sd2 = pool.add_domain(mount2).sd_id
    img = uid()
    pool.create_volume(sd, img, SIZE, fmt=fmt)
    check(pool, **{sd: (1, 1, SIZE), sd2: (0, 0, 0)})
    s1, s2 = uid(), uid()
    pool.snapshot(sd, img, s1)
    check(pool, **{sd: (1, 2, SIZE)})
    pool.extend(sd, img, 2 * SIZE)
    check(pool, **{sd: (1, 2, 2 * SIZE)})
    pool.snapshot(sd, img, s2)
    check(pool, **{sd: (1, 3, 2 * SIZE)})
    # Back to a snapshot of the smaller size; s2 stays as a side branch.
    pool.revert_to_snapshot(sd, img, s1)
    check(pool, **{sd: (1, 3, SIZE)})
    pool.delete_snapshot(sd, img, s2)
    check(pool)
    pool.delete_snapshot(sd, img, s1)
    check(pool, **{sd: (1, 1, SIZE)})

    clone = uid()
    pool.clone(sd, img, clone, size=3 * SIZE)
    check(pool, **{sd: (2, 2, 4 * SIZE)})

    raw = str(tmp_path / "src.raw")
    qemuimg.create(raw, "raw", SIZE)
    tmpl = uid()
    pool.import_volume(sd, tmpl, raw, "raw", SIZE,
                       voltype=sc.VolumeType.SHARED)
    check(pool, **{sd: (3, 3, 5 * SIZE)})
    thin1, thin2 = uid(), uid()
    pool.thin_clone(sd, tmpl, thin1)
    pool.thin_clone(sd, tmpl, thin2, size=2 * SIZE)
    # A thin clone counts its own leaf, not the template it links.
    check(pool, **{sd: (5, 5, 8 * SIZE)})

    staged = os.path.join(pool.master.mount, f".tmp-{sd}-upload")
    shutil.copyfile(raw, staged)
    adopted = uid()
    pool.adopt_volume(sd, adopted, staged, SIZE)
    check(pool, **{sd: (6, 6, 9 * SIZE)})

    # The template is copied first, then the image over it.
    pool.copy_image(sd, thin1, sd2)
    check(pool, **{sd: (6, 6, 9 * SIZE), sd2: (2, 2, 2 * SIZE)})
    pool.copy_image(sd, img, sd2, move=True)
    check(pool, **{sd: (5, 5, 8 * SIZE), sd2: (3, 3, 3 * SIZE)})

    # A template with dependents: its image goes, its volume stays
    # linked in the thin clones, which count what they did.
    pool.delete_image(sd, tmpl)
    check(pool, **{sd: (4, 4, 7 * SIZE)})
    for sd_id in (sd, sd2):
        for img_id in pool.list_images(sd_id):
            pool.delete_image(sd_id, img_id)
    check(pool, **{sd: (0, 0, 0), sd2: (0, 0, 0)})
    assert fsck.check(pool).clean


def test_hidden_snapshot_and_dropped_layers(pool, sd_id):
    img = uid()
    pool.create_volume(sd_id, img, SIZE)
    a, b, c = uid(), uid(), uid()
    pool.snapshot(sd_id, img, a)
    pool.snapshot(sd_id, img, b)
    pool.revert_to_snapshot(sd_id, img, a)
    # a has two children: deleting it only hides it (update_volume).
    pool.delete_snapshot(sd_id, img, a)
    check(pool, **{sd_id: (1, 3, SIZE)})
    pool.snapshot(sd_id, img, c)
    pool.delete_snapshot(sd_id, img, b)     # remove_volume
    check(pool)


# Failing steps


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("counters") / "world")
    os.makedirs(os.path.join(work, "mnt1"))
    os.makedirs(os.path.join(work, "mnt2"))
    ctx = faults.make_world(work)
    return work, ctx


def learn_steps(world, tmp_path, op):
    """The names of the steps ``op`` runs, with their run number."""
    work0, ctx = world
    work = copy_world(work0, str(tmp_path / f"learn-{op}"))
    names = []

    def on_change(event, details):
        if event == "RUNNING":
            names.append(details["task_name"])

    OPS[op](open_pool(work, [faults.listener(on_change)]), ctx)
    shutil.rmtree(work)
    return [(n, names[:i + 1].count(n)) for i, n in enumerate(names)]


FAILING_OPS = ["create", "snapshot", "extend", "revert", "merge_commit",
               "thin_clone", "copy_thin", "move", "delete", "import",
               "adopt"]


@pytest.mark.parametrize("op", FAILING_OPS)
def test_failing_steps_keep_counters(world, tmp_path, op):
    work0, ctx = world
    for i, (step, nth) in enumerate(learn_steps(world, tmp_path, op)):
        work = copy_world(work0, str(tmp_path / f"{i}"))
        pool = open_pool(work)
        with failing_step(step, when="after", nth=nth) as raised:
            with pytest.raises((OSError, errors.StorageError)):
                OPS[op](pool, ctx)
        assert raised, step
        # Reverted, or stopped past the point of no return: counted as
        # it stands, without any help from recovery.
        assert_counters(pool)
        pool.recover()
        assert_counters(pool)
        assert counters_problems(pool) == []
        shutil.rmtree(work)


# Killed processes


def writes_of(world, tmp_path, op):
    work0, ctx = world
    work = copy_world(work0, str(tmp_path / f"count-{op}"))
    with faults.counting_writes() as count:
        OPS[op](open_pool(work), ctx)
    shutil.rmtree(work)
    return count[0]


@pytest.mark.parametrize("op", ["create", "snapshot", "extend", "revert",
                                "thin_clone", "move", "delete"])
def test_kill_between_change_and_count(world, tmp_path, op):
    """Killed after a metadata change, before its count: the record is
    off until recovery, which rebuilds it."""
    work0, ctx = world
    writes = writes_of(world, tmp_path, op)
    assert writes
    off = 0
    for nth in range(1, writes + 1):
        work = copy_world(work0, str(tmp_path / f"{nth}"))
        child = faults.run_child(work, "counters-kill", op, str(nth))
        assert child.returncode == -9, child.stderr[-2000:]
        pool = open_pool(work)
        off += bool(counters_problems(pool))
        assert [o for _, o in pool.recover()] in (["SUCCESS"],
                                                   ["REVERTED"])
        assert_counters(pool)
        assert fsck.check(pool).clean
        shutil.rmtree(work)
    assert off, "no kill left the counters off: the test proves nothing"


@pytest.mark.parametrize("op, fail, kill", [
    ("thin_clone", "publish_image", "create_volume"),
    ("create", "publish_image", "create_volume"),
    ("snapshot", "legalize", "freeze_leaf"),
])
def test_kill_while_reverting(world, tmp_path, op, fail, kill):
    work0, ctx = world
    work = copy_world(work0, str(tmp_path / "w"))
    child = faults.run_child(work, "revert-kill", op, fail, kill)
    assert child.returncode == -9, child.stderr[-2000:]
    pool = open_pool(work)
    assert [o for _, o in pool.recover()] == ["REVERTED"]
    assert_counters(pool)
    assert fsck.check(pool).clean


def test_recovery_rebuilds_counters_it_finds_off(world, tmp_path, caplog):
    work0, ctx = world
    work = copy_world(work0, str(tmp_path / "w"))
    pool = open_pool(work)
    dom = pool.domain(ctx["sd"])
    # A flow stopped past its point of no return, and a record off.
    with failing_step("remove_image"), \
            pytest.raises(errors.OperationIncomplete):
        pool.delete_image(ctx["sd"], ctx["img"])
    right = stored(dom)
    with pool.lease_manager.domain_lease(dom):
        counters.write(dom, right + counters.Counters(7, 7, 7), 99)
    with caplog.at_level(logging.WARNING):
        assert pool.recover() == [("remove_image", "SUCCESS")]
    assert "were off after flow" in caplog.text
    assert_counters(pool)


# Concurrency


def test_threads_change_one_domain(pool, sd_id):
    errors_seen = []

    def worker(seed):
        try:
            for i in range(4):
                img = uid()
                fmt = FORMATS[(seed + i) % 2]
                pool.create_volume(sd_id, img, SIZE, fmt=fmt)
                pool.extend(sd_id, img, SIZE + (seed + 1) * MiB)
                pool.snapshot(sd_id, img, uid())
                if i % 2:
                    pool.delete_image(sd_id, img)
        except Exception as e:  # noqa: BLE001 -- reported below
            errors_seen.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors_seen == []
    check(pool, **{sd_id: (8, 16, sum(SIZE + (n + 1) * MiB
                                      for n in range(4)) * 2)})
    assert fsck.check(pool).clean


CHILD = """
import sys, uuid
from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage.pool import StoragePool
pool = StoragePool.open([sys.argv[1]])
sd = pool.master.sd_id
for i in range(int(sys.argv[2])):
    img = str(uuid.uuid4())
    pool.create_volume(sd, img, 16 * sc.MiB)
    pool.extend(sd, img, 17 * sc.MiB)
    if i % 2:
        pool.delete_image(sd, img)
"""


def test_processes_change_one_domain(pool, mount, sd_id):
    env = dict(os.environ, PYTHONPATH=ROOT)
    children = [subprocess.Popen([sys.executable, "-c", CHILD, mount, "6"],
                                 env=env, cwd=ROOT, stderr=subprocess.PIPE,
                                 text=True) for _ in range(3)]
    # And this process at the same time.
    for _ in range(3):
        img = uid()
        pool.create_volume(sd_id, img, SIZE)
        pool.delete_image(sd_id, img)
    for child in children:
        _, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-2000:]
    check(pool, **{sd_id: (9, 9, 9 * 17 * MiB)})


# What the record says when it is not there or not right


def damage(dom, how):
    path = dom.dom_md(sc.COUNTERS)
    if how == "missing":
        os.unlink(path)
    elif how == "torn":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "zeros":
        size = os.path.getsize(path)
        with open(path, "wb") as f:
            f.write(b"\0" * size)
    elif how == "off":
        # Well formed, wrong: what a lost update would leave.
        record = counters.read(dom)
        counters.write(dom, record.counters + counters.Counters(1, 0, MiB),
                       record.seq + 1)
    else:
        raise AssertionError(how)


def content(dom):
    """The record's bytes; None when it is missing."""
    try:
        with open(dom.dom_md(sc.COUNTERS), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def populated(pool, sd_id):
    for fmt in FORMATS:
        img = uid()
        pool.create_volume(sd_id, img, SIZE, fmt=fmt)
        pool.snapshot(sd_id, img, uid())
    return counters.scan(pool.domain(sd_id))


@pytest.mark.parametrize("how", ["missing", "torn", "zeros", "off"])
def test_fsck_reports_and_repairs(pool, sd_id, how):
    scanned = populated(pool, sd_id)
    dom = pool.master
    damage(dom, how)
    before = content(dom)
    [problem] = counters_problems(pool)
    assert problem.sd_id == sd_id and problem.garbage
    assert problem.path == dom.dom_md(sc.COUNTERS)
    assert content(dom) == before       # checking changed nothing
    report = fsck.repair(pool)
    assert report.clean, [p.as_dict() for p in report.problems]
    assert [p.kind for p in report.repaired] == ["counters"]
    assert stored(dom) == scanned
    assert fsck.repair(pool).repaired == []


def test_old_domains_get_counters_when_upgraded(tmp_path):
    mount, entry = ovirt_fixtures.copy_fixture("v4", str(tmp_path))
    (tmp_path / "master").mkdir()
    pool = StoragePool.create(str(tmp_path / "master"))
    dom = pool.attach_domain(ovirt_fixtures.domain_path(mount, entry))
    # A V4 domain is not written: no record, and fsck expects none.
    assert content(dom) is None
    assert counters_problems(pool) == []
    assert pool.domain_counters(dom.sd_id) == counters.scan(dom)
    pool.upgrade_domain(dom.sd_id)
    assert stored(dom) == counters.scan(dom)
    assert stored(dom).images == len(entry["images"])
    assert counters_problems(pool) == []


def test_attaching_an_ovirt_domain_builds_counters(tmp_path):
    mount, entry = ovirt_fixtures.copy_fixture("v5-detached",
                                               str(tmp_path))
    path = ovirt_fixtures.domain_path(mount, entry)
    dom_md = sorted(os.listdir(os.path.join(path, "dom_md")))
    assert sc.COUNTERS not in dom_md
    (tmp_path / "master").mkdir()
    pool = StoragePool.create(str(tmp_path / "master"))
    dom = pool.attach_domain(path)
    assert stored(dom) == counters.scan(dom)
    assert stored(dom).images == len(entry["images"])
    # The one name the engine adds to what oVirt wrote.
    assert sorted(os.listdir(os.path.join(path, "dom_md"))) == sorted(
        dom_md + [sc.COUNTERS])


def test_the_first_change_rebuilds_a_missing_record(pool, sd_id):
    """A domain made by an earlier release has no record: the first
    change that counts builds it by a scan."""
    scanned = populated(pool, sd_id)
    dom = pool.master
    damage(dom, "missing")
    pool.create_volume(sd_id, uid(), SIZE)
    assert stored(dom) == counters.scan(dom)
    assert stored(dom).images == scanned.images + 1


def test_a_count_that_cannot_be_written_removes_the_record(
        pool, sd_id, monkeypatch):
    populated(pool, sd_id)
    dom = pool.master

    def enospc(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(counters, "write", enospc)
    # The operation is not failed for its count.
    pool.create_volume(sd_id, uid(), SIZE)
    monkeypatch.undo()
    assert not os.path.exists(dom.dom_md(sc.COUNTERS))
    assert pool.domain_counters(sd_id) == counters.scan(dom)
    pool.create_volume(sd_id, uid(), SIZE)
    assert stored(dom) == counters.scan(dom)


@pytest.mark.parametrize("how", ["missing", "torn", "off"])
def test_readers_scan_when_the_record_is_bad(pool, sd_id, how, caplog):
    scanned = populated(pool, sd_id)
    dom = pool.master
    damage(dom, how)
    path = dom.dom_md(sc.COUNTERS)
    with caplog.at_level(logging.INFO, logger=counters.__name__):
        values = [pool.domain_counters(sd_id) for _ in range(3)]
    if how == "off":
        # Well formed: trusted (fsck finds it; recovery rebuilds it).
        assert values == [scanned + counters.Counters(1, 0, MiB)] * 3
        return
    assert values == [scanned] * 3
    # Logged once, and never written by a reader.
    assert len([r for r in caplog.records
                if "scanning the domain" in r.message]) == 1
    assert os.path.exists(path) == (how != "missing")
    with pytest.raises(errors.BadCounters):
        counters.read(dom)


def test_interrupted_write_leaves_a_leftover_fsck_removes(pool, sd_id):
    """A process killed inside ``write`` leaves ``.new`` next to the
    record, which stays the one it replaces."""
    populated(pool, sd_id)
    dom = pool.master
    new = dom.dom_md(sc.COUNTERS) + sc.NEW_EXT
    with open(new, "wb") as f:
        f.write(b"FORMAT=1\n")
    os.utime(new, (1, 1))
    assert stored(dom) == counters.scan(dom)
    report = fsck.repair(pool)
    assert report.clean and not os.path.exists(new)


def test_recovery_without_a_flow_writes_nothing(pool, sd_id):
    populated(pool, sd_id)
    dom = pool.master
    seq = counters.read(dom).seq
    assert pool.recover() == []
    assert counters.read(dom).seq == seq
