"""Recoverable operations: TaskFlow flows of :mod:`actions` steps.

Each operation is a module-level factory, listed in :data:`FACTORIES`,
that takes only serialisable arguments (domain, image and volume ids,
sizes, format names) and returns a linear flow of :class:`Step` tasks.
:class:`FlowRunner` records the factory's name and arguments in a
logbook before running it, so after a crash :meth:`FlowRunner.recover`
rebuilds the flow from the allow-list (never by importing a name read
from storage) and runs it to the end.

Two directions (doc/source/contributor/flows.rst):

- Steps before the point of no return undo what they did when a later
  step fails: TaskFlow reverts them in reverse order.
- Steps marked ``forward`` (the destructive one and every step after it:
  data committed into a base, a source removed) are never undone. If one
  fails, the flow stops with :class:`errors.OperationIncomplete`, its
  logbook is kept, and recovery runs it forward from where it stopped.

A revert that fails keeps its logbook too (state FAILURE); recovery goes
on reverting. A finished (or fully reverted) flow's logbook is deleted,
so the backend holds only work in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from typing import Any

from taskflow import engines
from taskflow import exceptions as tf_exc
from taskflow import states
from taskflow import task
from taskflow.patterns import linear_flow
from taskflow.persistence import models
from taskflow.types import failure as tf_failure

from ovirt_cinder.storage import actions
from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import logbook

__all__ = ["Step", "FlowRunner", "Pending", "FACTORIES", "FLOW_VERSION",
           "create_image", "snapshot", "merge_commit", "merge_stream",
           "update_volume", "remove_volume", "revert", "clone",
           "thin_clone", "extend", "copy_image", "remove_image",
           "import_image", "adopt_image", "export_volume",
           "upgrade_domain"]

LOG = logging.getLogger(__name__)

# Bumped when a factory's steps or arguments change meaning; recovery
# runs only books written with a version it knows.
FLOW_VERSION = 2
FINISHED = (states.SUCCESS, states.REVERTED)
FAILED = "FAILED"
SKIPPED = "SKIPPED"
BUSY = "BUSY"


class _ForwardOnly(Exception):
    """Raised by the revert of a forward step: stops TaskFlow's revert."""

    def __init__(self, step: str, cause: str) -> None:
        super().__init__(f"step {step} failed: {cause}")
        self.step = step
        self.cause = cause


class Step(task.Task):
    """Run ``actions.do_<action>``; revert with ``actions.<undo_action>``
    (default ``undo_<action>``), both with the same arguments.

    The step's name (unique in its flow) and arguments are all TaskFlow
    persists; the code that runs is looked up by action name, so a flow
    rebuilt after an upgrade runs the new code of the same step. A
    ``forward`` step is past the point of no return: its revert refuses,
    which stops the flow's revert there.
    """

    def __init__(self, action: str, name: str | None = None, *,
                 undo_action: str | None = None, forward: bool = False,
                 **args: Any) -> None:
        super().__init__(name=name or action,
                         requires=["ctx", *args], inject=args)
        self.action = action
        self.undo_action = undo_action or f"undo_{action}"
        self.forward = forward

    def execute(self, ctx: actions.Context, **kwargs: Any) -> None:
        getattr(actions, f"do_{self.action}")(ctx, **kwargs)

    def revert(self, ctx: actions.Context, *_args: Any,
               **kwargs: Any) -> None:
        result = kwargs.pop("result", None)
        failures = kwargs.pop("flow_failures", None) or {}
        if self.forward:
            cause = result if isinstance(result, tf_failure.Failure) \
                else next(iter(failures.values()), None)
            raise _ForwardOnly(self.name, cause.exception_str if cause
                               else "unknown failure")
        undo = getattr(actions, self.undo_action, None)
        if undo is None:
            raise errors.InvalidParameter(name="undo action",
                                          value=self.undo_action,
                                          reason="no such action")
        undo(ctx, **kwargs)


def _flow(name: str, steps: Iterable[Step]) -> linear_flow.Flow:
    flow = linear_flow.Flow(name)
    flow.add(*steps)
    return flow


