"""Recoverable operations: TaskFlow flows of :mod:`actions` steps.

Each operation is a module-level factory that takes only serialisable
arguments (paths, ids, sizes, format names) and returns a linear flow of
:class:`Step` tasks. The engine runs a factory with
``engines.load_from_factory`` against a persisted logbook, so after a
crash :meth:`FlowRunner.recover` rebuilds every unfinished flow with
``engines.load_from_detail`` and runs it to the end; a step that cannot
finish makes TaskFlow revert the flow, undoing each step in reverse.

The logbook lives in ``master/tasks`` of the pool's master domain (a
TaskFlow directory backend) or in any SQLAlchemy URL. A finished flow's
logbook is deleted, so the backend holds only work in progress.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from typing import Any

from taskflow import engines
from taskflow import exceptions as exc
from taskflow import states
from taskflow import task
from taskflow.patterns import linear_flow
from taskflow.persistence import backends
from taskflow.persistence import models

from ovirt_cinder.storage import actions
from ovirt_cinder.storage import constants as sc

__all__ = ["Step", "FlowRunner", "create_image", "snapshot", "merge_commit",
           "merge_stream", "update_volume", "remove_volume", "revert",
           "clone", "thin_clone", "extend", "copy_image", "remove_image",
           "import_image", "adopt_image", "export_volume"]

LOG = logging.getLogger(__name__)

FINISHED = (states.SUCCESS, states.REVERTED)


class Step(task.Task):
    """Run ``actions.do_<action>``; revert with ``actions.undo_<action>``.

    The step's name (unique in its flow) and arguments are all TaskFlow
    persists; the code that runs is looked up by action name, so a flow
    rebuilt after an upgrade runs the new code of the same step.
    """

    def __init__(self, action: str, name: str | None = None,
                 undo: str | None = None, **args: Any) -> None:
        super().__init__(name=name or action, requires=list(args),
                         inject=args)
        self.action = action
        self.undo = undo or f"undo_{action}"

    def execute(self, **kwargs: Any) -> None:
        getattr(actions, f"do_{self.action}")(**kwargs)

    def revert(self, *_args: Any, **kwargs: Any) -> None:
        kwargs.pop("result", None)
        kwargs.pop("flow_failures", None)
        undo = getattr(actions, self.undo, actions.noop)
        undo(**kwargs)


def _flow(name: str, steps: Iterable[Step]) -> linear_flow.Flow:
    flow = linear_flow.Flow(name)
    flow.add(*steps)
    return flow


# Factories. Each takes the domain path(s) first; the pool records them in
# the logbook so recovery can take the same leases.


def create_image(sd_path: str, img_id: str, vol_id: str, capacity: int,
                 fmt: str, prealloc: str, voltype: str = "LEAF",
                 description: str = "") -> linear_flow.Flow:
    return _flow("create_image", [
        Step("make_image_dir", sd_path=sd_path, img_id=img_id),
        Step("create_volume", sd_path=sd_path, img_id=img_id,
             vol_id=vol_id, capacity=capacity, fmt=fmt, prealloc=prealloc,
             parent_id=None, voltype=voltype, description=description,
             staged=True),
        Step("publish_image", sd_path=sd_path, img_id=img_id),
    ])


def import_image(sd_path: str, img_id: str, vol_id: str, capacity: int,
                 fmt: str, prealloc: str, src: str, src_fmt: str,
                 voltype: str = "LEAF",
                 description: str = "") -> linear_flow.Flow:
    """A new image filled from an (already inspected) file."""
    return _flow("import_image", [
        Step("make_image_dir", sd_path=sd_path, img_id=img_id),
        Step("create_volume", sd_path=sd_path, img_id=img_id,
             vol_id=vol_id, capacity=capacity, fmt=fmt, prealloc=prealloc,
             parent_id=None, voltype=voltype, description=description,
             staged=True, legal=False),
        Step("import", undo="noop", sd_path=sd_path, img_id=img_id,
             vol_id=vol_id, src=src, src_fmt=src_fmt),
        _legalize(sd_path, img_id, vol_id, staged=True),
        Step("publish_image", sd_path=sd_path, img_id=img_id),
    ])


def adopt_image(sd_path: str, img_id: str, vol_id: str, capacity: int,
                fmt: str, src: str, voltype: str = "LEAF",
                description: str = "",
                disktype: str = "DATA") -> linear_flow.Flow:
    """A new image whose volume is an (already inspected) file, moved in."""
    return _flow("adopt_image", [
        Step("make_image_dir", sd_path=sd_path, img_id=img_id),
        Step("adopt_volume", sd_path=sd_path, img_id=img_id,
             vol_id=vol_id, src=src, capacity=capacity, fmt=fmt,
             voltype=voltype, description=description, disktype=disktype,
             staged=True),
        _legalize(sd_path, img_id, vol_id, staged=True),
        Step("publish_image", sd_path=sd_path, img_id=img_id),
    ])


def _legalize(sd_path, img_id, vol_id, staged=False, name="legalize"):
    return Step("update_volume", name=name, sd_path=sd_path, img_id=img_id,
                vol_id=vol_id, changes={"legality": "LEGAL"},
                undo={"legality": "ILLEGAL"}, staged=staged)


def snapshot(sd_path: str, img_id: str, leaf_id: str, vol_id: str,
             snap_id: str, capacity: int, leaf_description: str,
             snap_description: str, sequence: int) -> linear_flow.Flow:
    """Freeze the leaf as snapshot ``snap_id``; a new qcow2 leaf on top."""
    return _flow("snapshot", [
        Step("create_volume", sd_path=sd_path, img_id=img_id,
             vol_id=vol_id, capacity=capacity, fmt="COW",
             prealloc="SPARSE", parent_id=leaf_id, voltype="LEAF",
             legal=False, sequence=sequence),
        Step("update_volume", name="freeze_leaf", sd_path=sd_path,
             img_id=img_id, vol_id=leaf_id,
             changes={"voltype": "INTERNAL",
                      "description": snap_description},
             undo={"voltype": "LEAF", "description": leaf_description}),
        _legalize(sd_path, img_id, vol_id),
    ])


def merge_commit(sd_path: str, img_id: str, base_id: str, top_id: str,
                 grandchildren: list[str], base_undo: dict[str, Any],
                 base_changes: dict[str, Any]) -> linear_flow.Flow:
    """Commit ``top`` into its parent ``base``; ``base`` takes its place.

    The top volume is removed last, so until then every reader of the
    grandchildren still has a complete chain.
    """
    steps = [
        Step("update_volume", name="invalidate_base", sd_path=sd_path,
             img_id=img_id, vol_id=base_id,
             changes={"legality": "ILLEGAL"}, undo=base_undo),
        Step("commit", undo="noop", sd_path=sd_path, img_id=img_id,
             top_id=top_id, base_id=base_id),
    ]
    for child in grandchildren:
        steps.append(Step("rebase", name=f"rebase_{child}", undo="noop",
                          sd_path=sd_path, img_id=img_id, vol_id=child,
                          parent_id=base_id, unsafe=True))
        steps.append(Step("update_volume", name=f"reparent_{child}",
                          undo="noop", sd_path=sd_path, img_id=img_id,
                          vol_id=child, changes={"parent": base_id}))
    steps.append(Step("remove_volume", undo="noop", sd_path=sd_path,
                      img_id=img_id, vol_id=top_id))
    steps.append(Step("update_volume", name="validate_base", undo="noop",
                      sd_path=sd_path, img_id=img_id, vol_id=base_id,
                      changes=dict(base_changes, legality="LEGAL")))
    return _flow("merge_commit", steps)


def merge_stream(sd_path: str, img_id: str, base_id: str, top_id: str,
                 new_parent: str | None) -> linear_flow.Flow:
    """Pull ``base``'s data into its child ``top``; drop ``base``."""
    return _flow("merge_stream", [
        Step("update_volume", name="invalidate_top", sd_path=sd_path,
             img_id=img_id, vol_id=top_id,
             changes={"legality": "ILLEGAL"}, undo={"legality": "LEGAL"}),
        Step("rebase", undo="noop", sd_path=sd_path, img_id=img_id,
             vol_id=top_id, parent_id=new_parent, unsafe=False),
        Step("update_volume", name="validate_top", undo="noop",
             sd_path=sd_path, img_id=img_id, vol_id=top_id,
             changes={"legality": "LEGAL",
                      "parent": new_parent or sc.BLANK_UUID}),
        Step("remove_volume", undo="noop", sd_path=sd_path, img_id=img_id,
             vol_id=base_id),
    ])


