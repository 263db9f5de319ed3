"""The durable logbook backend on real files (pytest's tmp_path, a tmpfs).

Torn files are made the way the stock backend leaves them (truncated,
empty, garbage in place); ENOSPC comes from a real 64 KiB tmpfs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import time
import uuid

import pytest
from taskflow import engines
from taskflow import states
from taskflow import task
from taskflow.patterns import linear_flow
from taskflow.persistence import models
from taskflow.persistence.backends import impl_dir
from taskflow.types import failure

from ovirt_cinder.storage import errors
from ovirt_cinder.storage import logbook


def make_book(name: str = "book", atoms: int = 3,
              pad: int = 100) -> models.LogBook:
    book = models.LogBook(name)
    book.meta = {"owner": "host-1", "domains": ["/srv/mnt1"]}
    flow = models.FlowDetail("flow", str(uuid.uuid4()))
    flow.state = states.RUNNING
    flow.meta = {"kind": "test"}
    for i in range(atoms):
        atom = models.TaskDetail(f"task-{i}", str(uuid.uuid4()))
        atom.put(states.SUCCESS, {"i": i, "pad": "x" * pad})
        flow.add(atom)
    error = models.TaskDetail("failed", str(uuid.uuid4()))
    error.put(states.FAILURE,
              failure.Failure.from_exception(ValueError("boom")))
    flow.add(error)
    book.add(flow)
    return book


def as_dict(book: models.LogBook) -> dict:
    """Everything a book holds, comparable with ==.

    Not the book's updated_at: LogBook.add() sets it, so a load does too.
    """
    data = book.to_dict(marshal_time=True)
    del data["updated_at"]
    return {
        "book": data,
        "flows": {
            flow.uuid: {"flow": flow.to_dict(),
                        "atoms": {atom.uuid: atom.to_dict()
                                  for atom in flow}}
            for flow in book},
    }


def metadata(root: str, book: models.LogBook, kind: str) -> str:
    flow = next(iter(book))
    atom = next(iter(flow))
    name = {"book": ("books", book.uuid),
            "flow": ("flow_details", flow.uuid),
            "atom": ("atom_details", atom.uuid)}[kind]
    return os.path.join(root, *name, "metadata")


def tree(root: str) -> list[str]:
    found = []
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            found.append(os.path.relpath(os.path.join(top, name), root))
    return sorted(found)


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "tasks")


@pytest.fixture
def backend(root):
    return logbook.fetch(root)


# Round trip


def test_fetch_creates_root(tmp_path):
    root = str(tmp_path / "a" / "b" / "tasks")
    backend = logbook.fetch(root)
    assert isinstance(backend, logbook.DurableDirBackend)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o770
    assert sorted(os.listdir(root)) == ["atom_details", "books",
                                        "flow_details"]
    assert logbook.book_ids(backend) == []


def test_round_trip(backend, root):
    book = make_book()
    logbook.save_book(backend, book)
    assert logbook.book_ids(backend) == [book.uuid]
    loaded = logbook.load_book(backend, book.uuid)
    assert as_dict(loaded) == as_dict(book)
    flow = next(iter(loaded))
    assert flow.find(next(iter(next(iter(book)))).uuid).results == {
        "i": 0, "pad": "x" * 100}
    # No lock files, no temporary files.
    assert not [p for p in tree(root)
                if os.path.basename(p) in ("lock", "lock.lock")
                or ".tmp-" in p]


def test_save_updates(backend):
    book = make_book()
    logbook.save_book(backend, book)
    flow = next(iter(book))
    atom = models.TaskDetail("late", str(uuid.uuid4()))
    atom.put(states.SUCCESS, "done")
    flow.add(atom)
    flow.state = states.SUCCESS
    next(iter(flow)).put(states.SUCCESS, "changed")
    logbook.save_book(backend, book)
    assert as_dict(logbook.load_book(backend, book.uuid)) == as_dict(book)


def test_destroy(backend, root):
    book, other = make_book("one"), make_book("two")
    logbook.save_book(backend, book)
    logbook.save_book(backend, other)
    assert sorted(logbook.book_ids(backend)) == sorted(
        [book.uuid, other.uuid])
    logbook.destroy_book(backend, book.uuid)
    assert logbook.book_ids(backend) == [other.uuid]
    assert logbook.load_book(backend, book.uuid) is None
    logbook.destroy_book(backend, book.uuid)  # missing: a no-op
    logbook.destroy_book(backend, other.uuid)
    assert tree(root) == ["atom_details", "books", "flow_details"]


def test_interrupted_destroy(backend, root):
    # Destroy removes the book's metadata first; killed right after, the
    # book is no longer listed, and destroying it again removes the rest.
    book = make_book()
    logbook.save_book(backend, book)
    os.unlink(metadata(root, book, "book"))
    assert logbook.book_ids(backend) == []
    assert logbook.load_book(backend, book.uuid) is None
    logbook.destroy_book(backend, book.uuid)
    assert tree(root) == ["atom_details", "books", "flow_details"]


def test_lock_only_directory_is_not_a_book(backend, root):
    # What the stock backend leaves when a read races a destroy.
    ghost = os.path.join(root, "books", str(uuid.uuid4()))
    os.mkdir(ghost)
    open(os.path.join(ghost, "lock"), "w").close()
    assert logbook.book_ids(backend) == []
    assert logbook.load_book(backend, os.path.basename(ghost)) is None


def test_load_missing_creates_nothing(backend, root):
    before = tree(root)
    assert logbook.load_book(backend, str(uuid.uuid4())) is None
    assert tree(root) == before


def test_reads_stock_directory(root):
    # A directory written by TaskFlow's own backend loads unchanged.
    stock = impl_dir.DirBackend({"path": root})
    book = make_book()
    with contextlib.closing(stock.get_connection()) as conn:
        conn.upgrade()
        conn.save_logbook(book)
    backend = logbook.fetch(root)
    assert logbook.book_ids(backend) == [book.uuid]
    assert as_dict(logbook.load_book(backend, book.uuid)) == as_dict(book)


class Echo(task.Task):
    def execute(self, value):
        return value * 2


def echo_flow(value):
    return linear_flow.Flow("echo").add(
        Echo("first", inject={"value": value}),
        Echo("second", inject={"value": value + 1}))


def test_engine_runs_on_durable_backend(backend):
    book = models.LogBook("echo_flow")
    engine = engines.load_from_factory(
        echo_flow, factory_kwargs={"value": 20}, backend=backend, book=book)
    engine.run()
    loaded = logbook.load_book(backend, book.uuid)
    flow = next(iter(loaded))
    assert flow.state == states.SUCCESS
    assert {a.name: a.results for a in flow} == {"first": 40,
                                                 "second": 42}


# Torn files


DAMAGE = {
    "empty": lambda data: b"",
    "truncated": lambda data: data[:len(data) // 2],
    "garbage": lambda data: b"\x00\xff\xfe not json",
    "not an object": lambda data: b"[1, 2, 3]",
    "wrong shape": lambda data: b'{"name": "x"}',
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("kind", ["book", "flow", "atom"])
def test_torn_file(backend, root, kind, damage):
    torn, other = make_book("torn"), make_book("other")
    logbook.save_book(backend, torn)
    logbook.save_book(backend, other)
    path = metadata(root, torn, kind)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:  # in place, as the stock backend writes
        f.write(DAMAGE[damage](data))

    with pytest.raises(logbook.TornBook) as e:
        logbook.load_book(backend, torn.uuid)
    assert isinstance(e.value, errors.StorageError)
    assert e.value.book_id == torn.uuid
    assert e.value.path == path
    assert str(e.value) == (f"Logbook {torn.uuid} is unreadable at "
                            f"{path}: {e.value.reason}")
    if damage == "empty":
        assert e.value.reason == "empty file"
    assert as_dict(logbook.load_book(backend, other.uuid)) == as_dict(other)

    dest = logbook.quarantine(backend, torn.uuid)
    assert os.path.dirname(dest) == os.path.join(root, "quarantine")
    assert os.path.basename(dest).startswith(torn.uuid + "-")
    assert logbook.book_ids(backend) == [other.uuid]
    assert logbook.load_book(backend, torn.uuid) is None
    assert as_dict(logbook.load_book(backend, other.uuid)) == as_dict(other)
    # Every file of the torn book moved, the damaged one included.
    moved = os.path.join(dest, os.path.relpath(path, root))
    with open(moved, "rb") as f:
        assert f.read() == DAMAGE[damage](data)
    flow = next(iter(torn))
    assert sorted(os.listdir(os.path.join(dest, "atom_details"))) == sorted(
        atom.uuid for atom in flow)
    assert os.listdir(os.path.join(dest, "flow_details")) == [flow.uuid]
    assert os.listdir(os.path.join(dest, "books")) == [torn.uuid]


def test_torn_file_found_from_any_read(backend, root):
    # Engines read flow and atom details directly: the book is found.
    book = make_book()
    logbook.save_book(backend, book)
    flow = next(iter(book))
    atom = next(iter(flow))
    open(metadata(root, book, "atom"), "wb").close()
    with contextlib.closing(backend.get_connection()) as conn:
        with pytest.raises(logbook.TornBook) as e:
            conn.get_atom_details(atom.uuid)
        assert e.value.book_id == book.uuid
        with pytest.raises(logbook.TornBook):
            conn.get_flow_details(flow.uuid)
        with pytest.raises(logbook.TornBook):  # a save reads to merge
            conn.update_atom_details(atom)


def test_missing_linked_file(backend, root):
    book, other = make_book("torn"), make_book("other")
    logbook.save_book(backend, book)
    logbook.save_book(backend, other)
    atom_dir = os.path.dirname(metadata(root, book, "atom"))
    os.rename(atom_dir, atom_dir + ".gone")
    with pytest.raises(logbook.TornBook) as e:
        logbook.load_book(backend, book.uuid)
    assert e.value.book_id == book.uuid
    assert "missing" in e.value.reason
    dest = logbook.quarantine(backend, book.uuid)
    assert dest is not None
    assert logbook.book_ids(backend) == [other.uuid]


def test_quarantine_partly_missing(backend, root):
    book = make_book()
    logbook.save_book(backend, book)
    flow_dir = os.path.dirname(metadata(root, book, "flow"))
    os.rename(flow_dir, flow_dir + ".gone")  # its atoms can't be found
    os.unlink(metadata(root, book, "book"))
    dest = logbook.quarantine(backend, book.uuid)
    assert os.listdir(os.path.join(dest, "books")) == [book.uuid]
    assert os.listdir(os.path.join(dest, "flow_details")) == []
    assert logbook.quarantine(backend, book.uuid) is None
    assert logbook.quarantine(backend, str(uuid.uuid4())) is None


# Garbage


def age(path: str, seconds: float = 7200) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when), follow_symlinks=False)


def test_sweep(backend, root):
    book = make_book()
    logbook.save_book(backend, book)
    before = tree(root)
    # What kills leave: an atom written but not linked, a flow (and its
    # atom) of a book whose first save never finished, a partial file.
    orphan = make_book("orphan")
    with contextlib.closing(backend.get_connection()) as conn:
        conn.update_atom_details(models.TaskDetail("x", str(uuid.uuid4())),
                                 ignore_missing=True)
        conn.update_flow_details(next(iter(orphan)), ignore_missing=True)
    half = os.path.join(root, "books", orphan.uuid)
    os.mkdir(half)
    atom_dir = os.path.dirname(metadata(root, book, "atom"))
    partial = os.path.join(atom_dir, ".tmp-metadata-x1")
    open(partial, "w").close()
    book_partial = os.path.join(root, "books", book.uuid, ".tmp-metadata-x2")
    open(book_partial, "w").close()
    garbage = sorted(set(tree(root)) - set(before))
    assert logbook.sweep(backend) == []  # young: maybe a save in progress

    for path in garbage:
        age(os.path.join(root, path))
    removed = logbook.sweep(backend)
    assert {partial, book_partial, half} <= set(removed)
    assert tree(root) == before
    assert as_dict(logbook.load_book(backend, book.uuid)) == as_dict(book)


# ENOSPC on a real, tiny tmpfs


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]
    try:
        subprocess.run(cmd, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", b"") or b""
        pytest.skip(f"cannot mount a 64k tmpfs ({e} {err.decode().strip()})"
                    "; the ENOSPC test needs root and tmpfs")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def fill(directory: str, room: int = 0) -> None:
    """Fill the file system, then free ``room`` bytes."""
    fd = os.open(os.path.join(directory, "filler"),
                 os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
        os.ftruncate(fd, os.fstat(fd).st_size - room)
    finally:
        os.close(fd)


def grow(book: models.LogBook) -> None:
    """Make the first atom bigger than the whole file system."""
    atom = next(iter(next(iter(book))))
    atom.put(states.SUCCESS, {"pad": "y" * 128 * 1024})


def test_enospc_keeps_saved_content(tiny_fs):
    root = os.path.join(tiny_fs, "tasks")
    backend = logbook.fetch(root)
    book = make_book()
    logbook.save_book(backend, book)
    saved = as_dict(book)
    # Room for the small files, not for the grown atom: its write fails
    # half way.
    fill(tiny_fs, room=16 * 1024)

    grow(book)
    with pytest.raises(OSError) as e:
        logbook.save_book(backend, book)
    assert e.value.errno == errno.ENOSPC
    assert as_dict(logbook.load_book(backend, book.uuid)) == saved
    assert not [p for p in tree(root) if ".tmp-" in p]

    os.unlink(os.path.join(tiny_fs, "filler"))
    # The backend works again once there is room.
    atom = next(iter(next(iter(book))))
    atom.put(states.SUCCESS, "small")
    logbook.save_book(backend, book)
    assert as_dict(logbook.load_book(backend, book.uuid)) == as_dict(book)


def test_enospc_tears_stock_backend(tiny_fs):
    # The bug this module fixes: the stock backend truncates in place.
    root = os.path.join(tiny_fs, "tasks")
    stock = impl_dir.DirBackend({"path": root})
    book = make_book()
    with contextlib.closing(stock.get_connection()) as conn:
        conn.upgrade()
        conn.save_logbook(book)
        fill(tiny_fs)
        grow(book)
        with pytest.raises(Exception) as e:
            conn.save_logbook(book)
    assert "No space left" in repr(e.value) + repr(e.value.__cause__)
    with pytest.raises(logbook.TornBook) as e:
        logbook.load_book(logbook.fetch(root), book.uuid)
    assert e.value.book_id == book.uuid
    assert e.value.path == metadata(root, book, "atom")


# SQL


def test_sqlite(tmp_path):
    backend = logbook.fetch(f"sqlite:///{tmp_path}/books.sqlite")
    book, other = make_book("one"), make_book("two")
    logbook.save_book(backend, book)
    logbook.save_book(backend, other)
    assert sorted(logbook.book_ids(backend)) == sorted(
        [book.uuid, other.uuid])
    assert as_dict(logbook.load_book(backend, book.uuid)) == as_dict(book)
    logbook.destroy_book(backend, book.uuid)
    logbook.destroy_book(backend, book.uuid)
    assert logbook.load_book(backend, book.uuid) is None
    assert logbook.quarantine(backend, other.uuid) is None
    assert logbook.book_ids(backend) == []
    assert logbook.quarantine(backend, other.uuid) is None
    assert logbook.sweep(backend, min_age=0) == []