def _forward(*steps: Step) -> list[Step]:
    """Mark steps as past the point of no return."""
    for step in steps:
        step.forward = True
    return list(steps)


# Factories. Each takes domain ids (resolved by the context to this
# host's paths) and is listed in FACTORIES for recovery.


def create_image(sd_id: str, img_id: str, vol_id: str, capacity: int,
                 fmt: str, prealloc: str, voltype: str = "LEAF",
                 description: str = "") -> linear_flow.Flow:
    return _flow("create_image", [
        Step("make_image_dir", sd_id=sd_id, img_id=img_id),
        Step("create_volume", sd_id=sd_id, img_id=img_id,
             vol_id=vol_id, capacity=capacity, fmt=fmt, prealloc=prealloc,
             parent_id=None, voltype=voltype, description=description,
             staged=True),
        Step("publish_image", sd_id=sd_id, img_id=img_id),
    ])


def import_image(sd_id: str, img_id: str, vol_id: str, capacity: int,
                 fmt: str, prealloc: str, src: str, src_fmt: str,
                 voltype: str = "LEAF",
                 description: str = "") -> linear_flow.Flow:
    """A new image filled from an (already inspected) file."""
    return _flow("import_image", [
        Step("make_image_dir", sd_id=sd_id, img_id=img_id),
        Step("create_volume", sd_id=sd_id, img_id=img_id,
             vol_id=vol_id, capacity=capacity, fmt=fmt, prealloc=prealloc,
             parent_id=None, voltype=voltype, description=description,
             staged=True, legal=False),
        Step("import", undo_action="noop", sd_id=sd_id, img_id=img_id,
             vol_id=vol_id, src=src, src_fmt=src_fmt),
        _legalize(sd_id, img_id, vol_id, staged=True),
        Step("publish_image", sd_id=sd_id, img_id=img_id),
    ])


def adopt_image(sd_id: str, img_id: str, vol_id: str, capacity: int,
                fmt: str, src: str, voltype: str = "LEAF",
                description: str = "",
                disktype: str = "DATA") -> linear_flow.Flow:
    """A new image whose volume is an (already inspected) file, moved in."""
    return _flow("adopt_image", [
        Step("make_image_dir", sd_id=sd_id, img_id=img_id),
        Step("adopt_volume", sd_id=sd_id, img_id=img_id,
             vol_id=vol_id, src=src, capacity=capacity, fmt=fmt,
             voltype=voltype, description=description, disktype=disktype,
             staged=True),
        _legalize(sd_id, img_id, vol_id, staged=True),
        Step("publish_image", sd_id=sd_id, img_id=img_id),
    ])


def _legalize(sd_id, img_id, vol_id, staged=False, name="legalize"):
    return Step("update_volume", name=name, sd_id=sd_id, img_id=img_id,
                vol_id=vol_id, changes={"legality": "LEGAL"},
                undo={"legality": "ILLEGAL"}, staged=staged)


def snapshot(sd_id: str, img_id: str, leaf_id: str, leaf_gen: int,
             vol_id: str, snap_id: str, capacity: int,
             leaf_description: str, snap_description: str,
             sequence: int, live: bool = False) -> linear_flow.Flow:
    """Freeze the leaf as snapshot ``snap_id``; a new qcow2 leaf on top.

    The freeze checks the leaf is still the LEAF of generation
    ``leaf_gen`` that was planned with, under the domain lease. ``live``:
    a daemon serves the image; once it writes into the new leaf
    (``live_snapshot``) the flow only goes forward.
    """
    steps = [
        Step("create_volume", sd_id=sd_id, img_id=img_id,
             vol_id=vol_id, capacity=capacity, fmt="COW",
             prealloc="SPARSE", parent_id=leaf_id, voltype="LEAF",
             legal=False, sequence=sequence, live=live),
        Step("update_volume", name="freeze_leaf", sd_id=sd_id,
             img_id=img_id, vol_id=leaf_id,
             changes={"voltype": "INTERNAL",
                      "description": snap_description},
             expect=_plan(leaf_gen, voltype="LEAF"),
             undo={"voltype": "LEAF", "description": leaf_description}),
    ]
    if not live:
        return _flow("snapshot", steps + [_legalize(sd_id, img_id, vol_id)])
    return _flow("snapshot", steps + _forward(
        Step("live_snapshot", sd_id=sd_id, img_id=img_id, vol_id=vol_id),
        _legalize(sd_id, img_id, vol_id)))


