"""Recovery trusts nothing it reads from a logbook.

Each test leaves a real unfinished flow in the logbook (a listener stops
the flow as a step starts, as a crash would), then tampers with the book
as someone with write access to the master domain could, and checks what
recovery does: never import a name from the book, never run with fewer
leases than the book names, never take over a live owner's flow, and
quarantine a torn book without blocking the others.
"""

import json
import logging
import os
import threading
import time
import uuid

import pytest

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import flows
from ovirt_cinder.storage import fsck
from ovirt_cinder.storage import lease
from ovirt_cinder.storage import logbook
from ovirt_cinder.storage.pool import StoragePool
from tests.listeners import at_step

MiB = sc.MiB


def interrupt_at(step):
    """A listener factory: stop the flow as ``step`` starts."""
    def interrupt():
        raise KeyboardInterrupt
    return at_step(step, interrupt)


@pytest.fixture
def world(tmp_path):
    mnt1, mnt2 = tmp_path / "mnt1", tmp_path / "mnt2"
    mnt1.mkdir()
    mnt2.mkdir()
    locks = str(tmp_path / "locks")
    pool = StoragePool.create(str(mnt1), lease_manager=lease.
                              LocalLeaseManager(lock_path=locks))
    sd2 = pool.add_domain(str(mnt2)).sd_id
    img = str(uuid.uuid4())
    pool.create_volume(pool.master.sd_id, img, 16 * MiB)
    return {"mounts": [str(mnt1), str(mnt2)], "locks": locks,
            "sd": pool.master.sd_id, "sd2": sd2, "img": img}


def open_pool(world, mounts=None, **kwargs):
    leases = kwargs.pop("lease_manager", None) or lease.LocalLeaseManager(
        lease_timeout=2, lock_path=world["locks"])
    return StoragePool.open(mounts or world["mounts"],
                            lease_manager=leases, **kwargs)


def leave_snapshot(world, step="freeze_leaf"):
    """An unfinished snapshot of the world's image; its book id."""
    pool = open_pool(world, listeners=[interrupt_at(step)])
    with pytest.raises(KeyboardInterrupt):
        pool.snapshot(world["sd"], world["img"], str(uuid.uuid4()))
    pending, = pool.runner.unfinished()
    return pending.book_id


def tamper(pool, book_id, **changes):
    book = logbook.load_book(pool.runner.backend, book_id)
    book.meta = dict(book.meta, **changes)
    logbook.save_book(pool.runner.backend, book)


def test_unfinished_flow_is_recovered(world):
    leave_snapshot(world)
    pool = open_pool(world)
    with pytest.raises(errors.ImageIsBusy):
        pool.snapshot(world["sd"], world["img"], str(uuid.uuid4()))
    assert pool.recover() == [("snapshot", "SUCCESS")]
    assert fsck.check(pool).clean
    assert len(pool.image(world["sd"], world["img"]).snapshots()) == 1


