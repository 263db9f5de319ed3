"""Crash matrix: every operation killed at every task boundary.

For each operation the test first runs it once to learn its task names,
then for every task and for "before" (RUNNING) and "after" (SUCCESS) it
runs the operation in a child process that SIGKILLs itself there. After
each kill, ``fsck.repair`` (which finishes or reverts the persisted flow,
then removes garbage) must leave every domain clean, every snapshot that
existed before with the same data, and the operation either done or not
visible at all: in every domain, every image's leaf, snapshot and template
view is what it was unless the operation itself changes it, and what the
operation adds has the data it must have (``effects``). The matrix is
printed at the end of the run.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import fsck
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage.pool import StoragePool
from tests import ovirt_fixtures
from tests import qemuio
from tests.functional import crash_ops
from tests.functional.conftest import assert_counters
from tests.functional.conftest import leftovers

MiB = sc.MiB
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

MATRIX: list[tuple[str, str, str, str]] = []


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A pool with a 3-snapshot chain, a template and a second domain;
    an image with a side branch (``img_b``) and one over the template
    (``thin``); a V4 domain (``sd4``, next to the second) with a chain
    and an image over a template, for ``upgrade``."""
    work = str(tmp_path_factory.mktemp("golden"))
    mnt1, mnt2 = os.path.join(work, "mnt1"), os.path.join(work, "mnt2")
    os.mkdir(mnt1)
    os.mkdir(mnt2)
    pool = StoragePool.create(mnt1)
    sd2 = pool.add_domain(mnt2).sd_id
    sd = pool.master.sd_id
    img = str(uuid.uuid4())
    pool.create_volume(sd, img, 16 * MiB, fmt=sc.VolumeFormat.RAW)
    snaps = []
    for i in range(3):
        leaf = pool.leaf(sd, img)
        # The second layer holds the most data: deleting snapshot 0
        # streams the small base into it, deleting snapshot 1 commits
        # the small third layer into it.
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
    img_b, b_snaps = branched_image(pool, sd)
    thin = str(uuid.uuid4())
    leaf = pool.thin_clone(sd, tmpl, thin)
    qemuio.write_pattern(leaf.path, "qcow2", 2 * MiB, MiB, 0x70)
    ctx = {"sd": sd, "sd2": sd2, "img": img, "snaps": snaps, "tmpl": tmpl,
           "raw_file": raw_file, "img_b": img_b, "b_snaps": b_snaps,
           "thin": thin,
           "sd4": ovirt_fixtures.make_v4_domain(pool, mnt2, raw_file)}
    with open(os.path.join(work, "ctx.json"), "w") as f:
        json.dump(ctx, f)
    # Every view by (domain, image, snapshot id | "leaf" | "template"),
    # for check_views (not given to the children).
    ctx["views"] = full_views(pool)
    return work, ctx, legacy_views(ctx["views"])


def branched_image(pool, sd):
    """An image whose snapshot b0 has two children, and whose snapshot
    b2 hangs on a side branch over an anonymous layer::

        V0 (b0) <- V1 (no snapshot) <- V2 (b2)
           ^----- leaf
    """
    img = str(uuid.uuid4())
    pool.create_volume(sd, img, 16 * MiB, fmt=sc.VolumeFormat.RAW)
    snaps = [str(uuid.uuid4()) for _ in range(3)]
    for i, snap in enumerate(snaps):
        leaf = pool.leaf(sd, img)
        qemuio.write_pattern(leaf.path, leaf.qemu_format, i * 4 * MiB, MiB,
                             0x60 + i)
        pool.snapshot(sd, img, snap)
    leaf = pool.revert_to_snapshot(sd, img, snaps[1])
    qemuio.write_pattern(leaf.path, "qcow2", 12 * MiB, MiB, 0x63)
    pool.delete_snapshot(sd, img, snaps[1])     # V1 has 2 children
    leaf = pool.revert_to_snapshot(sd, img, snaps[0])
    qemuio.write_pattern(leaf.path, "qcow2", 12 * MiB, MiB, 0x64)
    tree = pool.image(sd, img)
    v0 = tree.find_snapshot(snaps[0])
    assert len(tree.children(v0.vol_id)) == 2
    assert sorted(tree.snapshots()) == sorted([snaps[0], snaps[2]])
    return img, snaps


