"""Inspection of untrusted image bytes (DESIGN.md section 7).

:func:`inspect_untrusted` is the gate every uploaded or downloaded image
passes before any other tool opens it. It applies these rules, in order,
and rejects with :class:`errors.UnsafeImage` (or its subclasses
:class:`errors.FormatMismatch`, :class:`errors.ImageTooLarge` and
:class:`errors.CorruptImage`):

1. Detection: the oslo.utils format inspector reads the headers of the file
   (never following references). Content matching several formats is
   rejected (a header hidden in another format), except an ISO that also
   carries an MBR/GPT (a "hybrid" bootable ISO), which is an ISO.
2. Names: the ``gpt`` inspector (also used for a legacy MBR) means a raw
   disk with a partition table, reported as ``raw``. Other names are the
   inspector's (``raw``, ``qcow2``, ``vmdk``, ``vhd``, ``vhdx``, ``vdi``,
   ``iso``, ``luks``, ``qed``).
3. Truncated headers: content detected as raw that starts with the magic
   of a structured format (qcow2, QED, VMDK, VHDX, LUKS) is a truncated or
   damaged header; other tools could still probe it as that format.
4. Safety checks of the inspector: a qcow2 with a backing file, an external
   data file, unknown incompatible features or version 1; a VMDK of a
   subformat other than monolithicSparse/streamOptimized or with extents
   naming other files; QED (banned); an invalid partition table.
5. ``allowed_formats`` (names as in rule 2; an ``iso`` also passes where
   ``raw`` is allowed, since it is stored and read as raw bytes).
6. ``declared_format`` is a Glance/Cinder ``disk_format``. Declared and
   detected names are both mapped to qemu-img names as Cinder does
   (``iso`` -> ``raw``, ``vhd`` -> ``vpc``, ``ploop`` -> ``parallels``;
   we also map ``ami``/``ari``/``aki`` -> ``raw``) and must be equal: an
   ISO declared raw, or raw bytes declared ISO, are fine.
7. ``qemu-img info -f <qemu name>`` under CPU and address-space limits
   (:func:`qemuimg.info` with ``untrusted=True``). If it fails the image is
   unsafe (the QemuImgError is the cause); if it reports a backing file
   or a data file anyway, the image is unsafe. A qcow2 whose header has
   the ``corrupt`` bit set is :class:`errors.CorruptImage`.
8. ``max_virtual_size``: the larger of qemu-img's and the inspector's
   virtual size must not exceed it.
9. Structure: ``qemu-img check -f <qemu name>`` under the same limits
   (:func:`qemuimg.check` with ``untrusted=True``). Any corruption (a
   table or cluster past the end of the file, a refcount table out of
   range, metadata overlapping other metadata, a refcount that does not
   match the references: everything qemu-img counts as ``corruptions``)
   or ``check-errors``, or a check that cannot complete (the image cannot
   be opened), is :class:`errors.CorruptImage`. Leaked clusters
   (allocated but unused: space, never data) are accepted and logged.
   Formats without checks (raw, vpc) pass.

``name`` (an image id, say) stands for ``path`` in every error: it is the
error's ``path`` and replaces the path wherever qemu-img's messages name
the file, so a caller's staging file never shows in a message.

A LUKS image fails rule 7 (qemu-img needs the key); OSError from opening
the file (a missing path) is not caught.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from dataclasses import dataclass

from oslo_utils.imageutils import format_inspector

from ovirt_cinder.storage import errors
from ovirt_cinder.storage import qemuimg

__all__ = ["InspectedImage", "inspect_untrusted", "qemu_format"]

LOG = logging.getLogger(__name__)

# Inspector names that are a raw disk to us.
_RAW_ALIASES = {"gpt": "raw", "mbr": "raw"}

# Glance/Cinder disk_format and inspector names -> qemu-img format names.
_QEMU_NAMES = {
    "iso": "raw",
    "vhd": "vpc",
    "ploop": "parallels",
    "ami": "raw",
    "ari": "raw",
    "aki": "raw",
}

# Magic bytes at offset 0 of formats the inspector may fail to complete.
_MAGICS = {
    b"QFI\xfb": "qcow2",
    b"QED\x00": "qed",
    b"KDMV": "vmdk",
    b"vhdxfile": "vhdx",
    b"LUKS\xba\xbe": "luks",
}

_CHUNK = 4096


@dataclass(frozen=True)
class InspectedImage:
    path: str
    format: str
    virtual_size: int
    actual_size: int


def inspect_untrusted(path: str, *, declared_format: str | None = None,
                      max_virtual_size: int | None = None,
                      allowed_formats: Collection[str] | None = None,
                      name: str | None = None) -> InspectedImage:
    """Inspect untrusted image bytes; raise UnsafeImage if unusable.

    Errors name the image ``name`` (default ``path``), never ``path``.
    """
    try:
        return _inspect(path, declared_format, max_virtual_size,
                        allowed_formats)
    except errors.UnsafeImage as e:
        if name is None or name == path:
            raise
        raise _renamed(e, path, name) from e


def _inspect(path: str, declared_format: str | None,
             max_virtual_size: int | None,
             allowed_formats: Collection[str] | None) -> InspectedImage:
    inspector = _detect(path)
    fmt = _RAW_ALIASES.get(str(inspector), str(inspector))
    if fmt == "raw":
        _check_magic(path)
    _safety_check(path, inspector)
    _check_allowed(path, fmt, allowed_formats)
    _check_declared(path, fmt, declared_format)
    info = _qemu_info(path, fmt)
    size = max(info.virtual_size, inspector.virtual_size)
    if max_virtual_size is not None and size > max_virtual_size:
        raise errors.ImageTooLarge(path=path, size=size,
                                   limit=max_virtual_size)
    _qemu_check(path, fmt)
    return InspectedImage(path=path, format=fmt,
                          virtual_size=info.virtual_size,
                          actual_size=info.actual_size)


def qemu_format(name: str) -> str:
    """The qemu-img format name of a disk_format or inspector name."""
    name = _RAW_ALIASES.get(name, name)
    return _QEMU_NAMES.get(name, name)


def _detect(path: str) -> format_inspector.FileInspector:
    """Run all inspectors over the headers of ``path`` (rule 1)."""
    with open(path, "rb") as f:
        wrapper = format_inspector.InspectWrapper(f)
        try:
            while wrapper.read(_CHUNK) and wrapper.formats is None:
                pass
        except format_inspector.ImageFormatError as e:
            raise errors.UnsafeImage(path=path, reason=str(e)) from e
        finally:
            wrapper.close()
    return _single_format(path, wrapper.formats or [])


def _single_format(path: str, found: list[format_inspector.FileInspector],
                   ) -> format_inspector.FileInspector:
    by_name = {str(i): i for i in found}
    if len(by_name) == 1:
        return found[0]
    if set(by_name) == {"iso", "gpt"}:
        return by_name["iso"]
    names = ",".join(sorted(by_name)) or "none"
    raise errors.UnsafeImage(path=path,
                             reason=f"several formats detected: {names}")


def _check_magic(path: str) -> None:
    """Reject raw content starting with a format magic (rule 3)."""
    with open(path, "rb") as f:
        head = f.read(max(len(m) for m in _MAGICS))
    for magic, name in _MAGICS.items():
        if head.startswith(magic):
            raise errors.UnsafeImage(
                path=path, reason=f"truncated or invalid {name} header")


def _safety_check(path: str,
                  inspector: format_inspector.FileInspector) -> None:
    """Run the inspector's safety checks (rule 4)."""
    try:
        inspector.safety_check()
    except format_inspector.SafetyCheckFailed as e:
        reasons = "; ".join(f"{name}: {failure}"
                            for name, failure in e.failures.items())
        raise errors.UnsafeImage(
            path=path, reason=f"{inspector} safety check failed: {reasons}",
        ) from e
    except format_inspector.ImageFormatError as e:
        raise errors.UnsafeImage(path=path, reason=str(e)) from e