def update_volume(sd_path: str, img_id: str, vol_id: str,
                  changes: dict[str, Any],
                  undo: dict[str, Any]) -> linear_flow.Flow:
    return _flow("update_volume", [
        Step("update_volume", sd_path=sd_path, img_id=img_id,
             vol_id=vol_id, changes=changes, undo=undo)])


def remove_volume(sd_path: str, img_id: str,
                  vol_ids: list[str]) -> linear_flow.Flow:
    """Remove volumes nothing depends on, children before parents."""
    return _flow("remove_volume", [
        Step("remove_volume", name=f"remove_{v}", undo="noop",
             sd_path=sd_path, img_id=img_id, vol_id=v) for v in vol_ids])


def revert(sd_path: str, img_id: str, leaf_id: str, snap_vol_id: str,
           vol_id: str, capacity: int, sequence: int,
           garbage: list[str]) -> linear_flow.Flow:
    """Replace the leaf with a fresh overlay on a snapshot's volume."""
    return _flow("revert", [
        Step("create_volume", sd_path=sd_path, img_id=img_id,
             vol_id=vol_id, capacity=capacity, fmt="COW",
             prealloc="SPARSE", parent_id=snap_vol_id, voltype="LEAF",
             legal=False, sequence=sequence),
        Step("update_volume", name="invalidate_leaf", sd_path=sd_path,
             img_id=img_id, vol_id=leaf_id,
             changes={"legality": "ILLEGAL"}, undo={"legality": "LEGAL"}),
        _legalize(sd_path, img_id, vol_id),
        *[Step("remove_volume", name=f"remove_{v}", undo="noop",
               sd_path=sd_path, img_id=img_id, vol_id=v)
          for v in [leaf_id, *garbage]],
    ])