def views(pool, ctx):
    """sha256 of every snapshot's and template's guest view, by id."""
    return legacy_views(full_views(pool))


def full_views(pool):
    """sha256 of every guest view: {(sd_id, img_id, what): sha}, where
    what is a snapshot id, "leaf" (the active layer) or "template"."""
    result = {}
    for sd_id, dom in pool.domains.items():
        root = os.path.dirname(dom.mount)
        for img_id in pool.list_images(sd_id):
            tree = pool.image(sd_id, img_id)
            for snap_id, vol in tree.snapshots().items():
                result[(sd_id, img_id, snap_id)] = cached_digest(
                    root, tree, vol)
            tmpl = tree.template()
            if tmpl:
                result[(sd_id, img_id, "template")] = cached_digest(
                    root, tree, tmpl)
            else:
                result[(sd_id, img_id, "leaf")] = cached_digest(
                    root, tree, tree.leaf())
    return result


_DIGESTS: dict[tuple, str] = {}


def cached_digest(root, tree, vol):
    """digest(vol), remembered by the name (below the world's directory),
    size and mtime of every file of its chain: the matrix copies the
    golden world with ``cp -a``, which keeps mtimes, and any write to a
    file changes its mtime, so only views whose files an operation wrote
    are read again."""
    files = []
    for v in tree.chain(vol.vol_id):
        st = os.stat(v.path)
        files.append((os.path.relpath(v.path, root), v.qemu_format,
                      st.st_size, st.st_mtime_ns))
    key = tuple(files)
    if key not in _DIGESTS:
        _DIGESTS[key] = digest(vol)
    return _DIGESTS[key]


def legacy_views(full):
    """What views() gives: snapshots by id, templates by image id."""
    return {img_id if what == "template" else what: sha
            for (_, img_id, what), sha in full.items() if what != "leaf"}


def digest(vol):
    out = vol.path + ".view"
    try:
        qemuimg.convert(vol.path, out, src_fmt=vol.qemu_format,
                        dst_fmt="raw")
        h = hashlib.sha256()
        with open(out, "rb") as f:
            for block in iter(lambda: f.read(MiB), b""):
                h.update(block)
        return h.hexdigest()
    finally:
        os.unlink(out)


def copy_world(golden_dir, dst):
    # cp keeps the holes of the sparse lease files and the template hard
    # links; shutil.copytree would write gigabytes of zeros.
    subprocess.run(["cp", "-a", golden_dir, dst], check=True)
    return dst


def task_names(golden_dir, tmp_path, op):
    work = copy_world(golden_dir, str(tmp_path / "names"))
    names: list[str] = []
    with open(os.path.join(work, "ctx.json")) as f:
        ctx = json.load(f)
    pool = crash_ops.open_pool(work, [crash_ops.recorder(names)])
    crash_ops.OPS[op](pool, ctx)
    shutil.rmtree(work)
    # A name the operation runs again (two flows) is killed at as NAME#N.
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return unique


def run_child(work, op, task, state, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "tests.functional.crash_ops", work, op, task,
         state, *extra], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=120, start_new_session=True)


@pytest.mark.parametrize("op", ["clone", "copy", "import"])
def test_crash_in_the_middle_of_a_copy(golden, tmp_path, op):
    golden_dir, ctx, before = golden
    work = copy_world(golden_dir, str(tmp_path / "w"))
    child = run_child(work, op, "progress", "30")
    assert child.returncode == -9, child.stderr[-2000:]
    pool = crash_ops.open_pool(work)
    assert not fsck.check(pool).clean
    report = fsck.repair(pool)
    MATRIX.append((op, "qemu-img convert", "at 30%",
                   check_world(pool, ctx, before, report, op)))
    if op == "clone":
        # Finished by recovery: the whole view, not the 30% copied.
        leaf = pool.leaf(ctx["sd"], crash_ops.NEW_IMG)
        assert digest(leaf) == before[ctx["snaps"][1]]


@pytest.mark.parametrize("op", sorted(crash_ops.OPS))
def test_crash_matrix(golden, tmp_path, op):
    golden_dir, ctx, before = golden
    names = task_names(golden_dir, tmp_path, op)
    assert names, "the operation ran no flow"
    for i, task in enumerate(names):
        for state in ("RUNNING", "SUCCESS"):
            work = copy_world(golden_dir, str(tmp_path / f"{i}-{state}"))
            child = run_child(work, op, task, state)
            assert child.returncode == -9, child.stderr[-2000:]
            pool = crash_ops.open_pool(work)
            report = fsck.repair(pool)
            outcome = check_world(pool, ctx, before, report, op)
            MATRIX.append((op, task, "before" if state == "RUNNING"
                           else "after", outcome))
            shutil.rmtree(work)


