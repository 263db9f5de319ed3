"""File storage domains: layout, the read side, and metadata primitives.

A file domain lives in a directory ``<mount>/<sd_id>`` (a local directory,
a POSIX or NFS mount point that someone else mounted)::

    <sd_id>/dom_md/metadata        KEY=value lines + _SHA_CKSUM (sdmeta)
    <sd_id>/dom_md/ids             sanlock lockspace <sd_id> at 0 (the
                                   flock of the local backend, too)
    <sd_id>/dom_md/leases          resources; "SDM" at 1 x ALIGNMENT
    <sd_id>/dom_md/xleases         external leases: an empty index at
                                   1 x ALIGNMENT (xlease)
    <sd_id>/dom_md/inbox, outbox   16 MiB each (sparse), kept for
                                   compatibility
    <sd_id>/dom_md/ovirt-cinder-counters
                                   ours: the domain's image, volume and
                                   provisioned-byte counts (counters;
                                   vdsm never lists dom_md)
    <sd_id>/images/<img>/<vol>     volume data, raw or qcow2
    <sd_id>/images/<img>/<vol>.meta   volume metadata (volmeta)
    <sd_id>/images/<img>/<vol>.lease  sanlock resource <vol> at 0
    <sd_id>/master/                master domain only; our logbook of
                                   unfinished work is in
                                   master/ovirt-cinder/flows

The lease areas are written as vdsm writes them when it creates a domain
and its volumes (:func:`create_domain`, :meth:`FileDomain.
create_volume_lease`), whatever the lease backend, with the ``sanlock``
program (:mod:`sanlock_direct`, no daemon needed): ``ids``, ``leases``
and every ``.lease`` are ALIGNMENT long (``leases`` 2 x), ``xleases``
ALIGNMENT + the index. Files are mode 0660 and directories 0775 whatever
the umask, owned by :class:`Ownership` (``ovirt_file_owner`` and
``ovirt_file_group``; vdsm:kvm, 36:36, where oVirt hosts share the
domain).

Work in progress is kept out of sight: a new image is built in
``images/.tmp-<img>`` and renamed into place when complete; a deleted one
is first renamed to ``images/_remove_me_<img>``. Readers never list those.

:class:`FileDomain` is the manifest (any host may read). The few writing
primitives here (metadata writes, directory publish) are called by the
operations in :mod:`actions` under the domain lease.
"""

from __future__ import annotations

import dataclasses
import grp
import logging
import os
import pwd
import time

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import counters
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fileutil
from ovirt_cinder.storage import sanlock_direct
from ovirt_cinder.storage import sdmeta
from ovirt_cinder.storage import validate
from ovirt_cinder.storage import volmeta
from ovirt_cinder.storage import xlease

__all__ = ["FileDomain", "DomainStats", "Ownership", "find_domains",
           "scan_domains", "create_domain"]

LOG = logging.getLogger(__name__)

# The I/O timeout recorded in a new lockspace (vdsm's sanlock io_timeout).
# sanlock waits 2 x the recorded one when a host first joins, so the pool
# records its sanlock lease manager's own.
LOCKSPACE_IO_TIMEOUT = 10


@dataclasses.dataclass(frozen=True)
class DomainStats:
    total: int
    free: int
    used: int


@dataclasses.dataclass(frozen=True)
class Ownership:
    """The owner and group of what the engine creates in a domain; -1
    leaves the one the process creates with."""

    uid: int = -1
    gid: int = -1

    @classmethod
    def resolve(cls, owner: str | int | None = None,
                group: str | int | None = None) -> Ownership:
        """From user and group names or numeric ids (``"vdsm"``,
        ``"36"``); None or empty: unchanged."""
        return cls(uid=_resolve_id(owner, "file owner", pwd.getpwnam),
                   gid=_resolve_id(group, "file group", grp.getgrnam))

    @property
    def ids(self) -> dict[str, int]:
        return {"uid": self.uid, "gid": self.gid}

    def chown(self, path: str) -> None:
        if self.uid != -1 or self.gid != -1:
            os.chown(path, self.uid, self.gid, follow_symlinks=False)


