"""Volume metadata codec (oVirt storage-domain format V5, reads V3/V4).

A volume's metadata is one 512-byte record: the ``<vol>.meta`` file on a
file domain, or one slot of the ``metadata`` LV on a block domain (slots
are 8 KiB and zero padded). This module only converts between bytes and
:class:`VolumeMetadata`; it does no I/O.

Format written (V5, exactly as vdsm writes it)::

    CAP=1073741824
    CTIME=1700000000
    DESCRIPTION={"snap":"..."}
    DISKTYPE=DATA
    DOMAIN=<sd uuid>
    FORMAT=COW
    GEN=0
    IMAGE=<img uuid>
    LEGALITY=LEGAL
    PUUID=<parent vol uuid or 00000000-0000-0000-0000-000000000000>
    SEQ=1
    TYPE=SPARSE
    VOLTYPE=LEAF
    EOF

``KEY=value`` lines sorted by key, each ending with ``\\n``, then the line
``EOF``, UTF-8, at most 512 bytes (``MetadataOverflow`` otherwise).
``CAP`` is in bytes, ``GEN`` counts completed operations and wraps from
999 to 0, ``SEQ`` is the per-image creation sequence of the volume (vdsm
4.5+ writes it too), ``DESCRIPTION`` is at most 210 characters.

Reading follows vdsm: trailing NUL padding is dropped, the data is split
into lines (``\\n``, ``\\r\\n`` or ``\\r``), reading stops at the first
line starting with ``EOF``, lines without ``=`` are skipped, keys and
values are stripped and only the first ``=`` separates them (a value may
contain ``=``). Unknown keys are ignored. ``GEN`` and ``SEQ`` default to
0 when missing; every other key is required. V4 metadata has ``SIZE`` (in
512-byte blocks) instead of ``CAP``, and ``MTIME`` and ``POOL_UUID``
(ignored). Metadata cleared by vdsm before 4.20.34 (a ``NONE=###...``
record) is reported as invalid. Any missing key or bad value raises
``MetadataError`` naming the key.

V3 and V4 records are the same: ``SIZE`` and ``MTIME=0`` instead of
``CAP`` and ``SEQ`` (older vdsm also wrote ``POOL_UUID``, and legacy
engines ``DISKTYPE=2``). :func:`legacy_bytes` writes that format, with
``CAP`` added for the first step of the V4 to V5 upgrade (as vdsm's
``convert_volumes_metadata``: a V4 reader takes ``CAP`` when it is
there), and :func:`record_keys` tells which keys a record holds.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import validate
from ovirt_cinder.storage.constants import Legality
from ovirt_cinder.storage.constants import Preallocation
from ovirt_cinder.storage.constants import VolumeFormat
from ovirt_cinder.storage.constants import VolumeType

__all__ = ["VolumeMetadata", "legacy_bytes", "record_keys"]

MAX_SEQUENCE = 2**32 - 1

# Attribute name -> on-disk key, in the order of the dataclass fields.
_KEYS = {
    "domain": "DOMAIN",
    "image": "IMAGE",
    "parent": "PUUID",
    "capacity": "CAP",
    "format": "FORMAT",
    "type": "TYPE",
    "voltype": "VOLTYPE",
    "legality": "LEGALITY",
    "description": "DESCRIPTION",
    "disktype": "DISKTYPE",
    "generation": "GEN",
    "ctime": "CTIME",
    "sequence": "SEQ",
}
_OPTIONAL = {"GEN": "0", "SEQ": "0"}
_V4_SIZE = "SIZE"
_CLEARED = "NONE"
_EOF = "EOF"
_UUIDS = ("domain", "image", "parent")
_ENUMS: dict[str, type[enum.StrEnum]] = {
    "format": VolumeFormat,
    "type": Preallocation,
    "voltype": VolumeType,
    "legality": Legality,
}
# Inclusive ranges of the integer attributes.
_INTS = {
    "capacity": (0, 2**63 - 1),
    "ctime": (0, 2**63 - 1),
    "generation": (0, sc.MAX_GENERATION),
    "sequence": (0, MAX_SEQUENCE),
}


@dataclass(frozen=True)
class VolumeMetadata:
    """The metadata of one volume; immutable, validated on construction.

    Enum fields accept their on-disk strings (``"COW"``) and are stored as
    enums. The description length is checked by :meth:`to_bytes`, so an
    old volume with a longer description can still be read.
    """

    domain: str
    image: str
    parent: str
    capacity: int
    format: VolumeFormat
    type: Preallocation
    voltype: VolumeType
    legality: Legality
    description: str = ""
    disktype: str = sc.DiskType.DATA.value
    generation: int = 0
    ctime: int = 0
    sequence: int = 0

    def __post_init__(self) -> None:
        for name in _UUIDS:
            validate.check_uuid(getattr(self, name), name)
        for name, enum_type in _ENUMS.items():
            object.__setattr__(self, name, _to_enum(self, name, enum_type))
        for name, (low, high) in _INTS.items():
            _check_int(name, getattr(self, name), low, high)
        _check_text("description", self.description)
        _check_text("disktype", self.disktype)
        if not self.disktype:
            raise errors.InvalidParameter(
                name="disktype", value=self.disktype, reason="empty")

    @classmethod
    def from_bytes(cls, data: bytes, path: str = "") -> VolumeMetadata:
        """Parse a V5 or V4 record; ``path`` only names it in errors."""
        md = _read_lines(data, path)
        if _CLEARED in md:
            raise errors.MetadataError(path=path, reason="metadata cleared")
        if _KEYS["capacity"] not in md and _V4_SIZE in md:
            blocks = validate.parse_int(md[_V4_SIZE], _V4_SIZE, path)
            md[_KEYS["capacity"]] = str(blocks * sc.BLOCK_SIZE_512)
        values = {name: _field_value(md, name, path) for name in _KEYS}
        try:
            return cls(**values)
        except errors.InvalidParameter as e:
            key = _KEYS.get(getattr(e, "name", ""), "?")
            raise errors.MetadataError(
                path=path, reason=f"invalid {key}: {e}") from e

    def to_bytes(self) -> bytes:
        """Return the V5 record; raise if it does not fit in 512 bytes."""
        if len(self.description) > sc.DESCRIPTION_SIZE:
            raise errors.InvalidParameter(
                name="description", value=self.description,
                reason=f"longer than {sc.DESCRIPTION_SIZE} characters")
        md = {key: str(getattr(self, name)) for name, key in _KEYS.items()}
        lines = [f"{key}={md[key]}\n" for key in sorted(md)]
        lines.append(f"{_EOF}\n")
        data = "".join(lines).encode("utf-8")
        if len(data) > sc.METADATA_SIZE:
            raise errors.MetadataOverflow(
                size=len(data), limit=sc.METADATA_SIZE)
        return data

    def replace(self, **changes: Any) -> VolumeMetadata:
        """Return a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def with_next_generation(self, **changes: Any) -> VolumeMetadata:
        """Return a copy with ``changes`` and GEN + 1 (999 wraps to 0)."""
        if "generation" in changes:
            raise TypeError("with_next_generation() sets generation itself")
        generation = (self.generation + 1) % (sc.MAX_GENERATION + 1)
        return self.replace(generation=generation, **changes)