def check_world(pool, ctx, before, report, op=None):
    assert report.clean, [p.as_dict() for p in report.problems]
    assert_counters(pool)
    for dom in pool.domains.values():
        assert leftovers(dom.path) == []
        for img_id in dom.list_images():
            tree = pool.image(dom.sd_id, img_id)
            assert tree.check() == []
            assert all(v.legal for v in tree.volumes.values())
    full = full_views(pool)
    after = legacy_views(full)
    for key, value in before.items():
        if key in after:
            assert after[key] == value, f"data of {key} changed"
    if op is not None:
        check_views(op, ctx, full)
    if op == "upgrade":
        # Recovery finished the upgrade, wherever it was killed.
        ovirt_fixtures.check_v5(pool.domain(ctx["sd4"]))
    outcome = ",".join(f"{n}:{o}" for n, o in report.recovered) or "clean"
    return outcome + (f" +{len(report.repaired)} removed"
                      if report.repaired else "")


def effects(op, ctx):
    """What ``op`` may do to the views of the golden world, done or not.

    Returns (gone, changed, new): ``gone`` maps each view the operation
    may remove to the view that must then exist instead (None: none);
    ``changed`` maps each view the operation may change to the one other
    value it may then have (None: any); ``new`` maps each view it may
    add to the value it must have (None: any). New views come per image
    all or nothing. Every other view must be there, unchanged.
    """
    before = ctx["views"]
    sd, sd2, img, tmpl = ctx["sd"], ctx["sd2"], ctx["img"], ctx["tmpl"]
    snaps, new_img = ctx["snaps"], crash_ops.NEW_IMG
    gone, changed, new = {}, {}, {}

    def copies(src_sd, img_id, dst_sd, move=False):
        for (s, i, what), sha in before.items():
            if (s, i) == (src_sd, img_id):
                new[(dst_sd, i, what)] = sha
                if move:
                    gone[(s, i, what)] = (dst_sd, i, what)

    if op == "snapshot":
        new[(sd, img, crash_ops.NEW_SNAP)] = before[(sd, img, "leaf")]
    elif op == "merge_commit":
        gone[(sd, img, snaps[1])] = None
    elif op == "merge_stream":
        gone[(sd, img, snaps[0])] = None
    elif op == "update_volume":
        gone[(sd, ctx["img_b"], ctx["b_snaps"][0])] = None
    elif op == "remove_volume":
        gone[(sd, ctx["img_b"], ctx["b_snaps"][2])] = None
    elif op == "revert":
        changed[(sd, img, "leaf")] = before[(sd, img, snaps[0])]
    elif op == "extend":
        changed[(sd, img, "leaf")] = None
    elif op == "create":
        new[(sd, new_img, "leaf")] = None
    elif op in ("import", "adopt"):
        # The template was imported from the same file.
        new[(sd, new_img, "template")] = before[(sd, tmpl, "template")]
    elif op == "clone":
        new[(sd, new_img, "leaf")] = before[(sd, img, snaps[1])]
    elif op == "thin_clone":
        new[(sd, new_img, "leaf")] = before[(sd, tmpl, "template")]
    elif op in ("copy", "move"):
        copies(sd, img, sd2, move=op == "move")
    elif op == "copy_thin":
        copies(sd, tmpl, sd2)
        copies(sd, ctx["thin"], sd2)
    elif op == "upgrade":
        pass    # metadata only: every view stays
    elif op == "delete":
        for key in before:
            if key[:2] == (sd, img):
                gone[key] = None
    else:
        raise AssertionError(f"no expected effects for {op}")
    return gone, changed, new


