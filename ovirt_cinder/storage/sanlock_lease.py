"""Multi-host leases with sanlock: the ``sanlock`` lease backend.

Layout on a file domain (DESIGN.md sections 3 and 5), with the sector size
and alignment of the domain's metadata (``BLOCK_SIZE``, ``ALIGNMENT``)::

    dom_md/ids        lockspace <sd_id>: one delta lease per host id
                      (1..250), written by each host's daemon every
                      io_timeout*2 s while it is joined
    dom_md/leases     resource "SDM" at 1 x ALIGNMENT (SDM_LEASE_SLOT): the
                      domain-manager lease held around every metadata
                      change
    images/<img>/<vol>.lease
                      resource <vol_id> at offset 0: the volume lease

Life cycle: the engine writes the lockspace, the SDM resource and each
volume's resource when it creates the domain and the volume
(:func:`sd.create_domain`, with the ``sanlock`` program), whatever the
backend; :meth:`SanlockLeaseManager.init_domain` reads them and leaves
valid ones alone, and formats areas of zeros (a domain made without the
program, or by an older release) through the daemon, as
:meth:`~SanlockLeaseManager.volume_lease` does for a volume's lease on
first use. :meth:`~SanlockLeaseManager.join` adds the lockspace with this
host's id; it blocks about ``2 * io_timeout + 1`` seconds and is done once
per domain (lease calls join on first use). A lease call registers the
process with the daemon once (the registration fd lives as long as the
process: if the process dies, the daemon releases its leases) and acquires
the resource, retrying while another host or process holds it, up to
``lease_timeout`` seconds (then :class:`errors.LeaseTimeout`). Joining and
every request to the daemon go through :func:`lease.offload`, so they never
block an eventlet hub. Image leases are the host-local ones of
:class:`lease.LeaseManager`; across hosts a flow re-checks its plan under
the SDM lease.

If a host dies holding a lease, the other hosts get it once sanlock
declares the dead host's delta lease expired: ``8 * io_timeout + 60``
seconds after its last renewal (68 s with io_timeout=1, 140 s with the
default 10). :meth:`~SanlockLeaseManager.host_status` tells the state of
every host id the daemon saw in a lockspace.

Leases are re-entrant within a thread, like :class:`lease.
LocalLeaseManager`: the in-process lock (``00_storage.<sd_id>`` or
``02_vol.<sd_id>.<vol_id>``) serialises this process's threads and the
outermost holder talks to sanlock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import lease
from ovirt_cinder.storage import sanlockd

__all__ = ["SanlockLeaseManager", "MAX_HOST_ID", "volume_lock"]

LOG = logging.getLogger(__name__)

MAX_HOST_ID = 250
# How long get_hosts may answer EAGAIN right after joining.
_HOSTS_WAIT = 10.0


def volume_lock(sd_id: str, vol_id: str) -> str:
    """In-process lock name of a volume lease (after storage and image)."""
    return f"02_vol.{sd_id}.{vol_id}"


class _Resource:
    """A sanlock resource: lockspace, name, and its place on disk."""

    def __init__(self, lockspace: str, name: str, path: str,
                 offset: int) -> None:
        self.lockspace = lockspace
        self.name = name
        self.path = path
        self.offset = offset

    def __str__(self) -> str:
        return f"{self.lockspace}:{self.name}:{self.path}:{self.offset}"


def _geometry(domain) -> dict[str, int]:
    return {"align": domain.metadata.alignment,
            "sector": domain.metadata.block_size}


def _is_zero(path: str, offset: int, length: int) -> bool:
    with open(path, "rb") as f:
        f.seek(offset)
        return not f.read(length).strip(b"\0")


class SanlockLeaseManager(lease.LeaseManager):
    """Domain (SDM) and volume leases held through the sanlock daemon."""

    def __init__(self, host_id: int = 1, io_timeout: int = 10, *,
                 lease_timeout: float = lease.DEFAULT_LEASE_TIMEOUT,
                 lock_path: str | None = None,
                 retry_interval: float = 0.5) -> None:
        if not 1 <= host_id <= MAX_HOST_ID:
            raise errors.InvalidParameter(
                name="host id", value=host_id,
                reason=f"must be 1..{MAX_HOST_ID}")
        if io_timeout < 1:
            raise errors.InvalidParameter(
                name="io timeout", value=io_timeout, reason="must be >= 1")
        super().__init__(lease_timeout=lease_timeout, lock_path=lock_path)
        self.host_id = host_id
        self.io_timeout = io_timeout
        self.retry_interval = retry_interval
        self._state = threading.Lock()      # _fd, _joined, _join_locks
        self._fd_lock = threading.Lock()    # one request at a time on _fd
        self._fd: tuple[int, int] | None = None     # (pid, fd)
        self._joined: dict[str, tuple[str, bool]] = {}  # sd_id: (ids, ours)
        self._join_locks: dict[str, threading.Lock] = {}
        self._ready: set[str] = set()       # volume resources checked

    def __enter__(self) -> SanlockLeaseManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Formatting

    def init_domain(self, domain, *, force: bool = False) -> None:
        """Format the lockspace and the SDM resource of a new domain.

        A valid lease with the domain's names is left alone; an area of
        zeros is formatted; anything else raises
        :class:`sanlockd.LeaseCorrupt` unless ``force``.
        """
        geo = _geometry(domain)
        ids = domain.dom_md("ids")
        if self._needs_format(
                ids, 0, lambda: sanlockd.read_lockspace(ids, **geo),
                domain.sd_id, geo, force):
            LOG.info("Formatting lockspace %s in %s", domain.sd_id, ids)
            sanlockd.write_lockspace(domain.sd_id, ids,
                                     io_timeout=self.io_timeout, **geo)
        self._init_resource(self._sdm(domain), geo, force)

    def _init_resource(self, res: _Resource, geo: dict[str, int],
                       force: bool = False) -> None:
        if self._resource_needs_format(res, geo, force):
            LOG.info("Formatting resource %s", res)
            sanlockd.write_resource(res.lockspace, res.name, res.path,
                                    res.offset, **geo)

    def _resource_needs_format(self, res: _Resource, geo: dict[str, int],
                               force: bool = False) -> bool:
        return self._needs_format(
            res.path, res.offset,
            lambda: sanlockd.read_resource(res.path, res.offset, **geo),
            (res.lockspace, res.name), geo, force)

    @staticmethod
    def _needs_format(path: str, offset: int, read, expected,
                      geo: dict[str, int], force: bool) -> bool:
        try:
            found = read()
        except sanlockd.LeaseCorrupt:
            if force or _is_zero(path, offset, geo["align"]):
                return True
            raise
        if found == expected:
            return False
        if force:
            return True
        raise sanlockd.LeaseCorrupt(
            lease=f"{path}:{offset}", rc=0,
            reason=f"holds {found!r}, expected {expected!r}")

    # Lockspaces

    def join(self, domain) -> None:
        """Join the domain's lockspace with our host id (idempotent)."""
        sd_id = domain.sd_id
        with self._state:
            lock = self._join_locks.setdefault(sd_id, threading.Lock())
        with lock:
            if sd_id in self._joined:
                return
            ids = domain.dom_md("ids")
            ours = lease.offload(self._add_lockspace, sd_id, ids)
            with self._state:
                self._joined[sd_id] = (ids, ours)

    def _add_lockspace(self, sd_id: str, ids: str) -> bool:
        """Add the lockspace; False if the daemon had already joined."""
        start = time.monotonic()
        try:
            sanlockd.add_lockspace(sd_id, self.host_id, ids,
                                   io_timeout=self.io_timeout)
        except sanlockd.SanlockError as e:
            if e.rc != -17:     # EEXIST: joined by another process
                raise
            self._wait_joined(sd_id, ids)
            return False
        LOG.info("Joined lockspace %s as host %d in %.1f s", sd_id,
                 self.host_id, time.monotonic() - start)
        return True

    def _wait_joined(self, sd_id: str, ids: str) -> None:
        deadline = time.monotonic() + 4 * self.io_timeout + 10
        while True:
            state = sanlockd.inq_lockspace(sd_id, self.host_id, ids)
            if state:
                return
            if state is False or time.monotonic() > deadline:
                raise sanlockd.SanlockError(
                    lease=f"{sd_id}:{self.host_id}:{ids}", rc=-17,
                    reason="the daemon has this lockspace with another "
                           "host id, or is leaving it")
            time.sleep(0.1)

    def leave(self, domain) -> None:
        """Leave a lockspace this manager joined (no lease may be held)."""
        with self._state:
            ids, ours = self._joined.pop(domain.sd_id, (None, False))
        if ids and ours:
            sanlockd.rem_lockspace(domain.sd_id, self.host_id, ids)

    def close(self) -> None:
        """Leave every lockspace we joined (without waiting for the daemon
        to finish) and drop the registration."""
        with self._state:
            joined, self._joined = self._joined, {}
            fd, self._fd = self._fd, None
        for sd_id, (ids, ours) in sorted(joined.items()):
            if ours:
                try:
                    sanlockd.rem_lockspace(sd_id, self.host_id, ids,
                                           wait=False)
                except sanlockd.SanlockError as e:
                    LOG.warning("Cannot leave lockspace %s: %s", sd_id, e)
        if fd is not None and fd[0] == os.getpid():
            os.close(fd[1])

    # Hosts

    def host_status(self, domain) -> dict[int, str]:
        """State of every host id seen in the lockspace, by host id:
        ``unknown``, ``free``, ``live``, ``fail`` or ``dead``."""
        self.join(domain)
        deadline = time.monotonic() + _HOSTS_WAIT
        while True:
            try:
                hosts = sanlockd.get_hosts(domain.sd_id)
            except sanlockd.SanlockError as e:
                # EAGAIN: just joined, host states not known yet.
                if e.rc != -11 or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
                continue
            return {h.host_id: h.state for h in hosts}

    def is_host_dead(self, domain, host_id: int) -> bool:
        """True once sanlock declares ``host_id`` dead in the lockspace."""
        return self.host_status(domain).get(host_id) == "dead"

    @property
    def owner(self) -> dict[str, object]:
        return dict(super().owner, host_id=self.host_id)

    def owner_gone(self, domain, owner: dict[str, object]) -> bool:
        """Our own host id, or one sanlock declares dead in ``domain``'s
        lockspace: a live host's flows are never taken over."""
        host_id = owner.get("host_id")
        if host_id == self.host_id:
            return True
        if not isinstance(host_id, int):
            return False
        return self.is_host_dead(domain, host_id)

    # Leases

    @contextlib.contextmanager
    def domain_lease(self, domain) -> Iterator[None]:
        """Hold the domain's SDM lease (re-entrant within a thread)."""
        with self._held_resource(domain, lease.storage_lock(domain.sd_id),
                        self._sdm(domain)):
            yield

    @contextlib.contextmanager
    def volume_lease(self, domain, img_id: str,
                     vol_id: str) -> Iterator[None]:
        """Hold a volume's lease; formats its ``.lease`` on first use."""
        res = _Resource(domain.sd_id, vol_id,
                        domain.volume_path(img_id, vol_id) + sc.LEASE_EXT,
                        0)
        self._ensure_volume_resource(domain, img_id, res)
        with self._held_resource(domain, volume_lock(domain.sd_id, vol_id),
                                 res):
            yield

    def _ensure_volume_resource(self, domain, img_id: str,
                                res: _Resource) -> None:
        """Format a volume's lease on first use, under the SDM lease so
        two hosts never format one another's held lease."""
        if res.path in self._ready:
            return
        if not os.path.exists(res.path):
            raise errors.VolumeNotFound(sd_id=domain.sd_id, img_id=img_id,
                                        vol_id=res.name)
        geo = _geometry(domain)
        if self._resource_needs_format(res, geo):
            with self.domain_lease(domain):
                self._init_resource(res, geo)
        self._ready.add(res.path)

    def _sdm(self, domain) -> _Resource:
        return _Resource(domain.sd_id, sc.SDM_LEASE_NAME,
                         domain.dom_md("leases"),
                         sc.SDM_LEASE_SLOT * domain.metadata.alignment)

    def _held_resource(self, domain, lock_name: str,
                       res: _Resource) -> contextlib.AbstractContextManager:
        return self._held(lock_name,
                          lambda: self._sanlock_held(domain, res))

    @contextlib.contextmanager
    def _sanlock_held(self, domain, res: _Resource) -> Iterator[None]:
        self._acquire(domain, res)
        try:
            yield
        except BaseException:
            self._release_quietly(res)
            raise
        self._release(res)

    def _acquire(self, domain, res: _Resource) -> None:
        self.join(domain)
        start = time.monotonic()
        deadline = start + self.lease_timeout
        while True:
            try:
                self._request(sanlockd.acquire, res)
                break
            except sanlockd.LockspaceNotJoined:
                # Removed under us (by another process): join again.
                with self._state:
                    self._joined.pop(domain.sd_id, None)
                self.join(domain)
            except sanlockd.LeaseBusy as e:
                if time.monotonic() >= deadline:
                    raise errors.LeaseTimeout(
                        lease=str(res), timeout=self.lease_timeout,
                        rc=e.rc) from e
                time.sleep(self.retry_interval)
        LOG.debug("Acquired %s in %.3f s", res, time.monotonic() - start)

    def _release(self, res: _Resource) -> None:
        self._request(sanlockd.release, res)

    def _release_quietly(self, res: _Resource) -> None:
        try:
            self._release(res)
        except sanlockd.SanlockError:
            LOG.exception("Cannot release %s", res)

    def _request(self, fn, res: _Resource) -> None:
        fd = self._registration()
        with self._fd_lock:
            lease.offload(fn, fd, res.lockspace, res.name, res.path,
                          res.offset)

    def _registration(self) -> int:
        """This process's registration fd (a forked child registers
        again: the parent's leases are not the child's)."""
        with self._state:
            pid = os.getpid()
            if self._fd is None or self._fd[0] != pid:
                self._fd = (pid, sanlockd.register())
            return self._fd[1]
