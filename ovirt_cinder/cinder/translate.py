"""Engine errors to Cinder exceptions: the only place they are mapped.

:func:`engine_errors` wraps every engine call of the driver. Mapping:

======================================  ===================================
engine error                            Cinder exception
======================================  ===================================
ImageNotFound, VolumeNotFound           VolumeNotFound (``volume_id``)
SnapshotNotFound                        SnapshotNotFound (``snapshot_id``)
ImageIsBusy (StalePlan), LeaseTimeout   VolumeIsBusy (retry later)
UnsafeImage (FormatMismatch, ...)       ImageUnacceptable
InvalidOperation, InvalidParameter,     InvalidVolume
VolumeAttached
any other StorageError                  VolumeBackendAPIException
======================================  ===================================

The original engine error stays the ``__cause__`` of the Cinder one.
``hide`` maps paths that must not appear in the Cinder exception's message
(the driver's staging files) to what is said instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from collections.abc import Mapping

from cinder import exception

from ovirt_cinder.storage import errors

__all__ = ["engine_errors"]


@contextlib.contextmanager
def engine_errors(volume_id: str = "", snapshot_id: str = "",
                  image_id: str = "", hide: Mapping[str, str] | None = None
                  ) -> Iterator[None]:
    """Re-raise engine errors inside the block as Cinder exceptions."""
    try:
        yield
    except errors.StorageError as e:
        raise _cinder_error(e, volume_id, snapshot_id, image_id,
                            hide or {}) from e


def _scrub(text: str, hide: Mapping[str, str]) -> str:
    """``text`` with each hidden path (or its file name) replaced."""
    for path, name in hide.items():
        text = text.replace(path, name)
        base = os.path.basename(path)
        if base:
            text = text.replace(base, name)
    return text


def _cinder_error(e: errors.StorageError, volume_id: str,
                  snapshot_id: str, image_id: str,
                  hide: Mapping[str, str]) -> Exception:
    text = _scrub(str(e), hide)
    if isinstance(e, errors.SnapshotNotFound):
        return exception.SnapshotNotFound(snapshot_id=snapshot_id or e)
    if isinstance(e, (errors.ImageNotFound, errors.VolumeNotFound)):
        return exception.VolumeNotFound(volume_id=volume_id or e)
    if isinstance(e, (errors.ImageIsBusy, errors.LeaseTimeout)):
        return exception.VolumeIsBusy(volume_name=volume_id or e)
    if isinstance(e, errors.UnsafeImage):
        return exception.ImageUnacceptable(image_id=image_id, reason=text)
    if isinstance(e, (errors.InvalidOperation, errors.InvalidParameter,
                      errors.VolumeAttached)):
        return exception.InvalidVolume(reason=text)
    return exception.VolumeBackendAPIException(data=text)
