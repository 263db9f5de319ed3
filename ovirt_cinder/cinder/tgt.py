"""What the driver reads of tgtd's state, through Cinder's own privsep
call (``tgtadm --lld iscsi --op show --mode target``).

Cinder's ``TgtAdm.extend_target`` re-creates a target (``tgt-admin
--update -f``): tgtd reads a LUN's size only when it opens the backing
file. The initiators' sessions drop and they log in again by themselves
about two seconds later. Until then, a rescan (os-brick's
``extend_volume``, which Nova runs as soon as Cinder reports the new size)
still sees the old size; so the driver waits for the sessions to come
back before it returns (:func:`wait_sessions`).
"""

from __future__ import annotations

import logging
import time

import cinder.privsep.targets.tgt

__all__ = ["parse_sessions", "sessions", "wait_sessions"]

LOG = logging.getLogger(__name__)

RELOGIN_TIMEOUT = 15.0
_POLL = 0.2


def parse_sessions(show: str) -> dict[str, int]:
    """Target IQN -> number of I_T nexus (sessions) in ``tgtadm`` show
    output."""
    found: dict[str, int] = {}
    iqn = None
    for line in show.splitlines():
        if line.startswith("Target "):
            iqn = line.split(":", 1)[1].strip()
            found[iqn] = 0
        elif iqn is not None and line.strip().startswith("I_T nexus:"):
            found[iqn] += 1
    return found


def sessions(iqn: str) -> int:
    out, _err = cinder.privsep.targets.tgt.tgtadm_show()
    return parse_sessions(out).get(iqn, 0)


def wait_sessions(iqn: str, count: int,
                  timeout: float = RELOGIN_TIMEOUT) -> bool:
    """Wait until ``iqn`` has ``count`` sessions again; False (logged)
    when it does not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while sessions(iqn) < count:
        if time.monotonic() >= deadline:
            LOG.warning("Target %s has not got its %d session(s) back "
                        "after %s seconds", iqn, count, timeout)
            return False
        time.sleep(_POLL)
    return True
