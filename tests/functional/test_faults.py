"""Fault injection: every step of every flow fails, and so do undos.

"Every undo runs at least once": for each operation the test learns its
steps by running it once (a recording listener), then, on a fresh copy
of the world for each, makes every step fail with EIO, once when it
starts and once after it did its work (:mod:`faults`). A step before the
point of no return must leave the world exactly as it was (every view,
every volume's metadata but its generation, every file name; fsck clean;
no logbook); a forward step must stop the flow with OperationIncomplete,
keep every view the user had readable, and leave a logbook that
``recover()`` finishes into the world a clean run makes.

Then: undos that fail (recovery goes on reverting), real ENOSPC and EROFS
on a tmpfs domain, and processes killed while reverting or recovering.
The outcome matrix is printed at the end of the module.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import uuid

import pytest

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import flows
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage.pool import StoragePool
from tests import qemuio
from tests.functional import faults
from tests.functional.faults import OPS
from tests.functional.faults import check_consistent
from tests.functional.faults import copy_world
from tests.functional.faults import failing_step
from tests.functional.faults import failing_undo
from tests.functional.faults import open_pool
from tests.functional.faults import state
from tests.functional.faults import views

MiB = sc.MiB
MATRIX: list[tuple[str, str, str, str]] = []
# Calls of each undo action during the fault matrix.
UNDONE: dict[str, int] = {}
WHEN = ("before", "after")


@pytest.fixture(scope="module", autouse=True)
def matrix(request):
    yield
    if not MATRIX:
        return
    rows = [("operation", "failing step", "fault", "outcome"), *MATRIX]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
             for r in rows]
    plugins = request.config.pluginmanager
    reporter = plugins.getplugin("terminalreporter")
    capture = plugins.getplugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_sep("=", "fault matrix")
        for line in lines:
            reporter.write_line(line)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("faults") / "world")
    os.makedirs(os.path.join(work, "mnt1"))
    os.makedirs(os.path.join(work, "mnt2"))
    ctx = faults.make_world(work)
    return work, ctx, state(open_pool(work))


class Learned:
    """What a clean run of an operation does: ``steps``, (flow index,
    step name) in the order they ran; ``flows``, (factory name, state of
    the world when it started) for each flow; ``after``, the views of
    the world it leaves."""

    def __init__(self, steps, flows, after):
        self.steps = steps
        self.flows = flows
        self.after = after


_LEARNED: dict[str, Learned] = {}


def learn(world, tmp_path, op):
    if op not in _LEARNED:
        work0, ctx, _ = world
        work = copy_world(work0, str(tmp_path / f"learn-{op}"))
        started: list[tuple[str, dict]] = []
        steps: list[tuple[int, str]] = []

        def on_change(event, details):
            if event == "RUNNING":
                steps.append((len(started) - 1, details["task_name"]))

        pool = open_pool(work, [faults.listener(on_change)])
        real = flows.FlowRunner.run

        def run(self, factory, *args, **kwargs):
            started.append((factory.__name__, state(pool)))
            return real(self, factory, *args, **kwargs)

        flows.FlowRunner.run = run
        try:
            OPS[op](pool, ctx)
        finally:
            flows.FlowRunner.run = real
        check_consistent(pool)
        _LEARNED[op] = Learned(steps, started, views(pool))
        shutil.rmtree(work)
    return _LEARNED[op]


def assert_same_world(pool, before):
    after = state(pool)
    files = set(after["files"]) ^ set(before["files"])
    assert not files, f"files added or removed: {sorted(files)}"
    for part in ("metadata", "views"):
        changed = sorted(k for k in set(after[part]) | set(before[part])
                         if after[part].get(k) != before[part].get(k))
        assert not changed, f"{part} changed: " + "; ".join(
            f"{k}: {before[part].get(k)} -> {after[part].get(k)}"
            for k in changed)
    check_consistent(pool)


# 1. A fault at every step of every flow


@pytest.mark.parametrize("op", sorted(OPS))
def test_fault_at_every_step(world, tmp_path, op):
    work0, ctx, _ = world
    learned = learn(world, tmp_path, op)
    assert learned.steps, "the operation ran no flow"
    failed = []
    for i, (flow, step) in enumerate(learned.steps):
        nth = sum(1 for _, s in learned.steps[:i + 1] if s == step)
        before = learned.flows[flow][1]
        label = step if nth == 1 else f"{step} (#{nth})"
        for when in WHEN:
            work = copy_world(work0, str(tmp_path / f"{i}-{when}"))
            try:
                outcome = fault_case(work, ctx, before, learned.after, op,
                                     step, nth, when)
            except AssertionError as e:
                outcome = "FAILED"
                failed.append(f"{label} ({when}): {e}")
            MATRIX.append((op, label, when, outcome))
            shutil.rmtree(work)
    assert not failed, "\n".join(failed)


def fault_case(work, ctx, before, reference, op, step, nth, when):
    """``before``: the world when the failing step's flow started;
    ``reference``: the views of the world a clean run leaves."""
    pool = open_pool(work)
    with failing_step(step, when, nth) as raised, \
            faults.counting_undos(UNDONE):
        with pytest.raises(Exception) as caught:
            OPS[op](pool, ctx)
    assert [name for name, _ in raised] == [step]
    forward = raised[0][1]
    error = caught.value
    if not forward:
        assert isinstance(error, faults.InjectedFault), repr(error)
        assert_same_world(open_pool(work), before)
        return "reverted"
    assert isinstance(error, errors.OperationIncomplete), repr(error)
    pending = list(pool.runner.unfinished())
    assert [p.detail.state for p in pending] == ["FAILURE"]
    # Everything the user can read reads as before, or as it will.
    halted = views(pool, halted=True)
    for key, value in halted.items():
        if key in reference:
            assert value == reference[key], f"{key} changed while halted"
        elif key.startswith("leaf:"):
            assert value == before["views"][key], f"{key} changed"
    pool = open_pool(work)
    assert pool.recover() == [(pending[0].name, "SUCCESS")]
    check_consistent(pool)
    assert views(pool) == reference
    return "halted; recover: SUCCESS"


def test_every_undo_ran(request):
    """Every undo action of the engine ran in the matrix (run after it)."""
    matrix = [i for i in request.session.items
              if i.originalname == "test_fault_at_every_step"]
    if len(matrix) != len(OPS):
        pytest.skip("the whole fault matrix did not run")
    assert sorted(UNDONE) == faults.UNDOS


def test_matrix_covers_every_flow(world, tmp_path):
    """Every factory of flows.FACTORIES but export_volume (not a pool
    operation) runs in the matrix; both merge directions are there."""
    seen = {name for op in OPS
            for name, _ in learn(world, tmp_path, op).flows}
    assert seen == set(flows.FACTORIES) - {"export_volume"}
    assert learn(world, tmp_path, "merge_stream").steps[1][1] == "rebase"
    assert learn(world, tmp_path, "merge_commit").steps[1][1] == "commit"


# 2. An undo that fails: the book is kept and recovery goes on reverting


UNDO_CASES = [
    # undo kind, operation, failing step, fault
    ("undo_create_volume", "create", "publish_image", "before"),
    ("undo_update_volume", "snapshot", "legalize", "before"),
    ("undo_make_image_dir", "clone", "legalize", "after"),
    ("undo_publish_image", "create", "publish_image", "after"),
    ("undo_link_volume", "thin_clone", "publish_image", "after"),
    ("undo_adopt_volume", "adopt", "publish_image", "before"),
]


@pytest.mark.parametrize("kind,op,step,when", UNDO_CASES,
                         ids=[c[0] for c in UNDO_CASES])
def test_failing_undo(world, tmp_path, kind, op, step, when):
    work0, ctx, before = world
    work = copy_world(work0, str(tmp_path / "w"))
    pool = open_pool(work)
    match = {}
    if kind == "undo_update_volume":
        # The freeze of the old leaf, not the legalize's own undo.
        match["vol_id"] = pool.leaf(ctx["sd"], ctx["img"]).vol_id
    with failing_step(step, when), \
            failing_undo(kind, **match) as undone:
        with pytest.raises(Exception) as caught:
            OPS[op](pool, ctx)
    assert undone == [kind]
    assert isinstance(caught.value, faults.InjectedFault), \
        repr(caught.value)
    pending = list(pool.runner.unfinished())
    assert [p.detail.state for p in pending] == ["FAILURE"]
    pool = open_pool(work)
    # Its images are refused until the flow is finished.
    for sd_id, img_id in pending[0].images:
        with pytest.raises(errors.ImageIsBusy):
            pool.delete_image(sd_id, img_id)
    assert pool.recover() == [(pending[0].name, "REVERTED")]
    assert_same_world(pool, before)
    MATRIX.append((op, step, f"{when}; {kind} fails once",
                   "kept; recover: REVERTED"))


def test_undo_fails_again_in_recovery(world, tmp_path):
    """A revert that fails during the operation and again during the
    first recovery: the book stays (FAILED); the next one reverts."""
    work0, ctx, before = world
    work = copy_world(work0, str(tmp_path / "w"))
    pool = open_pool(work)
    with failing_step("legalize", "after"), \
            failing_undo("undo_create_volume", times=2) as undone:
        with pytest.raises(faults.InjectedFault):
            OPS["clone"](pool, ctx)
        assert open_pool(work).recover() == [("clone", "FAILED")]
    assert undone == ["undo_create_volume"] * 2
    assert [p.detail.state for p in pool.runner.unfinished()] == \
        ["FAILURE"]
    pool = open_pool(work)
    assert pool.recover() == [("clone", "REVERTED")]
    assert_same_world(pool, before)
    MATRIX.append(("clone", "legalize", "after; undo fails twice",
                   "kept; recover: FAILED, then REVERTED"))


# 3. ENOSPC on a small filesystem; 4. EROFS in the middle of an operation


@pytest.fixture
def tmpfs(tmp_path):
    """``mnt2``: a 40 MiB tmpfs, unmounted at the end."""
    mnt = tmp_path / "mnt2"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m",
                           "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs (needs root with "
                    f"CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)],
                       capture_output=True)
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture
def small(tmp_path, tmpfs):
    """A pool whose master (and logbook) is on a normal directory and
    whose second domain is on the tmpfs, holding:

    ``full``: a 16 MiB qcow2 with 8 MiB of data (a clone needs 8 MiB);
    ``chain``: raw base (6 MiB) <- S1 layer (4 MiB) <- S2 layer <- leaf:
    deleting S1 commits 4 MiB into the base's holes;
    ``prealloc``: an 8 MiB preallocated raw volume.
    """
    mnt1 = tmp_path / "mnt1"
    mnt1.mkdir()
    pool = StoragePool.create(str(mnt1))
    sd2 = pool.add_domain(tmpfs).sd_id
    ids = {"sd2": sd2, "full": uid(), "chain": uid(), "prealloc": uid(),
           "s1": uid(), "s2": uid()}
    vol = pool.create_volume(sd2, ids["full"], 16 * MiB)
    qemuio.write_pattern(vol.path, "qcow2", 0, 8 * MiB, 0x61)
    vol = pool.create_volume(sd2, ids["chain"], 16 * MiB,
                             fmt=sc.VolumeFormat.RAW)
    qemuio.write_pattern(vol.path, "raw", 0, 6 * MiB, 0x71)
    pool.snapshot(sd2, ids["chain"], ids["s1"])
    vol = pool.leaf(sd2, ids["chain"])
    qemuio.write_pattern(vol.path, "qcow2", 8 * MiB, 4 * MiB, 0x72)
    pool.snapshot(sd2, ids["chain"], ids["s2"])
    vol = pool.leaf(sd2, ids["chain"])
    qemuio.write_pattern(vol.path, "qcow2", 14 * MiB, MiB, 0x73)
    vol = pool.create_volume(sd2, ids["prealloc"], 8 * MiB,
                             fmt=sc.VolumeFormat.RAW,
                             prealloc=sc.Preallocation.PREALLOCATED)
    qemuio.write_pattern(vol.path, "raw", 0, MiB, 0x81)
    return str(tmp_path), ids


def uid():
    return str(uuid.uuid4())


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(mount, leave):
    """Fill ``mount`` with a file until ``leave`` bytes are free."""
    path = os.path.join(mount, "filler")
    size = free_bytes(mount) - leave
    assert size > 0
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    return path


def is_enospc(error):
    text = str(error)
    return (getattr(error, "errno", None) == errno.ENOSPC
            or "No space left on device" in text)


def test_enospc_in_clone_is_reverted(small, tmpfs):
    work, ids = small
    pool = open_pool(work)
    before = state(pool)
    fill(tmpfs, 2 * MiB)
    free = free_bytes(tmpfs)
    with pytest.raises(errors.StorageError) as caught:
        pool.clone(ids["sd2"], ids["full"], uid())
    assert is_enospc(caught.value), caught.value
    pool = open_pool(work)
    assert_same_world(pool, before)
    assert free_bytes(tmpfs) >= free - 64 * 1024
    MATRIX.append(("clone", "convert", "ENOSPC", "reverted; space back"))


def test_enospc_in_commit_is_finished_by_recovery(small, tmpfs):
    work, ids = small
    pool = open_pool(work)
    before = views(pool)
    leaf_key = f"leaf:{ids['sd2']}:{ids['chain']}"
    filler = fill(tmpfs, 2 * MiB)
    with pytest.raises(errors.OperationIncomplete) as caught:
        pool.delete_snapshot(ids["sd2"], ids["chain"], ids["s1"])
    assert "No space left on device" in str(caught.value)
    assert views(pool)[leaf_key] == before[leaf_key]
    # Still no space: recovery fails again and keeps the book.
    assert open_pool(work).recover() == [("merge_commit", "FAILED")]
    assert views(pool)[leaf_key] == before[leaf_key]
    os.unlink(filler)
    pool = open_pool(work)
    assert pool.recover() == [("merge_commit", "SUCCESS")]
    check_consistent(pool)
    after = views(pool)
    assert ids["s1"] not in after
    assert after[leaf_key] == before[leaf_key]
    assert after[ids["s2"]] == before[ids["s2"]]
    leaf = pool.leaf(ids["sd2"], ids["chain"])
    for offset, length, pattern in ((0, 6, 0x71), (8, 4, 0x72),
                                    (14, 1, 0x73)):
        qemuio.verify_pattern(leaf.path, "qcow2", offset * MiB,
                              length * MiB, pattern)
    MATRIX.append(("merge_commit", "commit", "ENOSPC",
                   "halted; FAILED until space freed; SUCCESS"))


def test_enospc_in_preallocated_extend(small, tmpfs):
    work, ids = small
    pool = open_pool(work)
    before = state(pool)
    fill(tmpfs, 2 * MiB)
    with pytest.raises(errors.StorageError) as caught:
        pool.extend(ids["sd2"], ids["prealloc"], 24 * MiB)
    assert is_enospc(caught.value), caught.value
    pool = open_pool(work)
    leaf = pool.leaf(ids["sd2"], ids["prealloc"])
    assert leaf.legal and leaf.meta.capacity == 8 * MiB
    assert qemuimg.info(leaf.path, "raw").virtual_size == 8 * MiB
    qemuio.verify_pattern(leaf.path, "raw", 0, MiB, 0x81)
    assert_same_world(pool, before)
    MATRIX.append(("extend", "resize", "ENOSPC", "reverted"))


def remounter(mount, step, done):
    """A listener factory: remount ``mount`` read-only when ``step``
    starts."""
    def on_change(event, details):
        if details.get("task_name") == step and event == "RUNNING" \
                and not done:
            subprocess.run(["mount", "-o", "remount,ro", mount],
                           check=True)
            done.append(step)
    return faults.listener(on_change)


EROFS_CASES = [
    # operation, step that finds the domain read-only, outcome
    ("clone", "convert", "REVERTED"),
    ("create", "create_volume", "REVERTED"),
    ("merge_commit", "commit", "SUCCESS"),
    ("merge_commit", "remove_volume", "SUCCESS"),
]


@pytest.mark.parametrize("op,step,outcome", EROFS_CASES)
def test_erofs_in_the_middle(small, tmpfs, op, step, outcome):
    work, ids = small
    pool = open_pool(work)
    before = state(pool)
    done: list[str] = []
    pool = open_pool(work, [remounter(tmpfs, step, done)])
    new = uid()
    run = {
        "clone": lambda: pool.clone(ids["sd2"], ids["full"], new),
        "create": lambda: pool.create_volume(ids["sd2"], new, 16 * MiB),
        "merge_commit": lambda: pool.delete_snapshot(
            ids["sd2"], ids["chain"], ids["s1"]),
    }[op]
    with pytest.raises(Exception) as caught:
        run()
    assert done == [step]
    error = caught.value
    assert isinstance(error, (OSError, errors.StorageError)), repr(error)
    assert (getattr(error, "errno", None) == errno.EROFS
            or "Read-only file system" in str(error)), error
    pending = list(pool.runner.unfinished())
    assert [p.detail.state for p in pending] == ["FAILURE"]
    subprocess.run(["mount", "-o", "remount,rw", tmpfs], check=True)
    pool = open_pool(work)
    assert pool.recover() == [(pending[0].name, outcome)]
    check_consistent(pool)
    if outcome == "REVERTED":
        assert_same_world(pool, before)
    else:
        after = views(pool)
        assert ids["s1"] not in after
        for key, value in after.items():
            assert value == before["views"][key], key
    MATRIX.append((op, step, "EROFS", f"{type(error).__name__}, kept; "
                   f"recover: {outcome}"))


# 5. Killed while reverting, killed while recovering


REVERT_KILLS = [
    # operation, failing step, step whose revert is killed
    ("create", "publish_image", "make_image_dir"),
    ("clone", "legalize", "create_volume"),
    ("clone", "convert", "convert"),
    ("snapshot", "legalize", "freeze_leaf"),
    ("thin_clone", "publish_image", "link_volume"),
    ("revert", "legalize", "invalidate_leaf"),
    ("extend", "resize", "invalidate"),
]


@pytest.mark.parametrize("op,fail,kill", REVERT_KILLS)
def test_killed_while_reverting(world, tmp_path, op, fail, kill):
    work0, ctx, before = world
    work = copy_world(work0, str(tmp_path / "w"))
    child = faults.run_child(work, "revert-kill", op, fail, kill)
    assert child.returncode == -9, child.stderr[-2000:]
    pool = open_pool(work)
    pending = list(pool.runner.unfinished())
    assert len(pending) == 1
    assert pool.recover() == [(pending[0].name, "REVERTED")]
    assert_same_world(pool, before)
    MATRIX.append((op, fail, f"killed reverting {kill}",
                   "recover: REVERTED"))


RECOVER_KILLS = [
    # operation, halting step, kill point in the recovery
    ("merge_commit", "commit", "remove_volume", "RUNNING"),
    ("merge_commit", "commit", "progress", "30"),
    ("merge_stream", "rebase", "validate_top", "SUCCESS"),
    ("move", "remove_source", "remove_source", "RUNNING"),
]


@pytest.mark.parametrize("op,halt,kill,when", RECOVER_KILLS)
def test_killed_while_recovering(world, tmp_path, op, halt, kill, when):
    work0, ctx, _ = world
    reference = learn(world, tmp_path, op).after
    work = copy_world(work0, str(tmp_path / "w"))
    pool = open_pool(work)
    with failing_step(halt), pytest.raises(errors.OperationIncomplete):
        OPS[op](pool, ctx)
    child = faults.run_child(work, "recover-kill", kill, when)
    assert child.returncode == -9, child.stderr[-2000:]
    pool = open_pool(work)
    assert pool.recover() == [(flow_name(op), "SUCCESS")]
    check_consistent(pool)
    assert views(pool) == reference
    MATRIX.append((op, halt, f"recovery killed at {kill} {when}",
                   "recover: SUCCESS"))


def flow_name(op):
    return {"move": "copy_image"}.get(op, op)


def test_killed_while_recovering_a_revert(world, tmp_path):
    """A revert that failed, then a recovery killed while reverting."""
    work0, ctx, before = world
    work = copy_world(work0, str(tmp_path / "w"))
    pool = open_pool(work)
    with failing_step("publish_image", "after"), \
            failing_undo("undo_create_volume"), \
            pytest.raises(faults.InjectedFault):
        OPS["create"](pool, ctx)
    child = faults.run_child(work, "recover-kill", "make_image_dir",
                             "REVERTING")
    assert child.returncode == -9, child.stderr[-2000:]
    pool = open_pool(work)
    assert pool.recover() == [("create_image", "REVERTED")]
    assert_same_world(pool, before)
    MATRIX.append(("create", "publish_image",
                   "undo fails; recovery killed reverting",
                   "recover: REVERTED"))


@pytest.mark.parametrize("op", ["extend", "snapshot", "create"])
def test_enospc_in_a_metadata_write(small, tmpfs, op):
    """Not a byte free: the first metadata write of the flow fails."""
    work, ids = small
    pool = open_pool(work)
    before = state(pool)
    fill(tmpfs, 0)
    run = {
        "extend": lambda: pool.extend(ids["sd2"], ids["full"], 32 * MiB),
        "snapshot": lambda: pool.snapshot(ids["sd2"], ids["full"], uid()),
        "create": lambda: pool.create_volume(ids["sd2"], uid(), 16 * MiB),
    }[op]
    with pytest.raises(OSError) as caught:
        run()
    assert caught.value.errno == errno.ENOSPC
    pool = open_pool(work)
    assert_same_world(pool, before)
    MATRIX.append((op, "first metadata write", "ENOSPC, 0 free",
                   "reverted"))