def _resolve_id(value: str | int | None, name: str, lookup) -> int:
    if value is None or value == "":
        return -1
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    try:
        entry = lookup(text)
    except KeyError:
        raise errors.InvalidParameter(
            name=name, value=value, reason="no such name on this host; "
            "give a numeric id") from None
    return entry[2]


class FileDomain:
    """A file storage domain on disk (the read side)."""

    def __init__(self, path: str, metadata: sdmeta.DomainMetadata) -> None:
        self.path = os.path.abspath(path)
        self.metadata = metadata
        # Copies within the domain use copy offload (qemu-img -C) when
        # this is set and the filesystem reflinks.
        self.copy_offload = True
        # Who owns what the engine creates here (the pool sets it).
        self.ownership = Ownership()
        self._reflink: bool | None = None
        self._direct_io: bool | None = None

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
        return sorted(n for n in names if validate.is_uuid(n))

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
                      and validate.is_uuid(n[:-len(sc.META_EXT)]))

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

    def supports_direct_io(self) -> bool:
        """Whether volume files here take O_DIRECT writes (probed once)."""
        if self._direct_io is None:
            self._direct_io = fileutil.supports_direct_io(self.images_dir)
        return self._direct_io

    @property
    def sdm_lease_offset(self) -> int:
        """Where the SDM resource is in ``dom_md/leases``."""
        return sc.SDM_LEASE_SLOT * self.metadata.alignment

    # Writing primitives (callers hold the domain lease)

    def write_volume_meta(self, img_id: str, vol_id: str,
                          meta: volmeta.VolumeMetadata,
                          image_dir: str | None = None) -> None:
        path = self.volume_path(img_id, vol_id, image_dir) + sc.META_EXT
        fileutil.atomic_write(path, meta.to_bytes(), **self.ownership.ids)

    def write_metadata(self, metadata: sdmeta.DomainMetadata) -> None:
        fileutil.atomic_write(self.dom_md(sc.METADATA),
                              sdmeta.format_metadata(metadata),
                              **self.ownership.ids)
        self.metadata = metadata

    def make_dir(self, path: str) -> None:
        """Create a directory of the domain (an existing one is kept),
        mode 0775 and owned as configured."""
        _make_dir(path, self.ownership, exist_ok=True)

    def own_file(self, path: str) -> None:
        """Give a file the engine wrote (volume data) mode 0660 and the
        configured owner."""
        os.chmod(path, sc.FILE_MODE)
        self.ownership.chown(path)

    def create_volume_lease(self, path: str, vol_id: str) -> None:
        """Create a volume's ``.lease`` (never an existing one) holding
        the sanlock resource ``vol_id`` of lockspace ``sd_id`` at offset
        0, as vdsm does when it creates a volume: one ``sanlock direct
        init`` (about 3 ms)."""
        fileutil.create_sparse(path, 0, **self.ownership.ids)
        md = self.metadata
        if _can_format(self.sd_id):
            sanlock_direct.init_resource(
                path, self.sd_id, vol_id, alignment=md.alignment,
                block_size=md.block_size)
        else:
            os.truncate(path, md.alignment)


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
        if not (validate.is_uuid(name) and os.path.isfile(
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
                  block_size: int = sc.BLOCK_SIZE_512,
                  alignment: int = sc.ALIGNMENT,
                  ownership: Ownership | None = None,
                  io_timeout: int = LOCKSPACE_IO_TIMEOUT) -> FileDomain:
    """Create a V5 file domain in ``<mount>/<sd_id>``.

    The domain is built in a hidden directory and renamed into place when
    its metadata is written, so a crash never leaves a half domain. Its
    lease areas are written as vdsm writes them (module doc): the
    lockspace ``sd_id`` in ``ids`` (recording ``io_timeout``), the
    resource ``SDM`` in ``leases`` at 1 x ``alignment``, an empty
    ``xleases`` index. Its counters (:mod:`counters`) are zero.
    Directories are 0775 and files 0660 whatever the umask, owned as
    ``ownership`` says.
    """
    validate.check_uuid(sd_id, "domain id")
    validate.check_uuid(pool_id, "pool id")
    ownership = ownership or Ownership()
    final = os.path.join(mount, sd_id)
    if os.path.exists(final):
        raise errors.DomainExists(sd_id=sd_id, path=final)
    md = sdmeta.DomainMetadata(
        sd_id=sd_id, pool_id=pool_id, version=sc.DOMAIN_VERSION,
        type=domain_type, cls=sc.DomainClass.DATA, role=role,
        description=description, block_size=block_size,
        alignment=alignment, remote_path=remote_path or mount)
    tmp = os.path.join(mount, f"{sc.TEMP_PREFIX}{sd_id}-{time.time_ns()}")
    _make_dir(tmp, ownership)
    try:
        dom_md = os.path.join(tmp, sc.DOM_MD)
        for name in (sc.DOM_MD, sc.IMAGES) + (
                (sc.MASTER,) if role == sc.DomainRole.MASTER else ()):
            _make_dir(os.path.join(tmp, name), ownership)
        for name, size in sc.SPECIAL_FILES.items():
            fileutil.create_sparse(os.path.join(dom_md, name), size,
                                   **ownership.ids)
        _format_lease_areas(dom_md, sd_id, alignment=alignment,
                            block_size=block_size, io_timeout=io_timeout)
        # A new domain holds nothing: its counters start at zero.
        fileutil.atomic_write(os.path.join(dom_md, sc.COUNTERS),
                              counters.format_record(
                                  sd_id, counters.Counters(), 0),
                              **ownership.ids)
        fileutil.atomic_write(os.path.join(dom_md, sc.METADATA),
                              sdmeta.format_metadata(md), **ownership.ids)
        os.rename(tmp, final)
    except BaseException:
        fileutil.remove_tree(tmp)
        raise
    fileutil.fsync_dir(mount)
    dom = FileDomain(final, md)
    dom.ownership = ownership
    return dom


def _make_dir(path: str, ownership: Ownership,
              exist_ok: bool = False) -> None:
    try:
        os.mkdir(path, sc.DIR_MODE)
    except FileExistsError:
        if not exist_ok:
            raise
    os.chmod(path, sc.DIR_MODE)     # the umask masked mkdir's mode
    ownership.chown(path)


_warned: set[str] = set()


def _can_format(sd_id: str) -> bool:
    """True if the ``sanlock`` program is there to write lease areas;
    else warn (once a domain) and leave them zeroed."""
    if sanlock_direct.available():
        return True
    if sd_id not in _warned:
        _warned.add(sd_id)
        LOG.warning("The sanlock program is missing: the lease areas of "
                    "domain %s are left unformatted (oVirt cannot attach "
                    "it until the sanlock lease backend formats them)",
                    sd_id)
    return False


def _format_lease_areas(dom_md: str, sd_id: str, *, alignment: int,
                        block_size: int, io_timeout: int) -> None:
    """Write ``ids``, ``leases`` and ``xleases`` of a new domain (in the
    directory ``dom_md``) as vdsm's ``initSPMlease`` and
    ``format_external_leases`` do."""
    ids, leases = (os.path.join(dom_md, n) for n in ("ids", "leases"))
    geometry = {"alignment": alignment, "block_size": block_size}
    if _can_format(sd_id):
        sanlock_direct.init_lockspace(ids, sd_id, io_timeout=io_timeout,
                                      **geometry)
        sanlock_direct.init_resource(
            leases, sd_id, sc.SDM_LEASE_NAME,
            offset=sc.SDM_LEASE_SLOT * alignment, **geometry)
    else:
        os.truncate(ids, alignment)
        os.truncate(leases, (sc.SDM_LEASE_SLOT + 1) * alignment)
    xlease.format_index(os.path.join(dom_md, "xleases"), sd_id, **geometry)
