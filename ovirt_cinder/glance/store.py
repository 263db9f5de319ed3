"""The ``ovirt`` Glance store: images kept as templates in a storage domain.

Registered as the ``glance_store.drivers`` entry point
``ovirt = ovirt_cinder.glance.store:Store`` and used in Glance's multi-store
mode (``enabled_backends = fast:ovirt`` with a ``[fast]`` section holding
the options below).

Each Glance image is one template: a SHARED volume alone in its own image,
whose image id is the Glance image id. The location URI is::

    ovirt://<pool_id>/<sd_id>/<img_id>/<vol_id>

with four canonical lower-case UUIDs and nothing else (no query, no
fragment, no extra path); anything else is ``BadStoreUri``, and a location
is only ever resolved through the engine, so nothing outside a domain of
the configured pool is opened.

``add`` receives the bytes into a sparse staging file on the domain's
filesystem (:mod:`upload`: all-zero blocks become holes), computes the md5
checksum and the multihash and feeds the signature verifier (each on its
own thread, overlapping the writes), refuses a byte count other than a
non-zero ``image_size`` (``Invalid``, as glance_store's filesystem store
does), then inspects the file as untrusted
(:func:`inspect.inspect_untrusted`, with ``ovirt_max_image_size`` as the
virtual size limit) and finally moves it into the domain as the template
volume (:meth:`StoragePool.adopt_volume`, one rename, no copy). The
stored bytes are exactly the uploaded bytes, so ``get`` returns them
unchanged:

- a qcow2 upload becomes a COW template (``FORMAT=COW``) that the Cinder
  driver's ``clone_image`` overlays in O(1);
- raw bytes (also a raw disk with a partition table) become a RAW
  template, sparse;
- other formats (ISO, VMDK, VHD, VHDX, VDI, ...) are stored as raw bytes
  (``FORMAT=RAW``) and marked so that ``clone_image`` refuses to overlay
  them: an ISO gets ``DISKTYPE=ISOF``, and every template records the
  detected format in its DESCRIPTION as ``{"fmt": ..., "tmpl": <image>}``;
  only ``fmt`` ``raw`` and ``qcow2`` are copy-on-write bases, and only
  for an image whose ``disk_format`` is that format in a ``bare``
  container (the driver checks; otherwise Cinder converts a copy);
- a qcow2 with a backing file or an external data file, an image with
  structural damage (``qemu-img check`` finds corruptions: tables past
  the end of the file, overlapping metadata, bad refcounts), and anything
  the format inspector calls unsafe, is refused
  (:class:`UnsafeImageRejected`, a ``ValueError``, which Glance answers
  with 400), with nothing left. Messages name the image id, never the
  staging file.

Any failure removes the staging file, and the engine's flow removes a
half-built image, so no partial data stays behind.

``delete`` removes the template image at once. Cinder volumes made from it
hard-link the template volume into their own image (DESIGN.md section 3),
so their chains stay whole; the data is freed when the last of them goes.
Copies of the template that the Cinder driver made in other domains
(marked ``copy`` in their DESCRIPTION) are removed too when no volume
links them; otherwise the driver removes each with its last volume.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

from glance_store import capabilities
from glance_store import driver
from glance_store import exceptions
from glance_store import location as glance_location
from oslo_config import cfg
from oslo_utils import units

from ovirt_cinder.glance import upload
from ovirt_cinder.storage import config
from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import description
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import image
from ovirt_cinder.storage import inspect
from ovirt_cinder.storage import pool as pool_mod

__all__ = ["Store", "StoreLocation", "UnsafeImageRejected", "OPTIONS",
           "SCHEME", "list_opts", "COW_BASE_FORMATS"]

LOG = logging.getLogger(__name__)

SCHEME = "ovirt"

# Detected formats that a template can serve as a copy-on-write base for.
COW_BASE_FORMATS = ("raw", "qcow2")

# The store's own options; OPTIONS adds them to the options it shares with
# the Cinder driver and the CLI (config.POOL_OPTS: the pool, its mounts,
# leases and logbook).
STORE_OPTS = [
    cfg.StrOpt("ovirt_store_domain",
               help="""
The storage domain (``sd_id``) new images are written to as templates.

Cinder can create volumes from an image in O(1) only in the domain that
holds its template, so choose the domain Cinder creates volumes in.

Possible values:
    * The UUID of a domain of the pool
    * Unset: the pool's master domain

