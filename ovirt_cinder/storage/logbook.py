"""Durable TaskFlow logbooks: a directory backend that never tears a file.

TaskFlow's directory backend (``impl_dir``) rewrites each JSON file in
place, without fsync: a process killed, or a disk filled, during a write
leaves an empty or truncated file, and every later load of that logbook
fails. :class:`DurableDirBackend` keeps the same layout, so a directory
written by the stock backend is read as it is::

    <root>/
      books/<book_id>/metadata            the LogBook (JSON)
      books/<book_id>/<flow_id>           symlink to flow_details/<flow_id>
      flow_details/<flow_id>/metadata     a FlowDetail
      flow_details/<flow_id>/<atom_id>    symlink to atom_details/<atom_id>
      atom_details/<atom_id>/metadata     an AtomDetail
      quarantine/<book_id>-<timestamp>/   books moved aside by quarantine(),
                                          with the same three directories

Durability guarantee:

- a ``metadata`` file is published by writing a uniquely named
  ``.tmp-metadata-*`` file beside it, fsyncing it, renaming it over
  ``metadata`` and fsyncing the directory: a reader, in another process or
  after a crash, sees the old or the new content, never a torn one. A
  failed write (ENOSPC, EIO) raises OSError and leaves the old content;
- a new directory or symlink is fsynced into its parent, and an object is
  written before the link that names it: a link never dangles after a
  crash;
- a new book's own ``metadata`` is written after its flow and atom
  details, and is the first thing removed when the book is destroyed: a
  book is listed by :func:`book_ids` only while it is whole. A crash
  during a destroy leaves an unlisted book directory, which
  :func:`destroy_book` of the same id removes.

What a crash can leave is garbage nothing reads: an object written but
not yet linked, a partial ``.tmp-metadata-*`` file, a book directory
without its ``metadata``. :func:`sweep` removes such things once they are
older than any save in progress can be.

Updates of an existing flow or atom to PENDING or RUNNING are not written
(see ``_TRANSIENT``): recovery resumes such an object exactly as it
resumes the state before, so only the step boundaries that matter (a
step's end, a failure, a revert) cost a synced write. An update that
leaves a file's content as it is but for an atom's progress (TaskFlow
saves an atom for its state, again for its progress and again with its
flow) is not written either.

Locking: none on disk. Reads need none (a rename is atomic) and each write
has its own temporary name, so concurrent writers of one object (several
processes on one host) each publish a whole file and the last rename
wins, which is all TaskFlow's per-file ``lock`` files gave (its
read-merge-write was never atomic across processes). Without lock files a
read no longer recreates the directory of a destroyed book. Within one
backend TaskFlow's in-memory transaction lock still serializes saves.

Reading a file that is empty, truncated, not JSON or not a TaskFlow object
raises :class:`TornBook`, never a raw ValueError or KeyError; a file that
a book links but that is missing raises it too. :func:`quarantine` moves
such a book out of the way so the others keep loading.

The module functions serve SQLAlchemy backends too (``fetch`` of a URL):
a database is transactional, so its books are never torn.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from oslo_serialization import jsonutils
from taskflow import exceptions as exc
from taskflow import states
from taskflow.persistence import backends
from taskflow.persistence import base
from taskflow.persistence import models
from taskflow.persistence.backends import impl_dir

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fileutil

__all__ = [
    "TornBook", "DurableDirBackend", "fetch", "book_ids", "load_book",
    "save_book", "destroy_book", "quarantine", "sweep",
]

METADATA = "metadata"
# States that a resumed flow treats exactly as the state before them (an
# atom PENDING or RUNNING is run; a flow PENDING or RUNNING goes on): an
# update of an existing object to one of them is not written, which
# saves two fsyncs per step and per flow start and changes nothing that
# recovery reads.
_TRANSIENT = frozenset({states.PENDING, states.RUNNING})
BOOKS = "books"
FLOWS = "flow_details"
ATOMS = "atom_details"
QUARANTINE = "quarantine"
DIR_MODE = 0o770
FILE_MODE = 0o660


class TornBook(errors.StorageError):
    """A logbook file is empty, truncated, not valid, or missing."""

    msg = "Logbook {book_id} is unreadable at {path}: {reason}"


# Filesystem primitives


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _publish(path: str, data: bytes) -> None:
    """Replace ``path`` by ``data``: unique temp + fsync + rename + fsync.

    Unlike :func:`fileutil.atomic_write` the temporary name is unique, so
    concurrent writers need no lock.
    """
    directory, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{sc.TEMP_PREFIX}{name}-",
                               dir=directory)
    try:
        try:
            os.fchmod(fd, FILE_MODE)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        fileutil.remove_file(tmp)
        raise
    fileutil.fsync_dir(directory)


def _content(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _same_state(old: bytes | None, new: bytes) -> bool:
    """Whether ``new`` differs from ``old`` at most in an atom's progress
    (which recovery never reads)."""
    if old is None:
        return False
    if old == new:
        return True
    try:
        return _without_progress(old) == _without_progress(new)
    except ValueError:
        return False


def _without_progress(raw: bytes) -> Any:
    data = json.loads(raw)
    meta = data.get("atom", {}).get("meta") if isinstance(data, dict) \
        else None
    if isinstance(meta, dict):
        meta.pop("progress", None)
    return data


def _make_dir(path: str) -> bool:
    """Create ``path`` and fsync its parent; False if it existed."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return False
    os.chmod(path, DIR_MODE)  # whatever the umask
    fileutil.fsync_dir(os.path.dirname(path))
    return True