def _check_allowed(path: str, fmt: str,
                   allowed: Collection[str] | None) -> None:
    """Reject formats not allowed (rule 5)."""
    if allowed is None or fmt in allowed:
        return
    if fmt == "iso" and "raw" in allowed:
        return
    raise errors.UnsafeImage(path=path,
                             reason=f"format {fmt} is not allowed")


def _check_declared(path: str, fmt: str, declared: str | None) -> None:
    """Compare declared and detected formats as qemu sees them (rule 6)."""
    if declared is None:
        return
    if qemu_format(declared.lower()) != qemu_format(fmt):
        raise errors.FormatMismatch(path=path, declared=declared,
                                    actual=fmt)


def _qemu_info(path: str, fmt: str) -> qemuimg.ImageInfo:
    """qemu-img info under limits, re-checking references (rule 7)."""
    try:
        info = qemuimg.info(path, qemu_format(fmt), untrusted=True)
    except errors.QemuImgError as e:
        raise errors.UnsafeImage(
            path=path, reason=f"qemu-img info failed: {e.err}") from e
    if info.backing_filename:
        raise errors.UnsafeImage(
            path=path, reason=f"backing file {info.backing_filename!r}")
    if info.data_file:
        raise errors.UnsafeImage(
            path=path, reason=f"data file {info.data_file!r}")
    if info.corrupt:
        raise errors.CorruptImage(
            path=path, reason="the qcow2 header is marked corrupt")
    return info


def _qemu_check(path: str, fmt: str) -> None:
    """qemu-img check under limits: no corruptions, no errors (rule 9)."""
    try:
        result = qemuimg.check(path, fmt=qemu_format(fmt), untrusted=True)
    except errors.QemuImgError as e:
        raise errors.CorruptImage(
            path=path, reason=f"qemu-img check failed: {e.err}") from e
    if result.corruptions or result.check_errors:
        raise errors.CorruptImage(
            path=path, reason=f"qemu-img check found {result.corruptions} "
            f"corruptions and {result.check_errors} check errors")
    if result.leaks:
        LOG.info("Image %s has %d leaked clusters (accepted: unused "
                 "space, no data)", path, result.leaks)


def _renamed(e: errors.UnsafeImage, path: str,
             name: str) -> errors.UnsafeImage:
    """``e`` again, with ``name`` wherever it named ``path``."""
    base = os.path.basename(path)

    def scrub(value: object) -> object:
        if not isinstance(value, str):
            return value
        value = value.replace(path, name)
        return value.replace(base, name) if base else value

    fields = {k: scrub(v) for k, v in vars(e).items()}
    fields["path"] = name
    return type(e)(**fields)