def _plan(generation: int, **fields: str) -> dict[str, Any]:
    return {"generation": generation, "legality": "LEGAL", **fields}


def merge_commit(sd_id: str, img_id: str, base_id: str, base_gen: int,
                 top_id: str, grandchildren: list[str],
                 base_changes: dict[str, Any],
                 live: bool = False) -> linear_flow.Flow:
    """Commit ``top`` into its parent ``base``; ``base`` takes its place.

    Once the commit starts writing into the base, the base no longer
    holds the snapshot it held: from there the flow only goes forward.
    The top volume is removed last, so until then every reader of the
    grandchildren still has a complete chain. ``live``: the daemon serving
    the image commits (and writes the new backing name into the volume
    above the top, so that rebase finds it done).
    """
    steps = [
        Step("update_volume", name="invalidate_base", sd_id=sd_id,
             img_id=img_id, vol_id=base_id,
             changes={"legality": "ILLEGAL"}, expect=_plan(base_gen),
             undo={"legality": "LEGAL"}),
    ]
    forward = [Step("live_commit" if live else "commit", name="commit",
                    sd_id=sd_id, img_id=img_id, top_id=top_id,
                    base_id=base_id)]
    for child in grandchildren:
        forward.append(Step("rebase", name=f"rebase_{child}", sd_id=sd_id,
                            img_id=img_id, vol_id=child, parent_id=base_id,
                            unsafe=True))
        forward.append(Step("update_volume", name=f"reparent_{child}",
                            sd_id=sd_id, img_id=img_id, vol_id=child,
                            changes={"parent": base_id}))
    forward.append(Step("remove_volume", sd_id=sd_id, img_id=img_id,
                        vol_id=top_id))
    forward.append(Step("update_volume", name="validate_base", sd_id=sd_id,
                        img_id=img_id, vol_id=base_id,
                        changes=dict(base_changes, legality="LEGAL")))
    return _flow("merge_commit", steps + _forward(*forward))


def merge_stream(sd_id: str, img_id: str, base_id: str, top_id: str,
                 top_gen: int, new_parent: str | None,
                 live: bool = False) -> linear_flow.Flow:
    """Pull ``base``'s data into its child ``top``; drop ``base``.

    Once the rebase changed the top's backing file the old chain is gone:
    from there the flow only goes forward. ``live``: the daemon serving
    the image streams.
    """
    if live:
        pull = Step("live_stream", name="rebase", sd_id=sd_id,
                    img_id=img_id, vol_id=top_id, base_id=base_id,
                    parent_id=new_parent)
    else:
        pull = Step("rebase", sd_id=sd_id, img_id=img_id, vol_id=top_id,
                    parent_id=new_parent, unsafe=False)
    return _flow("merge_stream", [
        Step("update_volume", name="invalidate_top", sd_id=sd_id,
             img_id=img_id, vol_id=top_id, expect=_plan(top_gen),
             changes={"legality": "ILLEGAL"}, undo={"legality": "LEGAL"}),
        *_forward(
            pull,
            Step("update_volume", name="validate_top", sd_id=sd_id,
                 img_id=img_id, vol_id=top_id,
                 changes={"legality": "LEGAL",
                          "parent": new_parent or sc.BLANK_UUID}),
            Step("remove_volume", sd_id=sd_id, img_id=img_id,
                 vol_id=base_id)),
    ])


def update_volume(sd_id: str, img_id: str, vol_id: str, gen: int,
                  changes: dict[str, Any],
                  undo: dict[str, Any]) -> linear_flow.Flow:
    return _flow("update_volume", [
        Step("update_volume", sd_id=sd_id, img_id=img_id, vol_id=vol_id,
             changes=changes, undo=undo, expect={"generation": gen})])