def check_views(op, ctx, after):
    """The views after a crash of ``op`` and repair (see effects)."""
    before = ctx["views"]
    gone, changed, new = effects(op, ctx)
    for key, sha in before.items():
        if key not in after:
            assert key in gone, f"{op}: {key} vanished"
            if gone[key] is not None:
                assert gone[key] in after, f"{op}: {key} lost, not moved"
        elif key in changed:
            assert after[key] in (sha, changed[key]) or \
                changed[key] is None, f"{op}: {key} has unexpected data"
        else:
            assert after[key] == sha, f"{op}: data of {key} changed"
    for key, sha in after.items():
        if key in before:
            continue
        assert key in new, f"{op}: unexpected view {key}"
        assert new[key] in (None, sha), f"{op}: {key} has wrong data"
    images = {key[:2] for key in new}
    for image in images:
        present = [key in after for key in new if key[:2] == image]
        assert all(present) or not any(present), \
            f"{op}: image {image} is partly there"


def test_fsck_reports_and_repairs_garbage(golden, tmp_path):
    golden_dir, ctx, before = golden
    work = copy_world(golden_dir, str(tmp_path / "w"))
    pool = crash_ops.open_pool(work)
    dom = pool.domain(ctx["sd"])
    img_dir = dom.image_dir(ctx["img"])
    # An interrupted metadata write, a half-removed image, a stray lease.
    open(os.path.join(img_dir, "x.meta.new"), "w").close()
    os.mkdir(dom.removed_image_dir(str(uuid.uuid4())))
    stray = str(uuid.uuid4())
    open(os.path.join(img_dir, stray + ".lease"), "w").close()
    report = fsck.check(pool)
    kinds = sorted(p.kind for p in report.problems)
    assert kinds == ["leftover", "leftover", "orphan"]
    report = fsck.repair(pool)
    assert report.clean and len(report.repaired) == 3
    assert views(pool, ctx) == before


def test_fsck_never_repairs_bad_checksum(golden, tmp_path):
    golden_dir, ctx, _ = golden
    work = copy_world(golden_dir, str(tmp_path / "w"))
    pool = crash_ops.open_pool(work)
    path = pool.domain(ctx["sd2"]).dom_md("metadata")
    with open(path, "rb") as f:
        data = f.read()
    corrupt = data.replace(b"DESCRIPTION=", b"DESCRIPTION=x")
    with open(path, "wb") as f:
        f.write(corrupt)
    report = fsck.repair(pool)
    assert [p.kind for p in report.problems] == ["bad-metadata"]
    with open(path, "rb") as f:
        assert f.read() == corrupt


def test_crash_with_sqlalchemy_logbook(golden, tmp_path):
    """The logbook can live in any SQLAlchemy database."""
    golden_dir, ctx, before = golden
    work = copy_world(golden_dir, str(tmp_path / "w"))
    url = f"sqlite:///{tmp_path}/logbook.sqlite"
    child = run_child(work, "merge_commit", "commit", "SUCCESS", url)
    assert child.returncode == -9, child.stderr[-2000:]
    pool = crash_ops.open_pool(work, flow_connection=url)
    assert [p.name for p in pool.runner.unfinished()] == ["merge_commit"]
    report = fsck.repair(pool)
    assert report.recovered == [("merge_commit", "SUCCESS")]
    check_world(pool, ctx, before, report)
    assert snapshot_gone(pool, ctx, ctx["snaps"][1])


def snapshot_gone(pool, ctx, snap_id):
    return snap_id not in pool.image(ctx["sd"], ctx["img"]).snapshots()


def test_recover_skips_flows_finished_meanwhile(golden, tmp_path):
    golden_dir, ctx, _ = golden
    work = copy_world(golden_dir, str(tmp_path / "w"))
    child = run_child(work, "snapshot", "legalize", "RUNNING")
    assert child.returncode == -9
    pool = crash_ops.open_pool(work)
    pending, = pool.runner.unfinished()
    # Another recoverer finishes it first; ours must not run it twice.
    assert crash_ops.open_pool(work).recover() == [("snapshot",
                                                    "SUCCESS")]
    assert pool.runner.load(pending.book_id) is None
    assert pool.recover() == []


def test_merge_directions(golden, tmp_path):
    """The matrix covers both merge directions."""
    golden_dir, ctx, _ = golden
    assert task_names(golden_dir, tmp_path, "merge_stream")[1] == "rebase"
    assert task_names(golden_dir, tmp_path, "merge_commit")[1] == "commit"


def pytest_terminal_summary_matrix():
    rows = [("operation", "killed at", "when", "outcome")] + MATRIX
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths))
                     for r in rows)
