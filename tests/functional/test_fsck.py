"""fsck next to damaged images and live work: what it reports, what repair
removes, what it never touches.

Pools are real (local directories, qemu-img); data is checked by the
sha256 of each volume's guest view before and after repair, and by the
list of files left in the domain.
"""

import contextlib
import hashlib
import json
import os
import subprocess
import threading
import time
import uuid

import pytest
from taskflow.types import notifier

from ovirt_cinder.storage import actions
from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import fsck
from ovirt_cinder.storage import lease
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage.pool import StoragePool
from tests import qemuio

MiB = sc.MiB
SIZE = 8 * MiB
OLD = 2 * 3600      # seconds: older than every fsck age limit


def uid():
    return str(uuid.uuid4())


def manager(tmp_path, timeout=5.0, cls=lease.LocalLeaseManager):
    return cls(lease_timeout=timeout, lock_path=str(tmp_path / "locks"))


@pytest.fixture
def mounts(tmp_path):
    paths = [str(tmp_path / "mnt1"), str(tmp_path / "mnt2")]
    for path in paths:
        os.mkdir(path)
    return paths


@pytest.fixture
def pool(tmp_path, mounts):
    return StoragePool.create(mounts[0], lease_manager=manager(tmp_path))


def reopen(tmp_path, mounts, **kwargs):
    kwargs.setdefault("lease_manager", manager(tmp_path))
    return StoragePool.open(mounts, **kwargs)


def chain(pool, fmt=sc.VolumeFormat.RAW):
    """An image base <- leaf with data in both; (sd, img, base, leaf)."""
    sd = pool.master.sd_id
    img = uid()
    base = pool.create_volume(sd, img, SIZE, fmt=fmt)
    qemuio.write_pattern(base.path, base.qemu_format, 0, MiB, 0x11)
    pool.snapshot(sd, img, uid())
    leaf = pool.leaf(sd, img)
    qemuio.write_pattern(leaf.path, "qcow2", 2 * MiB, MiB, 0x22)
    return sd, img, pool.image(sd, img).get(base.vol_id), leaf