def clone(src_sd_path: str, src_img_id: str, src_vol_id: str,
          sd_path: str, img_id: str, vol_id: str, capacity: int, fmt: str,
          prealloc: str, description: str = "") -> linear_flow.Flow:
    """A new single-volume image with a full (sparse) copy of a view."""
    return _flow("clone", [
        Step("make_image_dir", sd_path=sd_path, img_id=img_id),
        Step("create_volume", sd_path=sd_path, img_id=img_id,
             vol_id=vol_id, capacity=capacity, fmt=fmt, prealloc=prealloc,
             parent_id=None, voltype="LEAF", description=description,
             staged=True, legal=False),
        Step("convert", undo="noop", src_sd_path=src_sd_path,
             src_img_id=src_img_id, src_vol_id=src_vol_id,
             sd_path=sd_path, img_id=img_id, vol_id=vol_id,
             fmt="qcow2" if fmt == "COW" else "raw", staged=True),
        _legalize(sd_path, img_id, vol_id, staged=True),
        Step("publish_image", sd_path=sd_path, img_id=img_id),
    ])


def thin_clone(sd_path: str, tmpl_img_id: str, tmpl_vol_id: str,
               img_id: str, vol_id: str, capacity: int,
               description: str = "") -> linear_flow.Flow:
    """A new image whose first layer is a qcow2 overlay on a template."""
    return _flow("thin_clone", [
        Step("make_image_dir", sd_path=sd_path, img_id=img_id),
        Step("link_volume", sd_path=sd_path, src_img_id=tmpl_img_id,
             vol_id=tmpl_vol_id, img_id=img_id),
        Step("create_volume", sd_path=sd_path, img_id=img_id,
             vol_id=vol_id, capacity=capacity, fmt="COW",
             prealloc="SPARSE", parent_id=tmpl_vol_id, voltype="LEAF",
             description=description, staged=True),
        Step("publish_image", sd_path=sd_path, img_id=img_id),
    ])


