"""Sanlock lease areas written and read by the ``sanlock`` program.

The Python binding (:mod:`sanlockd`) asks the daemon for every call,
formatting included. The program's ``direct`` commands do the I/O
themselves, so the engine formats a domain's lease areas when it creates
the domain and its volumes, whatever the lease backend and with no daemon
running (the argument syntax is sanlock's ``LOCKSPACE`` and ``RESOURCE``)::

    sanlock direct init -s <sd_id>:0:ids:0 -Z 512 -A 1M -a 0
    sanlock direct init -r <sd_id>:SDM:leases:1048576 -Z 512 -A 1M -a 0
    sanlock direct read_leader -s <sd_id>:1:ids:0 -Z 512 -A 1M -a 0
    sanlock direct dump leases:1048576:1048576 -Z 512 -A 1M -a 0

- Each command runs in the file's directory and names the file by its
  base name: sanlock splits its arguments at colons, so a path holding
  one would be cut (vdsm runs ``dump`` the same way).
- ``-Z`` and ``-A`` are the domain's block size and alignment (512/1M,
  or 4096 with 1M, 2M, 4M or 8M).
- ``-a 0`` uses plain synchronous I/O (the file is still opened
  ``O_DIRECT|O_SYNC``): with AIO the program spends about 35 ms tearing
  its context down after the write; without it a volume lease costs
  about 3 ms in all.
- ``LC_ALL=C``, and each command is killed after :data:`TIMEOUT` seconds.
- sanlock prints ``<action> done <rc>``; a negative rc or a non-zero exit
  status raises :class:`SanlockDirectError` carrying the rc (``-errno``,
  or sanlock's own codes: ``-223`` no lease there, ``-226``/``-227``
  another lockspace/resource name).

A lockspace (``init -s``) is written for every host id (2000 delta leases
of one sector for 512/1M), a resource (``init -r``) fills one alignment
at its offset: both are ``alignment`` bytes, so a new ``ids`` is
1 x ALIGNMENT long and ``leases`` 2 x (the SDM resource is in slot 1).
``dump`` lists only lease records in use: a lockspace no host joined
shows none, so :func:`read_leader` reads it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import subprocess

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors

__all__ = ["SanlockDirectError", "SanlockDirectUnavailable", "Leader",
           "Record", "TIMEOUT", "available", "init_lockspace",
           "init_resource", "read_leader", "dump"]

LOG = logging.getLogger(__name__)

# Seconds a command may run (sanlock's own I/O timeout is 10 s an I/O).
TIMEOUT = 60.0
# Where the program is looked for after $PATH (Debian installs it in
# /usr/sbin, which a service's PATH may lack).
EXTRA_PATH = "/usr/sbin:/sbin"

# sanlock's own return codes (sanlock_rv.h) that a read of an area gives.
_REASONS = {
    -223: "no lease at this offset (SANLK_LEADER_MAGIC)",
    -224: "another lease version (SANLK_LEADER_VERSION)",
    -225: "another sector size (SANLK_LEADER_SECTORSIZE)",
    -226: "another lockspace name (SANLK_LEADER_LOCKSPACE)",
    -227: "another resource name (SANLK_LEADER_RESOURCE)",
    -228: "another number of hosts (SANLK_LEADER_NUMHOSTS)",
    -229: "a bad checksum (SANLK_LEADER_CHECKSUM)",
}
_DONE = re.compile(r"^\S+ done (-?\d+)$", re.MULTILINE)


class SanlockDirectError(errors.LeaseError):
    msg = "sanlock direct {action} of {lease} failed: {reason} (rc={rc})"


class SanlockDirectUnavailable(SanlockDirectError):
    msg = "The sanlock program is not available: {reason}"


@dataclasses.dataclass(frozen=True)
class Leader:
    """The leader record of a lease area (``read_leader``)."""

    magic: int
    version: int
    sector_size: int
    num_hosts: int
    max_hosts: int
    owner_id: int
    owner_generation: int
    lver: int
    lockspace: str
    resource: str
    timestamp: int
    io_timeout: int


@dataclasses.dataclass(frozen=True)
class Record:
    """One lease record that ``dump`` lists."""

    offset: int
    lockspace: str
    resource: str
    timestamp: int
    owner_id: int
    owner_generation: int
    lver: int


_program: str | None = None


def _find_program() -> str:
    global _program
    if _program is None:
        path = os.pathsep.join(
            p for p in (os.environ.get("PATH", ""), EXTRA_PATH) if p)
        _program = shutil.which("sanlock", path=path)
        if _program is None:
            raise SanlockDirectUnavailable(
                action="", lease="", rc=None,
                reason="no sanlock in $PATH or /usr/sbin (apt-get "
                       "install sanlock)")
    return _program


def available() -> bool:
    """True if the ``sanlock`` program is installed."""
    try:
        _find_program()
    except SanlockDirectUnavailable:
        return False
    return True


def _geometry(alignment: int, block_size: int) -> list[str]:
    if (block_size, alignment) not in _VALID:
        raise errors.InvalidParameter(
            name="block size/alignment", value=(block_size, alignment),
            reason="sanlock supports 512/1M and 4096/1M, 2M, 4M, 8M")
    return ["-Z", str(block_size), "-A", f"{alignment // sc.MiB}M"]


_VALID = {(sc.BLOCK_SIZE_512, sc.MiB)} | {
    (sc.BLOCK_SIZE_4K, n * sc.MiB) for n in (1, 2, 4, 8)}


def _name(path: str) -> tuple[str, str]:
    """(directory, base name) of ``path``, the base name colon-free."""
    directory, name = os.path.split(os.path.abspath(path))
    if ":" in name:
        raise errors.InvalidParameter(
            name="lease file", value=path,
            reason="sanlock cannot name a file with ':' in its name")
    return directory, name


def _reason(rc: int | None, output: str) -> str:
    if rc is not None and rc in _REASONS:
        return _REASONS[rc]
    if rc is not None and -200 < rc < 0:
        return os.strerror(-rc)
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _run(action: str, lease: str, directory: str, args: list[str]) -> str:
    """Run ``sanlock direct <action> <args>`` in ``directory``; return
    its output, or raise :class:`SanlockDirectError`."""
    argv = [_find_program(), "direct", action, *args, "-a", "0"]
    try:
        proc = subprocess.run(
            argv, cwd=directory, stdin=subprocess.DEVNULL,
            capture_output=True, encoding="utf-8", errors="replace",
            timeout=TIMEOUT,
            env={**os.environ, "LC_ALL": "C"}, check=False)
    except subprocess.TimeoutExpired:
        raise SanlockDirectError(
            action=action, lease=lease, rc=None,
            reason=f"timed out after {TIMEOUT:g} s") from None
    except OSError as e:
        raise SanlockDirectError(action=action, lease=lease, rc=None,
                                 reason=str(e)) from e
    found = _DONE.findall(proc.stdout)
    rc = int(found[-1]) if found else None
    if proc.returncode != 0 or (rc is not None and rc < 0):
        raise SanlockDirectError(
            action=action, lease=lease, rc=rc,
            reason=_reason(rc, proc.stderr + proc.stdout))
    LOG.debug("sanlock direct %s %s: rc=%s", action, lease, rc)
    return proc.stdout


def init_lockspace(path: str, lockspace: str, *, alignment: int,
                   block_size: int, offset: int = 0,
                   io_timeout: int | None = None) -> None:
    """Format the delta leases (host ids) of ``lockspace`` at
    ``path:offset``; ``io_timeout`` is the one recorded (sanlock's 10 s
    by default, vdsm's too)."""
    directory, name = _name(path)
    args = ["-s", f"{lockspace}:0:{name}:{offset}",
            *_geometry(alignment, block_size)]
    if io_timeout is not None:
        args += ["-o", str(io_timeout)]
    _run("init", f"{lockspace}:{path}:{offset}", directory, args)


def init_resource(path: str, lockspace: str, resource: str, *,
                  alignment: int, block_size: int, offset: int = 0) -> None:
    """Format the paxos lease ``resource`` of ``lockspace`` at
    ``path:offset`` (one alignment)."""
    directory, name = _name(path)
    _run("init", f"{lockspace}:{resource}:{path}:{offset}", directory,
         ["-r", f"{lockspace}:{resource}:{name}:{offset}",
          *_geometry(alignment, block_size)])


def read_leader(path: str, lockspace: str, resource: str | None = None, *,
                alignment: int, block_size: int, offset: int = 0) -> Leader:
    """The leader of the lockspace (``resource`` None: host id 1's delta
    lease) or of the resource at ``path:offset``.

    sanlock checks the names: another lockspace or resource raises
    :class:`SanlockDirectError` with rc -226 or -227, an empty area -223.
    """
    directory, name = _name(path)
    if resource is None:
        spec = ["-s", f"{lockspace}:1:{name}:{offset}"]
    else:
        spec = ["-r", f"{lockspace}:{resource}:{name}:{offset}"]
    out = _run("read_leader", f"{lockspace}:{resource or ''}:{path}:"
               f"{offset}", directory,
               [*spec, *_geometry(alignment, block_size)])
    fields = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        fields[key] = value
    try:
        return Leader(
            magic=int(fields["magic"], 16),
            version=int(fields["version"], 16),
            sector_size=int(fields["sector_size"]),
            num_hosts=int(fields["num_hosts"]),
            max_hosts=int(fields["max_hosts"]),
            owner_id=int(fields["owner_id"]),
            owner_generation=int(fields["owner_generation"]),
            lver=int(fields["lver"]),
            lockspace=fields["space_name"],
            resource=fields["resource_name"],
            timestamp=int(fields["timestamp"]),
            io_timeout=int(fields["io_timeout"]))
    except (KeyError, ValueError) as e:
        raise SanlockDirectError(
            action="read_leader", lease=path, rc=None,
            reason=f"unexpected output: {e}") from e


def dump(path: str, *, alignment: int, block_size: int, offset: int = 0,
         size: int | None = None) -> list[Record]:
    """The lease records in use in ``path`` from ``offset`` (``size``
    bytes; default: to the end of the file)."""
    directory, name = _name(path)
    spec = f"{name}:{offset}" + ("" if size is None else f":{size}")
    out = _run("dump", f"{path}:{offset}", directory,
               [spec, *_geometry(alignment, block_size)])
    records = []
    for line in out.splitlines()[1:]:
        # offset lockspace resource timestamp own gen lver; names may be
        # anything: a line that does not parse is skipped, as vdsm does.
        parts = line.split()
        try:
            records.append(Record(
                offset=int(parts[0]), lockspace=parts[1],
                resource=parts[2], timestamp=int(parts[3]),
                owner_id=int(parts[4]), owner_generation=int(parts[5]),
                lver=int(parts[6])))
        except (IndexError, ValueError):
            LOG.warning("Skipping a line of sanlock direct dump of %s: %r",
                        path, line)
    return records