def remove_volume(sd_id: str, img_id: str,
                  vol_ids: list[str]) -> linear_flow.Flow:
    """Remove volumes nothing depends on, children before parents."""
    return _flow("remove_volume", _forward(*[
        Step("remove_volume", name=f"remove_{v}", sd_id=sd_id,
             img_id=img_id, vol_id=v) for v in vol_ids]))


def revert(sd_id: str, img_id: str, leaf_id: str, leaf_gen: int,
           snap_vol_id: str, vol_id: str, capacity: int, sequence: int,
           garbage: list[str]) -> linear_flow.Flow:
    """Replace the leaf with a fresh overlay on a snapshot's volume.

    Once the old leaf is being removed its data is going: from there the
    flow only goes forward.
    """
    return _flow("revert", [
        Step("create_volume", sd_id=sd_id, img_id=img_id,
             vol_id=vol_id, capacity=capacity, fmt="COW",
             prealloc="SPARSE", parent_id=snap_vol_id, voltype="LEAF",
             legal=False, sequence=sequence),
        Step("update_volume", name="invalidate_leaf", sd_id=sd_id,
             img_id=img_id, vol_id=leaf_id, expect=_plan(leaf_gen),
             changes={"legality": "ILLEGAL"}, undo={"legality": "LEGAL"}),
        _legalize(sd_id, img_id, vol_id),
        *_forward(*[Step("remove_volume", name=f"remove_{v}", sd_id=sd_id,
                         img_id=img_id, vol_id=v)
                    for v in [leaf_id, *garbage]]),
    ])


def clone(src_sd_id: str, src_img_id: str, src_vol_id: str,
          sd_id: str, img_id: str, vol_id: str, capacity: int, fmt: str,
          prealloc: str, description: str = "") -> linear_flow.Flow:
    """A new single-volume image with a full (sparse) copy of a view."""
    return _flow("clone", [
        Step("make_image_dir", sd_id=sd_id, img_id=img_id),
        Step("create_volume", sd_id=sd_id, img_id=img_id,
             vol_id=vol_id, capacity=capacity, fmt=fmt, prealloc=prealloc,
             parent_id=None, voltype="LEAF", description=description,
             staged=True, legal=False),
        Step("convert", undo_action="noop", src_sd_id=src_sd_id,
             src_img_id=src_img_id, src_vol_id=src_vol_id,
             sd_id=sd_id, img_id=img_id, vol_id=vol_id,
             fmt="qcow2" if fmt == "COW" else "raw", staged=True),
        _legalize(sd_id, img_id, vol_id, staged=True),
        Step("publish_image", sd_id=sd_id, img_id=img_id),
    ])


def thin_clone(sd_id: str, tmpl_img_id: str, tmpl_vol_id: str,
               img_id: str, vol_id: str, capacity: int,
               description: str = "") -> linear_flow.Flow:
    """A new image whose first layer is a qcow2 overlay on a template."""
    return _flow("thin_clone", [
        Step("make_image_dir", sd_id=sd_id, img_id=img_id),
        Step("link_volume", sd_id=sd_id, src_img_id=tmpl_img_id,
             vol_id=tmpl_vol_id, img_id=img_id),
        Step("create_volume", sd_id=sd_id, img_id=img_id,
             vol_id=vol_id, capacity=capacity, fmt="COW",
             prealloc="SPARSE", parent_id=tmpl_vol_id, voltype="LEAF",
             description=description, staged=True),
        Step("publish_image", sd_id=sd_id, img_id=img_id),
    ])


def extend(sd_id: str, img_id: str, vol_id: str, gen: int,
           size: int, live: bool = False) -> linear_flow.Flow:
    """Grow the leaf. A resize that fails (or whose step fails after it)
    is undone: the volume shrinks back to the capacity its metadata
    still records, dropping only the new, empty part. Once the final
    metadata write starts, the flow only goes forward. ``live``: the
    daemon serving the image resizes, and from then on the guest may
    have seen the new size, so the resize is never undone."""
    invalidate = Step("update_volume", name="invalidate", sd_id=sd_id,
                      img_id=img_id, vol_id=vol_id, expect=_plan(gen),
                      changes={"legality": "ILLEGAL"},
                      undo={"legality": "LEGAL"})
    validate = Step("update_volume", name="validate", sd_id=sd_id,
                    img_id=img_id, vol_id=vol_id,
                    changes={"legality": "LEGAL", "capacity": size})
    if live:
        return _flow("extend", [invalidate, *_forward(
            Step("live_resize", name="resize", sd_id=sd_id, img_id=img_id,
                 vol_id=vol_id, size=size), validate)])
    return _flow("extend", [
        invalidate,
        Step("resize", sd_id=sd_id, img_id=img_id, vol_id=vol_id,
             size=size),
        *_forward(validate),
    ])