def digest(path, fmt):
    """sha256 of the guest view of the volume at ``path``."""
    out = path + ".view"
    qemuimg.convert(path, out, src_fmt=fmt, dst_fmt="raw")
    try:
        with open(out, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    finally:
        os.unlink(out)


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def listing(dom):
    """Every file and directory under the domain's images/."""
    found = []
    for root, dirs, files in os.walk(dom.images_dir):
        found += [os.path.relpath(os.path.join(root, n), dom.images_dir)
                  for n in dirs + files]
    return sorted(found)


def kinds(report):
    return sorted(p.kind for p in report.problems)


def find(report, kind, vol_id=None, path=None):
    found = [p for p in report.problems if p.kind == kind
             and (vol_id is None or p.vol_id == vol_id)
             and (path is None or p.path == path)]
    assert found, (kind, [p.as_dict() for p in report.problems])
    return found[0]


def set_meta(dom, img, vol_id, **changes):
    meta = dom.read_volume_meta(img, vol_id)
    dom.write_volume_meta(img, vol_id, meta.with_next_generation(**changes))


def half_made_layer(pool, sd, img, parent):
    """An ILLEGAL childless LEAF over ``parent``, as a snapshot or revert
    leaves it when it dies before legalizing it and its book is lost."""
    vol_id = uid()
    actions.do_create_volume(
        pool.context, sd, img, vol_id, capacity=SIZE, fmt="COW",
        prealloc="SPARSE", parent_id=parent, voltype="LEAF", legal=False)
    return vol_id


def age(path, seconds=OLD):
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


# Clean pools


def test_clean_pool(pool):
    chain(pool)
    assert fsck.check(pool).clean
    report = fsck.repair(pool)
    assert report.clean
    assert report.repaired == report.quarantined == report.recovered == []
    assert report.as_dict()["quarantined"] == []


# Data is never deleted


def test_missing_meta_of_base_under_legal_leaf(pool):
    sd, img, base, leaf = chain(pool)
    view = digest(leaf.path, "qcow2")
    os.unlink(base.path + sc.META_EXT)
    report = fsck.check(pool)
    orphan = find(report, "orphan", base.vol_id)
    assert not orphan.garbage and not orphan.quarantine
    assert leaf.vol_id in orphan.detail     # named by the leaf
    find(report, "broken-chain", leaf.vol_id)   # its parent is missing
    dom = pool.master
    before = listing(dom)

    report = fsck.repair(pool)
    assert listing(dom) == before
    # Nothing touched but the counters, which counted the lost record.
    assert [p.kind for p in report.repaired] == ["counters"]
    assert report.quarantined == []
    assert os.path.exists(base.path)
    assert digest(leaf.path, "qcow2") == view
    assert find(report, "orphan", base.vol_id)


def test_missing_data_file(pool):
    sd, img, base, leaf = chain(pool, fmt=sc.VolumeFormat.COW)
    os.unlink(leaf.path)
    report = fsck.check(pool)
    orphan = find(report, "orphan", leaf.vol_id)
    assert not orphan.garbage and "LEGAL" in orphan.detail
    assert "no data file" in find(report, "broken-chain", leaf.vol_id).detail
    before = listing(pool.master)
    view = digest(base.path, "qcow2")
    report = fsck.repair(pool)
    assert listing(pool.master) == before
    assert digest(base.path, "qcow2") == view
    assert report.repaired == [] and not report.clean


def test_unnamed_orphan_data_is_quarantined(pool):
    sd, img, base, leaf = chain(pool)
    view = digest(leaf.path, "qcow2")
    dom = pool.master
    orphan_id = uid()
    orphan = dom.volume_path(img, orphan_id)
    qemuimg.create(orphan, "raw", MiB)
    qemuio.write_pattern(orphan, "raw", 0, MiB, 0x33)
    open(orphan + sc.LEASE_EXT, "w").close()
    data = file_digest(orphan)
    problem = find(fsck.check(pool), "orphan", orphan_id)
    assert problem.quarantine and not problem.garbage

    report = fsck.repair(pool)
    assert report.clean, [p.as_dict() for p in report.problems]
    moved, = report.quarantined
    assert moved.vol_id == orphan_id
    assert not os.path.exists(orphan)
    stamps = os.listdir(os.path.join(dom.path, fsck.QUARANTINE))
    where = os.path.join(dom.path, fsck.QUARANTINE, stamps[0], img)
    assert sorted(os.listdir(where)) == [orphan_id, orphan_id + ".lease"]
    assert where in moved.detail
    assert file_digest(os.path.join(where, orphan_id)) == data
    assert digest(leaf.path, "qcow2") == view
    assert report.as_dict()["quarantined"][0]["vol_id"] == orphan_id


def test_orphan_data_in_broken_image_stays(pool):
    """The leaf's metadata is gone: its data is the volume, left in place
    (the image has no legal leaf, so nothing about it is sure)."""
    sd, img, base, leaf = chain(pool)
    os.unlink(leaf.path + sc.META_EXT)
    report = fsck.repair(pool)
    problem = find(report, "orphan", leaf.vol_id)
    assert not problem.quarantine and "not whole" in problem.detail
    assert report.quarantined == []
    assert os.path.exists(leaf.path)


def test_stray_files_are_kept(pool):
    sd, img, base, leaf = chain(pool)
    dom = pool.master
    img_dir = dom.image_dir(img)
    strays = [os.path.join(img_dir, "notes.txt"),
              os.path.join(img_dir, leaf.vol_id + ".bak"),
              os.path.join(dom.images_dir, "README"),
              os.path.join(dom.images_dir, uid())]     # a file, not a dir
    for path in strays:
        with open(path, "w") as f:
            f.write("mine")
    os.mkdir(os.path.join(img_dir, uid()))
    report = fsck.check(pool)
    found = [p for p in report.problems if p.kind == "stray"]
    assert len(found) == 5 and not any(p.garbage for p in found)
    assert kinds(report) == ["stray"] * 5
    before = listing(dom)
    report = fsck.repair(pool)
    assert listing(dom) == before
    assert kinds(report) == ["stray"] * 5 and report.repaired == []


# Broken chains are reported


def test_chain_loop(pool):
    sd, img, base, leaf = chain(pool)
    dom = pool.master
    set_meta(dom, img, base.vol_id, parent=leaf.vol_id)
    report = fsck.check(pool)
    assert any("Loop" in p.detail for p in report.problems
               if p.kind == "broken-chain")
    before = listing(dom)
    fsck.repair(pool)
    assert listing(dom) == before


def test_foreign_backing_path(pool):
    sd, img, base, leaf = chain(pool)
    subprocess.run(["qemu-img", "rebase", "-u", "-b", "/etc/hostname",
                    "-F", "raw", leaf.path], check=True)
    report = fsck.check(pool)
    problem = find(report, "broken-chain", leaf.vol_id)
    assert "/etc/hostname" in problem.detail
    before = listing(pool.master)
    fsck.repair(pool)
    assert listing(pool.master) == before


def test_unreadable_volume_metadata(pool):
    sd, img, base, leaf = chain(pool)
    dom = pool.master
    layer = half_made_layer(pool, sd, img, leaf.vol_id)
    with open(base.path + sc.META_EXT, "wb") as f:
        f.write(b"garbage\n")
    report = fsck.check(pool)
    assert not find(report, "bad-metadata", base.vol_id).garbage
    # Nothing of an image with unreadable metadata is garbage: that
    # volume could name anything as its parent.
    assert not find(report, "illegal-volume", layer).garbage
    before = listing(dom)
    fsck.repair(pool)
    assert listing(dom) == before


def test_bad_checksum_on_second_domain(tmp_path, mounts, pool):
    sd, img, base, leaf = chain(pool)
    dom2 = pool.add_domain(mounts[1])
    junk = os.path.join(pool.master.image_dir(img), leaf.vol_id +
                        ".meta.new")
    open(junk, "w").close()
    path = dom2.dom_md("metadata")
    with open(path, "rb") as f:
        corrupt = f.read().replace(b"DESCRIPTION=", b"DESCRIPTION=x")
    with open(path, "wb") as f:
        f.write(corrupt)

    pool = reopen(tmp_path, mounts)
    assert set(pool.domains) == {sd}
    report = fsck.check(pool)
    bad = find(report, "bad-metadata", path=dom2.path)
    assert bad.sd_id == dom2.sd_id and "checksum" in bad.detail
    assert find(report, "leftover", path=junk).garbage

    report = fsck.repair(pool)
    assert [p.path for p in report.repaired] == [junk]
    assert kinds(report) == ["bad-metadata"]
    with open(path, "rb") as f:
        assert f.read() == corrupt


def test_bad_checksum_after_open_freezes_the_domain(pool):
    sd, img, base, leaf = chain(pool)
    layer = half_made_layer(pool, sd, img, leaf.vol_id)
    path = pool.master.dom_md("metadata")
    with open(path, "rb") as f:
        corrupt = f.read().replace(b"DESCRIPTION=", b"DESCRIPTION=x")
    with open(path, "wb") as f:
        f.write(corrupt)
    report = fsck.repair(pool)
    assert not find(report, "illegal-volume", layer).garbage
    assert "bad-metadata" in kinds(report)
    with open(path, "rb") as f:
        assert f.read() == corrupt


# ILLEGAL volumes


def test_illegal_only_leaf_is_kept(pool):
    """A failed extend whose book was lost: the ILLEGAL leaf is the
    volume's data."""
    sd, img, base, leaf = chain(pool)
    view = digest(leaf.path, "qcow2")
    set_meta(pool.master, img, leaf.vol_id, legality=sc.Legality.ILLEGAL)
    report = fsck.check(pool)
    problem = find(report, "illegal-volume", leaf.vol_id)
    assert not problem.garbage and "only leaf" in problem.detail
    assert "broken-chain" in kinds(report)      # no legal leaf
    before = listing(pool.master)
    report = fsck.repair(pool)
    assert listing(pool.master) == before
    assert digest(leaf.path, "qcow2") == view
    assert find(report, "illegal-volume", leaf.vol_id)


def test_illegal_internal_volume_is_kept(pool):
    """A base invalidated by a commit whose book was lost holds data."""
    sd, img, base, leaf = chain(pool)
    set_meta(pool.master, img, base.vol_id, legality=sc.Legality.ILLEGAL)
    report = fsck.repair(pool)
    assert not find(report, "illegal-volume", base.vol_id).garbage
    assert os.path.exists(base.path)


def test_half_made_snapshot_layer_is_removed(pool):
    sd, img, base, leaf = chain(pool)
    view = digest(leaf.path, "qcow2")
    dom = pool.master
    layer = half_made_layer(pool, sd, img, leaf.vol_id)
    problem = find(fsck.check(pool), "illegal-volume", layer)
    assert problem.garbage
    report = fsck.repair(pool)
    assert report.clean, [p.as_dict() for p in report.problems]
    assert [p.vol_id for p in report.repaired] == [layer]
    assert not any(n.startswith(layer) for n in os.listdir(
        dom.image_dir(img)))
    assert pool.leaf(sd, img).vol_id == leaf.vol_id
    assert digest(leaf.path, "qcow2") == view


def test_half_made_layer_without_data_is_removed(pool):
    sd, img, base, leaf = chain(pool)
    layer = half_made_layer(pool, sd, img, leaf.vol_id)
    os.unlink(pool.master.volume_path(img, layer))
    problem = find(fsck.check(pool), "orphan", layer)
    assert problem.garbage
    report = fsck.repair(pool)
    assert report.clean, [p.as_dict() for p in report.problems]
    assert [p.vol_id for p in report.repaired] == [layer]
    assert not any(n.startswith(layer) for n in os.listdir(
        pool.master.image_dir(img)))


def test_layer_with_a_child_is_kept(pool):
    sd, img, base, leaf = chain(pool)
    layer = half_made_layer(pool, sd, img, leaf.vol_id)
    top = half_made_layer(pool, sd, img, layer)
    set_meta(pool.master, img, top, legality=sc.Legality.LEGAL)
    report = fsck.check(pool)
    assert not find(report, "illegal-volume", layer).garbage


# Unfinished work


def interrupter(task_name):
    """A listener factory: KeyboardInterrupt when ``task_name`` starts."""
    @contextlib.contextmanager
    def listen(engine):
        def on_change(event, details):
            if details.get("task_name") == task_name and event == "RUNNING":
                raise KeyboardInterrupt(task_name)
        engine.atom_notifier.register(notifier.Notifier.ANY, on_change)
        try:
            yield
        finally:
            engine.atom_notifier.deregister(notifier.Notifier.ANY,
                                            on_change)
    return listen


class ElsewhereLeaseManager(lease.LocalLeaseManager):
    """Runs flows as another, live host."""

    @property
    def owner(self):
        return {"host": "elsewhere.example", "host_id": 2}


def interrupted_snapshot(tmp_path, mounts, cls=lease.LocalLeaseManager):
    """A pool with an image whose snapshot stopped after creating the new
    layer: the book names the image, the new layer is ILLEGAL."""
    pool = StoragePool.create(mounts[0], lease_manager=manager(tmp_path))
    sd, img, base, leaf = chain(pool)
    views = digest(leaf.path, "qcow2")
    stopped = reopen(tmp_path, mounts,
                     lease_manager=manager(tmp_path, cls=cls),
                     listeners=[interrupter("freeze_leaf")])
    with pytest.raises(KeyboardInterrupt):
        stopped.snapshot(sd, img, uid())
    tree = pool.image(sd, img)
    layer, = [v.vol_id for v in tree.volumes.values() if not v.legal]
    return sd, img, leaf, layer, views


def test_image_of_unfinished_flow_is_not_garbage(tmp_path, mounts):
    sd, img, leaf, layer, view = interrupted_snapshot(tmp_path, mounts)
    pool = reopen(tmp_path, mounts)
    report = fsck.check(pool)
    flow = find(report, "unfinished-flow")
    assert flow.detail.startswith("snapshot") and img in flow.detail
    problem = find(report, "illegal-volume", layer)
    assert not problem.garbage and "unfinished flow" in problem.detail
    # repair recovers first: the snapshot is finished, not removed.
    report = fsck.repair(pool)
    assert report.recovered == [("snapshot", "SUCCESS")]
    assert report.clean, [p.as_dict() for p in report.problems]
    assert pool.leaf(sd, img).vol_id == layer
    assert digest(pool.leaf(sd, img).path, "qcow2") == view


def test_flow_of_live_host_keeps_its_image(tmp_path, mounts):
    sd, img, leaf, layer, view = interrupted_snapshot(
        tmp_path, mounts, cls=ElsewhereLeaseManager)
    pool = reopen(tmp_path, mounts)
    before = listing(pool.master)
    report = fsck.repair(pool)
    assert report.recovered == [("snapshot", "SKIPPED")]
    assert not find(report, "illegal-volume", layer).garbage
    assert "unfinished-flow" in kinds(report)
    assert listing(pool.master) == before


def test_torn_book_is_reported(tmp_path, pool):
    chain(pool)
    book = os.path.join(pool.flows_dir, "books", uid())
    os.makedirs(book)
    with open(os.path.join(book, "metadata"), "w") as f:
        f.write('{"name": "snap')
    report = fsck.check(pool)
    flow = find(report, "unfinished-flow")
    assert "quarantined" in flow.detail


def test_legacy_logbook(pool):
    sd, img, base, leaf = chain(pool)
    layer = half_made_layer(pool, sd, img, leaf.vol_id)
    books = os.path.join(pool.master.master_dir, "tasks", "books")
    os.makedirs(os.path.join(books, uid()))
    with open(os.path.join(books, os.listdir(books)[0], "metadata"),
              "w") as f:
        json.dump({"name": "snapshot", "meta": {"domains": [sd]}}, f)
    report = fsck.check(pool)
    legacy = find(report, "unfinished-flow", path=books)
    assert "earlier release" in legacy.detail
    assert not find(report, "illegal-volume", layer).garbage
    fsck.repair(pool)
    assert os.path.exists(pool.master.volume_path(img, layer))


def test_repair_racing_a_live_operation(tmp_path, mounts):
    pool = StoragePool.create(mounts[0],
                              lease_manager=manager(tmp_path, timeout=0.5))
    sd, img, base, leaf = chain(pool)
    layer = half_made_layer(pool, sd, img, leaf.vol_id)
    held, release = threading.Event(), threading.Event()

    def operation():
        with pool.lease_manager.image_lease(pool.master, img):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=operation)
    thread.start()
    try:
        assert held.wait(10)
        start = time.monotonic()
        report = fsck.repair(pool)
        assert time.monotonic() - start < 10
    finally:
        release.set()
        thread.join()
    problem = find(report, "illegal-volume", layer)
    assert "not repaired" in problem.detail
    assert os.path.exists(pool.master.volume_path(img, layer))
    assert report.repaired == []
    # Once the operation is gone, repair removes it.
    assert fsck.repair(pool).clean


