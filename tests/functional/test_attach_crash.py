"""Crash and fault matrices of the live operations: the process that runs
a snapshot, a merge or an extend of an attached image is SIGKILLed before
and after each of its steps, or the step fails (EIO) before or after its
work so that the undos run, while the image's daemon goes on serving the
guest.

After each kill or failure, ``recover`` finishes or reverts the flow and
then:

- every volume is LEGAL and the daemon serves exactly the chain the
  metadata names;
- the guest's view is unchanged, and stays so after a detach and a new
  attach (the data is in the chain, not only in the daemon);
- every snapshot that still exists holds what it held;
- retrying the operation (as a user retries a failed Cinder call) leaves
  no temporary snapshot behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from ovirt_cinder.storage import attach
from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import description
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import flows
from ovirt_cinder.storage import validate
from tests.functional import crash_ops
from tests.functional import faults
from tests.functional import live_crash_ops
from tests.qemuio import view_digest
from tests.qemuio import write_pattern

MiB = sc.MiB
SIZE = 16 * MiB
REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


@contextlib.contextmanager
def world(tmp_path):
    """A pool with an image [base(S1), L1(S2), L2] served by a daemon."""
    run = tempfile.mkdtemp(prefix="oc-", dir="/tmp")
    os.symlink(run, tmp_path / "run")
    (tmp_path / "mnt").mkdir()
    from ovirt_cinder.storage.pool import StoragePool
    pool = StoragePool.create(str(tmp_path / "mnt"), run_path=run)
    sd_id, img = pool.master.sd_id, validate.new_uuid()
    base = pool.create_volume(sd_id, img, SIZE, fmt=sc.VolumeFormat.RAW)
    write_pattern(base.path, "raw", 0, SIZE, 0x11)
    snaps = []
    for offset, pattern in ((MiB, 0x22), (2 * MiB, 0x33)):
        snaps.append(validate.new_uuid())
        pool.snapshot(sd_id, img, snaps[-1])
        leaf = pool.leaf(sd_id, img)
        write_pattern(leaf.path, "qcow2", offset, MiB, pattern)
    ctx = {"sd": sd_id, "img": img, "snaps": snaps}
    (tmp_path / "ctx.json").write_text(json.dumps(ctx))
    try:
        yield pool, ctx, pool.attach(sd_id, img), str(tmp_path)
    finally:
        att = attach.Attachments(run)
        for img_id in att.images():
            att.stop(img_id)
        shutil.rmtree(run, ignore_errors=True)


def digest(path, length=SIZE):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(length)).hexdigest()


def snapshot_digests(pool, ctx, scratch):
    tree = pool.image(ctx["sd"], ctx["img"])
    return {snap: view_digest(vol.path, vol.qemu_format, scratch)
            for snap, vol in tree.snapshots().items()
            if not description.get(vol.meta.description, "temp")}


def steps_of(op, tmp_path_factory):
    """The names of the steps an operation runs, in order, from a run of
    its own on a fresh world."""
    names = []
    with world(tmp_path_factory.mktemp(f"steps-{op}")) as (_p, ctx, _v,
                                                            workdir):
        live = live_crash_ops.open_pool(workdir,
                                        [crash_ops.recorder(names)])
        live_crash_ops.OPS[op](live, ctx)
    return names


def cases():
    return [(op, state) for op in sorted(live_crash_ops.OPS)
            for state in ("RUNNING", "SUCCESS")]


@pytest.mark.parametrize("op,state", cases())
def test_live_crash_matrix(op, state, tmp_path_factory):
    names = steps_of(op, tmp_path_factory)
    assert names
    for nth, name in enumerate(names, 1):
        _crash_case(op, nth, name, state, tmp_path_factory)


def _crash_case(op, nth, name, state, tmp_path_factory):
    work = tmp_path_factory.mktemp("case")
    with world(work) as (pool, ctx, view, workdir):
        scratch = str(work)
        before = digest(view)
        snaps_before = snapshot_digests(pool, ctx, scratch)
        proc = subprocess.run(
            [sys.executable, "-m", "tests.functional.live_crash_ops",
             workdir, op, str(nth), state], cwd=REPO,
            capture_output=True, text=True, timeout=120)
        where = f"{op} killed at step {nth} ({name}) {state}"
        assert proc.returncode == -9, (where, proc.returncode, proc.stderr)
        outcomes = pool.recover()
        assert all(o in (flows.states.SUCCESS, flows.states.REVERTED)
                   for _, o in outcomes), (where, outcomes)
        _check(pool, ctx, view, before, snaps_before, scratch, where)
        # A retry finishes what the user asked for.
        _retry(pool, ctx, op)
        _check(pool, ctx, view, before, snaps_before, scratch, where)
        assert not [s for s, v in pool.image(ctx["sd"], ctx["img"])
                    .snapshots().items()
                    if description.get(v.meta.description, "temp")], where
        pool.detach(ctx["sd"], ctx["img"])
        view = pool.attach(ctx["sd"], ctx["img"])
        assert digest(view) == before, where


@contextlib.contextmanager
def failing_nth_step(nth, when):
    """Make the ``nth`` step run (from 1, across flows) raise EIO,
    ``before`` doing anything or ``after`` doing its work."""
    real = flows.Step.execute
    runs = [0]

    def execute(self, ctx, **kwargs):
        runs[0] += 1
        if runs[0] != nth:
            return real(self, ctx, **kwargs)
        if when == "after":
            real(self, ctx, **kwargs)
        raise faults.InjectedFault(f"{when} step {self.name}")

    flows.Step.execute = execute
    try:
        yield
    finally:
        flows.Step.execute = real


@pytest.mark.parametrize("op,when", [
    (op, when) for op in sorted(live_crash_ops.OPS)
    for when in ("before", "after")])
def test_live_fault_matrix(op, when, tmp_path_factory):
    names = steps_of(op, tmp_path_factory)
    for nth, name in enumerate(names, 1):
        work = tmp_path_factory.mktemp("fault")
        with world(work) as (pool, ctx, view, _workdir):
            scratch = str(work)
            before = digest(view)
            snaps_before = snapshot_digests(pool, ctx, scratch)
            where = f"{op}: step {nth} ({name}) fails {when} its work"
            with failing_nth_step(nth, when), \
                    pytest.raises((faults.InjectedFault,
                                   errors.OperationIncomplete)):
                live_crash_ops.OPS[op](pool, ctx)
            outcomes = pool.recover()
            assert all(o == flows.states.SUCCESS for _, o in outcomes), \
                (where, outcomes)
            _check(pool, ctx, view, before, snaps_before, scratch, where)
            _retry(pool, ctx, op)
            _check(pool, ctx, view, before, snaps_before, scratch, where)


def _retry(pool, ctx, op):
    try:
        live_crash_ops.OPS[op](pool, ctx)
    except errors.SnapshotNotFound:
        pass    # the deletion was finished by recovery
    except errors.InvalidOperation:
        pass    # the snapshot was taken by recovery


def _check(pool, ctx, view, before, snaps_before, scratch, where):
    tree = pool.image(ctx["sd"], ctx["img"])
    assert not tree.problems(), where
    assert all(v.legal for v in tree.volumes.values()), where
    daemon = pool.attachments.daemon(ctx["img"])
    assert daemon is not None, where
    assert daemon.chain() == [v.vol_id for v in reversed(tree.chain())], \
        where
    assert digest(view) == before, where
    now = snapshot_digests(pool, ctx, scratch)
    for snap, value in now.items():
        if snap in snaps_before:
            assert value == snaps_before[snap], (where, snap)