def copy_image(src_sd_id: str, img_id: str, sd_id: str,
               volumes: list[dict[str, Any]],
               templates: list[dict[str, Any]],
               remove_source: bool) -> linear_flow.Flow:
    """Copy an image's volumes (base first) into another domain.

    ``volumes`` are the metadata fields of each own volume, in an order
    where parents come first; only each volume's top layer is copied, so
    the copy keeps the snapshots. ``templates`` are shared template
    volumes the image depends on; each must already exist in the target
    domain (as its own template image) and is linked in. Removing the
    source (a move) comes after the copy is published and is never
    undone: the copy is then the only complete one.
    """
    steps = [Step("make_image_dir", sd_id=sd_id, img_id=img_id)]
    for t in templates:
        steps.append(Step("link_volume", name=f"link_{t['vol_id']}",
                          sd_id=sd_id, src_img_id=t["img_id"],
                          vol_id=t["vol_id"], img_id=img_id))
    for v in volumes:
        vol_id = v["vol_id"]
        steps.append(Step(
            "create_volume", name=f"create_{vol_id}", sd_id=sd_id,
            img_id=img_id, vol_id=vol_id, capacity=v["capacity"],
            fmt=v["format"], prealloc=v["type"], parent_id=v["parent"],
            voltype=v["voltype"], description=v["description"],
            staged=True, legal=False, sequence=v["sequence"]))
        steps.append(Step(
            "convert", name=f"copy_{vol_id}", undo_action="noop",
            src_sd_id=src_sd_id, src_img_id=img_id,
            src_vol_id=vol_id, sd_id=sd_id, img_id=img_id,
            vol_id=vol_id, staged=True, top_only=True,
            fmt="qcow2" if v["format"] == "COW" else "raw"))
    for v in volumes:
        steps.append(_legalize(sd_id, img_id, v["vol_id"], staged=True,
                               name=f"legalize_{v['vol_id']}"))
    steps.append(Step("publish_image", sd_id=sd_id, img_id=img_id))
    if remove_source:
        steps += _forward(Step("remove_image", name="remove_source",
                               sd_id=src_sd_id, img_id=img_id))
    return _flow("copy_image", steps)


def remove_image(sd_id: str, img_id: str) -> linear_flow.Flow:
    return _flow("remove_image", _forward(
        Step("remove_image", sd_id=sd_id, img_id=img_id)))


def export_volume(sd_id: str, img_id: str, vol_id: str, dst: str,
                  fmt: str) -> linear_flow.Flow:
    return _flow("export_volume", [
        Step("export", undo_action="noop", sd_id=sd_id, img_id=img_id,
             vol_id=vol_id, dst=dst, fmt=fmt)])


def upgrade_domain(sd_id: str) -> linear_flow.Flow:
    """Upgrade a V3 or V4 domain to V5 in place, in vdsm's order.

    Before the domain's version write every state is a valid V3 or V4
    domain (an xleases volume and CAP keys added): a failure there
    reverts nothing. The version write is the point of no return; after
    it the volume records are rewritten in the V5 format, and a reader
    ignores the V4 keys left until then. Steps: :mod:`actions`.
    """
    return _flow("upgrade_domain", [
        Step("upgrade_v4", undo_action="noop", sd_id=sd_id),
        Step("convert_volumes_metadata", undo_action="noop", sd_id=sd_id),
        *_forward(
            Step("convert_metadata", sd_id=sd_id),
            Step("finalize_volumes_metadata", sd_id=sd_id)),
    ])