def _make_dirs(path: str) -> None:
    parent = os.path.dirname(path)
    if parent != path and not os.path.isdir(parent):
        _make_dirs(parent)
    _make_dir(path)


def _link(target: str, path: str) -> None:
    """Create the symlink ``path`` -> ``target`` (kept if it exists)."""
    try:
        os.symlink(target, path)
    except FileExistsError:
        return
    fileutil.fsync_dir(os.path.dirname(path))


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _links(path: str) -> list[str]:
    """Names of the symlinks in ``path``; [] if it is missing."""
    return [name for name in _listdir(path)
            if os.path.islink(os.path.join(path, name))]


def _books(books_dir: str) -> list[str]:
    """Book directories with their metadata file (a lock file alone, or
    a half destroyed book, is not a book)."""
    return [name for name in _listdir(books_dir)
            if os.path.isfile(os.path.join(books_dir, name, METADATA))]


@contextlib.contextmanager
def _not_found() -> Iterator[None]:
    """A missing file or directory is TaskFlow's NotFound; other OSErrors
    (ENOSPC, EIO, EACCES) pass unchanged."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError) as e:
        raise exc.NotFound(f"Item not found: {e.filename}", cause=e) from e


def _reason(raw: bytes, error: Exception) -> str:
    if not raw:
        return "empty file"
    return f"{len(raw)} bytes, {type(error).__name__}: {error}"


# The backend


class DurableDirBackend(impl_dir.DirBackend):
    """``impl_dir.DirBackend`` whose files are published atomically and
    durably; see the module docstring.

    Configuration: ``{"path": root}``, as for the stock backend.
    """

    def get_connection(self) -> DurableConnection:
        return DurableConnection(self)


class DurableConnection(impl_dir.Connection):
    """The stock connection with lock-free atomic I/O, a write order that
    never publishes a link before its object, and TornBook on read."""

    # Items

    def _get_item(self, path: str) -> dict[str, Any]:
        item = self._join_path(path, METADATA)
        with _not_found():
            with open(item, "rb") as f:
                raw = f.read()
        try:
            data = json.loads(raw.decode(self.backend.encoding))
            if not isinstance(data, dict):
                raise ValueError(f"JSON {type(data).__name__}, not object")
            kind = self._kind(path)
            if kind is not None:
                self._deserialize(kind, data)
        except Exception as e:
            raise TornBook(book_id=self._owner(path), path=item,
                           reason=_reason(raw, e)) from e
        return data

    def _set_item(self, path: str, value: dict[str, Any],
                  transaction: Any) -> None:
        item = self._join_path(path, METADATA)
        state = value.get("atom", value).get("state")
        if state in _TRANSIENT and os.path.exists(item):
            return
        data = jsonutils.dumps(value).encode(self.backend.encoding)
        if _same_state(_content(item), data):
            return      # TaskFlow saves the same object again and again
        with _not_found():
            _make_dir(path)
            _publish(item, data)

    def _del_tree(self, path: str, transaction: Any) -> None:
        with _not_found():
            shutil.rmtree(path)
        fileutil.fsync_dir(os.path.dirname(path))

    def _get_children(self, path: str) -> list[str]:
        with _not_found():
            os.stat(path)
        if path == self.book_path:
            return _books(path)
        return _links(path)

    def _ensure_path(self, path: str) -> None:
        _make_dirs(path)

    def _create_link(self, src_path: str, dest_path: str,
                     transaction: Any) -> None:
        with _not_found():
            _link(src_path, dest_path)

    def _kind(self, path: str) -> type | None:
        return {self.book_path: models.LogBook,
                self.flow_path: models.FlowDetail,
                self.atom_path: models.AtomDetail,
                }.get(os.path.dirname(path))

    def _owner(self, path: str) -> str | None:
        """The id of the book that links the object at ``path``."""
        parent, uuid = os.path.split(path)
        if parent == self.book_path:
            return uuid
        if parent == self.atom_path:
            uuid = self._linker(self.flow_path, uuid)
        if uuid is None:
            return None
        return self._linker(self.book_path, uuid)

    @staticmethod
    def _linker(parents: str, name: str) -> str | None:
        for parent in _listdir(parents):
            if os.path.islink(os.path.join(parents, parent, name)):
                return parent
        return None

    # Write order: objects before the links that name them

    def _do_update_flow_details(self, flow_detail: models.FlowDetail,
                                transaction: Any,
                                ignore_missing: bool = False
                                ) -> models.FlowDetail:
        flow_path = self._get_obj_path(flow_detail)
        self._update_object(flow_detail, transaction,
                            ignore_missing=ignore_missing)
        for atom_detail in flow_detail:
            self._update_object(atom_detail, transaction,
                                ignore_missing=True)
            self._create_link(self._get_obj_path(atom_detail),
                              self._join_path(flow_path, atom_detail.uuid),
                              transaction)
        return flow_detail

    def save_logbook(self, book: models.LogBook) -> models.LogBook:
        book_path = self._get_obj_path(book)
        with self._transaction() as transaction:
            for flow_detail in book:
                self._do_update_flow_details(flow_detail, transaction,
                                             ignore_missing=True)
                with _not_found():
                    _make_dir(book_path)
                self._create_link(self._get_obj_path(flow_detail),
                                  self._join_path(book_path,
                                                  flow_detail.uuid),
                                  transaction)
            self._update_object(book, transaction, ignore_missing=True)
        return book

    def _do_destroy_logbook(self, book_uuid: str, transaction: Any) -> None:
        book_path = self._join_path(self.book_path, book_uuid)
        flows = self._get_children(book_path)  # NotFound if no book
        # Unlisted first: a crash below leaves no half book.
        if fileutil.remove_file(self._join_path(book_path, METADATA)):
            fileutil.fsync_dir(book_path)
        for flow_uuid in flows:
            flow_path = self._join_path(self.flow_path, flow_uuid)
            for atom_uuid in _links(flow_path):
                fileutil.remove_tree(self._join_path(self.atom_path,
                                                     atom_uuid))
            fileutil.remove_tree(flow_path)
        # Last, so that destroying the same id again finds the rest.
        fileutil.remove_tree(book_path)

    # Reading

    def get_logbook(self, book_uuid: str,
                    lazy: bool = False) -> models.LogBook:
        """The book; NotFound if it is gone, TornBook if it is broken."""
        try:
            return super().get_logbook(book_uuid, lazy=lazy)
        except TornBook as e:
            if e.book_id == book_uuid:
                raise
            raise TornBook(book_id=book_uuid, path=e.path,
                           reason=e.reason) from e
        except exc.NotFound as e:
            if not self.has_book(book_uuid):
                raise  # gone, or destroyed while we read it
            path = getattr(e.cause, "filename", None) or book_uuid
            raise TornBook(book_id=book_uuid, path=path,
                           reason="linked by the book but missing") from e

    def has_book(self, book_uuid: str) -> bool:
        return os.path.isfile(self._join_path(self.book_path, book_uuid,
                                              METADATA))


# The functions FlowRunner uses


def fetch(connection: str) -> base.Backend:
    """A backend for ``connection``, upgraded (its schema made).

    A string with ``://`` is an SQLAlchemy URL; anything else is the root
    directory of a :class:`DurableDirBackend`, created (mode 0o770) if
    missing.
    """
    if "://" in connection:
        backend = backends.fetch({"connection": connection})
    else:
        _make_dirs(os.path.abspath(connection))
        backend = DurableDirBackend({"path": connection})
    with _connection(backend) as conn:
        conn.upgrade()
    return backend


@contextlib.contextmanager
def _connection(backend: base.Backend) -> Iterator[base.Connection]:
    with contextlib.closing(backend.get_connection()) as conn:
        yield conn


def book_ids(backend: base.Backend) -> list[str]:
    """Ids of the books present, without loading their flows."""
    if isinstance(backend, impl_dir.DirBackend):
        return _books(os.path.join(backend.path, BOOKS))
    with _connection(backend) as conn:
        return [book.uuid for book in conn.get_logbooks(lazy=True)]


def load_book(backend: base.Backend, book_id: str) -> models.LogBook | None:
    """The book with its flow and atom details; None if it is gone.

    Raises TornBook if one of its files is unreadable or missing.
    """
    with _connection(backend) as conn:
        try:
            return conn.get_logbook(book_id)
        except exc.NotFound:
            return None


def save_book(backend: base.Backend, book: models.LogBook) -> None:
    """Save the book, its flow details and their atom details."""
    with _connection(backend) as conn:
        conn.save_logbook(book)


def destroy_book(backend: base.Backend, book_id: str) -> None:
    """Destroy the book and its details; a missing book is a no-op."""
    with _connection(backend) as conn:
        try:
            conn.destroy_logbook(book_id)
        except exc.NotFound:
            pass


def quarantine(backend: base.Backend, book_id: str) -> str | None:
    """Move a (torn) book out of the way of :func:`book_ids`.

    For a directory backend the book's directories (those that can be
    found) move to ``<root>/quarantine/<book_id>-<timestamp>/`` under
    ``books/``, ``flow_details/`` and ``atom_details/``; returns that
    path, or None if nothing of the book was left. Other backends destroy
    what they can and return None. Missing pieces are skipped.
    """
    if isinstance(backend, impl_dir.DirBackend):
        return _quarantine_dir(backend.path, book_id)
    destroy_book(backend, book_id)
    return None


def _quarantine_dir(root: str, book_id: str) -> str | None:
    # Details first, book last: if this is interrupted the book is still
    # listed (and torn), so quarantining it again moves the rest.
    pieces = _book_pieces(root, book_id)
    if not pieces:
        return None
    stamp = datetime.datetime.now(datetime.UTC).strftime(
        "%Y%m%dT%H%M%S.%fZ")
    dest = os.path.join(root, QUARANTINE, f"{book_id}-{stamp}")
    for kind in (BOOKS, FLOWS, ATOMS):
        _make_dirs(os.path.join(dest, kind))
    for kind, name in pieces:
        with contextlib.suppress(FileNotFoundError):
            os.rename(os.path.join(root, kind, name),
                      os.path.join(dest, kind, name))
    for kind in (BOOKS, FLOWS, ATOMS):
        fileutil.fsync_dir(os.path.join(root, kind))
        fileutil.fsync_dir(os.path.join(dest, kind))
    return dest


def _book_pieces(root: str, book_id: str) -> list[tuple[str, str]]:
    """(kind, name) of the book's directories that exist, book last."""
    flows = _links(os.path.join(root, BOOKS, book_id))
    atoms = [atom for flow in flows
             for atom in _links(os.path.join(root, FLOWS, flow))]
    pieces = ([(ATOMS, atom) for atom in atoms]
              + [(FLOWS, flow) for flow in flows]
              + [(BOOKS, book_id)])
    return [(kind, name) for kind, name in pieces
            if os.path.lexists(os.path.join(root, kind, name))]


