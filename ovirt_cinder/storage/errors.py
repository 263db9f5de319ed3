"""Typed errors of the storage engine.

Every error carries its data as attributes and renders ``msg`` with them,
so callers (the Cinder driver, the Glance store, the CLI) can translate
them without parsing strings::

    raise VolumeNotFound(sd_id=sd, img_id=img, vol_id=vol)
"""

from __future__ import annotations

from typing import Any


class StorageError(Exception):
    """Base of all engine errors."""

    msg = "Storage error"

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)
        super().__init__(str(self))

    def __str__(self) -> str:
        try:
            return self.msg.format(**self.__dict__)
        except (KeyError, IndexError, AttributeError):
            return f"{self.msg} {self.__dict__}"


class InvalidParameter(StorageError):
    msg = "Invalid {name}: {value!r} ({reason})"


class InvalidUUID(InvalidParameter):
    msg = "Invalid {name}: {value!r} is not a UUID"


class MetadataError(StorageError):
    msg = "Invalid metadata in {path}: {reason}"


class MetadataOverflow(MetadataError):
    msg = "Metadata is {size} bytes, more than the {limit} bytes limit"


class ChecksumMismatch(MetadataError):
    msg = ("Metadata checksum mismatch in {path}: stored {stored}, "
           "computed {computed}")


class UnsupportedVersion(MetadataError):
    msg = "Unsupported domain version {version} in {path}"


class DomainNotFound(StorageError):
    msg = "Storage domain {sd_id} not found"


class DomainExists(StorageError):
    msg = "Storage domain {sd_id} already exists at {path}"


class PoolMismatch(StorageError):
    msg = "Storage domain {sd_id} belongs to pool {actual}, not {expected}"


class ImageNotFound(StorageError):
    msg = "Image {img_id} not found in domain {sd_id}"


class ImageExists(StorageError):
    msg = "Image {img_id} already exists in domain {sd_id}"


class VolumeNotFound(StorageError):
    msg = "Volume {vol_id} of image {img_id} not found in domain {sd_id}"


class VolumeExists(StorageError):
    msg = "Volume {vol_id} already exists in image {img_id}"


class SnapshotNotFound(StorageError):
    msg = "Snapshot {snap_id} not found in image {img_id}"


class IllegalVolume(StorageError):
    msg = "Volume {vol_id} of image {img_id} is {legality}"


class ChainError(StorageError):
    msg = "Broken chain in image {img_id}: {reason}"


class ChainLoop(ChainError):
    msg = "Loop in the chain of image {img_id} at volume {vol_id}"


class MissingParent(ChainError):
    msg = "Volume {vol_id} of image {img_id} has missing parent {parent_id}"


class ParentNotShared(ChainError):
    msg = ("Volume {vol_id} of image {img_id} has parent {parent_id} from "
           "image {parent_img_id} that is not SHARED")


class ImageIsBusy(StorageError):
    msg = "Image {img_id} is busy: {reason}"


class InvalidOperation(StorageError):
    msg = "Cannot {operation}: {reason}"


class NoSpace(StorageError):
    msg = "No space left in domain {sd_id}: {reason}"


class LeaseError(StorageError):
    msg = "Lease {lease} error: {reason}"


class LeaseTimeout(LeaseError):
    msg = "Timed out waiting for lease {lease} after {timeout} seconds"


class CommandError(StorageError):
    """An external program exited with an error."""

    msg = "Command {cmd} failed with rc={rc}: {err}"


class QemuImgError(CommandError):
    msg = "qemu-img {cmd} failed with rc={rc}: {err}"


class UnsafeImage(StorageError):
    """Untrusted image bytes failed inspection."""

    msg = "Unsafe image {path}: {reason}"


class ImageTooLarge(UnsafeImage):
    msg = "Image {path} virtual size {size} is over the limit {limit}"


class FormatMismatch(UnsafeImage):
    msg = "Image {path} declared as {declared} but is {actual}"