# The only factories recovery rebuilds, by the name a logbook records.
FACTORIES: dict[str, Callable[..., linear_flow.Flow]] = {
    f.__name__: f for f in (
        create_image, import_image, adopt_image, snapshot, merge_commit,
        merge_stream, update_volume, remove_volume, revert, clone,
        thin_clone, extend, copy_image, remove_image, export_volume,
        upgrade_domain)}
# Flows whose arguments name files outside the domains (a staged upload,
# an export target): only their own host may finish them.
HOST_LOCAL = frozenset({"import_image", "adopt_image", "export_volume"})


# Running and recovering


@dataclasses.dataclass
class Pending:
    """An unfinished flow found in the logbook.

    ``problem`` says why it cannot be run as it is (a torn book, a
    factory or version not on the allow-list); such a book is never run.
    """

    book_id: str
    name: str
    meta: dict[str, Any]
    book: models.LogBook | None = None
    detail: models.FlowDetail | None = None
    problem: str | None = None

    @property
    def images(self) -> list[tuple[str, str]]:
        return [(sd_id, img_id) for sd_id, img_id
                in self.meta.get("images", [])]

    @property
    def domains(self) -> list[str]:
        return list(self.meta.get("domains", []))

    @property
    def owner(self) -> dict[str, Any]:
        return dict(self.meta.get("owner") or {})


class FlowRunner:
    """Runs factories against a persisted logbook; recovers the rest."""

    def __init__(self, connection: str, owner: dict[str, Any] | None = None,
                 listeners: Iterable[Callable[[Any], Any]] = ()) -> None:
        self.owner = owner or {}
        self.listeners = list(listeners)
        self.backend = logbook.fetch(connection)

    def run(self, factory: Callable[..., linear_flow.Flow],
            ctx: actions.Context, *, domains: list[str],
            images: list[tuple[str, str]], **kwargs: Any) -> None:
        """Run ``factory(**kwargs)``. ``domains`` and ``images``: what the
        flow touches; the caller holds those images' leases, and recovery
        takes the same ones."""
        name = factory.__name__
        if FACTORIES.get(name) is not factory:
            raise errors.InvalidParameter(name="flow factory", value=name,
                                          reason="not in FACTORIES")
        book = models.LogBook(name)
        book.meta = {"factory": name, "version": FLOW_VERSION,
                     "kwargs": kwargs, "owner": self.owner,
                     "domains": list(domains),
                     "images": [list(i) for i in images]}
        detail = models.FlowDetail(name, str(uuid.uuid4()))
        book.add(detail)
        logbook.save_book(self.backend, book)
        self._run(self._engine(factory(**kwargs), book, detail, ctx), book)

    def _engine(self, flow, book, detail, ctx):
        engine = engines.load(flow, flow_detail=detail, book=book,
                              backend=self.backend)
        engine.storage.inject({"ctx": ctx}, transient=True)
        return engine

    def _run(self, engine, book: models.LogBook) -> None:
        try:
            with contextlib.ExitStack() as stack:
                for make_listener in self.listeners:
                    stack.enter_context(make_listener(engine))
                engine.run()
        except BaseException as e:
            state = engine.storage.get_flow_state()
            if state == states.REVERTED:
                # Nothing is left to recover.
                logbook.destroy_book(self.backend, book.uuid)
            halted = _find(e, _ForwardOnly)
            if halted is not None:
                raise errors.OperationIncomplete(
                    operation=book.name, reason=halted.cause) from e
            # A failed revert or an interrupt stays in the logbook.
            real = _unwrap(e)
            if real is e:
                raise
            raise real from None
        logbook.destroy_book(self.backend, book.uuid)

    # Reading the logbook

    def unfinished(self) -> Iterator[Pending]:
        """Every unfinished flow; torn books are quarantined and reported
        (never raised), so one bad book never hides the others."""
        for book_id in logbook.book_ids(self.backend):
            pending = self.load(book_id)
            if pending is not None:
                yield pending

    def load(self, book_id: str) -> Pending | None:
        """The current state of a book; None once its flow is gone."""
        try:
            book = logbook.load_book(self.backend, book_id)
        except logbook.TornBook as e:
            where = logbook.quarantine(self.backend, book_id)
            LOG.error("%s; quarantined at %s", e, where)
            return Pending(book_id, "?", {}, problem=f"{e}; quarantined "
                           f"at {where}")
        if book is None:
            return None
        meta = dict(book.meta or {})
        details = list(book)
        pending = Pending(book_id, str(meta.get("factory", book.name)),
                          meta, book, details[0] if details else None)
        pending.problem = _untrusted(pending)
        return pending

    def busy_images(self) -> set[tuple[str, str]]:
        """(sd_id, img_id) of every image an unfinished flow names."""
        return {i for p in self.unfinished() for i in p.images}

    # Recovering

    def recover(self, pending: Pending, ctx: actions.Context) -> str:
        """Finish (or go on reverting) one unfinished flow whose image
        leases the caller holds; return SUCCESS, REVERTED or FAILED."""
        if pending.problem:
            raise errors.UntrustedFlow(book_id=pending.book_id,
                                       reason=pending.problem)
        book, detail = pending.book, pending.detail
        assert book is not None
        if detail is None or detail.state in FINISHED:
            logbook.destroy_book(self.backend, book.uuid)
            return detail.state if detail else states.SUCCESS
        flow = FACTORIES[pending.name](**pending.meta["kwargs"])
        engine = self._engine(flow, book, detail, ctx)
        _prepare_resume(engine, flow)
        try:
            self._run(engine, book)
        except Exception:
            state = engine.storage.get_flow_state()
            if state == states.REVERTED:
                return states.REVERTED
            LOG.exception("Flow %s (%s) failed again during recovery; "
                          "its logbook is kept", pending.name, book.uuid)
            return FAILED
        return states.SUCCESS


