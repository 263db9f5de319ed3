"""Storage-domain metadata codec (oVirt format V5, reads V3 and V4).

The metadata of a file domain is ``<sdUUID>/dom_md/metadata``; a block
domain keeps the same keys in VG tags. This module converts between bytes,
a ``{key: value}`` dict and :class:`DomainMetadata`; it does no I/O.

File format (as vdsm's ``persistent.py`` and ``fileSD.py`` write it)::

    ALIGNMENT=1048576
    BLOCK_SIZE=512
    CLASS=Data
    DESCRIPTION=nfs-data
    ...
    VERSION=5
    _SHA_CKSUM=<sha1 hex>

``KEY=value`` lines sorted by key, then ``_SHA_CKSUM=``, each line ending
with ``\\n``, UTF-8. The checksum is the SHA-1 of the concatenated
``KEY=value`` strings in key order, without newlines and without the
checksum line, each encoded ASCII with ``xmlcharrefreplace`` (so ``é``
counts as ``&#233;``). Keys are sorted as keys, not as lines: ``PV1``
comes before ``PV10``.

Reading: trailing NUL padding is dropped, the UTF-8 text is split with
``str.splitlines``, blank lines are skipped, the key is stripped but the
value is kept as is (vdsm does the same). A line without ``=``, a missing
``_SHA_CKSUM`` or a checksum that does not match raises (vdsm would trust
a file without a checksum; we never do).

Keys (``DomainMetadata`` field): ``VERSION`` (version), ``SDUUID``
(sd_id), ``TYPE`` (type), ``CLASS`` (cls), ``ROLE`` (role),
``DESCRIPTION`` (≤ 50 characters), ``POOL_UUID`` (pool_id, empty when
detached), ``BLOCK_SIZE`` and ``ALIGNMENT`` (V5 only; V3/V4 domains are
512 / 1 MiB), ``LOCKPOLICY``, ``LOCKRENEWALINTERVALSEC`` (5),
``LEASETIMESEC`` (60), ``IOOPTIMEOUTSEC`` (10), ``LEASERETRIES`` (3)
(missing or empty lease values read as their defaults, as in vdsm),
``REMOTE_PATH`` (file domains). Every other key (oVirt's
``MASTER_VERSION``, ``POOL_*``, block domains' ``VGUUID``, ``PV0``...,
V4's ``LOGBLKSIZE``/``PHYBLKSIZE``) is kept in ``extra`` and written back
unchanged.

Versions: V3 and V4 file domains have the same keys (no ``BLOCK_SIZE``
or ``ALIGNMENT``; both are 512 / 1 MiB); V4 adds ``dom_md/xleases``.
:func:`upgraded` gives the metadata one version up and :func:`attached`
the metadata of a domain attached to a pool, both as vdsm writes them.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import NoReturn

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import validate
from ovirt_cinder.storage.constants import DomainClass
from ovirt_cinder.storage.constants import DomainRole
from ovirt_cinder.storage.constants import DomainType

__all__ = [
    "CHECKSUM_KEY",
    "DomainMetadata",
    "attached",
    "checksum",
    "dumps",
    "format_metadata",
    "is_detached",
    "loads",
    "parse",
    "upgraded",
]

CHECKSUM_KEY = "_SHA_CKSUM"

FILE_DOMAIN_TYPES = frozenset({
    DomainType.LOCALFS, DomainType.NFS, DomainType.POSIXFS,
    DomainType.GLUSTERFS,
})
ALIGNMENTS = (1 * sc.MiB, 2 * sc.MiB, 4 * sc.MiB, 8 * sc.MiB)
BLOCK_SIZES = (sc.BLOCK_SIZE_512, sc.BLOCK_SIZE_4K)

# Attribute name -> key, for every field but ``extra``.
_KEYS = {
    "sd_id": "SDUUID",
    "pool_id": "POOL_UUID",
    "version": "VERSION",
    "type": "TYPE",
    "cls": "CLASS",
    "role": "ROLE",
    "description": "DESCRIPTION",
    "block_size": "BLOCK_SIZE",
    "alignment": "ALIGNMENT",
    "lock_policy": "LOCKPOLICY",
    "lock_renewal_interval_sec": "LOCKRENEWALINTERVALSEC",
    "lease_time_sec": "LEASETIMESEC",
    "io_op_timeout_sec": "IOOPTIMEOUTSEC",
    "lease_retries": "LEASERETRIES",
    "remote_path": "REMOTE_PATH",
}
_REQUIRED = ("sd_id", "version", "type", "cls", "role")
_LEASE_INTS = (
    "lock_renewal_interval_sec", "lease_time_sec", "io_op_timeout_sec",
    "lease_retries",
)
_V5_ONLY = ("block_size", "alignment")


def checksum(lines: Iterable[str]) -> str:
    """Return vdsm's checksum of ``KEY=value`` lines (no newlines).

    The lines are hashed in key order whatever order they come in.
    """
    h = hashlib.sha1(usedforsecurity=False)
    for line in sorted(lines, key=lambda line: line.split("=", 1)[0]):
        h.update(line.encode("ascii", "xmlcharrefreplace"))
    return h.hexdigest()


def dumps(md: Mapping[str, str]) -> bytes:
    """Return the file bytes of ``md`` with its ``_SHA_CKSUM`` line."""
    for key, value in md.items():
        _check_item(key, value)
    lines = [f"{key}={md[key]}" for key in sorted(md)]
    lines.append(f"{CHECKSUM_KEY}={checksum(lines)}")
    return "".join(line + "\n" for line in lines).encode("utf-8")


def loads(data: bytes, path: str = "") -> dict[str, str]:
    """Parse file bytes and verify their checksum; ``path`` names errors."""
    md = _parse_lines(_decode(data, path), path)
    stored = md.pop(CHECKSUM_KEY, None)
    if stored is None:
        raise errors.MetadataError(
            path=path, reason=f"{CHECKSUM_KEY} is missing")
    computed = checksum(f"{key}={value}" for key, value in md.items())
    if stored != computed:
        raise errors.ChecksumMismatch(
            path=path, stored=stored, computed=computed)
    return md


@dataclass(frozen=True)
class DomainMetadata:
    """The metadata of one storage domain; validated on construction."""

    sd_id: str
    pool_id: str
    version: int
    type: DomainType
    cls: DomainClass
    role: DomainRole
    description: str = ""
    block_size: int = sc.BLOCK_SIZE_512
    alignment: int = sc.ALIGNMENT
    lock_policy: str = ""
    lock_renewal_interval_sec: int = 5
    lease_time_sec: int = 60
    io_op_timeout_sec: int = 10
    lease_retries: int = 3
    remote_path: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate.check_uuid(self.sd_id, "sd_id")
        if self.pool_id:
            validate.check_uuid(self.pool_id, "pool_id")
        _set_enum(self, "type", DomainType)
        _set_enum(self, "cls", DomainClass)
        _set_enum(self, "role", DomainRole)
        self._check_numbers()
        for name in ("pool_id", "description", "lock_policy",
                     "remote_path"):
            _check_value(name, getattr(self, name))
        if len(self.description) > sc.SD_DESCRIPTION_SIZE:
            raise errors.InvalidParameter(
                name="description", value=self.description,
                reason=f"longer than {sc.SD_DESCRIPTION_SIZE} characters")
        object.__setattr__(self, "extra", self._checked_extra())

    @classmethod
    def from_dict(cls, md: Mapping[str, str],
                  path: str = "") -> DomainMetadata:
        """Build from a ``{key: value}`` dict (see :func:`loads`)."""
        values: dict[str, Any] = {
            name: _field_value(md, name, path) for name in _KEYS
            if _KEYS[name] in md or name in _REQUIRED}
        if values["version"] not in sc.SUPPORTED_DOMAIN_VERSIONS:
            raise errors.UnsupportedVersion(
                version=values["version"], path=path)
        known = {*_KEYS.values(), CHECKSUM_KEY}
        values["extra"] = {k: v for k, v in md.items() if k not in known}
        try:
            return cls(**values)
        except errors.InvalidParameter as e:
            name = getattr(e, "name", "?")
            raise errors.MetadataError(
                path=path, reason=f"invalid {_KEYS.get(name, name)}: {e}",
            ) from e

    def to_dict(self) -> dict[str, str]:
        """Return all keys as strings (without the checksum)."""
        md = {key: str(getattr(self, name)) for name, key in _KEYS.items()}
        if self.version < 5:
            for name in _V5_ONLY:
                del md[_KEYS[name]]
        if self.type not in FILE_DOMAIN_TYPES and not self.remote_path:
            del md[_KEYS["remote_path"]]
        md.update(self.extra)
        return md

    def replace(self, **changes: Any) -> DomainMetadata:
        """Return a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def _check_numbers(self) -> None:
        if (type(self.version) is not int
                or self.version not in sc.SUPPORTED_DOMAIN_VERSIONS):
            _invalid("version", self.version,
                     f"expected one of {sc.SUPPORTED_DOMAIN_VERSIONS}")
        _check_choice("block_size", self.block_size, BLOCK_SIZES)
        _check_choice("alignment", self.alignment, ALIGNMENTS)
        if self.version < 5 and (self.block_size, self.alignment) != (
                sc.BLOCK_SIZE_512, sc.ALIGNMENT):
            _invalid("block_size", self.block_size,
                     f"version {self.version} supports only 512 bytes "
                     f"blocks and 1 MiB alignment")
        for name in _LEASE_INTS:
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                _invalid(name, value, "expected a positive integer")

    def _checked_extra(self) -> dict[str, str]:
        extra = dict(self.extra)
        for key, value in extra.items():
            if key in _KEYS.values() or key == CHECKSUM_KEY:
                _invalid("extra", key, "a key with its own field")
            _check_item(key, value)
        return extra


