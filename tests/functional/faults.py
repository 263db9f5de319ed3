"""Fault injection for the flows of the engine, and a child that dies.

Faults are injected at the engine's boundary: :func:`failing_step`
replaces :meth:`flows.Step.execute` so that one named step raises
``OSError(EIO)`` (before or after doing its work), :func:`failing_undo`
makes one ``actions.undo_*`` raise once. (A TaskFlow listener cannot
inject a failure: the notifier logs and swallows what a callback raises.)

The world every test starts from (:func:`make_world`): a pool of two
domains (``mnt1`` master, ``mnt2``) with

- ``img``: a raw base and three qcow2 layers, each a snapshot, then the
  leaf (as test_crash's golden world: deleting snapshot 0 streams,
  deleting snapshot 1 commits);
- ``tmpl``: a template (one SHARED raw volume), and ``thin``, an image
  over it (copying it copies the template first: two flows);
- ``img2``: snapshot A with two children, an anonymous layer (a deleted
  snapshot) under snapshot C, and the leaf: deleting A only hides it
  (update_volume flow), deleting C removes C and the layer under it
  (remove_volume flow).
- ``sd4``: a V4 domain next to ``mnt2``'s (ovirt_fixtures.
  make_v4_domain) with a snapshot chain and an image over a template,
  for ``upgrade`` (upgrade_domain flow).

The child process::

    python -m tests.functional.faults WORKDIR revert-kill OP FAIL KILL
        run OP with step FAIL failing; SIGKILL when the revert of step
        KILL starts
    python -m tests.functional.faults WORKDIR recover-kill STEP STATE
        run pool.recover(); SIGKILL when STEP reaches STATE, or, with
        STEP "progress", the process group once a copy reported STATE
        percent
    python -m tests.functional.faults WORKDIR counters-kill OP NTH
        run OP; SIGKILL at its NTH write of a domain's counters: after
        the metadata change it counts, before the record is written

Exit code 3: the kill point was never reached.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid

from ovirt_cinder.storage import actions
from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import counters
from ovirt_cinder.storage import flows
from ovirt_cinder.storage import fsck
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage.pool import FLOWS_DIR
from ovirt_cinder.storage.pool import StoragePool
from tests import ovirt_fixtures
from tests import qemuio
from tests.functional.conftest import assert_counters
from tests.listeners import listener

MiB = sc.MiB
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
# New ids the operations use (fixed: a check knows what to look for).
NEW_IMG = "0a0a0a0a-0000-4000-8000-0000000000f1"
NEW_SNAP = "0a0a0a0a-0000-4000-8000-0000000000f2"


# Faults


class InjectedFault(OSError):
    """The EIO a faulty step raises (an OSError, as a failing disk's)."""

    def __init__(self, where: str) -> None:
        super().__init__(errno.EIO, f"injected fault: {where}")
        self.where = where


@contextlib.contextmanager
def failing_step(name, when="before", nth=1):
    """Make the ``nth`` run of a step named ``name`` (an operation that
    runs several flows may repeat names) raise InjectedFault: ``before``
    doing anything, or ``after`` doing its work. Yields the list of
    faults raised, as (step name, step is forward)."""
    real = flows.Step.execute
    raised = []
    runs = [0]

    @functools.wraps(real)
    def execute(self, ctx, **kwargs):
        if self.name == name:
            runs[0] += 1
        if self.name != name or runs[0] != nth:
            return real(self, ctx, **kwargs)
        if when == "after":
            real(self, ctx, **kwargs)
        raised.append((self.name, self.forward))
        raise InjectedFault(f"{when} step {self.name}")

    flows.Step.execute = execute
    try:
        yield raised
    finally:
        flows.Step.execute = real


@contextlib.contextmanager
def failing_undo(kind, times=1, **match):
    """Make ``actions.<kind>`` raise InjectedFault ``times`` times, on
    calls whose keyword arguments include ``match``. Yields the list of
    faults raised."""
    real = getattr(actions, kind)
    raised = []

    @functools.wraps(real)
    def undo(ctx, *args, **kwargs):
        if len(raised) < times and all(
                kwargs.get(k) == v for k, v in match.items()):
            raised.append(kind)
            raise InjectedFault(f"in {kind}")
        return real(ctx, *args, **kwargs)

    setattr(actions, kind, undo)
    try:
        yield raised
    finally:
        setattr(actions, kind, real)


UNDOS = sorted(n for n in dir(actions)
               if n.startswith("undo_") or n == "noop")


@contextlib.contextmanager
def counting_undos(counts):
    """Count the calls of every ``actions.undo_*`` (and ``noop``) into
    the dict ``counts`` while the context lasts."""
    reals = {n: getattr(actions, n) for n in UNDOS}

    def counted(name, real):
        @functools.wraps(real)
        def undo(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return real(*args, **kwargs)
        return undo

    for name, real in reals.items():
        setattr(actions, name, counted(name, real))
    try:
        yield counts
    finally:
        for name, real in reals.items():
            setattr(actions, name, real)


@contextlib.contextmanager
def counting_writes(kill_at=None):
    """Count the writes of domains' counters (yields a list holding the
    count); SIGKILL this process at write number ``kill_at``."""
    real = counters.write
    count = [0]

    @functools.wraps(real)
    def write(*args, **kwargs):
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    counters.write = write
    try:
        yield count
    finally:
        counters.write = real


def killer(task_name, state):
    """A listener factory: SIGKILL this process at (task, state)."""
    def on_change(event, details):
        if details.get("task_name") == task_name and event == state:
            os.kill(os.getpid(), signal.SIGKILL)
    return listener(on_change)


# The world


def make_world(work):
    """Build the world described in the module docstring under ``work``
    (``mnt1``, ``mnt2`` must exist); return its ids (also saved in
    ``work/ctx.json``)."""
    pool = StoragePool.create(os.path.join(work, "mnt1"))
    sd2 = pool.add_domain(os.path.join(work, "mnt2")).sd_id
    sd = pool.master.sd_id
    img = str(uuid.uuid4())
    pool.create_volume(sd, img, 16 * MiB, fmt=sc.VolumeFormat.RAW)
    snaps = []
    for i in range(3):
        leaf = pool.leaf(sd, img)
        length = 3 * MiB if i == 1 else MiB
        qemuio.write_pattern(leaf.path, leaf.qemu_format, i * 4 * MiB,
                             length, 0x20 + i)
        snaps.append(str(uuid.uuid4()))
        pool.snapshot(sd, img, snaps[-1])
    leaf = pool.leaf(sd, img)
    qemuio.write_pattern(leaf.path, "qcow2", 12 * MiB, MiB, 0x2f)
    raw_file = os.path.join(work, "src.raw")
    qemuimg.create(raw_file, "raw", 16 * MiB)
    qemuio.write_pattern(raw_file, "raw", 0, MiB, 0x42)
    tmpl = str(uuid.uuid4())
    pool.import_volume(sd, tmpl, raw_file, "raw", 16 * MiB,
                       voltype=sc.VolumeType.SHARED)
    thin = str(uuid.uuid4())
    leaf = pool.thin_clone(sd, tmpl, thin)
    qemuio.write_pattern(leaf.path, "qcow2", 8 * MiB, MiB, 0x44)
    # img2: A <- X(hidden) <- C, and A <- leaf.
    img2 = str(uuid.uuid4())
    pool.create_volume(sd, img2, 16 * MiB)
    snap_a, snap_x, snap_c = (str(uuid.uuid4()) for _ in range(3))
    for i, snap in enumerate((snap_a, snap_x, snap_c)):
        leaf = pool.leaf(sd, img2)
        qemuio.write_pattern(leaf.path, "qcow2", i * 2 * MiB, MiB,
                             0x51 + i)
        pool.snapshot(sd, img2, snap)
    pool.revert_to_snapshot(sd, img2, snap_x)
    pool.delete_snapshot(sd, img2, snap_x)
    pool.revert_to_snapshot(sd, img2, snap_a)
    leaf = pool.leaf(sd, img2)
    qemuio.write_pattern(leaf.path, "qcow2", 6 * MiB, MiB, 0x55)
    ctx = {"sd": sd, "sd2": sd2, "img": img, "snaps": snaps, "tmpl": tmpl,
           "raw_file": raw_file, "thin": thin, "img2": img2,
           "snap_a": snap_a, "snap_c": snap_c,
           # A V4 domain next to sd2, for upgrade.
           "sd4": ovirt_fixtures.make_v4_domain(
               pool, os.path.join(work, "mnt2"), raw_file)}
    with open(os.path.join(work, "ctx.json"), "w") as f:
        json.dump(ctx, f)
    return ctx


def load_ctx(work):
    with open(os.path.join(work, "ctx.json")) as f:
        return json.load(f)


def copy_world(src, dst):
    # cp keeps the holes of sparse files and the template's hard links.
    subprocess.run(["cp", "-a", src, dst], check=True)
    return dst


def open_pool(work, listeners=(), flow_connection=None):
    return StoragePool.open([os.path.join(work, "mnt1"),
                             os.path.join(work, "mnt2")],
                            listeners=listeners,
                            flow_connection=flow_connection)


# Operations


def op_create(pool, ctx):
    pool.create_volume(ctx["sd"], NEW_IMG, 16 * MiB)


def op_import(pool, ctx):
    pool.import_volume(ctx["sd"], NEW_IMG, ctx["raw_file"], "raw",
                       16 * MiB, voltype=sc.VolumeType.SHARED)


def op_adopt(pool, ctx):
    # As the Glance store does: a staged file on the domain's filesystem
    # is moved in, and removed if the operation fails.
    staged = os.path.join(pool.domain(ctx["sd"]).mount,
                          f".tmp-{ctx['sd']}-upload-fault")
    shutil.copyfile(ctx["raw_file"], staged)
    try:
        pool.adopt_volume(ctx["sd"], NEW_IMG, staged, 16 * MiB,
                          voltype=sc.VolumeType.SHARED)
    finally:
        if os.path.exists(staged):
            os.unlink(staged)


def op_snapshot(pool, ctx):
    pool.snapshot(ctx["sd"], ctx["img"], NEW_SNAP)


def op_merge_commit(pool, ctx):
    pool.delete_snapshot(ctx["sd"], ctx["img"], ctx["snaps"][1])


def op_merge_stream(pool, ctx):
    pool.delete_snapshot(ctx["sd"], ctx["img"], ctx["snaps"][0])


def op_hide_snapshot(pool, ctx):
    """A snapshot with two children: the update_volume flow."""
    pool.delete_snapshot(ctx["sd"], ctx["img2"], ctx["snap_a"])


def op_drop_snapshot(pool, ctx):
    """A childless snapshot over an anonymous layer only it keeps alive:
    the remove_volume flow, two volumes."""
    pool.delete_snapshot(ctx["sd"], ctx["img2"], ctx["snap_c"])


def op_revert(pool, ctx):
    pool.revert_to_snapshot(ctx["sd"], ctx["img"], ctx["snaps"][0])


def op_clone(pool, ctx):
    pool.clone(ctx["sd"], ctx["img"], NEW_IMG, snap_id=ctx["snaps"][1])


def op_clone_sd2(pool, ctx):
    pool.clone(ctx["sd"], ctx["img"], NEW_IMG, snap_id=ctx["snaps"][1],
               dst_sd_id=ctx["sd2"])


def op_thin_clone(pool, ctx):
    pool.thin_clone(ctx["sd"], ctx["tmpl"], NEW_IMG)


def op_extend(pool, ctx):
    pool.extend(ctx["sd"], ctx["img"], 32 * MiB)


def op_copy(pool, ctx):
    pool.copy_image(ctx["sd"], ctx["img"], ctx["sd2"])


def op_copy_thin(pool, ctx):
    """Two flows: the template is copied first, then the image over it."""
    pool.copy_image(ctx["sd"], ctx["thin"], ctx["sd2"])


def op_move(pool, ctx):
    pool.copy_image(ctx["sd"], ctx["img"], ctx["sd2"], move=True)


def op_delete(pool, ctx):
    pool.delete_image(ctx["sd"], ctx["img"])


def op_upgrade(pool, ctx):
    pool.upgrade_domain(ctx["sd4"])


OPS = {name[3:]: fn for name, fn in globals().items()
       if name.startswith("op_")}


# Looking at the world


def digest(vol, scratch=None):
    """sha256 of a volume's guest view (its whole chain)."""
    return qemuio.view_digest(vol.path, vol.qemu_format,
                              scratch or _scratch())


def _scratch():
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def views(pool, halted=False):
    """sha256 of every snapshot's, template's and legal leaf's view:
    ``snap_id``, ``tmpl:<img>``, ``leaf:<sd>:<img>``."""
    result = {}
    for sd_id in sorted(pool.domains):
        for img_id in pool.list_images(sd_id):
            tree = pool.image(sd_id, img_id)
            for snap_id, vol in tree.snapshots().items():
                result[snap_id] = digest(vol)
            tmpl = tree.template()
            if tmpl:
                result[f"tmpl:{img_id}"] = digest(tmpl)
                continue
            # The legal leaf; while a flow is halted, the leaf it made
            # ILLEGAL (the data the user has).
            leaves = [v for v in tree.own_volumes()
                      if v.meta.voltype == sc.VolumeType.LEAF]
            legal = [v for v in leaves if v.legal]
            leaves = legal if legal or not halted else leaves
            key = f"leaf:{sd_id}:{img_id}"
            result[key] = (digest(leaves[0]) if len(leaves) == 1
                           else f"{len(leaves)} legal leaves")
    return result


_FIELDS = ("image", "parent", "capacity", "format", "type", "voltype",
           "legality", "description", "disktype")


def metadata(pool):
    """Every volume's metadata but its generation and ctime."""
    result = {}
    for sd_id in sorted(pool.domains):
        for img_id in pool.list_images(sd_id):
            for vol_id, vol in pool.image(sd_id, img_id).volumes.items():
                result[f"{sd_id}/{img_id}/{vol_id}"] = tuple(
                    str(getattr(vol.meta, f)) for f in _FIELDS)
    return result


def files(pool):
    """Every name under the domains, but the logbook's."""
    found = []
    for dom in pool.domains.values():
        skip = os.path.join(dom.master_dir, FLOWS_DIR)
        for root, dirs, names in os.walk(dom.path):
            dirs[:] = [d for d in dirs if os.path.join(root, d) != skip]
            found += [os.path.relpath(os.path.join(root, n), dom.mount)
                      for n in dirs + names]
    return sorted(found)


def state(pool):
    return {"views": views(pool), "metadata": metadata(pool),
            "files": files(pool)}


def check_consistent(pool):
    """fsck clean, one legal leaf per image, no work in progress, and
    counters that match a scan."""
    report = fsck.check(pool)
    assert report.clean, [p.as_dict() for p in report.problems]
    assert_counters(pool)
    for sd_id in pool.domains:
        for img_id in pool.list_images(sd_id):
            tree = pool.image(sd_id, img_id)
            assert tree.check() == []
            assert tree.problems() == []
            assert all(v.legal for v in tree.volumes.values())
    assert list(pool.runner.unfinished()) == []


# The child


def main():
    work, mode = sys.argv[1:3]
    ctx = load_ctx(work)
    if mode == "revert-kill":
        op, fail, kill = sys.argv[3:6]
        pool = open_pool(work, [killer(kill, "REVERTING")])
        with failing_step(fail):
            try:
                OPS[op](pool, ctx)
            except Exception as e:
                print(f"not killed: {e!r}", file=sys.stderr)
    elif mode == "recover-kill":
        step, when = sys.argv[3:5]
        if step == "progress":
            def on_progress(percent):
                if percent >= float(when):
                    os.killpg(0, signal.SIGKILL)
            actions.progress_callback = on_progress
            pool = open_pool(work)
        else:
            pool = open_pool(work, [killer(step, when)])
        print(pool.recover(), file=sys.stderr)
    elif mode == "counters-kill":
        op, nth = sys.argv[3], int(sys.argv[4])
        pool = open_pool(work)
        with counting_writes(kill_at=nth):
            OPS[op](pool, ctx)
    else:
        sys.exit(f"unknown mode {mode}")
    sys.exit(3)


def run_child(work, *args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "tests.functional.faults", work, *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        start_new_session=True)


if __name__ == "__main__":
    main()
