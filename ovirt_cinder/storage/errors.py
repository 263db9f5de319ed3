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


class BadCounters(StorageError):
    """A domain's counters record that is missing or cannot be trusted
    (see counters.py): it is rebuilt by a scan, never used."""

    msg = "Counters of storage domain {sd_id} in {path}: {reason}"


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


class VolumeAttached(StorageError):
    msg = "Cannot {operation}: image {img_id} is attached (detach it first)"


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


class CorruptImage(UnsafeImage):
    """The image's structure is damaged (``qemu-img check`` found
    corruptions or could not check it, or the header is marked corrupt)."""

    msg = "Image {path} is damaged: {reason}"


class StalePlan(ImageIsBusy):
    """Another host changed the image between planning and doing."""

    msg = ("Image {img_id} changed while the operation was planned: "
           "volume {vol_id} {reason}; retry the operation")


class OperationIncomplete(StorageError):
    """A flow failed after its point of no return; recovery finishes it."""

    msg = ("{operation} failed after its point of no return and was not "
           "undone (nothing was lost): {reason}; it is finished by "
           "`ovirt-storage recover` or the next service start")


class UntrustedFlow(StorageError):
    """A logbook that recovery refuses to run."""

    msg = "Unfinished flow {book_id} is not run: {reason}"


class QemuImgTimeout(QemuImgError):
    """qemu-img ran out of time and was killed.

    ``timeout`` is the bound that expired: a wall-clock bound for quick
    commands, a bound on the time without progress (``stalled``) for data
    commands. ``rc`` is the exit status after the kill (None if the child
    could not be reaped), ``out`` and ``err`` what it wrote until then.
    """

    msg = "qemu-img {cmd} timed out after {timeout} seconds: {reason}"


class Qcow2HeaderError(StorageError):
    """A file is not a readable qcow2 image (bad magic, truncated...)."""

    msg = "Invalid qcow2 header in {path}: {reason}"


class MissingData(ChainError):
    msg = ("Volume {vol_id} of image {img_id} in domain {sd_id} has no data "
           "file {path}")


class BackingMismatch(ChainError):
    msg = ("Volume {vol_id} of image {img_id} has backing file {backing!r}, "
           "but its parent is {parent_id!r}")


class BackingFormatMismatch(ChainError):
    msg = ("Volume {vol_id} of image {img_id} names backing format "
           "{backing_format!r}, but its parent {parent_id} is "
           "{parent_format!r}")


class FormatMismatchInChain(ChainError):
    msg = ("Volume {vol_id} of image {img_id} is declared {expected} but "
           "its data file is {actual}")


class ExternalDataFile(ChainError):
    msg = ("Volume {vol_id} of image {img_id} uses an external data file "
           "{data_file!r}")


class BadVolumeData(ChainError):
    msg = "Volume {vol_id} of image {img_id} has unusable data: {reason}"


class NotQcow2(Qcow2HeaderError):
    """The file does not start with the qcow2 magic."""

    msg = "{path} is not a qcow2 image: {reason}"


class DomainNeedsUpgrade(StorageError):
    """A V3 or V4 domain: read, never changed, until it is upgraded."""

    msg = ("Storage domain {sd_id} has format V{version}; the engine "
           "changes only V5 domains: upgrade it first with "
           "`ovirt-storage domain upgrade {sd_id}` "
           "(StoragePool.upgrade_domain)")


class DomainAttached(StorageError):
    """A domain that cannot be attached to this pool as it is."""

    msg = "Storage domain {sd_id} is attached to pool {pool_id}: {reason}"
