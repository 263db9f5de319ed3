"""A small typed wrapper around the ``sanlock`` C binding.

The binding (Debian's ``python3-sanlock``; there is none on PyPI) raises
``sanlock.SanlockException(rc, message, strerror)`` for everything. This
module turns those into errors that carry ``rc`` and a readable reason, and
returns dataclasses instead of dicts. It is imported lazily, so the engine
works without sanlock installed; :func:`available` says whether it is.

Return codes (``rc``) are negative: ``-errno`` for system errors (``-11``
EAGAIN, ``-17`` EEXIST, ``-2`` ENOENT, ``-111`` ECONNREFUSED) or sanlock's
own (``sanlock_rv.h``); the binding gives system errors as positive
numbers, this module always as negative ones:

``-220 .. -229`` (``SANLK_LEADER_*``)
    a lease area that holds no valid leader record: never initialised,
    wrong lockspace or resource name, wrong sector size, garbage.
``-243`` ``SANLK_ACQUIRE_IDLIVE``, ``-244`` ``SANLK_ACQUIRE_OWNED``,
``-245`` ``SANLK_ACQUIRE_OTHER``
    acquire: the resource is held by another host; ``-17`` (EEXIST):
    held by another process of this host. Both are :class:`LeaseBusy`.
``-28`` (ENOSPC)
    acquire: the lockspace is not joined.
``-262`` ``SANLK_HOSTID_BUSY``
    another live host uses this host id in the lockspace.

Every call, formatting and reading lease areas included, is a request to
the daemon at ``$SANLOCK_RUN_DIR/sanlock.sock`` (default ``/run/sanlock``),
which does the I/O: without a daemon they raise :class:`DaemonUnavailable`.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
from collections.abc import Callable
from typing import Any
from typing import TypeVar

from ovirt_cinder.storage import errors

__all__ = [
    "SanlockError", "SanlockUnavailable", "DaemonUnavailable", "LeaseBusy",
    "LeaseCorrupt", "HostIdBusy", "LockspaceNotJoined", "HostStatus",
    "HOST_STATES", "available",
    "write_lockspace", "read_lockspace", "write_resource", "read_resource",
    "add_lockspace", "inq_lockspace", "rem_lockspace", "register",
    "acquire", "release", "get_hosts"]

SANLK_LEADER_FIRST = -229
SANLK_LEADER_LAST = -220
SANLK_ACQUIRE_IDLIVE = -243
SANLK_ACQUIRE_OWNED = -244
SANLK_ACQUIRE_OTHER = -245
SANLK_HOSTID_BUSY = -262

# get_hosts() flags (the low 4 bits) by name.
HOST_STATES = {1: "unknown", 2: "free", 3: "live", 4: "fail", 5: "dead"}
HOST_FLAGS_MASK = 0x0F


class SanlockError(errors.LeaseError):
    msg = "Lease {lease} error: {reason} (rc={rc})"


class SanlockUnavailable(SanlockError):
    msg = "sanlock is not available: {reason}"


class DaemonUnavailable(SanlockError):
    msg = ("Cannot reach the sanlock daemon for lease {lease}: {reason} "
           "(rc={rc}); is it running?")


class LeaseBusy(SanlockError):
    msg = "Lease {lease} is held by another owner: {reason} (rc={rc})"


class LeaseCorrupt(SanlockError):
    msg = ("Lease {lease} has no valid sanlock record (not initialised "
           "or corrupt): {reason} (rc={rc})")


class HostIdBusy(SanlockError):
    msg = "Host id of lease {lease} is used by another live host (rc={rc})"


class LockspaceNotJoined(SanlockError):
    msg = "Lockspace of lease {lease} is not joined: {reason} (rc={rc})"


# Daemon requests: what an rc means for each, beyond the common codes.
_NO_DAEMON = {-errno.ENOENT: DaemonUnavailable,
              -errno.ECONNREFUSED: DaemonUnavailable}
# Held by another host (-243..-245) or another process of this host
# (-17, EEXIST; our own re-entry never reaches the daemon).
_ACQUIRE = {SANLK_ACQUIRE_IDLIVE: LeaseBusy, SANLK_ACQUIRE_OWNED: LeaseBusy,
            SANLK_ACQUIRE_OTHER: LeaseBusy, -errno.EAGAIN: LeaseBusy,
            -errno.EEXIST: LeaseBusy, -errno.ENOSPC: LockspaceNotJoined}


@dataclasses.dataclass(frozen=True)
class HostStatus:
    """One host of a lockspace, as the daemon sees it."""

    host_id: int
    generation: int
    timestamp: int
    io_timeout: int
    state: str      # one of HOST_STATES' values


_module: Any = None


def _sanlock() -> Any:
    global _module
    if _module is None:
        try:
            _module = importlib.import_module("sanlock")
        except ImportError as e:
            raise SanlockUnavailable(reason=str(e)) from e
    return _module


def available() -> bool:
    """True if the ``sanlock`` binding imports."""
    try:
        _sanlock()
    except SanlockUnavailable:
        return False
    return True


def _error_class(rc: int, codes: dict[int, type[SanlockError]]
                 ) -> type[SanlockError]:
    if rc in codes:
        return codes[rc]
    if SANLK_LEADER_FIRST <= rc <= SANLK_LEADER_LAST:
        return LeaseCorrupt
    if rc == SANLK_HOSTID_BUSY:
        return HostIdBusy
    return SanlockError


T = TypeVar("T")


def _call(lease: str, fn: Callable[..., T], *args: Any,
          codes: dict[int, type[SanlockError]] | None = None,
          **kw: Any) -> T:
    """Call ``fn``; a SanlockException becomes a SanlockError subclass.

    The binding reports system errors as positive errno values and
    sanlock's own as negative codes; ``rc`` is always negative.
    """
    sanlock = _sanlock()
    try:
        return fn(*args, **kw)
    except sanlock.SanlockException as e:
        rc = -abs(e.errno) if isinstance(e.errno, int) else -errno.EIO
        reason = ": ".join(str(a) for a in e.args[1:]) or str(e)
        cls = _error_class(rc, codes or {})
        raise cls(lease=lease, rc=rc, reason=reason) from e


def _b(s: str) -> bytes:
    return s.encode("utf-8")


# Formatting and reading lease areas (the daemon does the I/O).

def write_lockspace(name: str, path: str, *, io_timeout: int,
                    align: int, sector: int) -> None:
    """Format the delta-lease area (host ids) of lockspace ``name``."""
    sl = _sanlock()
    _call(f"{name}:{path}", sl.write_lockspace, _b(name), path,
          iotimeout=io_timeout, align=align, sector=sector, codes=_NO_DAEMON)


def read_lockspace(path: str, *, align: int, sector: int) -> str:
    """The lockspace name written at ``path``; LeaseCorrupt if none."""
    sl = _sanlock()
    info = _call(path, sl.read_lockspace, path, align=align, sector=sector,
                 codes=_NO_DAEMON)
    return info["lockspace"].decode("utf-8")


def write_resource(lockspace: str, name: str, path: str, offset: int, *,
                   align: int, sector: int) -> None:
    """Format a paxos resource lease at ``path:offset``."""
    sl = _sanlock()
    _call(f"{lockspace}:{name}:{path}:{offset}", sl.write_resource,
          _b(lockspace), _b(name), [(path, offset)], align=align,
          sector=sector, codes=_NO_DAEMON)


def read_resource(path: str, offset: int, *, align: int,
                  sector: int) -> tuple[str, str]:
    """(lockspace, resource) names at ``path:offset``."""
    sl = _sanlock()
    info = _call(f"{path}:{offset}", sl.read_resource, path, offset,
                 align=align, sector=sector, codes=_NO_DAEMON)
    return (info["lockspace"].decode("utf-8"),
            info["resource"].decode("utf-8"))


# Daemon requests.

def add_lockspace(name: str, host_id: int, path: str, *,
                  io_timeout: int) -> None:
    """Join: acquire ``host_id``'s delta lease (about 2*io_timeout+1 s)."""
    sl = _sanlock()
    _call(f"{name}:{host_id}:{path}", sl.add_lockspace, _b(name), host_id,
          path, iotimeout=io_timeout, codes=_NO_DAEMON)