def legacy_bytes(meta: VolumeMetadata, *, capacity: bool = False) -> bytes:
    """Return the V3/V4 record of ``meta`` (as vdsm's ``storage_format``
    for a version below 5): ``SIZE`` in 512-byte blocks and ``MTIME=0``
    instead of ``CAP`` and ``SEQ``; with ``capacity``, ``CAP`` in bytes
    too. Raise if it does not fit in 512 bytes."""
    if meta.capacity % sc.BLOCK_SIZE_512:
        raise errors.InvalidParameter(
            name="capacity", value=meta.capacity,
            reason="not a multiple of 512: no V4 SIZE holds it")
    md = {key: str(getattr(meta, name)) for name, key in _KEYS.items()
          if name not in ("capacity", "sequence")}
    md["MTIME"] = "0"
    md[_V4_SIZE] = str(meta.capacity // sc.BLOCK_SIZE_512)
    if capacity:
        md[_KEYS["capacity"]] = str(meta.capacity)
    return _format(md)


def record_keys(data: bytes, path: str = "") -> set[str]:
    """The keys of a record as a reader sees them (up to ``EOF``)."""
    return set(_read_lines(data, path))


def _format(md: Mapping[str, str]) -> bytes:
    lines = [f"{key}={md[key]}\n" for key in sorted(md)]
    lines.append(f"{_EOF}\n")
    data = "".join(lines).encode("utf-8")
    if len(data) > sc.METADATA_SIZE:
        raise errors.MetadataOverflow(size=len(data), limit=sc.METADATA_SIZE)
    return data


def _read_lines(data: bytes, path: str) -> dict[str, str]:
    md: dict[str, str] = {}
    for raw in data.rstrip(b"\0").splitlines():
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise errors.MetadataError(
                path=path, reason=f"invalid line {raw!r}: {e}") from e
        if line.startswith(_EOF):
            break
        if "=" in line:
            key, value = line.split("=", 1)
            md[key.strip()] = value.strip()
    return md


def _field_value(md: Mapping[str, str], name: str, path: str) -> Any:
    key = _KEYS[name]
    raw = md.get(key, _OPTIONAL.get(key))
    if raw is None:
        raise errors.MetadataError(
            path=path, reason=f"required key {key} is missing")
    if name in _INTS:
        return validate.parse_int(raw, key, path)
    if name in _ENUMS:
        return validate.parse_enum(raw, key, path, _ENUMS[name])
    return raw


def _to_enum(md: VolumeMetadata, name: str,
             enum_type: type[enum.StrEnum]) -> enum.StrEnum:
    value = getattr(md, name)
    try:
        return enum_type(value)
    except ValueError:
        raise errors.InvalidParameter(
            name=name, value=value,
            reason=f"expected one of {', '.join(enum_type)}") from None


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise errors.InvalidParameter(
            name=name, value=value,
            reason=f"expected an integer in {low}..{high}")


def _check_text(name: str, value: object) -> None:
    # A reader splits at \n and \r and strips values: refuse what it would
    # read back differently.
    if (not isinstance(value, str) or "\n" in value or "\r" in value
            or value != value.strip()):
        raise errors.InvalidParameter(
            name=name, value=value,
            reason="not a single-line string without surrounding spaces")
