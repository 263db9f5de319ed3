"""Raw views of qcow2 volumes and chains for host-assisted migration.

Cinder 29 copies a volume for host-assisted (generic) migration in the
volume manager, not in the driver: ``VolumeManager._copy_volume_data``
attaches the source locally and the destination (through RPC) on the
source's cinder-volume host with os-brick, then runs ``dd`` from one
device path to the other (``BaseVD.copy_volume_data`` no longer exists,
so a driver cannot replace that copy). ``dd`` copies bytes, so the
source's ``device_path`` must hold the guest view as raw bytes.

For a qcow2 volume or a chain of a local or POSIX domain that is the
source of a migration (``migration_status`` ``"migrating"``), the driver
therefore attaches a raw view instead of the leaf:

* :func:`open_raw_view` writes the leaf's whole guest view (every layer,
  zeros where nothing is allocated) into the sparse raw file
  ``<image_conversion_dir>/ovirt-migration-<volume id>.raw`` with
  ``qemu-img convert`` (:meth:`StoragePool.export_volume`) and returns
  its path; a failed export leaves no file.
* :func:`close_raw_view` removes that file when the connection is
  terminated (the manager always detaches, also after a failed copy).

The view is a read-only snapshot: nothing writes to a migrating volume
(its status is ``maintenance``), and writes to the view never reach the
volume. The copy costs one extra sparse pass and temporary space in
``image_conversion_dir`` equal to the data of the volume.
"""

from __future__ import annotations

import contextlib
import os

from ovirt_cinder.storage import validate
from ovirt_cinder.storage.pool import StoragePool

__all__ = ["MIGRATING", "close_raw_view", "open_raw_view",
           "raw_view_path"]

MIGRATING = "migrating"
_PREFIX = "ovirt-migration-"


def raw_view_path(conversion_dir: str, volume_id: str) -> str:
    """Where the raw view of the Cinder volume ``volume_id`` lives."""
    volume_id = validate.check_uuid(volume_id, "volume id")
    return os.path.join(conversion_dir, f"{_PREFIX}{volume_id}.raw")


def open_raw_view(pool: StoragePool, sd_id: str, img_id: str,
                  path: str) -> str:
    """Export the leaf's guest view of ``img_id`` as raw into ``path``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        pool.export_volume(sd_id, img_id, path, fmt="raw")
    except BaseException:
        close_raw_view(path)
        raise
    return path


def close_raw_view(path: str) -> bool:
    """Remove a raw view; False if there was none."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        return True
    return False