# Leftovers


def test_leftovers(pool):
    sd, img, base, leaf = chain(pool)
    dom = pool.master
    building = dom.tmp_image_dir(uid())
    os.mkdir(building)
    open(os.path.join(building, uid()), "w").close()
    removing = dom.removed_image_dir(uid())
    os.mkdir(removing)
    meta_new = dom.volume_path(img, leaf.vol_id) + ".meta.new"
    open(meta_new, "w").close()
    probe = os.path.join(dom.images_dir, ".tmp-reflink-src")
    staging = os.path.join(dom.mount, f".tmp-{sd}-upload-{uid()}")
    md_new = dom.dom_md("metadata.new")
    young = [probe, staging, md_new]
    for path in young:
        open(path, "w").close()
    report = fsck.check(pool)
    assert kinds(report) == ["leftover"] * 6
    garbage = {p.path for p in report.problems if p.garbage}
    assert garbage == {building, removing, meta_new}

    report = fsck.repair(pool)
    assert {p.path for p in report.repaired} == garbage
    assert sorted(p.path for p in report.problems) == sorted(young)
    assert all(os.path.exists(p) for p in young)
    for path in young:
        age(path)
    report = fsck.repair(pool)
    assert report.clean, [p.as_dict() for p in report.problems]
    assert {p.path for p in report.repaired} == set(young)