def sweep(backend: base.Backend, min_age: float = 3600.0) -> list[str]:
    """Remove the garbage of crashes; return the paths removed.

    For a directory backend: book directories without their metadata,
    flow and atom directories that nothing links, and temporary files,
    all only if older than ``min_age`` seconds, so that a save in
    progress in another process (which writes an object just before it
    links it) is never hurt. Other backends have no garbage: [].
    """
    if not isinstance(backend, impl_dir.DirBackend):
        return []
    deadline = time.time() - min_age
    books_dir, flows_dir, atoms_dir = (
        os.path.join(backend.path, kind) for kind in (BOOKS, FLOWS, ATOMS))
    # In this order: what a removed book linked is unlinked next.
    removed = _sweep_dir(books_dir, set(_books(books_dir)), deadline)
    removed += _sweep_dir(flows_dir, _linked(books_dir), deadline)
    removed += _sweep_dir(atoms_dir, _linked(flows_dir), deadline)
    return removed


def _linked(parents: str) -> set[str]:
    """Names linked from the directories in ``parents``."""
    return {child for parent in _listdir(parents)
            for child in _links(os.path.join(parents, parent))}


def _sweep_dir(directory: str, live: set[str],
               deadline: float) -> list[str]:
    """Old entries of ``directory`` not in ``live``, and old temporary
    files of the live ones."""
    removed = []
    for name in _listdir(directory):
        path = os.path.join(directory, name)
        if name in live:
            garbage = [os.path.join(path, tmp) for tmp in _listdir(path)
                       if tmp.startswith(sc.TEMP_PREFIX)]
        else:
            garbage = [path]
        for path in garbage:
            if _older(path, deadline):
                _remove(path)
                removed.append(path)
    return removed


def _older(path: str, deadline: float) -> bool:
    try:
        return os.lstat(path).st_mtime < deadline
    except FileNotFoundError:
        return False


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        fileutil.remove_tree(path)
    else:
        fileutil.remove_file(path)
