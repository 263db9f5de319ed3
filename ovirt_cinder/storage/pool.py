"""Storage pools: the public API of the engine.

A pool is a UUID and the file domains whose metadata names it; one of them
is the master (``ROLE=Master``) and keeps the pool's logbook of unfinished
work in a directory of our own, ``master/ovirt-cinder/flows`` (not in
oVirt's ``master/tasks``). A pool is opened from the mount paths that hold
its domains (``<mount>/<sd_id>``), which is what a Cinder backend or the
CLI is configured with; a domain whose metadata cannot be read is kept in
:attr:`StoragePool.broken` and the others stay usable.

Every mutating method takes the image leases of the images it touches,
refuses an image that an unfinished flow names, reads the image and checks
its chain, plans (chooses ids, direction of a merge, what becomes
garbage), and runs the matching flow of :mod:`flows` while still holding
the image leases: the plan is made under the lease it is carried out
with. Each step takes the domain's SDM lease only for its metadata
change, and the first step that acts on the plan re-checks it under that
lease (see :mod:`lease`). Methods return :class:`image.Volume` objects
re-read from storage.

An image can be attached (:meth:`StoragePool.attach`): a daemon on this
host serves its chain (:mod:`attach`). Its snapshot, snapshot deletion and
extend then run live, through the daemon; a copy reads a temporary live
snapshot; a revert, a deletion and a move are refused (``VolumeAttached``).
doc/source/contributor/attach.rst has the whole design.

Opening and reading a pool imports none of TaskFlow, oslo.privsep and
eventlet: :func:`load_engine` imports them when the pool first runs or
recovers a flow, exports or deals with attached images, and says why
that import never runs in a worker thread.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from typing import TYPE_CHECKING
from typing import Any

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import counters
from ovirt_cinder.storage import description
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fileutil
from ovirt_cinder.storage import image
from ovirt_cinder.storage import lease
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage import sd
from ovirt_cinder.storage import sdmeta
from ovirt_cinder.storage import validate

__all__ = ["StoragePool", "FLOWS_DIR", "load_engine"]

LOG = logging.getLogger(__name__)

# The logbook directory, relative to the master domain's master/.
FLOWS_DIR = os.path.join("ovirt-cinder", "flows")

Images = Iterable[tuple[sd.FileDomain, str]]

_LIVE_OWNER = "owned by live host"

# The modules of mutating work: flows (TaskFlow and networkx), actions
# and attach (through qsd: oslo.privsep and eventlet). Importing them
# takes about 0.5 s that reading a pool (``ovirt-storage pool show``)
# does not need, so load_engine() imports them when a pool first runs or
# recovers a flow, exports or deals with attached images; until then the
# names below are stand-ins that call it.
_ENGINE = ("actions", "attach", "flows")
_engine_lock = threading.Lock()
_engine_loaded = False


def load_engine() -> None:
    """Import the modules of mutating work, once; thread-safe.

    A service calls it in the thread that starts it
    (``config.open_pool``); otherwise the stand-ins call it when a
    pool's method first needs one of the modules.

    Never in a worker thread: eventlet, imported by oslo.privsep and by
    TaskFlow (through futurist), runs a second copy of the ``threading``
    module as it is imported (``patcher.original('threading')``), and the
    copy's ``_MainThread()`` calls ``_thread._set_sentinel()`` in the
    importing thread. That replaces the lock the interpreter releases
    when the thread ends, so the thread's ``Thread`` object never sees
    it end: ``join()`` waits forever, and so does the interpreter's exit,
    which joins every non-daemon thread. The torture workers hung so at
    exit when a worker thread was the first to import the flows module.
    The main thread is safe (the exit releases its lock itself), and so
    is a daemon thread no one joins: off the main thread the imports run
    in a daemon thread of their own, which the caller waits for on an
    event. Not to be called while importing a module the engine imports
    (the daemon thread would wait for the caller's import lock).
    """
    global _engine_loaded, actions, attach, flows
    if _engine_loaded:
        return
    with _engine_lock:
        if _engine_loaded:
            return
        if threading.current_thread() is threading.main_thread():
            _import_engine()
        else:
            _import_engine_aside()
        # The stand-ins give way to the modules themselves.
        actions, attach, flows = (sys.modules[f"{__package__}.{name}"]
                                  for name in _ENGINE)
        _engine_loaded = True


def _import_engine() -> None:
    for name in _ENGINE:
        importlib.import_module(f"{__package__}.{name}")


def _import_engine_aside() -> None:
    """_import_engine() in a daemon thread (see load_engine)."""
    done = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            _import_engine()
        except BaseException as e:      # raised again in the caller
            failed.append(e)
        finally:
            done.set()

    threading.Thread(target=run, name="engine-import", daemon=True).start()
    done.wait()
    if failed:
        raise failed[0]


class _EngineModule:
    """Stands for an engine module: loads the engine on first use."""

    def __init__(self, name: str) -> None:
        self._name = f"{__package__}.{name}"

    def __getattr__(self, attr: str) -> Any:
        load_engine()
        return getattr(sys.modules[self._name], attr)


if TYPE_CHECKING:
    from ovirt_cinder.storage import actions
    from ovirt_cinder.storage import attach
    from ovirt_cinder.storage import flows
else:
    actions, attach, flows = (_EngineModule(n) for n in _ENGINE)


class StoragePool:
    """A pool of file domains, with the operations of the engine."""

    def __init__(self, pool_id: str, domains: Iterable[sd.FileDomain], *,
                 lease_manager: lease.LeaseManager | None = None,
                 flow_connection: str | None = None,
                 listeners: Iterable[Callable[[Any], Any]] = (),
                 broken: dict[str, errors.StorageError] | None = None,
                 ownership: sd.Ownership | None = None,
                 run_path: str = sc.DEFAULT_RUN_PATH) -> None:
        self.pool_id = validate.check_uuid(pool_id, "pool id")
        self.domains = {d.sd_id: d for d in domains}
        # Who owns what the engine creates (ovirt_file_owner/_group).
        self.ownership = ownership or sd.Ownership()
        if ownership is not None:
            for dom in self.domains.values():
                dom.ownership = ownership
        self.lease_manager = lease_manager or lease.LocalLeaseManager()
        self.broken = dict(broken or {})
        self._flow_connection = flow_connection
        self._listeners = list(listeners)
        self._runner: flows.FlowRunner | None = None
        # The outcome of each book in the last recover() pass.
        self._last_outcomes: dict[str, str] = {}
        # The engine's objects, made on first use (see load_engine), once:
        # the runner, the attached images' daemons, the flows' context.
        self._run_path = run_path
        self._attachments: attach.Attachments | None = None
        self._context: actions.Context | None = None
        self._made_lock = threading.RLock()

    # Opening and creating

    @classmethod
    def open(cls, mounts: Iterable[str], pool_id: str | None = None,
             **kwargs: Any) -> StoragePool:
        """Open the pool whose domains are under ``mounts``."""
        mounts = list(mounts)
        found, broken = [], {}
        for mount in mounts:
            doms, bad = sd.scan_domains(mount)
            found += doms
            broken.update(bad)
        for path, error in sorted(broken.items()):
            LOG.error("Storage domain at %s is not usable: %s", path, error)
        if pool_id is None:
            masters = {d.pool_id for d in found if d.is_master}
            if len(masters) != 1:
                raise errors.InvalidParameter(
                    name="mounts", value=mounts,
                    reason=f"{len(masters)} pools found; give a pool id")
            pool_id = masters.pop()
        domains = [d for d in found if d.pool_id == pool_id]
        if not any(d.is_master for d in domains):
            raise errors.DomainNotFound(sd_id=f"master of pool {pool_id}")
        return cls(pool_id, domains, broken=broken, **kwargs)

    @classmethod
    def create(cls, mount: str, *, pool_id: str | None = None,
               sd_id: str | None = None, description: str = "",
               domain_type: sc.DomainType = sc.DomainType.LOCALFS,
               remote_path: str = "",
               **kwargs: Any) -> StoragePool:
        """Create a pool with its master domain in ``mount``.

        ``domain_type`` and ``remote_path`` (``server:/export`` for NFS;
        default ``mount``) are written as oVirt writes TYPE and
        REMOTE_PATH; ``ownership`` (a keyword of the pool) owns the files.
        """
        pool_id = pool_id or validate.new_uuid()
        master = sd.create_domain(
            mount, sd_id=sd_id or validate.new_uuid(), pool_id=pool_id,
            description=description, domain_type=domain_type,
            role=sc.DomainRole.MASTER, remote_path=remote_path,
            ownership=kwargs.get("ownership"),
            io_timeout=_io_timeout(kwargs.get("lease_manager")))
        pool = cls(pool_id, [master], **kwargs)
        pool.lease_manager.init_domain(master)
        return pool

    def add_domain(self, mount: str, *, sd_id: str | None = None,
                   description: str = "",
                   domain_type: sc.DomainType = sc.DomainType.LOCALFS,
                   remote_path: str = "") -> sd.FileDomain:
        dom = sd.create_domain(
            mount, sd_id=sd_id or validate.new_uuid(), pool_id=self.pool_id,
            description=description, domain_type=domain_type,
            remote_path=remote_path, ownership=self.ownership,
            io_timeout=_io_timeout(self.lease_manager))
        self.lease_manager.init_domain(dom)
        self.domains[dom.sd_id] = dom
        return dom

    def attach_domain(self, path: str, *,
                      force: bool = False) -> sd.FileDomain:
        """Make the oVirt data domain in ``path`` (``<mount>/<sd_id>``) a
        regular domain of this pool; return it.

        The domain must be detached (``POOL_UUID`` empty), or, with
        ``force``, name another pool none of whose hosts use it any more
        (the caller's promise, as oVirt's "import domain" forced detach:
        nothing here can see that pool's hosts). One metadata write under
        the domain's SDM lease sets ``POOL_UUID`` and ``ROLE=Regular``
        (``MASTER_VERSION=0`` when a former master has it) and keeps
        every other key (:func:`sdmeta.attached`); images are not
        touched. Refused: another class than Data, a domain already in
        this pool, a bad checksum, a version this engine cannot read. A
        V3 or V4 domain is read as it is and changed only once
        :meth:`upgrade_domain` made it V5. Later :meth:`open` finds it
        when its mount is among the pool's mounts.
        """
        dom = sd.FileDomain.open(os.path.abspath(path))
        self._check_attachable(dom.metadata, force)
        dom.ownership = self.ownership
        self.lease_manager.init_domain(dom)
        with self.lease_manager.domain_lease(dom):
            # What another host may have written meanwhile.
            md = sd.FileDomain.open(dom.path).metadata
            self._check_attachable(md, force)
            dom.write_metadata(sdmeta.attached(md, self.pool_id))
            # oVirt keeps no counters: built by a scan (a V3 or V4
            # domain gets them when it is upgraded).
            if md.version >= sc.DOMAIN_VERSION:
                counters.rebuild(dom)
        LOG.info("Attached storage domain %s (V%d, was pool %r) to pool "
                 "%s", dom.sd_id, md.version, md.pool_id, self.pool_id)
        self.domains[dom.sd_id] = dom
        return dom

    def _check_attachable(self, md: sdmeta.DomainMetadata,
                          force: bool) -> None:
        if md.cls != sc.DomainClass.DATA:
            raise errors.InvalidOperation(
                operation=f"attach domain {md.sd_id}",
                reason=f"it is a {md.cls} domain; only Data domains hold "
                "volumes")
        if md.sd_id in self.domains or md.pool_id == self.pool_id:
            raise errors.DomainAttached(
                sd_id=md.sd_id, pool_id=self.pool_id,
                reason="it is already in this pool" + (
                    "" if md.sd_id in self.domains else
                    "; add its mount to the pool's mounts"))
        if not sdmeta.is_detached(md) and not force:
            raise errors.DomainAttached(
                sd_id=md.sd_id, pool_id=md.pool_id,
                reason="detach it in oVirt first, or force the attach "
                "if no host of that pool uses it any more")

    def upgrade_domain(self, sd_id: str) -> sd.FileDomain:
        """Upgrade a V3 or V4 domain of the pool to V5 in place (the
        ``upgrade_domain`` flow, crash safe: see :mod:`flows`); on a V5
        domain, rewrite any volume record still in the V4 format."""
        dom = self.domain(sd_id)
        self.runner.run(flows.upgrade_domain, self.context,
                        domains=[dom.sd_id], images=[], sd_id=dom.sd_id)
        return dom

    # Domains and flows

    @property
    def master(self) -> sd.FileDomain:
        for dom in self.domains.values():
            if dom.is_master:
                return dom
        raise errors.DomainNotFound(sd_id=f"master of pool {self.pool_id}")

    def domain(self, sd_id: str) -> sd.FileDomain:
        try:
            return self.domains[validate.check_uuid(sd_id, "domain id")]
        except KeyError:
            raise errors.DomainNotFound(sd_id=sd_id) from None

    @property
    def flows_dir(self) -> str:
        return os.path.join(self.master.master_dir, FLOWS_DIR)

    @property
    def runner(self) -> flows.FlowRunner:
        with self._made_lock:
            if self._runner is None:
                conn = self._flow_connection or self.flows_dir
                self._runner = flows.FlowRunner(
                    conn, owner=self.lease_manager.owner,
                    listeners=self._listeners)
            return self._runner

    @property
    def attachments(self) -> attach.Attachments:
        """The daemons serving this host's attached images."""
        with self._made_lock:
            if self._attachments is None:
                self._attachments = attach.Attachments(self._run_path)
            return self._attachments

    @property
    def context(self) -> actions.Context:
        """What the steps of the flows need (:class:`actions.Context`)."""
        with self._made_lock:
            if self._context is None:
                self._context = actions.Context(
                    domains=self.domains, leases=self.lease_manager,
                    attachments=self.attachments)
            return self._context

    @contextlib.contextmanager
    def _operation(self, images: Images) -> Iterator[None]:
        """Hold the image leases of an operation for its whole run.

        An image that an unfinished flow names is refused: that flow
        planned with a chain no one else may change before it is
        finished (``recover``)."""
        images = list(images)
        with self.lease_manager.image_leases(images):
            busy = self.runner.busy_images()
            for dom, img_id in images:
                if (dom.sd_id, img_id) in busy:
                    raise errors.ImageIsBusy(
                        img_id=img_id, reason="an unfinished operation "
                        "holds it; finish it with `ovirt-storage recover`")
            yield

    def _run(self, factory: Callable[..., Any], images: Images,
             **kwargs: Any) -> None:
        """Run a flow; the caller holds ``images``' leases."""
        images = list(images)
        for dom in {d.sd_id: d for d, _ in images}.values():
            _require_current_format(dom)
        self.runner.run(factory, self.context,
                        domains=sorted({d.sd_id for d, _ in images}),
                        images=[(d.sd_id, i) for d, i in images], **kwargs)

    def _checked(self, dom: sd.FileDomain, img_id: str) -> image.ImageTree:
        """The image, refused if its chain is broken in any way: loops,
        missing parents, a qcow2 backing name other than the parent's id
        (a path outside the domain among them), external data files."""
        tree = self.image(dom.sd_id, img_id)
        problems = tree.problems()
        if problems:
            raise problems[0]
        return tree

    def recover(self, lease_timeout: float | None = None
                ) -> list[tuple[str, str]]:
        """Finish, or go on reverting, every unfinished flow this host may
        run; return (name, outcome) for each book seen.

        Nothing in a logbook is trusted: a factory not on the allow-list,
        an unknown version, or arguments that do not fit are not run
        (``UNTRUSTED``); a flow naming a domain this pool does not have is
        not run (``SKIPPED``: never with fewer leases than it names); a
        live owner's flow is left to it (``BUSY``); another host's flow
        runs only once sanlock declares that host dead, and a flow naming
        host-local files only on its own host. A recovery that fails
        keeps its book (``FAILED``).

        ``lease_timeout`` bounds the wait for each flow's image leases
        (None: the lease manager's ``lease_timeout``). A flow that this
        process, or another process of this host, is running right now
        holds them, so its book comes back ``BUSY`` once the wait ends: a
        periodic pass (the Cinder driver's) gives a short one and tries
        again next time instead of waiting a full lease timeout behind
        every running flow. A ``BUSY`` or ``SKIPPED`` outcome that only
        repeats the previous pass's for the same book is logged at DEBUG.
        """
        done = []
        outcomes: dict[str, str] = {}
        for pending in list(self.runner.unfinished()):
            before = self._last_outcomes.get(pending.book_id)
            outcome = self._recover_one(pending, lease_timeout,
                                        before=before)
            outcomes[pending.book_id] = outcome
            # BUSY and SKIPPED leave the book for a later pass.
            waiting = outcome in (flows.BUSY, flows.SKIPPED)
            repeated = outcome == before and waiting
            LOG.log(logging.DEBUG if repeated else logging.INFO,
                    "Recovery of flow %s (%s): %s", pending.name,
                    pending.book_id, outcome)
            done.append((pending.name, outcome))
        self._last_outcomes = outcomes
        return done

    def _recover_one(self, pending: flows.Pending,
                     lease_timeout: float | None = None, *,
                     before: str | None = None) -> str:
        reason = self._refusal(pending)
        if reason:
            outcome = "UNTRUSTED" if pending.problem else flows.SKIPPED
            # An untrusted book is worth a warning each time; a live
            # host's running flow (active-active) is no news at all.
            if outcome == before == flows.SKIPPED:
                level = logging.DEBUG
            elif reason.startswith(_LIVE_OWNER):
                level = logging.INFO
            else:
                level = logging.WARNING
            LOG.log(level, "Not recovering flow %s (%s): %s", pending.name,
                    pending.book_id, reason)
            return outcome
        images = [(self.domains[s], i) for s, i in pending.images]
        try:
            with self.lease_manager.image_leases(images,
                                                 timeout=lease_timeout):
                # The owner may have finished while we waited for it.
                current = self.runner.load(pending.book_id)
                if current is None:
                    return flows.states.SUCCESS
                outcome = self.runner.recover(current, self.context)
                self._rebuild_counters(current)
                return outcome
        except errors.LeaseTimeout:
            return flows.BUSY

    def _rebuild_counters(self, pending: flows.Pending) -> None:
        """Rebuild, by a scan under the domain lease, the counters of the
        domains a recovered flow names: its owner may have died between
        a metadata change and its count (a step run again finds its
        change done and counts nothing)."""
        names = set(pending.domains) | {s for s, _ in pending.images}
        for sd_id in sorted(names):
            dom = self.domains[sd_id]
            try:
                with self.lease_manager.domain_lease(dom):
                    old, new = counters.rebuild(dom)
            except (OSError, errors.StorageError) as e:
                LOG.warning("Counters of storage domain %s not rebuilt "
                            "after recovering flow %s: %s", sd_id,
                            pending.book_id, e)
                continue
            if old is not None and old.counters != new:
                LOG.warning("Counters of storage domain %s were off after "
                            "flow %s: %s, rebuilt as %s", sd_id,
                            pending.book_id, old.counters, new)

    def _refusal(self, pending: flows.Pending) -> str | None:
        if pending.problem:
            return pending.problem
        unknown = [s for s in pending.domains if s not in self.domains]
        unknown += [s for s, _ in pending.images if s not in self.domains]
        if unknown:
            return f"names domains this host does not have: {unknown}"
        owner = pending.owner
        if not self.lease_manager.owner_gone(self.master, owner):
            return f"{_LIVE_OWNER} {owner}"
        if (pending.name in flows.HOST_LOCAL
                and owner.get("host") != socket.gethostname()):
            return f"its files are on host {owner.get('host')}"
        return None

    # Attaching

    def attach(self, sd_id: str, img_id: str) -> str:
        """Serve the image's guest view from a daemon on this host and
        return the path of the view (a raw file of the guest's size).

        Idempotent: a daemon already serving the image's current chain is
        kept (``ensure_export`` after a restart of the caller); a dead
        one is cleaned up and started again. A daemon serving another
        chain than the metadata names (an operation cut short before
        ``recover``) is refused: nothing guesses which one is right.
        """
        dom = self.domain(sd_id)
        with self._operation([(dom, img_id)]):
            tree = self._checked(dom, img_id)
            chain = tree.chain()
            for vol in chain:
                if not vol.legal:
                    raise errors.IllegalVolume(
                        img_id=img_id, vol_id=vol.vol_id,
                        legality=str(vol.meta.legality))
            wanted = [v.vol_id for v in reversed(chain)]
            daemon = self.attachments.daemon(img_id)
            if daemon is not None:
                served = daemon.chain()
                if served != wanted:
                    raise errors.InvalidOperation(
                        operation="attach", reason=f"the daemon of image "
                        f"{img_id} serves {served}, the metadata names "
                        f"{wanted}; run `ovirt-storage recover`")
                return daemon.view
            layers = [actions.layer(v) for v in chain]
            return self.attachments.start(img_id, layers).view

    def detach(self, sd_id: str, img_id: str) -> None:
        """Stop serving the image: no daemon, view or mount is left."""
        dom = self.domain(sd_id)
        with self._operation([(dom, img_id)]):
            self.attachments.stop(img_id)

    def attached(self, img_id: str) -> str | None:
        """The view of ``img_id`` if a daemon serves it on this host."""
        daemon = self.attachments.daemon(img_id)
        return daemon.view if daemon is not None else None

    def _served_chain(self, img_id: str) -> list[str] | None:
        """Volume ids (top first) a daemon here serves, None if none."""
        daemon = self.attachments.daemon(img_id)
        return daemon.chain() if daemon is not None else None

    def _serving(self, img_id: str) -> bool:
        """Whether a daemon here serves ``img_id`` (no QMP call)."""
        return self.attachments.daemon(img_id) is not None

    def _refuse_attached(self, img_id: str, operation: str) -> None:
        if self._serving(img_id):
            raise errors.VolumeAttached(img_id=img_id, operation=operation)

    @contextlib.contextmanager
    def _readable(self, dom: sd.FileDomain, img_id: str,
                  snap_id: str | None) -> Iterator[image.Volume]:
        """A volume whose view stays still while it is read: the
        snapshot, or the top. The top of an attached image is moving:
        a temporary live snapshot freezes it, merged back afterwards
        (the caller holds the image lease)."""
        tree = self._checked(dom, img_id)
        if snap_id or not self._serving(img_id):
            yield tree.find_snapshot(snap_id) if snap_id else _top(tree)
            return
        temp = validate.new_uuid()
        self._snapshot(dom, tree, temp, temporary=True)
        try:
            yield self.image(dom.sd_id, img_id).find_snapshot(temp)
        finally:
            tree = self.image(dom.sd_id, img_id)
            frozen = tree.find_snapshot(temp)
            self._merge(dom, tree, frozen,
                        tree.get(tree.children(frozen.vol_id)[0]))

    # Reading

    def list_images(self, sd_id: str) -> list[str]:
        return self.domain(sd_id).list_images()

    def domain_counters(self, sd_id: str) -> counters.Counters:
        """The images, volumes and provisioned bytes of a domain, from
        its counters record (no lease: one small read); a scan of its
        images when the record is missing or bad (see :mod:`counters`)."""
        return counters.current(self.domain(sd_id))

    def image(self, sd_id: str, img_id: str) -> image.ImageTree:
        dom = self.domain(sd_id)
        if not dom.has_image(img_id):
            raise errors.ImageNotFound(sd_id=sd_id, img_id=img_id)
        return image.load(dom, img_id)

    def leaf(self, sd_id: str, img_id: str) -> image.Volume:
        return self.image(sd_id, img_id).leaf()

    def find_image(self, img_id: str) -> str:
        """The id of the domain holding ``img_id``."""
        for sd_id, dom in sorted(self.domains.items()):
            if dom.has_image(img_id):
                return sd_id
        raise errors.ImageNotFound(sd_id="*", img_id=img_id)

    # Creating

    def create_volume(self, sd_id: str, img_id: str, size: int, *,
                      fmt: sc.VolumeFormat = sc.VolumeFormat.COW,
                      prealloc: sc.Preallocation = sc.Preallocation.SPARSE,
                      voltype: sc.VolumeType = sc.VolumeType.LEAF,
                      vol_id: str | None = None,
                      description: str = "") -> image.Volume:
        """A new image with one empty volume."""
        dom = self.domain(sd_id)
        img_id = validate.check_uuid(img_id, "image id")
        vol_id = self._new_volume_id(vol_id)
        with self._operation([(dom, img_id)]):
            self._run(flows.create_image, [(dom, img_id)], sd_id=dom.sd_id,
                      img_id=img_id, vol_id=vol_id,
                      capacity=_check_size(size), fmt=str(fmt),
                      prealloc=str(prealloc), voltype=str(voltype),
                      description=description)
            return self.image(sd_id, img_id).get(vol_id)

    def import_volume(self, sd_id: str, img_id: str, src: str,
                      src_fmt: str, capacity: int, *,
                      fmt: sc.VolumeFormat = sc.VolumeFormat.RAW,
                      prealloc: sc.Preallocation = sc.Preallocation.SPARSE,
                      voltype: sc.VolumeType = sc.VolumeType.LEAF,
                      vol_id: str | None = None,
                      description: str = "") -> image.Volume:
        """A new image filled from ``src``, which the caller inspected."""
        dom = self.domain(sd_id)
        img_id = validate.check_uuid(img_id, "image id")
        vol_id = self._new_volume_id(vol_id)
        with self._operation([(dom, img_id)]):
            self._run(flows.import_image, [(dom, img_id)], sd_id=dom.sd_id,
                      img_id=img_id, vol_id=vol_id,
                      capacity=_check_size(capacity), fmt=str(fmt),
                      prealloc=str(prealloc), src=os.path.abspath(src),
                      src_fmt=src_fmt, voltype=str(voltype),
                      description=description)
            return self.image(sd_id, img_id).get(vol_id)

    def adopt_volume(self, sd_id: str, img_id: str, src: str,
                     capacity: int, *,
                     fmt: sc.VolumeFormat = sc.VolumeFormat.RAW,
                     voltype: sc.VolumeType = sc.VolumeType.LEAF,
                     vol_id: str | None = None, description: str = "",
                     disktype: sc.DiskType = sc.DiskType.DATA
                     ) -> image.Volume:
        """A new image whose volume is ``src``, moved in without a copy.

        ``src`` must be a file the caller wrote and inspected, on the
        domain's filesystem; it is renamed into the new image, so its
        bytes are kept exactly (a qcow2 stays the file that was given).
        """
        dom = self.domain(sd_id)
        if os.stat(src).st_dev != os.stat(dom.images_dir).st_dev:
            raise errors.InvalidParameter(
                name="src", value=src,
                reason=f"not on the filesystem of domain {sd_id}")
        img_id = validate.check_uuid(img_id, "image id")
        vol_id = self._new_volume_id(vol_id)
        with self._operation([(dom, img_id)]):
            self._run(flows.adopt_image, [(dom, img_id)], sd_id=dom.sd_id,
                      img_id=img_id, vol_id=vol_id,
                      capacity=_check_size(capacity), fmt=str(fmt),
                      src=os.path.abspath(src), voltype=str(voltype),
                      description=description, disktype=str(disktype))
            return self.image(sd_id, img_id).get(vol_id)

    # Snapshots

    def snapshot(self, sd_id: str, img_id: str, snap_id: str, *,
                 vol_id: str | None = None) -> image.Volume:
        """Freeze the leaf as ``snap_id``; return the frozen volume.

        Of an attached image, live: the daemon serving it writes into
        the new leaf from the moment the snapshot is taken."""
        validate.check_uuid(snap_id, "snapshot id")
        dom = self.domain(sd_id)
        with self._operation([(dom, img_id)]):
            tree = self._checked(dom, img_id)
            if snap_id in tree.snapshots():
                raise errors.InvalidOperation(
                    operation="snapshot", reason=f"{snap_id} exists")
            self._snapshot(dom, tree, snap_id, vol_id)
            return self.image(sd_id, img_id).get(tree.leaf().vol_id)

    def _snapshot(self, dom: sd.FileDomain, tree: image.ImageTree,
                  snap_id: str, vol_id: str | None = None, *,
                  temporary: bool = False) -> None:
        leaf = tree.leaf()
        marks = {"snap": snap_id, "temp": "1" if temporary else None}
        self._run(flows.snapshot, [(dom, tree.img_id)], sd_id=dom.sd_id,
                  img_id=tree.img_id, leaf_id=leaf.vol_id,
                  leaf_gen=leaf.meta.generation,
                  vol_id=self._new_volume_id(vol_id, tree),
                  snap_id=snap_id, capacity=leaf.meta.capacity,
                  leaf_description=leaf.meta.description,
                  snap_description=description.update(
                      leaf.meta.description, **marks),
                  sequence=_next_sequence(tree),
                  live=self._serving(tree.img_id))

    def delete_snapshot(self, sd_id: str, img_id: str,
                        snap_id: str) -> None:
        """Drop a snapshot, merging its volume away where possible."""
        dom = self.domain(sd_id)
        with self._operation([(dom, img_id)]):
            tree = self._checked(dom, img_id)
            snap = tree.find_snapshot(snap_id)
            children = tree.children(snap.vol_id)
            if len(children) > 1:
                # Others still read through it: keep it as an anonymous
                # layer.
                hide = description.update(snap.meta.description, snap=None)
                self._run(flows.update_volume, [(dom, img_id)],
                          sd_id=dom.sd_id, img_id=img_id,
                          vol_id=snap.vol_id, gen=snap.meta.generation,
                          changes={"description": hide},
                          undo={"description": snap.meta.description})
            elif not children:
                garbage = [snap.vol_id, *_anonymous_ancestors(tree, snap)]
                self._run(flows.remove_volume, [(dom, img_id)],
                          sd_id=dom.sd_id, img_id=img_id, vol_ids=garbage)
            else:
                self._merge(dom, tree, snap, tree.get(children[0]))

    def _merge(self, dom: sd.FileDomain, tree: image.ImageTree,
               base: image.Volume, top: image.Volume) -> None:
        """Merge ``top`` with its parent ``base``, copying less data; in
        the daemon serving the image if it holds either.

        qemu 7.2 can neither commit nor stream into the layer a writable
        FUSE export serves (see :mod:`qsd`), so an attached image's leaf
        is first frozen by a live snapshot and then committed as an
        intermediate layer; the base, now an anonymous layer, is merged
        into an anonymous parent too, so that the chain does not grow.
        """
        images = [(dom, tree.img_id)]
        served = self._served_chain(tree.img_id) or []
        live = base.vol_id in served or top.vol_id in served
        if live and served[0] == top.vol_id:
            self._snapshot(dom, tree, validate.new_uuid(), temporary=True)
            tree = self.image(dom.sd_id, tree.img_id)
            top, base = tree.get(top.vol_id), tree.get(base.vol_id)
            self._commit(dom, tree, base, top, live=True)
            tree = self.image(dom.sd_id, tree.img_id)
            base = tree.get(base.vol_id)
            parent = tree.get(base.parent) if base.parent else None
            if parent is not None and _anonymous(tree, parent):
                self._merge(dom, tree, parent, base)
        elif _prefer_commit(base, top):
            self._commit(dom, tree, base, top, live=live)
        else:
            self._run(flows.merge_stream, images, sd_id=dom.sd_id,
                      img_id=tree.img_id, base_id=base.vol_id,
                      top_id=top.vol_id, top_gen=top.meta.generation,
                      new_parent=base.parent, live=live)

    def _commit(self, dom: sd.FileDomain, tree: image.ImageTree,
                base: image.Volume, top: image.Volume, *,
                live: bool) -> None:
        """Commit ``top`` into ``base``, which takes its place and its
        description (without a temporary snapshot's marks)."""
        desc = top.meta.description
        if description.get(desc, "temp"):
            desc = description.update(desc, snap=None, temp=None)
        self._run(flows.merge_commit, [(dom, tree.img_id)], sd_id=dom.sd_id,
                  img_id=tree.img_id, base_id=base.vol_id,
                  base_gen=base.meta.generation, top_id=top.vol_id,
                  grandchildren=tree.children(top.vol_id),
                  base_changes={
                      "voltype": str(top.meta.voltype),
                      "description": desc,
                      "capacity": max(top.meta.capacity,
                                      base.meta.capacity)},
                  live=live)

    def revert_to_snapshot(self, sd_id: str, img_id: str, snap_id: str, *,
                           vol_id: str | None = None) -> image.Volume:
        """Replace the leaf with a fresh overlay on the snapshot; refused
        while the image is attached (the guest's disk would change under
        it)."""
        dom = self.domain(sd_id)
        with self._operation([(dom, img_id)]):
            self._refuse_attached(img_id, "revert to a snapshot")
            tree = self._checked(dom, img_id)
            snap = tree.find_snapshot(snap_id)
            leaf = tree.leaf()
            garbage = [v for v in _anonymous_ancestors(tree, leaf)
                       if v != snap.vol_id]
            vol_id = self._new_volume_id(vol_id, tree)
            self._run(flows.revert, [(dom, img_id)], sd_id=dom.sd_id,
                      img_id=img_id, leaf_id=leaf.vol_id,
                      leaf_gen=leaf.meta.generation,
                      snap_vol_id=snap.vol_id, vol_id=vol_id,
                      capacity=snap.meta.capacity,
                      sequence=_next_sequence(tree), garbage=garbage)
            return self.image(sd_id, img_id).get(vol_id)

    # Copies

    def clone(self, sd_id: str, src_img_id: str, img_id: str, *,
              snap_id: str | None = None, dst_sd_id: str | None = None,
              size: int | None = None,
              fmt: sc.VolumeFormat | None = None,
              prealloc: sc.Preallocation = sc.Preallocation.SPARSE,
              vol_id: str | None = None) -> image.Volume:
        """A new image holding a full copy of the leaf or a snapshot (of
        a template image: of its SHARED volume, as a normal LEAF)."""
        src_dom = self.domain(sd_id)
        dst_dom = self.domain(dst_sd_id or sd_id)
        img_id = validate.check_uuid(img_id, "image id")
        images = [(src_dom, src_img_id), (dst_dom, img_id)]
        with self._operation(images), \
                self._readable(src_dom, src_img_id, snap_id) as src:
            size = _check_size(max(size or 0, src.meta.capacity))
            fmt = fmt or src.meta.format
            vol_id = self._new_volume_id(vol_id)
            self._run(flows.clone, images, src_sd_id=src_dom.sd_id,
                      src_img_id=src_img_id, src_vol_id=src.vol_id,
                      sd_id=dst_dom.sd_id, img_id=img_id, vol_id=vol_id,
                      capacity=size, fmt=str(fmt), prealloc=str(prealloc))
            return self.image(dst_dom.sd_id, img_id).get(vol_id)

    def thin_clone(self, sd_id: str, tmpl_img_id: str, img_id: str, *,
                   size: int | None = None,
                   vol_id: str | None = None) -> image.Volume:
        """A new image over a template (SHARED volume): O(1)."""
        dom = self.domain(sd_id)
        img_id = validate.check_uuid(img_id, "image id")
        images = [(dom, tmpl_img_id), (dom, img_id)]
        with self._operation(images):
            tmpl = self._checked(dom, tmpl_img_id).template()
            if tmpl is None:
                raise errors.InvalidOperation(
                    operation="thin clone",
                    reason=f"image {tmpl_img_id} is not a template")
            vol_id = self._new_volume_id(vol_id)
            self._run(flows.thin_clone, images, sd_id=dom.sd_id,
                      tmpl_img_id=tmpl_img_id, tmpl_vol_id=tmpl.vol_id,
                      img_id=img_id, vol_id=vol_id,
                      capacity=_check_size(max(size or 0,
                                               tmpl.meta.capacity)))
            return self.image(sd_id, img_id).get(vol_id)

    def copy_image(self, sd_id: str, img_id: str, dst_sd_id: str, *,
                   move: bool = False,
                   template_copy: bool = False) -> image.ImageTree:
        """Copy an image with its snapshots (or a template image) to
        another domain.

        ``template_copy`` copies a template image for the thin clones of
        the target domain: the copy's DESCRIPTION names the domain of the
        original (``copy``; the original's own ``copy`` if it is a copy
        itself) so that :meth:`collect_template_copy` can remove it once
        unused, and an image already in the target (another caller's
        copy, made while this one waited for the leases) is reused. The
        templates an image depends on are copied this way first.
        """
        src_dom, dst_dom = self.domain(sd_id), self.domain(dst_sd_id)
        if src_dom is dst_dom:
            raise errors.InvalidOperation(operation="copy image",
                                          reason="same domain")
        images = [(src_dom, img_id), (dst_dom, img_id)]
        with self._operation(images):
            if template_copy and dst_dom.has_image(img_id):
                return self.image(dst_sd_id, img_id)
            self._refuse_attached(img_id, "copy or move an image")
            tree = self._checked(src_dom, img_id)
            volumes = _volumes_in_order(tree)
            if template_copy:
                volumes = _marked_copy(tree, src_dom.sd_id, volumes)
            templates = [v for v in tree.volumes.values()
                         if v.meta.image != img_id]
            for t in templates:
                if not dst_dom.has_image(t.meta.image):
                    self.copy_image(sd_id, t.meta.image, dst_sd_id,
                                    template_copy=True)
            self._run(flows.copy_image, images, src_sd_id=src_dom.sd_id,
                      img_id=img_id, sd_id=dst_dom.sd_id,
                      volumes=volumes,
                      templates=[{"img_id": t.meta.image,
                                  "vol_id": t.vol_id} for t in templates],
                      remove_source=move)
            return self.image(dst_sd_id, img_id)

    def export_volume(self, sd_id: str, img_id: str, dst: str, *,
                      fmt: str = "raw",
                      snap_id: str | None = None) -> None:
        """Write the leaf's (a snapshot's, a template's) whole view into
        ``dst``."""
        dom = self.domain(sd_id)
        with self._operation([(dom, img_id)]), \
                self._readable(dom, img_id, snap_id) as vol:
            actions.do_export(self.context, dom.sd_id, img_id, vol.vol_id,
                              dst, fmt)

    # Changing and removing

    def extend(self, sd_id: str, img_id: str, size: int) -> image.Volume:
        dom = self.domain(sd_id)
        with self._operation([(dom, img_id)]):
            leaf = self._checked(dom, img_id).leaf()
            if size < leaf.meta.capacity:
                raise errors.InvalidOperation(
                    operation="extend", reason=f"{size} is smaller than "
                    f"the current size {leaf.meta.capacity}")
            if size > leaf.meta.capacity:
                self._run(flows.extend, [(dom, img_id)], sd_id=dom.sd_id,
                          img_id=img_id, vol_id=leaf.vol_id,
                          gen=leaf.meta.generation, size=_check_size(size),
                          live=self._serving(img_id))
            return self.leaf(sd_id, img_id)

    def delete_image(self, sd_id: str, img_id: str) -> bool:
        """Remove an image; return False if it was already gone.

        Template volumes shared into the image by hard links stay alive
        for every other image that links them.
        """
        dom = self.domain(sd_id)
        with self._operation([(dom, img_id)]):
            self._refuse_attached(img_id, "delete an image")
            if not dom.has_image(img_id):
                fileutil.remove_tree(dom.removed_image_dir(img_id))
                return False
            self._run(flows.remove_image, [(dom, img_id)], sd_id=dom.sd_id,
                      img_id=img_id)
            return True

    def collect_template_copy(self, sd_id: str, img_id: str) -> bool:
        """Remove a template copy that nothing needs; True if removed.

        Only a copy made with ``copy_image(template_copy=True)`` is
        removed, under its image lease, and only when no image links its
        volume (its data file has one hard link: thin clones hold one
        each) and its original is gone from the domain the copy names.
        Without that domain (not open here) the copy stays. A marked copy
        in the domain named (copied back there after the original went)
        is not the original.
        """
        dom = self.domain(sd_id)
        with self._operation([(dom, img_id)]):
            if not dom.has_image(img_id):
                return False
            tmpl = self.image(sd_id, img_id).template()
            origin = (description.get(tmpl.meta.description, "copy")
                      if tmpl is not None else None)
            if origin is None:
                return False
            if os.stat(tmpl.path).st_nlink > 1:
                return False
            src = self.domains.get(origin)
            if src is None or self._has_original(src, img_id):
                return False
            LOG.info("Removing unused copy %s of template %s in domain %s "
                     "(the original in domain %s is gone)", tmpl.vol_id,
                     img_id, sd_id, origin)
            self._run(flows.remove_image, [(dom, img_id)], sd_id=dom.sd_id,
                      img_id=img_id)
            return True

    def _has_original(self, dom: sd.FileDomain, img_id: str) -> bool:
        """Whether ``dom`` holds ``img_id`` as other than a template copy
        (anything unreadable counts as the original)."""
        if not dom.has_image(img_id):
            return False
        try:
            tmpl = self.image(dom.sd_id, img_id).template()
        except (errors.StorageError, OSError):
            return True
        return (tmpl is None
                or description.get(tmpl.meta.description, "copy") is None)

    def _new_volume_id(self, vol_id: str | None,
                       tree: image.ImageTree | None = None) -> str:
        if vol_id is None:
            return validate.new_uuid()
        vol_id = validate.check_uuid(vol_id, "volume id")
        if tree is not None and vol_id in tree:
            raise errors.VolumeExists(vol_id=vol_id, img_id=tree.img_id)
        return vol_id


def _require_current_format(dom: sd.FileDomain) -> None:
    """Refuse to change a V3 or V4 domain: the engine writes V5 records
    (read again from storage first: another host may have upgraded it)."""
    if dom.metadata.version >= sc.DOMAIN_VERSION:
        return
    dom.metadata = sd.FileDomain.open(dom.path).metadata
    if dom.metadata.version < sc.DOMAIN_VERSION:
        raise errors.DomainNeedsUpgrade(sd_id=dom.sd_id,
                                        version=dom.metadata.version)


def _io_timeout(leases: lease.LeaseManager | None) -> int:
    """The I/O timeout to record in a new domain's lockspace: the sanlock
    manager's (joining waits 2 x the recorded one), else vdsm's."""
    return getattr(leases, "io_timeout", sd.LOCKSPACE_IO_TIMEOUT)


def _check_size(size: int) -> int:
    if not isinstance(size, int) or size <= 0 or size % sc.BLOCK_SIZE_512:
        raise errors.InvalidParameter(
            name="size", value=size,
            reason="a positive multiple of 512 bytes")
    return size


def _top(tree: image.ImageTree) -> image.Volume:
    """The volume whose view is the image: a template's SHARED volume,
    else the leaf."""
    return tree.template() or tree.leaf()


def _marked_copy(tree: image.ImageTree, src_sd_id: str,
                 volumes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``volumes`` of a template image with DESCRIPTION ``copy`` naming
    the domain of the original."""
    tmpl = tree.template()
    if tmpl is None:
        raise errors.InvalidOperation(
            operation="copy template",
            reason=f"image {tree.img_id} is not a template")
    origin = description.get(tmpl.meta.description, "copy") or src_sd_id
    return [{**v, "description": description.update(v["description"],
                                                    copy=origin)}
            for v in volumes]


def _next_sequence(tree: image.ImageTree) -> int:
    return 1 + max((v.meta.sequence for v in tree.own_volumes()), default=0)


def _anonymous_ancestors(tree: image.ImageTree,
                         vol: image.Volume) -> list[str]:
    """Ancestors that only ``vol`` keeps alive (no snapshot, one child)."""
    garbage = []
    while vol.parent and vol.parent in tree:
        parent = tree.get(vol.parent)
        if (parent.meta.image != tree.img_id or parent.snapshot_id
                or parent.meta.voltype != sc.VolumeType.INTERNAL
                or tree.children(parent.vol_id) != [vol.vol_id]):
            break
        garbage.append(parent.vol_id)
        vol = parent
    return garbage


def _anonymous(tree: image.ImageTree, vol: image.Volume) -> bool:
    """An INTERNAL layer of the image itself that no snapshot names and
    only one volume reads through: merging it away loses nothing."""
    return (vol.meta.image == tree.img_id
            and vol.meta.voltype == sc.VolumeType.INTERNAL
            and vol.snapshot_id is None
            and len(tree.children(vol.vol_id)) == 1)


def _prefer_commit(base: image.Volume, top: image.Volume) -> bool:
    """Commit ``top`` into ``base`` unless streaming copies less.

    Committing copies the top's allocated data into the base; streaming
    copies the base's data into the top. A base shared with other images
    cannot change, so it is always streamed.
    """
    if base.meta.voltype == sc.VolumeType.SHARED:
        return False
    return (qemuimg.allocated_bytes(top.path, fmt=top.qemu_format)
            <= qemuimg.allocated_bytes(base.path, fmt=base.qemu_format))


def _volumes_in_order(tree: image.ImageTree) -> list[dict[str, Any]]:
    """Own volumes, every parent before its children."""
    own = {v.vol_id: v for v in tree.own_volumes()}
    ordered: list[dict[str, Any]] = []
    seen: set[str] = set()

    def visit(vol: image.Volume) -> None:
        if vol.vol_id in seen:
            return
        if vol.parent in own:
            visit(own[vol.parent])
        seen.add(vol.vol_id)
        m = vol.meta
        ordered.append({
            "vol_id": vol.vol_id, "capacity": m.capacity,
            "format": str(m.format), "type": str(m.type),
            "parent": vol.parent, "voltype": str(m.voltype),
            "description": m.description, "sequence": m.sequence})

    for vol in sorted(own.values(), key=lambda v: v.meta.sequence):
        visit(vol)
    return ordered