def extend(sd_path: str, img_id: str, vol_id: str,
           size: int) -> linear_flow.Flow:
    return _flow("extend", [
        Step("update_volume", name="invalidate", sd_path=sd_path,
             img_id=img_id, vol_id=vol_id,
             changes={"legality": "ILLEGAL"}, undo={"legality": "LEGAL"}),
        Step("resize", undo="noop", sd_path=sd_path, img_id=img_id,
             vol_id=vol_id, size=size),
        Step("update_volume", name="validate", undo="noop",
             sd_path=sd_path, img_id=img_id, vol_id=vol_id,
             changes={"legality": "LEGAL", "capacity": size}),
    ])


def copy_image(src_sd_path: str, img_id: str, sd_path: str,
               volumes: list[dict[str, Any]],
               templates: list[dict[str, Any]],
               remove_source: bool) -> linear_flow.Flow:
    """Copy an image's volumes (base first) into another domain.

    ``volumes`` are the metadata fields of each own volume, in an order
    where parents come first; only each volume's top layer is copied, so
    the copy keeps the snapshots. ``templates`` are shared template
    volumes the image depends on; each must already exist in the target
    domain (as its own template image) and is linked in.
    """
    steps = [Step("make_image_dir", sd_path=sd_path, img_id=img_id)]
    for t in templates:
        steps.append(Step("link_volume", name=f"link_{t['vol_id']}",
                          sd_path=sd_path, src_img_id=t["img_id"],
                          vol_id=t["vol_id"], img_id=img_id))
    for v in volumes:
        vol_id = v["vol_id"]
        steps.append(Step(
            "create_volume", name=f"create_{vol_id}", sd_path=sd_path,
            img_id=img_id, vol_id=vol_id, capacity=v["capacity"],
            fmt=v["format"], prealloc=v["type"], parent_id=v["parent"],
            voltype=v["voltype"], description=v["description"],
            staged=True, legal=False, sequence=v["sequence"]))
        steps.append(Step(
            "convert", name=f"copy_{vol_id}", undo="noop",
            src_sd_path=src_sd_path, src_img_id=img_id,
            src_vol_id=vol_id, sd_path=sd_path, img_id=img_id,
            vol_id=vol_id, staged=True, top_only=True,
            fmt="qcow2" if v["format"] == "COW" else "raw"))
    for v in volumes:
        steps.append(_legalize(sd_path, img_id, v["vol_id"], staged=True,
                               name=f"legalize_{v['vol_id']}"))
    steps.append(Step("publish_image", sd_path=sd_path, img_id=img_id))
    if remove_source:
        steps.append(Step("remove_image", name="remove_source",
                          undo="noop", sd_path=src_sd_path, img_id=img_id))
    return _flow("copy_image", steps)


def remove_image(sd_path: str, img_id: str) -> linear_flow.Flow:
    return _flow("remove_image", [
        Step("remove_image", undo="noop", sd_path=sd_path, img_id=img_id)])


def export_volume(sd_path: str, img_id: str, vol_id: str, dst: str,
                  fmt: str) -> linear_flow.Flow:
    return _flow("export_volume", [
        Step("export", undo="noop", sd_path=sd_path, img_id=img_id,
             vol_id=vol_id, dst=dst, fmt=fmt)])