@pytest.mark.parametrize("changes", [
    {"factory": "evil_flow.make"},
    {"factory": "ovirt_cinder.storage.actions.do_remove_image"},
    {"version": 1},
    {"kwargs": {"sd_id": "x", "evil": "rm -rf /"}},
    {"kwargs": "not a dict"},
])
def test_untrusted_book_is_not_run(world, changes, tmp_path, monkeypatch):
    # A module that anyone able to write the master domain could name:
    # importing it would leave a mark.
    marker = tmp_path / "imported"
    (tmp_path / "evil_flow.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "def make(**kwargs):\n    raise SystemExit\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    book_id = leave_snapshot(world)
    pool = open_pool(world)
    tamper(pool, book_id, **changes)
    assert pool.recover() == [(str(changes.get("factory", "snapshot")),
                               "UNTRUSTED")]
    assert not marker.exists()
    # The book is kept and reported; nothing ran.
    pending, = pool.runner.unfinished()
    assert pending.problem
    report = fsck.check(pool)
    assert "unfinished-flow" in {p.kind for p in report.problems}


def test_flow_naming_an_unknown_domain_is_not_run(world):
    book_id = leave_snapshot(world)
    pool = open_pool(world)
    tamper(pool, book_id, domains=[world["sd"], str(uuid.uuid4())])
    assert pool.recover() == [("snapshot", "SKIPPED")]
    assert len(list(pool.runner.unfinished())) == 1


def test_flow_of_a_domain_this_host_does_not_see_is_not_run(world):
    """A flow on the second domain, recovered by a host that does not
    mount it: it would run with fewer leases than it names."""
    pool = open_pool(world, listeners=[interrupt_at("create_volume")])
    with pytest.raises(KeyboardInterrupt):
        pool.create_volume(world["sd2"], str(uuid.uuid4()), MiB)
    partial = open_pool(world, mounts=world["mounts"][:1])
    assert partial.recover() == [("create_image", "SKIPPED")]
    assert open_pool(world).recover() == [("create_image", "SUCCESS")]


def test_another_hosts_flow_is_not_taken_over(world):
    book_id = leave_snapshot(world)
    pool = open_pool(world)
    tamper(pool, book_id, owner={"host": "elsewhere", "host_id": None})
    assert pool.recover() == [("snapshot", "SKIPPED")]
    assert len(list(pool.runner.unfinished())) == 1


def test_a_short_lease_timeout_leaves_a_running_flow_busy(world, caplog):
    """A periodic pass (the Cinder driver's) gives recover() a short lease
    timeout: a book whose images a flow of this process still holds
    comes back BUSY at once, not after lease_timeout, and a later pass
    finishes it. A repeated BUSY is not logged at INFO again."""
    book_id = leave_snapshot(world)
    pool = open_pool(world, lease_manager=lease.LocalLeaseManager(
        lease_timeout=60, lock_path=world["locks"]))
    dom = pool.domain(world["sd"])
    held, release = threading.Event(), threading.Event()

    def running_flow():
        with pool.lease_manager.image_lease(dom, world["img"]):
            held.set()
            release.wait(30)

    flow = threading.Thread(target=running_flow)
    flow.start()
    try:
        assert held.wait(10)
        with caplog.at_level(logging.DEBUG, logger="ovirt_cinder"):
            for _ in range(2):
                start = time.monotonic()
                assert pool.recover(lease_timeout=0.1) == [("snapshot",
                                                            "BUSY")]
                assert time.monotonic() - start < 10
    finally:
        release.set()
        flow.join()
    levels = [r.levelno for r in caplog.records
              if r.getMessage().startswith("Recovery of flow")]
    assert levels == [logging.INFO, logging.DEBUG]
    pending, = pool.runner.unfinished()
    assert pending.book_id == book_id
    assert pool.recover(lease_timeout=0.1) == [("snapshot", "SUCCESS")]
    assert list(pool.runner.unfinished()) == []
    assert len(pool.image(world["sd"], world["img"]).snapshots()) == 1
    assert fsck.check(pool).clean


def test_host_local_paths_are_recovered_only_by_their_host(world,
                                                           tmp_path):
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(MiB)
    pool = open_pool(world, listeners=[interrupt_at("import")])
    with pytest.raises(KeyboardInterrupt):
        pool.import_volume(world["sd"], str(uuid.uuid4()), str(src), "raw",
                           MiB)
    pending, = pool.runner.unfinished()
    # A book claiming the flow belongs to a dead sanlock host of another
    # machine: the staged file it names is not ours to read.

    class TrustingLeases(lease.LocalLeaseManager):
        def owner_gone(self, domain, owner):
            return True

    other = open_pool(world, lease_manager=TrustingLeases(
        lock_path=world["locks"]))
    tamper(other, pending.book_id, owner={"host": "elsewhere",
                                          "host_id": 7})
    assert other.recover() == [("import_image", "SKIPPED")]


def test_domain_paths_come_from_this_host(world, tmp_path):
    """A book written with another host's paths still runs on ours: steps
    take domain ids, resolved by this pool."""
    book_id = leave_snapshot(world)
    pool = open_pool(world)
    book = logbook.load_book(pool.runner.backend, book_id)
    assert "/" not in json.dumps(book.meta["kwargs"])
    assert pool.recover() == [("snapshot", "SUCCESS")]


def test_torn_book_is_quarantined_and_others_recovered(world):
    book_id = leave_snapshot(world)
    pool = open_pool(world)
    other_img = str(uuid.uuid4())
    stopper = open_pool(world, listeners=[interrupt_at("create_volume")])
    with pytest.raises(KeyboardInterrupt):
        stopper.create_volume(world["sd"], other_img, MiB)
    path = os.path.join(pool.flows_dir, "books", book_id, "metadata")
    with open(path, "wb") as f:
        f.truncate(0)
    outcomes = dict(pool.recover())
    assert outcomes == {"?": "UNTRUSTED", "create_image": "SUCCESS"}
    assert pool.image(world["sd"], other_img).leaf().legal
    assert os.listdir(os.path.join(pool.flows_dir, "quarantine"))
    assert list(pool.runner.unfinished()) == []


def test_failed_recovery_keeps_its_book(world, monkeypatch):
    leave_snapshot(world, step="legalize")
    pool = open_pool(world)

    def fail(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(flows.actions, "do_update_volume", fail)
    monkeypatch.setattr(flows.actions, "undo_update_volume", fail)
    assert pool.recover() == [("snapshot", "FAILED")]
    assert len(list(pool.runner.unfinished())) == 1
    monkeypatch.undo()
    assert pool.recover()[0][1] in ("SUCCESS", "REVERTED")
    assert fsck.check(pool).clean


def test_plan_changed_by_another_host_is_refused(world):
    """Another host (simulated: a metadata write between planning and the
    freeze, as only the domain lease fences hosts) changes the leaf: the
    snapshot fails with StalePlan, undoes its new volume and leaves the
    other host's change alone."""
    pool = open_pool(world)
    sd_id, img = world["sd"], world["img"]
    leaf = pool.leaf(sd_id, img)

    def other_host():
        dom = pool.domain(sd_id)
        meta = dom.read_volume_meta(img, leaf.vol_id)
        dom.write_volume_meta(img, leaf.vol_id, meta.with_next_generation(
            description='{"other": "host"}'))

    racing = open_pool(world, listeners=[at_step("freeze_leaf",
                                                  other_host)])
    with pytest.raises(errors.StalePlan):
        racing.snapshot(sd_id, img, str(uuid.uuid4()))
    tree = pool.image(sd_id, img)
    assert list(tree.volumes) == [leaf.vol_id]
    now = tree.leaf()
    assert now.meta.description == '{"other": "host"}'
    assert now.meta.generation == leaf.meta.generation + 1
    assert list(pool.runner.unfinished()) == []
    assert fsck.check(pool).clean
