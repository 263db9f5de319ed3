"""Validation of identifiers before they become paths."""

from __future__ import annotations

import re
import uuid

from ovirt_cinder.storage import errors

__all__ = ["check_uuid", "new_uuid"]

# Canonical lower-case 8-4-4-4-12 form only: no braces, no "urn:uuid:",
# no upper case, so one UUID has exactly one path.
_UUID_RE = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def check_uuid(value: object, name: str = "uuid") -> str:
    """Return ``value`` if it is a canonical UUID string, else raise."""
    if not isinstance(value, str) or not _UUID_RE.match(value):
        raise errors.InvalidUUID(name=name, value=value)
    return value


def new_uuid() -> str:
    return str(uuid.uuid4())