def parse(data: bytes, path: str = "") -> DomainMetadata:
    """Parse and verify file bytes into a :class:`DomainMetadata`."""
    return DomainMetadata.from_dict(loads(data, path), path)


def format_metadata(md: DomainMetadata) -> bytes:
    """Return the file bytes of ``md``."""
    return dumps(md.to_dict())


# Keys of the pool a master domain keeps (vdsm's spbackends); a regular
# domain carries them only as leftovers of a former master role.
MASTER_VERSION_KEY = "MASTER_VERSION"
# Block-domain keys that V5 dropped (vdsm's sd.convert_metadata).
V4_ONLY_KEYS = ("LOGBLKSIZE", "PHYBLKSIZE")


def is_detached(md: DomainMetadata) -> bool:
    """True if ``md`` names no pool (``POOL_UUID=``, or the blank UUID
    older vdsm wrote)."""
    return md.pool_id in ("", sc.BLANK_UUID)


def attached(md: DomainMetadata, pool_id: str) -> DomainMetadata:
    """``md`` as a regular domain of ``pool_id``: what vdsm's attachSD
    (``POOL_UUID``) and activateSD (``setDomainRegularRole``: ``ROLE=
    Regular``, ``MASTER_VERSION=0`` when the key is there) write.

    Every other key is kept: a former master's ``POOL_DESCRIPTION``,
    ``POOL_DOMAINS``, ``POOL_SPM_ID`` and ``POOL_SPM_LVER`` are read by
    vdsm only on the master domain of the pool it connects, and
    ``ROLE=Regular`` keeps it from ever taking this one for a master.
    """
    extra = dict(md.extra)
    if MASTER_VERSION_KEY in extra:
        extra[MASTER_VERSION_KEY] = "0"
    return md.replace(pool_id=validate.check_uuid(pool_id, "pool id"),
                      role=DomainRole.REGULAR, extra=extra)


