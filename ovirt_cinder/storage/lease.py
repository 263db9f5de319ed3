"""Leases that fence metadata changes, and the in-process lock order.

The interface is what sanlock offers (DESIGN.md section 5): a per-domain
manager lease ("SDM") held while a domain's metadata changes. Two
implementations share it:

``LocalLeaseManager``
    One host on a local directory: an ``flock`` on ``dom_md/ids`` fences
    other processes on this host; a re-entrant in-process lock fences
    threads. It is the default.
``sanlock``
    Multi-host; added by the sanlock module.

In-process locks are named so that sorting the names gives the fixed lock
order ``00_storage`` < ``01_img`` < ``02_vol``; :func:`locked` takes any set
of them in that order and releases in reverse, so two operations never
deadlock.
"""

from __future__ import annotations

import abc
import contextlib
import threading
from collections.abc import Iterable
from collections.abc import Iterator

from ovirt_cinder.storage import fileutil

__all__ = ["LeaseManager", "LocalLeaseManager", "locked", "storage_lock",
           "image_lock"]

_registry_lock = threading.Lock()
_locks: dict[str, threading.RLock] = {}


def _lock(name: str) -> threading.RLock:
    with _registry_lock:
        return _locks.setdefault(name, threading.RLock())


def storage_lock(sd_id: str) -> str:
    return f"00_storage.{sd_id}"


def image_lock(sd_id: str, img_id: str) -> str:
    return f"01_img.{sd_id}.{img_id}"


@contextlib.contextmanager
def locked(names: Iterable[str]) -> Iterator[None]:
    """Take in-process locks in their fixed order; release in reverse."""
    with contextlib.ExitStack() as stack:
        for name in sorted(set(names)):
            lock = _lock(name)
            lock.acquire()
            stack.callback(lock.release)
        yield


class LeaseManager(abc.ABC):
    """What the engine needs from a lease implementation."""

    @abc.abstractmethod
    def domain_lease(self, domain) -> contextlib.AbstractContextManager:
        """Hold the domain's SDM lease (metadata changes)."""

    def init_domain(self, domain) -> None:  # noqa: B027 -- optional hook
        """Prepare a domain's lease areas (idempotent); local needs none."""


class LocalLeaseManager(LeaseManager):
    """flock on ``dom_md/ids`` + an in-process lock: one host only."""

    def __init__(self) -> None:
        self._depth: dict[str, int] = {}

    @contextlib.contextmanager
    def domain_lease(self, domain) -> Iterator[None]:
        sd_id = domain.sd_id
        with locked([storage_lock(sd_id)]):
            # The re-entrant lock is ours now; only the outermost holder
            # takes the flock (a second fd would wait on our own lock).
            depth = self._depth.get(sd_id, 0)
            self._depth[sd_id] = depth + 1
            try:
                if depth:
                    yield
                else:
                    with fileutil.open_locked(domain.dom_md("ids")):
                        yield
            finally:
                self._depth[sd_id] = depth


def make_lease_manager(backend: str, host_id: int = 1,
                       io_timeout: int = 10) -> LeaseManager:
    """The lease manager for a configured backend: ``local`` (flock, one
    host) or ``sanlock`` (``host_id`` 1..250 in every domain lockspace)."""
    if backend == "local":
        return LocalLeaseManager()
    if backend == "sanlock":
        from ovirt_cinder.storage import sanlock_lease
        return sanlock_lease.SanlockLeaseManager(host_id=host_id,
                                                 io_timeout=io_timeout)
    from ovirt_cinder.storage import errors
    raise errors.InvalidParameter(name="lease backend", value=backend,
                                  reason='expected "local" or "sanlock"')


__all__ += ["make_lease_manager"]