# Running and recovering


class FlowRunner:
    """Runs factories against a persisted logbook; recovers the rest."""

    def __init__(self, connection: str, owner: str | None = None,
                 listeners: Iterable[Callable[[Any], Any]] = ()) -> None:
        self.owner = owner or socket.gethostname()
        self.listeners = list(listeners)
        self._books_dir: str | None = None
        if "://" in connection:
            conf = {"connection": connection}
        else:
            os.makedirs(connection, exist_ok=True)
            conf = {"connection": "dir://", "path": connection}
            self._books_dir = os.path.join(connection, "books")
        self.backend = backends.fetch(conf)
        with contextlib.closing(self.backend.get_connection()) as conn:
            conn.upgrade()

    def run(self, factory: Callable[..., Any], domains: list[str],
            **kwargs: Any) -> None:
        """Run ``factory(**kwargs)``; ``domains``: paths whose lease the
        caller holds (recorded so recovery takes the same leases)."""
        book = models.LogBook(factory.__name__)
        book.meta = {"owner": self.owner, "domains": domains}
        engine = engines.load_from_factory(
            factory, factory_kwargs=kwargs, backend=self.backend,
            book=book)
        self._run(engine, book)

    def _run(self, engine, book) -> None:
        try:
            with contextlib.ExitStack() as stack:
                for make_listener in self.listeners:
                    stack.enter_context(make_listener(engine))
                engine.run()
        except BaseException:
            # Reverted: nothing is left to recover. Anything else (a
            # failed revert, an interrupt) stays in the logbook.
            if engine.storage.get_flow_state() == states.REVERTED:
                self._destroy(book)
            raise
        self._destroy(book)

    def _destroy(self, book) -> None:
        with contextlib.closing(self.backend.get_connection()) as conn:
            conn.destroy_logbook(book.uuid)

    def unfinished(self) -> Iterator[tuple[models.LogBook,
                                            models.FlowDetail]]:
        for book_id in self._book_ids():
            current = self._load(book_id)
            if current is not None:
                yield current

    def reload(self, book: models.LogBook
               ) -> tuple[models.LogBook, models.FlowDetail] | None:
        """The current state of ``book``: None once its flow is gone."""
        return self._load(book.uuid)

    def _book_ids(self) -> list[str]:
        if self._books_dir is None:
            with contextlib.closing(self.backend.get_connection()) as conn:
                return [b.uuid for b in conn.get_logbooks(lazy=True)]
        # The directory backend recreates a book's directory (holding only
        # its lock file) when a reader races its removal: such a directory
        # is not a book.
        return [name for name in os.listdir(self._books_dir)
                if os.path.exists(os.path.join(self._books_dir, name,
                                               "metadata"))]

    def _load(self, book_id: str
              ) -> tuple[models.LogBook, models.FlowDetail] | None:
        with contextlib.closing(self.backend.get_connection()) as conn:
            try:
                book = conn.get_logbook(book_id)
            except exc.NotFound:
                self._forget(book_id)
                return None
        details = list(book)
        if not details:
            self._destroy(book)
            return None
        return book, details[0]

    def _forget(self, book_id: str) -> None:
        if self._books_dir is not None:
            path = os.path.join(self._books_dir, book_id)
            if not os.path.exists(os.path.join(path, "metadata")):
                shutil.rmtree(path, ignore_errors=True)

    def recover(self, book: models.LogBook,
                detail: models.FlowDetail) -> str:
        """Finish (or revert) one unfinished flow; return its outcome."""
        if detail.state in FINISHED:
            self._destroy(book)
            return detail.state
        engine = engines.load_from_detail(detail, backend=self.backend)
        try:
            self._run(engine, book)
        except Exception:
            LOG.exception("Flow %s (%s) failed during recovery, reverted",
                          detail.name, book.uuid)
            self._destroy(book)
            return states.REVERTED
        return states.SUCCESS