def test_staging_file_of_unfinished_flow_is_kept(tmp_path, mounts, pool):
    """An adopt stopped before it moved its staged file in."""
    sd = pool.master.sd_id
    staged = os.path.join(mounts[0], f".tmp-{sd}-upload-x")
    qemuimg.create(staged, "raw", MiB)
    age(staged)
    stopped = reopen(tmp_path, mounts,
                     lease_manager=manager(tmp_path,
                                           cls=ElsewhereLeaseManager),
                     listeners=[interrupter("adopt_volume")])
    img = uid()
    with pytest.raises(KeyboardInterrupt):
        stopped.adopt_volume(sd, img, staged, MiB)
    report = fsck.repair(reopen(tmp_path, mounts))
    problem = find(report, "leftover", path=staged)
    assert not problem.garbage and "unfinished flow" in problem.detail
    assert os.path.exists(staged)
    assert not find(report, "leftover",
                    path=pool.master.tmp_image_dir(img)).garbage


# Repair decides under the lease, not from its first scan


def stale_first_scan(monkeypatch, pool):
    """Make repair act on the findings of a scan taken now."""
    stale = [fsck._check(pool)]
    original = fsck._check
    monkeypatch.setattr(fsck, "_check",
                        lambda p: stale.pop() if stale else original(p))