def _untrusted(pending: Pending) -> str | None:
    meta = pending.meta
    if pending.name not in FACTORIES:
        return f"unknown flow factory {pending.name!r}"
    if meta.get("version") != FLOW_VERSION:
        return f"flow version {meta.get('version')!r} is not " \
               f"{FLOW_VERSION}"
    if not isinstance(meta.get("kwargs"), dict):
        return "no factory arguments"
    if pending.detail is None:
        return "no flow detail"
    try:
        FACTORIES[pending.name](**meta["kwargs"])
    except (TypeError, KeyError, ValueError) as e:
        return f"bad factory arguments: {e}"
    return None


def _prepare_resume(engine, flow: linear_flow.Flow) -> None:
    """Set a stopped flow up to go on in its direction.

    A flow that reached a forward step runs forward again from the first
    step that did not finish. A flow whose revert failed goes on
    reverting. A flow interrupted while running resumes as TaskFlow
    left it.
    """
    storage = engine.storage
    if storage.get_flow_state() not in (states.FAILURE, states.REVERTING,
                                        states.RUNNING):
        return
    steps = list(flow)
    started = {states.RUNNING, states.SUCCESS, states.FAILURE,
               states.REVERTING, states.REVERT_FAILURE, states.REVERTED}
    if any(s.forward and storage.get_atom_state(s.name) in started
           for s in steps):
        for s in steps:
            storage.set_atom_intention(s.name, states.EXECUTE)
            if storage.get_atom_state(s.name) != states.SUCCESS:
                storage.set_atom_state(s.name, states.PENDING)
        storage.set_flow_state(states.PENDING)
    elif storage.get_flow_state() == states.FAILURE:
        for s in steps:
            if storage.get_atom_state(s.name) == states.REVERT_FAILURE:
                storage.set_atom_state(s.name, states.FAILURE)
        storage.set_flow_state(states.RUNNING)


def _find(e: BaseException, cls: type) -> Any:
    if isinstance(e, cls):
        return e
    if isinstance(e, tf_exc.WrappedFailure):
        for f in e:
            if f.check(cls) and f.exception is not None:
                return f.exception
    return None


def _unwrap(e: BaseException) -> BaseException:
    """The first real error of a TaskFlow WrappedFailure."""
    if isinstance(e, tf_exc.WrappedFailure):
        for f in e:
            if f.exception is not None:
                return f.exception
    return e