def upgraded(md: DomainMetadata, version: int) -> DomainMetadata:
    """``md`` one format version up, as vdsm's format converter writes
    it: V3 to V4 changes only ``VERSION``; V4 to V5 adds ``BLOCK_SIZE=
    512`` and ``ALIGNMENT=1048576`` (all a V4 domain supports) and drops
    ``LOGBLKSIZE`` and ``PHYBLKSIZE``."""
    if version != md.version + 1 or version not in (4, 5):
        raise errors.InvalidParameter(
            name="version", value=version,
            reason=f"cannot upgrade version {md.version} to it")
    if version == 4:
        return md.replace(version=4)
    extra = {k: v for k, v in md.extra.items() if k not in V4_ONLY_KEYS}
    return md.replace(version=5, block_size=sc.BLOCK_SIZE_512,
                      alignment=sc.ALIGNMENT, extra=extra)



def _decode(data: bytes, path: str) -> str:
    try:
        return data.rstrip(b"\0").decode("utf-8")
    except UnicodeDecodeError as e:
        raise errors.MetadataError(path=path, reason=str(e)) from e


def _parse_lines(text: str, path: str) -> dict[str, str]:
    md: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        if "=" not in line:
            raise errors.MetadataError(
                path=path, reason=f"invalid line {line!r}")
        key, value = line.split("=", 1)
        md[key.strip()] = value
    return md


def _field_value(md: Mapping[str, str], name: str, path: str) -> Any:
    key = _KEYS[name]
    raw = md.get(key)
    if raw is None:
        raise errors.MetadataError(
            path=path, reason=f"required key {key} is missing")
    if name == "version" or name in _V5_ONLY:
        return validate.parse_int(raw, key, path)
    if name in _LEASE_INTS:
        return validate.parse_int(raw, key, path) if raw else _default(name)
    if name == "type":
        return validate.parse_enum(raw.upper(), key, path, DomainType)
    if name == "cls":
        return validate.parse_enum(raw, key, path, DomainClass)
    if name == "role":
        return validate.parse_enum(raw.capitalize(), key, path, DomainRole)
    return raw


def _default(name: str) -> Any:
    return DomainMetadata.__dataclass_fields__[name].default


def _set_enum(md: DomainMetadata, name: str,
              enum_type: type[enum.StrEnum]) -> None:
    value = getattr(md, name)
    try:
        object.__setattr__(md, name, enum_type(value))
    except ValueError:
        _invalid(name, value, f"expected one of {', '.join(enum_type)}")


def _check_choice(name: str, value: object, choices: tuple[int, ...]) -> None:
    if type(value) is not int or value not in choices:
        _invalid(name, value, f"expected one of {choices}")


def _check_item(key: object, value: object) -> None:
    if (not isinstance(key, str) or not key or "=" in key
            or key != key.strip() or not _is_one_line(key)):
        _invalid("key", key, "not a single-line name without '='")
    if key == CHECKSUM_KEY:
        _invalid("key", key, "reserved for the checksum")
    _check_value(key, value)


def _check_value(name: str, value: object) -> None:
    # str.splitlines() breaks at \n, \r, \v, \f, \x1c-\x1e, \x85, \u2028
    # and \u2029: any of them would split the value when read back.
    if not isinstance(value, str) or not _is_one_line(value):
        _invalid(name, value, "not a single-line string")


def _is_one_line(text: str) -> bool:
    return len(f"={text}=".splitlines()) == 1


def _invalid(name: str, value: object, reason: str) -> NoReturn:
    raise errors.InvalidParameter(name=name, value=value, reason=reason)
