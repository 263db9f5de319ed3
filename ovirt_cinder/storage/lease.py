"""Leases that fence storage changes, and the in-process lock order.

Two scopes, as vdsm learned them (doc/source/contributor/leases.rst):

domain lease (``SDM``)
    Held only around a metadata change of a domain: writing a volume's
    ``.meta``, creating, publishing, hiding or removing an image or a
    volume. Each step of a flow takes it for the few milliseconds its
    metadata write lasts, so operations on other images of the domain go
    on while a long copy runs.
image lease
    Held by an operation for its whole run, from reading the image's
    chain and planning, through the long data work, to its last metadata
    step: operations on one image serialise, operations on different
    images do not. On one host it is an in-process lock plus an ``flock``
    on ``<lock_path>/<sd_id>.<img_id>.lock`` (a host-local directory that
    every service and the CLI of the host share). Across hosts the plan
    is fenced by the domain lease instead: a flow's first metadata step
    re-checks the volume generation it planned with (``GEN``) under the
    domain lease and fails with :class:`errors.StalePlan` if another host
    changed the image meanwhile.

Two implementations of the domain lease share the interface:

``LocalLeaseManager``
    One host on a local directory: an ``flock`` on ``dom_md/ids`` fences
    other processes on this host; a re-entrant in-process lock fences
    threads. It is the default.
``sanlock``
    Multi-host; :mod:`sanlock_lease`.

Every wait is bounded by ``lease_timeout`` (then :class:`errors.
LeaseTimeout`, which callers may retry); an image lease may be asked for
with a shorter ``timeout`` (a periodic recovery pass that should not wait
behind a running flow). Waits poll with short sleeps
instead of blocking in the kernel, and blocking C calls go through
:func:`offload`, so in an eventlet service (cinder-volume, glance-api) a
lease wait never stalls the hub.

In-process locks are named so that sorting the names gives the fixed lock
order ``00_storage`` < ``01_img`` < ``02_vol``; :func:`locked` takes any set
of them in that order and releases in reverse, so two operations never
deadlock.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from typing import Any
from typing import TypeVar

from ovirt_cinder.storage import errors

__all__ = ["LeaseManager", "LocalLeaseManager", "locked", "storage_lock",
           "image_lock", "make_lease_manager", "offload", "flocked",
           "DEFAULT_LOCK_PATH", "DEFAULT_LEASE_TIMEOUT"]

LOG = logging.getLogger(__name__)

DEFAULT_LOCK_PATH = "/var/lib/ovirt-cinder/locks"
DEFAULT_LEASE_TIMEOUT = 60.0
# Poll interval of lock waits: starts short, backs off to the maximum.
_POLL_MIN = 0.005
_POLL_MAX = 0.1

T = TypeVar("T")

_registry_lock = threading.Lock()
_locks: dict[str, threading.RLock] = {}


def _lock(name: str) -> threading.RLock:
    with _registry_lock:
        return _locks.setdefault(name, threading.RLock())


def storage_lock(sd_id: str) -> str:
    return f"00_storage.{sd_id}"


def image_lock(sd_id: str, img_id: str) -> str:
    return f"01_img.{sd_id}.{img_id}"


def _green() -> bool:
    patcher = sys.modules.get("eventlet.patcher")
    return patcher is not None and patcher.is_monkey_patched("thread")


def offload(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking call in a native thread when eventlet patched this
    process (so the hub keeps running), else directly."""
    if _green():
        from eventlet import tpool
        return tpool.execute(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def _sleeps(timeout: float) -> Iterator[None]:
    """Yield until ``timeout`` seconds passed, sleeping with back-off."""
    deadline = time.monotonic() + timeout
    interval = _POLL_MIN
    while time.monotonic() < deadline:
        time.sleep(min(interval, max(deadline - time.monotonic(), 0)))
        interval = min(interval * 2, _POLL_MAX)
        yield


@contextlib.contextmanager
def locked(names: Iterable[str],
           timeout: float | None = None) -> Iterator[None]:
    """Take in-process locks in their fixed order; release in reverse."""
    with contextlib.ExitStack() as stack:
        for name in sorted(set(names)):
            lock = _lock(name)
            if not lock.acquire(timeout=-1 if timeout is None else timeout):
                raise errors.LeaseTimeout(lease=name, timeout=timeout)
            stack.callback(lock.release)
        yield


@contextlib.contextmanager
def flocked(path: str, timeout: float, *,
            create: bool = False) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, waiting up to ``timeout``.

    The wait polls with ``LOCK_NB`` so it never blocks in the kernel.
    """
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o660)
    try:
        if not _try_flock(fd):
            start = time.monotonic()
            for _ in _sleeps(timeout):
                if _try_flock(fd):
                    break
            else:
                raise errors.LeaseTimeout(lease=path, timeout=timeout)
            LOG.debug("Waited %.3f s for %s", time.monotonic() - start, path)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class LeaseManager(abc.ABC):
    """What the engine needs from a lease implementation.

    ``host`` names the owner of the flows this manager runs, so recovery
    can tell its own unfinished work from another host's.
    """

    def __init__(self, *, lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
                 lock_path: str | None = None) -> None:
        if lease_timeout <= 0:
            raise errors.InvalidParameter(name="lease timeout",
                                          value=lease_timeout,
                                          reason="must be positive")
        self.lease_timeout = lease_timeout
        self.lock_path = lock_path or DEFAULT_LOCK_PATH
        self._depth: dict[str, int] = {}

    @abc.abstractmethod
    def domain_lease(self, domain) -> contextlib.AbstractContextManager:
        """Hold the domain's SDM lease (metadata changes)."""

    def init_domain(self, domain) -> None:  # noqa: B027 -- optional hook
        """Prepare a domain's lease areas (idempotent); local needs none."""

    @property
    def owner(self) -> dict[str, Any]:
        """Who runs flows through this manager (recorded in logbooks)."""
        return {"host": socket.gethostname(), "host_id": None}

    def owner_gone(self, domain, owner: dict[str, Any]) -> bool:
        """True if no live process of ``owner`` can still run its flows
        outside the image leases this process can take (this host's own
        flows qualify: every running flow holds its image leases)."""
        return owner.get("host") == socket.gethostname()

    @contextlib.contextmanager
    def image_lease(self, domain, img_id: str, *,
                    timeout: float | None = None) -> Iterator[None]:
        """Hold the image lease of ``img_id`` in ``domain``.

        ``timeout``: the longest wait, in seconds, for this process's
        other threads and the host's other processes to release it (then
        :class:`errors.LeaseTimeout`); None: ``lease_timeout``.
        """
        if timeout is None:
            timeout = self.lease_timeout
        path = os.path.join(self.lock_path, f"{domain.sd_id}.{img_id}.lock")
        with self._held(image_lock(domain.sd_id, img_id),
                        lambda: self._host_lock(path, timeout),
                        timeout=timeout):
            yield

    @contextlib.contextmanager
    def image_leases(self, images: Iterable[tuple[Any, str]], *,
                     timeout: float | None = None) -> Iterator[None]:
        """Hold several image leases, taken in the fixed lock order;
        ``timeout`` bounds the wait for each (see :meth:`image_lease`)."""
        with contextlib.ExitStack() as stack:
            for dom, img_id in sorted(set(images),
                                      key=lambda i: (i[0].sd_id, i[1])):
                stack.enter_context(self.image_lease(dom, img_id,
                                                     timeout=timeout))
            yield

    def _host_lock(self, path: str, timeout: float | None = None
                   ) -> contextlib.AbstractContextManager:
        os.makedirs(os.path.dirname(path), mode=0o775, exist_ok=True)
        return flocked(path,
                       self.lease_timeout if timeout is None else timeout,
                       create=True)

    @contextlib.contextmanager
    def _held(self, lock_name: str,
              outer: Callable[[], contextlib.AbstractContextManager], *,
              timeout: float | None = None) -> Iterator[None]:
        """The in-process lock ``lock_name`` (re-entrant in a thread); the
        outermost holder also enters ``outer()`` (flock, sanlock). The
        wait for the in-process lock is bounded by ``timeout`` (None:
        ``lease_timeout``)."""
        with locked([lock_name], timeout=self.lease_timeout
                    if timeout is None else timeout):
            depth = self._depth.get(lock_name, 0)
            self._depth[lock_name] = depth + 1
            try:
                if depth:
                    yield
                else:
                    with outer():
                        yield
            finally:
                self._depth[lock_name] = depth


class LocalLeaseManager(LeaseManager):
    """flock on ``dom_md/ids`` + an in-process lock: one host only."""

    def domain_lease(self, domain) -> contextlib.AbstractContextManager:
        return self._held(
            storage_lock(domain.sd_id),
            lambda: flocked(domain.dom_md("ids"), self.lease_timeout))


def make_lease_manager(backend: str, host_id: int = 1,
                       io_timeout: int = 10, *,
                       lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
                       lock_path: str | None = None) -> LeaseManager:
    """The lease manager for a configured backend: ``local`` (flock, one
    host) or ``sanlock`` (``host_id`` 1..250 in every domain lockspace).
    ``lease_timeout``: the longest wait for any lease; ``lock_path``: the
    host-local directory of image locks."""
    if backend == "local":
        return LocalLeaseManager(lease_timeout=lease_timeout,
                                 lock_path=lock_path)
    if backend == "sanlock":
        from ovirt_cinder.storage import sanlock_lease
        return sanlock_lease.SanlockLeaseManager(
            host_id=host_id, io_timeout=io_timeout,
            lease_timeout=lease_timeout, lock_path=lock_path)
    raise errors.InvalidParameter(name="lease backend", value=backend,
                                  reason='expected "local" or "sanlock"')
