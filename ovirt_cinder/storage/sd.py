"""File storage domains: layout, the read side, and metadata primitives.

A file domain lives in a directory ``<mount>/<sd_id>`` (a local directory,
a POSIX or NFS mount point that someone else mounted)::

    <sd_id>/dom_md/metadata        KEY=value lines + _SHA_CKSUM (sdmeta)
    <sd_id>/dom_md/ids             lockspace (sanlock; flock for local)
    <sd_id>/dom_md/leases          resources; "SDM" at 1 x ALIGNMENT
    <sd_id>/dom_md/xleases         external leases
    <sd_id>/dom_md/inbox, outbox   16 MiB each, kept for compatibility
    <sd_id>/images/<img>/<vol>     volume data, raw or qcow2
    <sd_id>/images/<img>/<vol>.meta   volume metadata (volmeta)
    <sd_id>/images/<img>/<vol>.lease  volume lease
    <sd_id>/master/                master domain only; our logbook of
                                   unfinished work is in
                                   master/ovirt-cinder/flows

Work in progress is kept out of sight: a new image is built in
``images/.tmp-<img>`` and renamed into place when complete; a deleted one
is first renamed to ``images/_remove_me_<img>``. Readers never list those.

:class:`FileDomain` is the manifest (any host may read). The few writing
primitives here (metadata writes, directory publish) are called by the
operations in :mod:`actions` under the domain lease.
"""

from __future__ import annotations

import dataclasses
import os
import time

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fileutil
from ovirt_cinder.storage import sdmeta
from ovirt_cinder.storage import validate
from ovirt_cinder.storage import volmeta

__all__ = ["FileDomain", "DomainStats", "find_domains", "scan_domains",
           "create_domain"]


@dataclasses.dataclass(frozen=True)
class DomainStats:
    total: int
    free: int
    used: int