def test_repair_rechecks_metadata(pool, monkeypatch):
    """The half-made layer was legalized after the scan: a snapshot
    finished meanwhile."""
    sd, img, base, leaf = chain(pool)
    layer = half_made_layer(pool, sd, img, leaf.vol_id)
    stale_first_scan(monkeypatch, pool)
    set_meta(pool.master, img, leaf.vol_id,
             voltype=sc.VolumeType.INTERNAL)
    set_meta(pool.master, img, layer, legality=sc.Legality.LEGAL)
    report = fsck.repair(pool)
    assert report.repaired == []
    assert report.clean, [p.as_dict() for p in report.problems]
    assert pool.leaf(sd, img).vol_id == layer


def test_repair_rechecks_busy(tmp_path, mounts, monkeypatch):
    """Another host started an operation on the image after the scan."""
    pool = StoragePool.create(mounts[0], lease_manager=manager(tmp_path))
    sd, img, base, leaf = chain(pool)
    layer = half_made_layer(pool, sd, img, leaf.vol_id)
    stale_first_scan(monkeypatch, pool)
    other = reopen(tmp_path, mounts,
                   lease_manager=manager(tmp_path,
                                         cls=ElsewhereLeaseManager),
                   listeners=[interrupter("resize")])
    with pytest.raises(KeyboardInterrupt):
        other.extend(sd, img, 2 * SIZE)
    report = fsck.repair(pool)
    assert report.recovered == [("extend", "SKIPPED")]
    assert report.repaired == []
    assert os.path.exists(pool.master.volume_path(img, layer))
    assert not find(report, "illegal-volume", layer).garbage
