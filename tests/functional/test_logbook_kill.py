"""Logbook writers killed in the middle of a write, for real.

Two kinds of kill:

- deterministic: the child lowers its RLIMIT_FSIZE and restores the
  default action of SIGXFSZ (Python ignores it), so the kernel kills it
  exactly when it writes past the limit, half way through an atom's file.
  TaskFlow's stock directory backend is left with a truncated file (the
  bug); the durable backend with the old file and a partial temporary one.
- random: a child saves a growing book in a loop and is SIGKILLed at
  random moments; after every kill every book must load.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid

import pytest
from taskflow import exceptions as exc
from taskflow.persistence.backends import impl_dir

from ovirt_cinder.storage import logbook

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=ROOT)

LIMIT = 64 * 1024
KILLS = 20
MAX_ATOMS = 40

XFSZ_CHILD = r"""
import contextlib, resource, signal, sys
from taskflow import states
from taskflow.persistence import models
from taskflow.persistence.backends import impl_dir
from ovirt_cinder.storage import logbook

which, root, book_id, flow_id, atom_id, limit = sys.argv[1:7]
limit = int(limit)
if which == "stock":
    backend = impl_dir.DirBackend({"path": root})
    with contextlib.closing(backend.get_connection()) as conn:
        conn.upgrade()
else:
    backend = logbook.fetch(root)
book = models.LogBook("xfsz", uuid=book_id)
flow = models.FlowDetail("flow", flow_id)
atom = models.TaskDetail("task", atom_id)
atom.put(states.SUCCESS, "small")
flow.add(atom)
book.add(flow)
logbook.save_book(backend, book)

resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
atom.put(states.SUCCESS, "x" * (4 * limit))
logbook.save_book(backend, book)
sys.exit("not killed")
"""

LOOP_CHILD = r"""
import sys, uuid
from taskflow import states
from taskflow.persistence import models
from ovirt_cinder.storage import logbook

root, book_id, flow_id, max_atoms = sys.argv[1:5]
backend = logbook.fetch(root)
book = logbook.load_book(backend, book_id)
if book is None:
    book = models.LogBook("kill", uuid=book_id)
    book.add(models.FlowDetail("flow", flow_id))
flow = book.find(flow_id)
n = flow.meta.get("n", 0) if flow.meta else 0
print("ready", flush=True)
while True:
    n += 1
    if len(flow) < int(max_atoms):
        flow.add(models.TaskDetail(f"task-{n}", str(uuid.uuid4())))
    for atom in flow:  # every file changes size and is rewritten
        atom.put(states.SUCCESS, {"n": n, "pad": "x" * (1024 * (n % 16))})
    flow.meta = {"n": n}
    logbook.save_book(backend, book)
"""


def run_xfsz(which: str, root: str) -> tuple[str, str, str]:
    ids = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    child = subprocess.run(
        [sys.executable, "-c", XFSZ_CHILD, which, root, *ids, str(LIMIT)],
        env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGXFSZ, child.stderr
    return ids


def atom_file(root: str, atom_id: str) -> str:
    return os.path.join(root, "atom_details", atom_id, "metadata")


def test_stock_backend_tears_when_killed_mid_write(tmp_path):
    root = str(tmp_path / "tasks")
    book_id, _, atom_id = run_xfsz("stock", root)

    path = atom_file(root, atom_id)
    assert os.path.getsize(path) == LIMIT  # a JSON document cut short
    stock = impl_dir.DirBackend({"path": root})
    with contextlib.closing(stock.get_connection()) as conn:
        with pytest.raises(exc.StorageFailure):
            conn.get_logbook(book_id)

    backend = logbook.fetch(root)
    with pytest.raises(logbook.TornBook) as e:
        logbook.load_book(backend, book_id)
    assert (e.value.book_id, e.value.path) == (book_id, path)
    assert logbook.quarantine(backend, book_id) is not None
    assert logbook.book_ids(backend) == []


def test_durable_backend_keeps_old_content_when_killed_mid_write(tmp_path):
    root = str(tmp_path / "tasks")
    book_id, flow_id, atom_id = run_xfsz("durable", root)

    atom_dir = os.path.dirname(atom_file(root, atom_id))
    partial = [name for name in os.listdir(atom_dir)
               if name.startswith(".tmp-metadata-")]
    assert len(partial) == 1  # the kill landed inside the write
    assert os.path.getsize(os.path.join(atom_dir, partial[0])) == LIMIT

    backend = logbook.fetch(root)
    book = logbook.load_book(backend, book_id)
    assert book.find(flow_id).find(atom_id).results == "small"
    logbook.destroy_book(backend, book_id)  # temporary files included
    assert not os.path.exists(atom_dir)


def check_book(book, flow_id: str) -> int:
    """Every file of the book is whole; returns its number of atoms."""
    flow = book.find(flow_id)
    assert flow is not None
    for atom in flow:
        if atom.results is None:  # added, not yet saved with a result
            continue
        n = atom.results["n"]
        assert atom.results == {"n": n, "pad": "x" * (1024 * (n % 16))}
    return len(flow)


def test_durable_backend_survives_random_sigkill(tmp_path):
    root = str(tmp_path / "tasks")
    book_id, flow_id = str(uuid.uuid4()), str(uuid.uuid4())
    rng = random.Random()
    atoms = 0
    for _ in range(KILLS):
        child = subprocess.Popen(
            [sys.executable, "-c", LOOP_CHILD, root, book_id, flow_id,
             str(MAX_ATOMS)],
            env=ENV, cwd=ROOT, stdout=subprocess.PIPE)
        try:
            assert child.stdout.readline() == b"ready\n"
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            child.kill()
            child.stdout.close()
            child.wait()
        assert child.returncode == -signal.SIGKILL  # killed, not crashed

        # As a restarted service would: a new backend, every book loads,
        # and sweeping the garbage of the kill takes nothing it needs.
        backend = logbook.fetch(root)
        for found in logbook.book_ids(backend):
            assert found == book_id
            book = logbook.load_book(backend, found)  # never TornBook
            now = check_book(book, flow_id)
            assert now >= atoms  # nothing saved is ever lost
            atoms = now
            logbook.sweep(backend, min_age=0)
            assert check_book(logbook.load_book(backend, found),
                              flow_id) == now
    assert atoms > 1

    logbook.destroy_book(backend, book_id)
    assert logbook.book_ids(backend) == []
    logbook.sweep(backend, min_age=0)
    for kind in ("books", "flow_details", "atom_details"):
        assert os.listdir(os.path.join(root, kind)) == []