class FileDomain:
    """A file storage domain on disk (the read side)."""

    def __init__(self, path: str, metadata: sdmeta.DomainMetadata) -> None:
        self.path = os.path.abspath(path)
        self.metadata = metadata
        # Copies within the domain use copy offload (qemu-img -C) when
        # this is set and the filesystem reflinks.
        self.copy_offload = True
        self._reflink: bool | None = None

    def __repr__(self) -> str:
        return f"<FileDomain {self.sd_id} at {self.path}>"

    # Opening

    @classmethod
    def open(cls, path: str) -> FileDomain:
        """Open the domain in directory ``path`` (``<mount>/<sd_id>``)."""
        md_path = os.path.join(path, sc.DOM_MD, sc.METADATA)
        try:
            with open(md_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise errors.DomainNotFound(
                sd_id=os.path.basename(path)) from None
        md = sdmeta.parse(data, md_path)
        if md.sd_id != os.path.basename(os.path.normpath(path)):
            raise errors.MetadataError(
                path=md_path, reason=f"SDUUID {md.sd_id} does not match "
                "the directory name")
        return cls(path, md)

    # Identity

    @property
    def sd_id(self) -> str:
        return self.metadata.sd_id

    @property
    def pool_id(self) -> str:
        return self.metadata.pool_id

    @property
    def is_master(self) -> bool:
        return self.metadata.role == sc.DomainRole.MASTER

    @property
    def mount(self) -> str:
        return os.path.dirname(self.path)

    # Paths

    def dom_md(self, name: str) -> str:
        return os.path.join(self.path, sc.DOM_MD, name)

    @property
    def images_dir(self) -> str:
        return os.path.join(self.path, sc.IMAGES)

    @property
    def master_dir(self) -> str:
        return os.path.join(self.path, sc.MASTER)

    def image_dir(self, img_id: str) -> str:
        validate.check_uuid(img_id, "image id")
        return os.path.join(self.images_dir, img_id)

    def tmp_image_dir(self, img_id: str) -> str:
        validate.check_uuid(img_id, "image id")
        return os.path.join(self.images_dir, sc.TEMP_PREFIX + img_id)

    def removed_image_dir(self, img_id: str) -> str:
        validate.check_uuid(img_id, "image id")
        return os.path.join(self.images_dir, sc.REMOVE_PREFIX + img_id)

    def volume_path(self, img_id: str, vol_id: str,
                    image_dir: str | None = None) -> str:
        validate.check_uuid(vol_id, "volume id")
        return os.path.join(image_dir or self.image_dir(img_id), vol_id)

    # Reading

    def has_image(self, img_id: str) -> bool:
        return os.path.isdir(self.image_dir(img_id))

    def list_images(self) -> list[str]:
        """Image ids in this domain (not those being built or removed)."""
        try:
            names = os.listdir(self.images_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _is_uuid(n))

    def list_volumes(self, img_id: str,
                     image_dir: str | None = None) -> list[str]:
        directory = image_dir or self.image_dir(img_id)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            raise errors.ImageNotFound(
                sd_id=self.sd_id, img_id=img_id) from None
        return sorted(n[:-len(sc.META_EXT)] for n in names
                      if n.endswith(sc.META_EXT)
                      and _is_uuid(n[:-len(sc.META_EXT)]))

    def read_volume_meta(self, img_id: str, vol_id: str,
                         image_dir: str | None = None
                         ) -> volmeta.VolumeMetadata:
        path = self.volume_path(img_id, vol_id, image_dir) + sc.META_EXT
        try:
            with open(path, "rb") as f:
                data = f.read(sc.METADATA_SIZE + 1)
        except FileNotFoundError:
            raise errors.VolumeNotFound(
                sd_id=self.sd_id, img_id=img_id, vol_id=vol_id) from None
        return volmeta.VolumeMetadata.from_bytes(data, path)

    def stats(self) -> DomainStats:
        st = os.statvfs(self.path)
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        return DomainStats(total=total, free=free, used=total - free)

    def supports_reflink(self) -> bool:
        if not self.copy_offload:
            return False
        if self._reflink is None:
            self._reflink = fileutil.supports_reflink(self.images_dir)
        return self._reflink

    # Writing primitives (callers hold the domain lease)

    def write_volume_meta(self, img_id: str, vol_id: str,
                          meta: volmeta.VolumeMetadata,
                          image_dir: str | None = None) -> None:
        path = self.volume_path(img_id, vol_id, image_dir) + sc.META_EXT
        fileutil.atomic_write(path, meta.to_bytes())

    def write_metadata(self, metadata: sdmeta.DomainMetadata) -> None:
        fileutil.atomic_write(self.dom_md(sc.METADATA),
                              sdmeta.format_metadata(metadata))
        self.metadata = metadata


def _is_uuid(name: str) -> bool:
    try:
        validate.check_uuid(name)
    except errors.InvalidUUID:
        return False
    return True


def find_domains(mount: str) -> list[FileDomain]:
    """Open every domain directory directly under ``mount``; raise on the
    first one that cannot be opened."""
    found, broken = scan_domains(mount)
    for error in broken.values():
        raise error
    return found


def scan_domains(mount: str) -> tuple[list[FileDomain],
                                      dict[str, errors.StorageError]]:
    """Open every domain directory directly under ``mount``.

    Returns the domains that opened and, by path, the error of each that
    did not (a bad checksum, unreadable metadata): one broken domain
    never hides the others. A missing or unreadable ``mount`` raises
    :class:`errors.DomainNotFound`.
    """
    try:
        names = sorted(os.listdir(mount))
    except OSError as e:
        raise errors.DomainNotFound(
            sd_id=f"in {mount} ({e.strerror})") from None
    found, broken = [], {}
    for name in names:
        path = os.path.join(mount, name)
        if not (_is_uuid(name) and os.path.isfile(
                os.path.join(path, sc.DOM_MD, sc.METADATA))):
            continue
        try:
            found.append(FileDomain.open(path))
        except errors.StorageError as e:
            broken[path] = e
        except OSError as e:
            broken[path] = errors.MetadataError(path=path,
                                                reason=e.strerror)
    return found, broken


def create_domain(mount: str, *, sd_id: str, pool_id: str,
                  description: str = "",
                  domain_type: sc.DomainType = sc.DomainType.LOCALFS,
                  role: sc.DomainRole = sc.DomainRole.REGULAR,
                  remote_path: str = "",
                  block_size: int = sc.BLOCK_SIZE_512) -> FileDomain:
    """Create a V5 file domain in ``<mount>/<sd_id>``.

    The domain is built in a hidden directory and renamed into place when
    its metadata is written, so a crash never leaves a half domain.
    """
    validate.check_uuid(sd_id, "domain id")
    validate.check_uuid(pool_id, "pool id")
    final = os.path.join(mount, sd_id)
    if os.path.exists(final):
        raise errors.DomainExists(sd_id=sd_id, path=final)
    tmp = os.path.join(mount, f"{sc.TEMP_PREFIX}{sd_id}-{time.time_ns()}")
    os.makedirs(os.path.join(tmp, sc.DOM_MD))
    os.mkdir(os.path.join(tmp, sc.IMAGES))
    if role == sc.DomainRole.MASTER:
        os.mkdir(os.path.join(tmp, sc.MASTER))
    for name, size in sc.SPECIAL_FILES.items():
        fileutil.create_sparse(os.path.join(tmp, sc.DOM_MD, name), size)
    md = sdmeta.DomainMetadata(
        sd_id=sd_id, pool_id=pool_id, version=sc.DOMAIN_VERSION,
        type=domain_type, cls=sc.DomainClass.DATA, role=role,
        description=description, block_size=block_size,
        alignment=sc.ALIGNMENT, remote_path=remote_path or mount)
    fileutil.atomic_write(os.path.join(tmp, sc.DOM_MD, sc.METADATA),
                          sdmeta.format_metadata(md))
    os.rename(tmp, final)
    fileutil.fsync_dir(mount)
    return FileDomain(final, md)