Related options:
    * ``ovirt_domain_paths``
"""),
    cfg.IntOpt("ovirt_max_image_size", default=units.Ti, min=0,
               help="""
The largest virtual size, in bytes, of an image that may be stored.

An image whose virtual size (as its header or ``qemu-img info`` says) is
larger is refused with nothing stored. An upload also stops once it has
sent more than this many bytes plus a small qcow2 metadata allowance.

Possible values:
    * A number of bytes
    * 0 for no limit

Related options:
    * None
"""),
    cfg.IntOpt("ovirt_chunk_size", default=4 * units.Mi, min=upload.BLOCK_SIZE,
               help="""
The size, in bytes, of the chunks read from an upload and served on
download.

All-zero blocks of 64 KiB inside a chunk are not written (the template
stays sparse).

Possible values:
    * An integer of at least 65536

Related options:
    * None
"""),
]

OPTIONS = [*config.POOL_OPTS, *STORE_OPTS]

_UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_URI = re.compile(rf"ovirt://({_UUID})/({_UUID})/({_UUID})/({_UUID})")
_UUID_RE = re.compile(_UUID)
_SPEC_KEYS = ("pool_id", "sd_id", "img_id", "vol_id")

# Slack over ovirt_max_image_size for qcow2 metadata while receiving.
_QCOW2_SLACK = 64 * units.Mi


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """Our options, for oslo-config-generator (group of the entry point)."""
    return [(SCHEME, OPTIONS)]


class UnsafeImageRejected(exceptions.Invalid, ValueError):
    """The uploaded bytes failed inspection; nothing was stored."""

    message = "Image refused: %(reason)s"


class StoreLocation(glance_location.StoreLocation):
    """``ovirt://<pool_id>/<sd_id>/<img_id>/<vol_id>``, UUIDs only."""

    def process_specs(self) -> None:
        for key in _SPEC_KEYS:
            value = str(self.specs.get(key, ""))
            if not _UUID_RE.fullmatch(value):
                raise exceptions.BadStoreUri(
                    uri=str(self.specs), reason=f"invalid {key}")
            setattr(self, key, value)

    def get_uri(self) -> str:
        return (f"{SCHEME}://{self.pool_id}/{self.sd_id}/{self.img_id}/"
                f"{self.vol_id}")

    def parse_uri(self, uri: str) -> None:
        match = _URI.fullmatch(uri) if isinstance(uri, str) else None
        if match is None:
            LOG.info("Invalid ovirt location %r", uri)
            raise exceptions.BadStoreUri(
                uri=uri, reason="expected ovirt://pool/domain/image/volume "
                "with canonical UUIDs")
        self.specs = dict(zip(_SPEC_KEYS, match.groups(), strict=True))
        self.process_specs()


def _chunks(path: str, offset: int, length: int,
            chunk_size: int) -> Iterator[bytes]:
    """Lazily read ``length`` bytes at ``offset``; open and close inside."""
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0:
            chunk = f.read(min(chunk_size, length))
            if not chunk:
                break
            length -= len(chunk)
            yield chunk


@contextlib.contextmanager
def _store_errors(img_id: str) -> Iterator[None]:
    """Engine and OS errors of ``add`` as glance_store exceptions.

    Messages name the image, never the staging file (an internal path):
    inspection errors already name the image id, the others are reworded.
    """
    try:
        yield
    except errors.ImageExists as e:
        raise exceptions.Duplicate(image=img_id) from e
    except errors.NoSpace as e:
        raise exceptions.StorageFull(message=str(e)) from e
    except upload.UploadTooLarge as e:
        raise UnsafeImageRejected(
            reason=f"image {img_id} is over the limit of {e.limit} "
            "bytes") from e
    except upload.SizeMismatch as e:
        raise exceptions.Invalid(
            message=f"image {img_id}: size mismatch: expected "
            f"{e.expected} bytes, got {e.actual} bytes") from e
    except errors.UnsafeImage as e:
        raise UnsafeImageRejected(reason=str(e)) from e
    except OSError as e:
        text = f"image {img_id}: {e.strerror or e}"
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise exceptions.StorageFull(message=text) from e
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise exceptions.StorageWriteDenied(message=text) from e
        raise


