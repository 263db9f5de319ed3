"""Validation of identifiers and metadata values read from storage."""

from __future__ import annotations

import enum
import re
import uuid

from ovirt_cinder.storage import errors

__all__ = ["check_uuid", "is_uuid", "new_uuid", "parse_int", "parse_enum"]

# Canonical lower-case 8-4-4-4-12 form only: no braces, no "urn:uuid:",
# no upper case, so one UUID has exactly one path.
_UUID_RE = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def check_uuid(value: object, name: str = "uuid") -> str:
    """Return ``value`` if it is a canonical UUID string, else raise."""
    if not isinstance(value, str) or not _UUID_RE.match(value):
        raise errors.InvalidUUID(name=name, value=value)
    return value


def is_uuid(value: object) -> bool:
    """Whether ``value`` is a canonical UUID string (a name we made)."""
    return isinstance(value, str) and bool(_UUID_RE.match(value))


def new_uuid() -> str:
    return str(uuid.uuid4())


_DECIMAL = re.compile(r"[0-9]+")


def parse_int(raw: str, key: str, path: str) -> int:
    """A metadata value that must be a plain decimal integer."""
    if not _DECIMAL.fullmatch(raw):
        raise errors.MetadataError(
            path=path, reason=f"invalid {key} value {raw!r}: not an integer")
    return int(raw)


def parse_enum(raw: str, key: str, path: str,
               enum_type: type[enum.StrEnum]) -> enum.StrEnum:
    """A metadata value that must be one of ``enum_type``'s values."""
    try:
        return enum_type(raw)
    except ValueError:
        raise errors.MetadataError(
            path=path,
            reason=f"invalid {key} value {raw!r}: expected one of "
                   f"{', '.join(enum_type)}") from None
