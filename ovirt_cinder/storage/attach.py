"""Attached images: the qemu-storage-daemon that serves each one.

The storage host owns every attached chain. Attaching an image starts one
:class:`qsd.Daemon` that opens the image's chain (base first, every layer
read-only but the leaf) and exposes the guest's view as a raw file, the
*view*, which an iSCSI target serves as a LUN (or a process on this host
opens directly). While the daemon runs, nothing else writes the chain's
files: the operations of :mod:`pool` that change an attached image go
through the daemon's QMP socket instead (live snapshot, merge, extend),
and the ones that cannot be done live are refused.

A daemon's state lives in ``<run_path>/attached/<img_id>/`` (its QMP
socket, pid file and view), on a host-local tmpfs (``/run``): the daemon
is not a child of the process that started it, so it keeps serving the
guest across a restart of that process, and ``ensure`` finds it again.
After a reboot the directory is gone with the daemon and ``ensure`` starts
a new one from the metadata.

A daemon that died (killed, crashed) leaves a directory and possibly a
stale FUSE mount: :meth:`Attachments.daemon` reports it as not running,
and the next attach or detach cleans it up. Operations then treat the
image as not attached: no process holds its files, so they work on them
directly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import qsd

__all__ = ["Attachments", "DEFAULT_RUN_PATH"]

DEFAULT_RUN_PATH = sc.DEFAULT_RUN_PATH

# A unix socket path is at most 107 bytes.
_MAX_SOCKET_PATH = 107


class Attachments:
    """The daemons of the images attached on this host."""

    def __init__(self, run_path: str = DEFAULT_RUN_PATH) -> None:
        self.run_path = run_path
        self.root = os.path.join(run_path, "attached")

    def run_dir(self, img_id: str) -> str:
        return os.path.join(self.root, img_id)

    def handle(self, img_id: str) -> qsd.Daemon:
        """A handle on ``img_id``'s daemon, running or not."""
        return qsd.Daemon(self.run_dir(img_id))

    def daemon(self, img_id: str) -> qsd.Daemon | None:
        """``img_id``'s daemon if it is running, else None."""
        if not os.path.isdir(self.run_dir(img_id)):
            return None
        daemon = self.handle(img_id)
        return daemon if daemon.alive() else None

    def start(self, img_id: str, chain: Sequence[qsd.Layer]) -> qsd.Daemon:
        """Start a daemon serving ``chain`` (base first) for ``img_id``;
        the caller holds the image lease and checked the chain."""
        daemon = self.handle(img_id)
        if len(daemon.sock.encode()) > _MAX_SOCKET_PATH:
            raise qsd.DaemonFailed(
                rc=None, argv=[], err=f"run path {self.run_path!r} is too "
                f"long for a unix socket ({daemon.sock!r})")
        daemon.cleanup_stale()
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        return qsd.Daemon.start(daemon.run_dir, chain)

    def stop(self, img_id: str) -> None:
        """Stop ``img_id``'s daemon, if any, and clean up after it."""
        self.handle(img_id).stop()

    def images(self) -> list[str]:
        """The images with a daemon directory on this host (running or
        left behind by a dead daemon)."""
        try:
            return sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