class Store(driver.Store):
    """Glance images as templates in an oVirt-style storage domain."""

    _CAPABILITIES = (capabilities.BitMasks.READ_RANDOM |
                     capabilities.BitMasks.WRITE_ACCESS |
                     capabilities.BitMasks.DRIVER_REUSABLE)
    OPTIONS = OPTIONS
    READ_CHUNKSIZE = 4 * units.Mi
    WRITE_CHUNKSIZE = READ_CHUNKSIZE

    def __init__(self, conf: cfg.ConfigOpts,
                 backend: str | None = None) -> None:
        super().__init__(conf, backend=backend)
        self._pool: pool_mod.StoragePool | None = None
        self._sd_id: str | None = None

    def get_schemes(self) -> tuple[str, ...]:
        return (SCHEME,)

    # Configuration

    @property
    def _options(self) -> Any:
        return getattr(self.conf, self.backend_group or "glance_store")

    def configure_add(self) -> None:
        """Open the pool and choose the domain; BadStoreConfiguration."""
        opts = self._options
        self.READ_CHUNKSIZE = self.WRITE_CHUNKSIZE = opts.ovirt_chunk_size
        self._pool = self._open_pool(opts)
        self._recover()
        self._sd_id = self._store_domain(opts)
        self._url_prefix = f"{SCHEME}://{self._pool.pool_id}/"
        dom = self._pool.domain(self._sd_id)
        if not os.access(dom.mount, os.W_OK) or not os.access(
                dom.images_dir, os.W_OK):
            self._bad_config(f"{dom.mount} or {dom.images_dir} is not "
                             "writable")

    def _open_pool(self, opts: Any) -> pool_mod.StoragePool:
        if not opts.ovirt_domain_paths:
            self._bad_config("ovirt_domain_paths is not set")
        try:
            return config.open_pool(opts)
        except (errors.StorageError, OSError) as e:
            self._bad_config(f"cannot open the pool: {e}")

    def _recover(self) -> None:
        """Finish or revert flows a crashed glance-api left behind."""
        assert self._pool is not None
        try:
            for name, outcome in self._pool.recover():
                LOG.info("Recovered storage flow %s: %s", name, outcome)
        except errors.StorageError as e:
            self._bad_config(f"cannot recover unfinished work: {e}")

    def _store_domain(self, opts: Any) -> str:
        pool = self._pool
        assert pool is not None
        try:
            if opts.ovirt_store_domain:
                return pool.domain(opts.ovirt_store_domain).sd_id
            return pool.master.sd_id
        except errors.StorageError as e:
            self._bad_config(str(e))

    def _bad_config(self, reason: str) -> Any:
        raise exceptions.BadStoreConfiguration(
            store_name=self.backend_group or SCHEME, reason=reason)

    @property
    def pool(self) -> pool_mod.StoragePool:
        if self._pool is None:
            self._pool = self._open_pool(self._options)
        return self._pool

    # Reading

    def _volume(self, location: glance_location.Location) -> image.Volume:
        """The template volume a location names; NotFound otherwise."""
        loc = location.store_location
        pool = self.pool
        if loc.pool_id != pool.pool_id or loc.sd_id not in pool.domains:
            raise exceptions.NotFound(image=loc.get_uri())
        try:
            vol = pool.image(loc.sd_id, loc.img_id).template()
        except errors.StorageError as e:
            raise exceptions.NotFound(image=loc.get_uri()) from e
        if vol is None or vol.vol_id != loc.vol_id or not vol.legal:
            raise exceptions.NotFound(image=loc.get_uri())
        return vol

    @capabilities.check
    def get(self, location: glance_location.Location, offset: int = 0,
            chunk_size: int | None = None,
            context: Any = None) -> tuple[Iterator[bytes], int]:
        """A lazy iterator over the stored bytes, and its length.

        ``chunk_size`` is the number of bytes wanted from ``offset`` (the
        whole rest when None), as in glance_store's other stores.
        """
        path = self._volume(location).path
        size = max(0, os.path.getsize(path) - offset)
        length = size if chunk_size is None else min(chunk_size, size)
        return (_chunks(path, offset, length, self.READ_CHUNKSIZE),
                chunk_size if chunk_size is not None else size)

    def get_size(self, location: glance_location.Location,
                 context: Any = None) -> int:
        return os.path.getsize(self._volume(location).path)

    # Writing

    @driver.back_compat_add
    @capabilities.check
    def add(self, image_id: str, image_file: Any, image_size: int,
            hashing_algo: str, context: Any = None,
            verifier: Any = None) -> tuple[str, int, str, str,
                                           dict[str, str]]:
        """Store an image as a template; see the module docstring."""
        img_id = str(image_id).lower()
        if not _UUID_RE.fullmatch(img_id):
            raise exceptions.BadStoreUri(
                uri=image_id, reason="image id must be a UUID")
        self._check_duplicate(img_id)
        dom = self.pool.domain(self._sd_id or self.pool.master.sd_id)
        with _store_errors(img_id), \
                upload.staging_file(dom.mount, dom.sd_id) as path:
            received = self._receive(path, image_file, image_size,
                                     hashing_algo, verifier)
            vol = self._publish(dom.sd_id, img_id, path)
        uri = StoreLocation({"pool_id": self.pool.pool_id,
                             "sd_id": dom.sd_id, "img_id": img_id,
                             "vol_id": vol.vol_id}, self.conf).get_uri()
        LOG.info("Stored image %s as %s (%s, %d bytes, %d allocated)",
                 img_id, uri, vol.meta.format, received.size,
                 received.allocated)
        metadata = {"store": self.backend_group} if self.backend_group \
            else {}
        return (uri, received.size, received.checksum, received.multihash,
                metadata)

    def _check_duplicate(self, img_id: str) -> None:
        try:
            self.pool.find_image(img_id)
        except errors.ImageNotFound:
            return
        raise exceptions.Duplicate(image=img_id)

    def _receive(self, path: str, image_file: Any, image_size: int,
                 hashing_algo: str, verifier: Any) -> upload.Received:
        limit = self._options.ovirt_max_image_size
        try:
            return upload.receive(
                path, image_file, hashing_algo=hashing_algo,
                chunk_size=self.WRITE_CHUNKSIZE, verifier=verifier,
                limit=limit + _QCOW2_SLACK if limit else None,
                expected_size=image_size or None)
        except ValueError as e:
            if "unsupported hash type" in str(e):
                raise exceptions.UnknownHashingAlgo(
                    algo=hashing_algo) from e
            raise

    def _publish(self, sd_id: str, img_id: str, path: str) -> image.Volume:
        """Inspect the staged file, then move it in as the template."""
        limit = self._options.ovirt_max_image_size or None
        found = inspect.inspect_untrusted(path, max_virtual_size=limit,
                                          name=img_id)
        fmt = (sc.VolumeFormat.COW if found.format == "qcow2"
               else sc.VolumeFormat.RAW)
        # A COW volume's capacity is the guest's size; a RAW one serves
        # the stored bytes themselves (rounded up: CAP counts sectors).
        size = (found.virtual_size if fmt == sc.VolumeFormat.COW
                else os.path.getsize(path))
        size = max(size, 1)
        capacity = -(-size // sc.BLOCK_SIZE_512) * sc.BLOCK_SIZE_512
        disktype = (sc.DiskType.ISOF if found.format == "iso"
                    else sc.DiskType.DATA)
        return self.pool.adopt_volume(
            sd_id, img_id, path, capacity, fmt=fmt,
            voltype=sc.VolumeType.SHARED, disktype=disktype,
            description=description.update("", tmpl=img_id,
                                           fmt=found.format))

    @capabilities.check
    def delete(self, location: glance_location.Location,
               context: Any = None) -> None:
        """Remove the template image; dependents keep their hard links.

        Then remove the copies the Cinder driver made of it in the other
        domains that no volume uses any more; a copy still in use goes
        with its last volume (the driver's ``delete_volume``).
        """
        vol = self._volume(location)
        loc = location.store_location
        try:
            self.pool.delete_image(loc.sd_id, vol.meta.image)
        except errors.ImageNotFound as e:
            raise exceptions.NotFound(image=loc.get_uri()) from e
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise exceptions.StorageWriteDenied(
                    message=f"image {loc.img_id}: {e.strerror or e}") from e
            raise
        self._collect_copies(loc.sd_id, vol.meta.image)

    def _collect_copies(self, sd_id: str, img_id: str) -> None:
        pool = self.pool
        for other in sorted(pool.domains):
            if other == sd_id or not pool.domain(other).has_image(img_id):
                continue
            try:
                if pool.collect_template_copy(other, img_id):
                    LOG.info("Removed the unused copy of image %s in "
                             "domain %s", img_id, other)
            except (errors.StorageError, OSError) as e:
                LOG.warning("Could not remove the copy of image %s in "
                            "domain %s (kept): %s", img_id, other, e)