def inq_lockspace(name: str, host_id: int, path: str) -> bool | None:
    """True if joined, False if not, None while joining or leaving."""
    sl = _sanlock()
    return _call(f"{name}:{host_id}:{path}", sl.inq_lockspace, _b(name),
                 host_id, path, codes=_NO_DAEMON)


def rem_lockspace(name: str, host_id: int, path: str, *,
                  wait: bool = True) -> None:
    """Leave (about 2 s); fails (rc=-16, EBUSY) while a resource is held
    in it. ``wait=False`` returns at once and the daemon leaves later."""
    sl = _sanlock()
    _call(f"{name}:{host_id}:{path}", sl.rem_lockspace, _b(name), host_id,
          path, unused=True, wait=wait)


def register() -> int:
    """Register this process; the fd must stay open while leases are held
    (closing it releases them)."""
    return _call("register", _sanlock().register, codes=_NO_DAEMON)


def acquire(fd: int, lockspace: str, name: str, path: str,
            offset: int) -> None:
    sl = _sanlock()
    _call(f"{lockspace}:{name}:{path}:{offset}", sl.acquire,
          _b(lockspace), _b(name), [(path, offset)], slkfd=fd,
          codes=_ACQUIRE)


def release(fd: int, lockspace: str, name: str, path: str,
            offset: int) -> None:
    sl = _sanlock()
    _call(f"{lockspace}:{name}:{path}:{offset}", sl.release,
          _b(lockspace), _b(name), [(path, offset)], slkfd=fd)


def get_hosts(lockspace: str) -> list[HostStatus]:
    """Hosts with a delta lease in a lockspace this daemon joined."""
    sl = _sanlock()
    hosts = _call(lockspace, sl.get_hosts, _b(lockspace))
    return [HostStatus(host_id=h["host_id"], generation=h["generation"],
                       timestamp=h["timestamp"], io_timeout=h["io_timeout"],
                       state=HOST_STATES.get(h["flags"] & HOST_FLAGS_MASK,
                                             "unknown"))
            for h in hosts]
