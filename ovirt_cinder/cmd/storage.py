"""``ovirt-storage``: the admin command line of the storage engine.

Every command opens the pool from the mount directories given with
``-p/--path`` (repeatable; default: the colon-separated
``OVIRT_STORAGE_PATHS``, then ``ovirt_domain_paths`` of the configuration
below), makes one engine call and prints a human table, or JSON with
``--json``. Global options may come before or after the
command (except ``--path`` of ``pool create`` and ``domain create``, which
names the mount to create in)::

    ovirt-storage pool create --path /mnt/a
    ovirt-storage pool create --path /mnt/n --type NFS \\
        --remote-path server:/export --file-owner vdsm --file-group kvm
    ovirt-storage -p /mnt/a pool show
    ovirt-storage -p /mnt/a volume create SD --size 1G --format qcow2
    ovirt-storage -p /mnt/a image show SD IMG --json
    ovirt-storage -p /mnt/a fsck --repair

Sizes are bytes or a number with a binary suffix (``K``, ``M``, ``G``,
``T``; ``512M``, ``1G``); they must be multiples of 512. Identifiers are
canonical lower-case UUIDs; a new one is chosen when an optional id is not
given.

Long copies (``image clone``, ``image copy``, ``image export``,
``volume import``) draw a progress bar on stderr when stderr is a TTY, or
with ``--progress``.

Configuration
    The pool's settings (mounts, pool UUID, lease backend, host id, lease
    timeout, lock path, logbook) come from the service's own configuration,
    read as oslo.config tools read it: ``--config-file`` (repeatable) and
    ``--config-dir``, with ``--backend NAME`` for a Cinder backend section
    (unset options fall back to ``[backend_defaults]``, as in Cinder) or
    ``--glance-store NAME`` for a glance_store backend section; otherwise
    the ``[storage]`` section of the given files, or of
    ``/etc/ovirt-cinder/ovirt-storage.conf`` when it exists and no file is
    given. Without a file, ``--backend`` reads Cinder's
    ``/etc/cinder/cinder.conf`` and ``--glance-store`` Glance's
    ``/etc/glance/glance-api.conf``. The chosen section must exist; options
    of other components in the files are ignored::

        ovirt-storage --backend ovirt1 fsck
        ovirt-storage --config-file /etc/glance/glance-api.conf \\
            --glance-store fast pool show

    Flags win over the files: ``-p`` (then ``OVIRT_STORAGE_PATHS``) over
    ``ovirt_domain_paths``, ``--pool-id``, ``--lease-backend``,
    ``--host-id``, ``--flow-connection``, ``--lock-path``,
    ``--file-owner`` and ``--file-group`` over their options (the last
    two own what ``pool create``, ``domain create`` and every operation
    create). Every service sharing the pool must agree on the lease
    backend, the logbook and (on one host) the lock path, so an admin
    command should read the services' configuration instead of repeating
    it.

Exit codes: 0 success; 1 ``fsck`` found problems that remain; 2 a usage
error, a configuration error, an engine error or an OS error (printed as
one line ``error: <message>``, never a traceback unless ``--debug``).
The engine and oslo.config are imported only once the arguments are
parsed, by the commands that open a pool; ``--help`` and usage errors
import neither. The read-only commands (``pool show``, ``domain list``,
``image list``, ``image show``) import no TaskFlow, oslo.privsep or
eventlet, and no oslo.config unless they read a configuration file; the
other commands that open a pool import them all as they open it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any
from typing import TextIO

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import validate

if TYPE_CHECKING:
    from ovirt_cinder.storage import fsck
    from ovirt_cinder.storage import image as image_mod
    from ovirt_cinder.storage.pool import StoragePool

__all__ = ["Output", "ConfigError", "main", "parse_size", "settings"]

PATHS_ENV = "OVIRT_STORAGE_PATHS"

# The CLI's own configuration file (section STORAGE_GROUP), read when it
# exists and no --config-file/--config-dir is given.
DEFAULT_CONFIG_FILE = "/etc/ovirt-cinder/ovirt-storage.conf"
STORAGE_GROUP = "storage"
# What --backend and --glance-store read when no file is given.
CINDER_CONFIG_FILE = "/etc/cinder/cinder.conf"
GLANCE_CONFIG_FILE = "/etc/glance/glance-api.conf"
# Cinder's shared section, where a backend section's unset options are read.
CINDER_SHARED_GROUP = "backend_defaults"

_FORMATS = {"raw": sc.VolumeFormat.RAW, "qcow2": sc.VolumeFormat.COW}
_UNITS = {"": 1, "K": sc.KiB, "M": sc.MiB, "G": sc.GiB, "T": 1024 * sc.GiB}
_SIZE_RE = re.compile(r"^(\d+)\s*([KMGT]?)(?:i?B)?$", re.IGNORECASE)
_BAR_WIDTH = 30
# ``volume import --max-virtual-size``: the Cinder driver's default limit
# (ovirt_max_image_virtual_size_gb = 1024).
DEFAULT_MAX_VIRTUAL_SIZE = 1024 * sc.GiB


@dataclasses.dataclass
class Output:
    """What a command prints: ``data`` as JSON or ``lines`` for humans."""

    data: Any
    lines: list[str]
    rc: int = 0


# Argument types

def parse_size(text: str) -> int:
    """Bytes from ``"1G"``, ``"512M"``, ``"4096"``; multiples of 512."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size: {text!r}")
    size = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if size <= 0 or size % sc.BLOCK_SIZE_512:
        raise argparse.ArgumentTypeError(
            f"invalid size: {text!r} is not a positive multiple of 512")
    return size


def _uuid(name: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        try:
            return validate.check_uuid(text, name)
        except errors.InvalidUUID as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    check.__name__ = name
    return check


# Output helpers

def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]
           ) -> list[str]:
    cells = [list(headers)] + [["-" if c is None else str(c) for c in r]
                               for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
            for r in cells]


def _human_size(size: int) -> str:
    value, unit = float(size), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"


def _draw_bar(stream: TextIO, percent: float) -> None:
    done = int(_BAR_WIDTH * min(max(percent, 0.0), 100.0) / 100)
    bar = "#" * done + " " * (_BAR_WIDTH - done)
    stream.write(f"\r[{bar}] {percent:3.0f}%")
    stream.flush()


@contextlib.contextmanager
def _progress(enabled: bool, stream: TextIO) -> Iterator[None]:
    """Route the engine's copy progress to a bar on ``stream``."""
    if not enabled:
        yield
        return
    from ovirt_cinder.storage import actions

    saved = actions.progress_callback
    drawn = []

    def update(percent: float) -> None:
        drawn.append(percent)
        _draw_bar(stream, percent)

    actions.progress_callback = update
    try:
        yield
    finally:
        actions.progress_callback = saved
        if drawn:
            stream.write("\n")
            stream.flush()


def _created(**ids: str) -> Output:
    return Output(data=ids, lines=[f"{k.replace('_', ' ')}: {v}"
                                   for k, v in ids.items()])


# Pool

class ConfigError(Exception):
    """A configuration file is missing, unreadable or holds a bad value."""


def _read_files(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The section to read and the oslo.config arguments naming files."""
    if args.backend and args.glance_store:
        raise ConfigError("give --backend or --glance-store, not both")
    group = args.backend or args.glance_store or STORAGE_GROUP
    files, dirs = args.config_files or [], args.config_dirs or []
    if not files and not dirs:
        default = (CINDER_CONFIG_FILE if args.backend else
                   GLANCE_CONFIG_FILE if args.glance_store else
                   DEFAULT_CONFIG_FILE)
        if os.path.exists(default):
            files = [default]
        elif group != STORAGE_GROUP:
            raise ConfigError(f"no {default} to read section [{group}] "
                              "from; give --config-file")
    argv = [a for f in files for a in ("--config-file", f)]
    argv += [a for d in dirs for a in ("--config-dir", d)]
    return group, argv


def settings(args: argparse.Namespace) -> argparse.Namespace:
    """The pool's options: from the configuration, then the flags.

    Raises :class:`ConfigError` for a missing, unreadable or unparsable
    file, a missing section or a bad value.
    """
    from ovirt_cinder.storage import config

    group, argv = _read_files(args)
    values = dict(config.DEFAULTS)
    if argv:
        # oslo.config (~60 ms) only when a file is read.
        from oslo_config import cfg

        cinder = bool(args.backend) and args.backend != CINDER_SHARED_GROUP
        try:
            values.update(_parse(group, argv, cinder=cinder))
        except cfg.Error as e:
            raise ConfigError(str(e)) from e
    values.update({dest: getattr(args, flag) for dest, flag in [
        ("ovirt_pool_uuid", "pool_id"),
        ("ovirt_lease_backend", "lease_backend"),
        ("ovirt_host_id", "host_id"),
        ("ovirt_flow_connection", "flow_connection"),
        ("ovirt_lock_path", "lock_path"),
        ("ovirt_file_owner", "file_owner"),
        ("ovirt_file_group", "file_group")]
        if getattr(args, flag, None) is not None})
    paths = args.paths or [
        p for p in os.environ.get(PATHS_ENV, "").split(":") if p]
    if paths:
        values["ovirt_domain_paths"] = paths
    return argparse.Namespace(section=group, **values)


def _parse(group: str, argv: list[str], *, cinder: bool) -> dict[str, Any]:
    """Read the POOL_OPTS of ``group`` from the files ``argv`` names; a
    ``cinder`` backend section falls back to ``[backend_defaults]``."""
    from oslo_config import cfg

    from ovirt_cinder.storage import config

    conf = cfg.ConfigOpts()     # private: never the global CONF
    conf.register_opts(config.POOL_OPTS, group=group)
    if cinder:
        # As Cinder's BackendGroupConfiguration: an option unset in the
        # backend section (None) is read from [backend_defaults].
        conf.register_opts(config.POOL_OPTS, group=CINDER_SHARED_GROUP)
        for opt in config.POOL_OPTS:
            conf.set_default(opt.dest, None, group=group)
    conf(args=argv, project="ovirt-cinder", prog="ovirt-storage",
         default_config_files=[], default_config_dirs=[], use_env=False)
    if group not in conf.list_all_sections():
        raise ConfigError(f"no section [{group}] in the configuration "
                          f"({_sources(conf)})")
    values = {}
    for opt in config.POOL_OPTS:
        value = _value(conf, group, opt.dest)
        if value is None and cinder:
            value = _value(conf, CINDER_SHARED_GROUP, opt.dest)
        values[opt.dest] = value
    return values


def _value(conf: Any, group: str, name: str) -> Any:
    from oslo_config import cfg

    try:
        return getattr(conf[group], name)
    except cfg.ConfigFileValueError as e:
        # oslo.config names the file as a LocationInfo repr; say it plainly.
        reason = str(e).rpartition(" is not valid: ")[2] or str(e)
        raise ConfigError(f"invalid value of {name} in [{group}] "
                          f"({_sources(conf)}): {reason}") from e


def _sources(conf: Any) -> str:
    """The files and directories ``conf`` read, for a message."""
    return ", ".join([*conf.config_file, *conf.config_dir])


def _require_mounts(opts: argparse.Namespace) -> None:
    if not opts.ovirt_domain_paths:
        raise ConfigError(
            f"no mount of the pool: give -p/--path MOUNT, set {PATHS_ENV}, "
            f"or set ovirt_domain_paths in [{opts.section}] of a "
            "configuration file")


def _open(args: argparse.Namespace) -> StoragePool:
    from ovirt_cinder.storage import config

    opts = settings(args)
    _require_mounts(opts)
    return config.open_pool(opts, engine=not _read_only(args))


def _or_new(value: str | None) -> str:
    return value or validate.new_uuid()


# Commands: pool and domains

def cmd_pool_create(args: argparse.Namespace) -> Output:
    from ovirt_cinder.storage import config
    from ovirt_cinder.storage.pool import StoragePool

    opts = settings(args)
    # The lease manager prepares the new domain's lease areas (sanlock).
    pool = StoragePool.create(
        args.target, pool_id=args.new_pool_id, sd_id=args.domain_id,
        description=args.description,
        domain_type=sc.DomainType(args.domain_type),
        remote_path=args.remote_path or "",
        lease_manager=config.lease_manager(opts),
        flow_connection=opts.ovirt_flow_connection or None,
        ownership=config.ownership(opts))
    return _created(pool_id=pool.pool_id, master_domain_id=pool.master.sd_id)


def _domain_row(pool: StoragePool, dom) -> dict[str, object]:
    stats = dom.stats()
    return {"sd_id": dom.sd_id, "role": str(dom.metadata.role),
            "type": str(dom.metadata.type), "path": dom.path,
            "description": dom.metadata.description,
            "total": stats.total, "free": stats.free, "used": stats.used,
            "images": len(pool.list_images(dom.sd_id))}


def _domains_table(rows: list[dict[str, Any]]) -> list[str]:
    return _table(
        ["DOMAIN", "ROLE", "TYPE", "TOTAL", "FREE", "USED", "IMAGES",
         "PATH"],
        [[r["sd_id"], r["role"], r["type"], _human_size(r["total"]),
          _human_size(r["free"]), _human_size(r["used"]), r["images"],
          r["path"]] for r in rows])


def _domain_rows(pool: StoragePool) -> list[dict[str, Any]]:
    return [_domain_row(pool, d) for _, d in sorted(pool.domains.items())]


def cmd_pool_show(args: argparse.Namespace) -> Output:
    pool = _open(args)
    rows = _domain_rows(pool)
    data = {"pool_id": pool.pool_id, "master": pool.master.sd_id,
            "domains": rows}
    return Output(data, [f"pool: {pool.pool_id}", ""] + _domains_table(rows))


def cmd_domain_create(args: argparse.Namespace) -> Output:
    pool = _open(args)
    dom = pool.add_domain(args.target, sd_id=args.domain_id,
                          description=args.description,
                          domain_type=sc.DomainType(args.domain_type),
                          remote_path=args.remote_path or "")
    return _created(domain_id=dom.sd_id, pool_id=pool.pool_id)


def cmd_domain_list(args: argparse.Namespace) -> Output:
    rows = _domain_rows(_open(args))
    return Output(rows, _domains_table(rows))


def cmd_domain_attach(args: argparse.Namespace) -> Output:
    pool = _open(args)
    dom = pool.attach_domain(args.domain_path, force=args.force)
    md = dom.metadata
    out = _created(domain_id=dom.sd_id, pool_id=pool.pool_id)
    out.data.update(version=md.version, mount=dom.mount)
    out.lines.append(f"add {dom.mount} to the pool's mounts (-p, "
                     "ovirt_domain_paths) to open it with the pool")
    if md.version < sc.DOMAIN_VERSION:
        out.lines.append(f"format V{md.version}: read only until "
                         f"`domain upgrade {dom.sd_id}`")
    return out


def cmd_domain_upgrade(args: argparse.Namespace) -> Output:
    dom = _open(args).upgrade_domain(args.domain)
    return Output({"sd_id": dom.sd_id, "version": dom.metadata.version},
                  [f"domain {dom.sd_id}: V{dom.metadata.version}"])


# Commands: images

def _image_row(pool: StoragePool, sd_id: str, img_id: str) -> dict:
    row: dict[str, Any] = {"img_id": img_id}
    try:
        tree = pool.image(sd_id, img_id)
        top = tree.template() or tree.leaf()
    except errors.StorageError as e:
        row.update(error=str(e))
        return row
    # Every volume of the directory: its own and the SHARED template
    # volumes linked in (a thin clone's base).
    shared = [v for v in tree.volumes.values()
              if v.meta.voltype == sc.VolumeType.SHARED]
    row.update(volumes=len(tree.volumes), shared=len(shared),
               snapshots=len(tree.snapshots()), format=top.qemu_format,
               capacity=top.meta.capacity,
               template=tree.template() is not None, error=None)
    return row


def cmd_image_list(args: argparse.Namespace) -> Output:
    pool = _open(args)
    rows = [_image_row(pool, args.domain, i)
            for i in pool.list_images(args.domain)]
    return Output(rows, _table(
        ["IMAGE", "VOLUMES", "SHARED", "SNAPSHOTS", "FORMAT", "CAPACITY",
         "TEMPLATE"],
        [[r["img_id"], r.get("volumes"), r.get("shared"), r.get("snapshots"),
          r.get("format"), _human_size(r["capacity"]) if "capacity" in r
          else "broken: " + r["error"],
          ("yes" if r["template"] else "no") if "template" in r else None]
         for r in rows]))


def _ordered_volumes(tree: image_mod.ImageTree) -> tuple[list, list]:
    """The chain base->leaf (or the template), then every other volume."""
    tmpl = tree.template()
    try:
        chain = [tmpl] if tmpl else tree.chain()
    except errors.ChainError:
        chain = []      # broken: list every volume, no chain
    ids = {v.vol_id for v in chain}
    rest = sorted((v for v in tree.volumes.values() if v.vol_id not in ids),
                  key=lambda v: (v.meta.sequence, v.vol_id))
    return chain, rest


def _chain_line(chain: list[image_mod.Volume], img_id: str) -> str:
    if not chain:
        return "chain: broken (run fsck)"
    parts = []
    for vol in chain:
        label = vol.vol_id[:8]
        if vol.meta.image != img_id:
            label += " (template)"
        elif vol.snapshot_id:
            label += f" (snap {vol.snapshot_id[:8]})"
        parts.append(label)
    return "chain: " + " -> ".join(parts) + "  [leaf]"


def cmd_image_show(args: argparse.Namespace) -> Output:
    pool = _open(args)
    tree = pool.image(args.domain, args.image)
    chain, rest = _ordered_volumes(tree)
    volumes = [v.as_dict() for v in chain + rest]
    data = {"sd_id": args.domain, "img_id": args.image,
            "template": tree.template() is not None,
            "leaf": chain[-1].vol_id if chain else None,
            "chain": [v.vol_id for v in chain], "volumes": volumes}
    lines = _table(
        ["VOLUME", "PARENT", "FORMAT", "VOLTYPE", "LEGALITY", "CAPACITY",
         "GEN", "SNAPSHOT"],
        [[v["vol_id"], v["parent"], v["format"], v["voltype"],
          v["legality"], _human_size(v["capacity"]), v["generation"],
          v["snapshot_id"]] for v in volumes])
    return Output(data, lines + ["", _chain_line(chain, args.image)])


def _voltype(args: argparse.Namespace) -> sc.VolumeType:
    return sc.VolumeType.SHARED if args.template else sc.VolumeType.LEAF


def cmd_volume_create(args: argparse.Namespace) -> Output:
    pool = _open(args)
    img_id = _or_new(args.image_id)
    vol = pool.create_volume(
        args.domain, img_id, args.size, fmt=_FORMATS[args.format],
        prealloc=(sc.Preallocation.PREALLOCATED if args.preallocated
                  else sc.Preallocation.SPARSE),
        voltype=_voltype(args))
    return _created(image_id=img_id, volume_id=vol.vol_id)


def cmd_volume_import(args: argparse.Namespace) -> Output:
    from ovirt_cinder.storage import inspect

    pool = _open(args)
    pool.domain(args.domain)
    found = inspect.inspect_untrusted(
        args.file, max_virtual_size=args.max_virtual_size)
    capacity = -(-found.virtual_size // sc.BLOCK_SIZE_512) * \
        sc.BLOCK_SIZE_512
    img_id = _or_new(args.image_id)
    vol = pool.import_volume(
        args.domain, img_id, args.file, inspect.qemu_format(found.format),
        capacity, fmt=_FORMATS[args.format], voltype=_voltype(args))
    out = _created(image_id=img_id, volume_id=vol.vol_id)
    out.data.update(source_format=found.format, capacity=capacity)
    return out


def cmd_snapshot_create(args: argparse.Namespace) -> Output:
    pool = _open(args)
    snap_id = _or_new(args.snapshot_id)
    vol = pool.snapshot(args.domain, args.image, snap_id)
    return _created(snapshot_id=snap_id, volume_id=vol.vol_id)


def cmd_snapshot_delete(args: argparse.Namespace) -> Output:
    _open(args).delete_snapshot(args.domain, args.image, args.snapshot)
    return _created(deleted_snapshot=args.snapshot)


def cmd_snapshot_revert(args: argparse.Namespace) -> Output:
    vol = _open(args).revert_to_snapshot(args.domain, args.image,
                                         args.snapshot)
    return _created(reverted_to=args.snapshot, leaf_id=vol.vol_id)


def cmd_image_clone(args: argparse.Namespace) -> Output:
    pool = _open(args)
    img_id = _or_new(args.image_id)
    fmt = _FORMATS[args.format] if args.format else None
    vol = pool.clone(args.domain, args.image, img_id, snap_id=args.snapshot,
                     dst_sd_id=args.to_domain, size=args.size, fmt=fmt)
    return _created(image_id=img_id, volume_id=vol.vol_id,
                    domain_id=args.to_domain or args.domain)


def cmd_image_thin_clone(args: argparse.Namespace) -> Output:
    pool = _open(args)
    img_id = _or_new(args.image_id)
    vol = pool.thin_clone(args.domain, args.template, img_id,
                          size=args.size)
    return _created(image_id=img_id, volume_id=vol.vol_id)


def cmd_image_extend(args: argparse.Namespace) -> Output:
    vol = _open(args).extend(args.domain, args.image, args.size)
    return Output({"img_id": args.image, "capacity": vol.meta.capacity},
                  [f"capacity: {vol.meta.capacity}"])


def cmd_image_copy(args: argparse.Namespace) -> Output:
    tree = _open(args).copy_image(args.domain, args.image, args.to_domain,
                                  move=args.move)
    return _created(image_id=tree.img_id, domain_id=args.to_domain)


def cmd_image_delete(args: argparse.Namespace) -> Output:
    removed = _open(args).delete_image(args.domain, args.image)
    return Output({"img_id": args.image, "removed": removed},
                  ["deleted" if removed else "already gone"])


def cmd_image_export(args: argparse.Namespace) -> Output:
    _open(args).export_volume(args.domain, args.image, args.file,
                              fmt=args.format, snap_id=args.snapshot)
    return _created(exported_to=args.file)


# Commands: checks

def _problem_lines(problems: list[fsck.Problem]) -> list[str]:
    return _table(
        ["KIND", "DOMAIN", "IMAGE", "VOLUME", "DETAIL", "GARBAGE"],
        [[p.kind, p.sd_id, p.img_id, p.vol_id, f"{p.detail} ({p.path})",
          "yes" if p.garbage else "no"] for p in problems])


def cmd_fsck(args: argparse.Namespace) -> Output:
    # The check reads the logbook: it imports TaskFlow.
    from ovirt_cinder.storage import fsck

    pool = _open(args)
    report = fsck.repair(pool) if args.repair else fsck.check(pool)
    lines = [f"recovered flow {n}: {o}" for n, o in report.recovered]
    lines += [f"removed {p.kind}: {p.path}" for p in report.repaired]
    lines += [f"quarantined {p.kind}: {p.path} ({p.detail})"
              for p in report.quarantined]
    if report.clean:
        lines.append("clean")
    else:
        lines += _problem_lines(report.problems)
    return Output(report.as_dict(), lines, rc=0 if report.clean else 1)


def cmd_recover(args: argparse.Namespace) -> Output:
    done = _open(args).recover()
    return Output([{"flow": n, "outcome": o} for n, o in done],
                  [f"{n}: {o}" for n, o in done] or ["nothing to recover"])


# Parser: (command, handler, help, arguments), an argument (flags, kwargs)

def _arg(*flags: str, **kwargs: Any) -> tuple[tuple[str, ...], dict]:
    return flags, kwargs


def _format(default: str | None) -> tuple[tuple[str, ...], dict]:
    return _arg("--format", choices=sorted(_FORMATS), default=default)


_DOMAIN = _arg("domain", type=_uuid("domain id"))
_IMAGE = _arg("image", type=_uuid("image id"))
_SNAPSHOT = _arg("snapshot", type=_uuid("snapshot id"))
_NEW_IMAGE = _arg("--image-id", type=_uuid("image id"))
_NEW_DOMAIN = _arg("--domain-id", type=_uuid("domain id"))
_DESCRIPTION = _arg("--description", default="")
_TEMPLATE = _arg("--template", action="store_true",
                 help="a template (SHARED volume)")
_SIZE = _arg("--size", type=parse_size, help="bytes, or 512M, 1G, ...")
# What oVirt records as the domain's TYPE and REMOTE_PATH.
_DOMAIN_TYPE = _arg("--type", dest="domain_type", default="LOCALFS",
                    choices=["NFS", "POSIXFS", "GLUSTERFS", "LOCALFS"],
                    help="the domain's TYPE (default LOCALFS)")
_REMOTE_PATH = _arg("--remote-path", metavar="SPEC",
                    help="the domain's REMOTE_PATH: server:/export for NFS, "
                    "the device or spec of a POSIX or Gluster mount "
                    "(default: the mount path)")

# Commands that only read: they open the pool without importing the
# engine's mutating modules (TaskFlow, oslo.privsep, eventlet: about 0.5 s)
# and draw no progress bar. The others import them up front.
_READ_ONLY = frozenset({cmd_pool_show, cmd_domain_list, cmd_image_list,
                        cmd_image_show})


def _read_only(args: argparse.Namespace) -> bool:
    return getattr(args, "func", None) in _READ_ONLY


_COMMANDS = [
    ("pool create", cmd_pool_create, "create a pool and its master domain",
     [_arg("--path", dest="target", metavar="MOUNT", required=True),
      _arg("--pool-id", dest="new_pool_id", type=_uuid("pool id")),
      _NEW_DOMAIN, _DESCRIPTION, _DOMAIN_TYPE, _REMOTE_PATH]),
    ("pool show", cmd_pool_show, "show the pool and its domains", []),
    ("domain create", cmd_domain_create, "add a domain to the pool",
     [_arg("--path", dest="target", metavar="MOUNT", required=True),
      _NEW_DOMAIN, _DESCRIPTION, _DOMAIN_TYPE, _REMOTE_PATH]),
    ("domain list", cmd_domain_list, "list the domains", []),
    ("domain attach", cmd_domain_attach,
     "attach a detached oVirt data domain to the pool",
     [_arg("domain_path", metavar="PATH",
           help="the domain directory, MOUNT/SD_ID"),
      _arg("--force", action="store_true",
           help="attach a domain that names another pool (only when no "
           "host of that pool uses it any more)")]),
    ("domain upgrade", cmd_domain_upgrade,
     "upgrade a V3/V4 domain to V5 in place", [_DOMAIN]),
    ("image list", cmd_image_list, "list the images of a domain",
     [_DOMAIN]),
    ("image show", cmd_image_show, "show the volume tree", [_DOMAIN, _IMAGE]),
    ("image clone", cmd_image_clone, "full copy into a new image",
     [_DOMAIN, _IMAGE, _NEW_IMAGE,
      _arg("--snapshot", type=_uuid("snapshot id")),
      _arg("--to-domain", type=_uuid("domain id")), _SIZE, _format(None)]),
    ("image thin-clone", cmd_image_thin_clone, "new image over a template",
     [_DOMAIN, _arg("template", type=_uuid("image id")), _NEW_IMAGE,
      _SIZE]),
    ("image extend", cmd_image_extend, "grow the image",
     [_DOMAIN, _IMAGE, _arg("size", type=parse_size)]),
    ("image copy", cmd_image_copy, "copy the image to another domain",
     [_DOMAIN, _IMAGE, _arg("to_domain", type=_uuid("domain id")),
      _arg("--move", action="store_true")]),
    ("image delete", cmd_image_delete, "delete the image",
     [_DOMAIN, _IMAGE]),
    ("image export", cmd_image_export, "write the image into a file",
     [_DOMAIN, _IMAGE, _arg("file"), _format("raw"),
      _arg("--snapshot", type=_uuid("snapshot id"))]),
    ("volume create", cmd_volume_create, "a new image with an empty volume",
     [_DOMAIN, _NEW_IMAGE,
      _arg("--size", type=parse_size, required=True, help=_SIZE[1]["help"]),
      _format("qcow2"), _arg("--preallocated", action="store_true"),
      _TEMPLATE]),
    ("volume import", cmd_volume_import, "a new image from an image file",
     [_DOMAIN, _arg("file"), _NEW_IMAGE, _TEMPLATE, _format("raw"),
      _arg("--max-virtual-size", type=parse_size,
           default=DEFAULT_MAX_VIRTUAL_SIZE,
           help="refuse a larger image (default 1T, as the Cinder "
           "driver's ovirt_max_image_virtual_size_gb)")]),
    ("snapshot create", cmd_snapshot_create, "freeze the leaf",
     [_DOMAIN, _IMAGE, _arg("--snapshot-id", type=_uuid("snapshot id"))]),
    ("snapshot delete", cmd_snapshot_delete, "drop (merge) a snapshot",
     [_DOMAIN, _IMAGE, _SNAPSHOT]),
    ("snapshot revert", cmd_snapshot_revert, "revert to a snapshot",
     [_DOMAIN, _IMAGE, _SNAPSHOT]),
    ("fsck", cmd_fsck, "check the pool (exit 1 if problems remain)",
     [_arg("--repair", action="store_true",
           help="finish flows and remove garbage first")]),
    ("recover", cmd_recover, "finish or revert unfinished operations", []),
]


def _host_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 250:
        raise argparse.ArgumentTypeError(
            f"invalid host id: {text!r} (expected 1-250)")
    return value


# Global options: before the command, or after it unless it owns the flag.
_GLOBALS = [
    _arg("-p", "--path", dest="paths", action="append", metavar="MOUNT",
         help=f"mount holding pool domains (repeatable; default "
         f"${PATHS_ENV}, colon separated, then ovirt_domain_paths)"),
    _arg("--pool-id", type=_uuid("pool id"),
         help="the pool (default ovirt_pool_uuid, or the only pool)"),
    _arg("--json", action="store_true", help="machine-readable output"),
    _arg("--progress", action="store_true",
         help="draw a progress bar on stderr"),
    _arg("--config-file", dest="config_files", action="append",
         metavar="PATH",
         help="a configuration file to read the pool's options from "
         f"(repeatable; default {DEFAULT_CONFIG_FILE} if it exists)"),
    _arg("--config-dir", dest="config_dirs", action="append",
         metavar="DIR", help="read every *.conf of DIR after the files"),
    _arg("--backend", metavar="NAME",
         help="read the Cinder backend section [NAME] (unset options "
         f"from [{CINDER_SHARED_GROUP}]; default file "
         f"{CINDER_CONFIG_FILE})"),
    _arg("--glance-store", metavar="NAME",
         help="read the glance_store backend section [NAME] (default file "
         f"{GLANCE_CONFIG_FILE})"),
    _arg("--lease-backend", choices=["local", "sanlock"],
         help="override ovirt_lease_backend"),
    _arg("--host-id", type=_host_id, metavar="N",
         help="override ovirt_host_id (sanlock, 1-250)"),
    _arg("--flow-connection", metavar="URL",
         help="override ovirt_flow_connection (logbook; '' for the "
         "master domain)"),
    _arg("--lock-path", metavar="DIR", help="override ovirt_lock_path"),
    _arg("--file-owner", metavar="USER",
         help="override ovirt_file_owner (owner of new files: a name or "
         "uid, e.g. vdsm or 36)"),
    _arg("--file-group", metavar="GROUP",
         help="override ovirt_file_group (group of new files: a name or "
         "gid, e.g. kvm or 36)"),
    _arg("--debug", action="store_true",
         help="show the traceback of an error"),
]


def _common(own: set[str], parents: dict[frozenset[str], Any]
            ) -> argparse.ArgumentParser:
    """Global options also accepted after a command (unless it owns them);
    one parent per set of owned global flags, shared by the commands."""
    owned = frozenset(f for flags, _ in _GLOBALS for f in flags if f in own)
    if owned not in parents:
        parent = parents[owned] = argparse.ArgumentParser(add_help=False)
        for flags, kwargs in _GLOBALS:
            if not owned.intersection(flags):
                parent.add_argument(*flags, **kwargs,
                                    default=argparse.SUPPRESS)
    return parents[owned]


def _add_commands(sub) -> None:
    groups = {}
    parents: dict[frozenset[str], Any] = {}
    for name, func, help, arguments in _COMMANDS:
        group, _, action = name.rpartition(" ")
        if group and group not in groups:
            groups[group] = sub.add_parser(
                group, help=f"{group} commands").add_subparsers(
                    dest="action", required=True)
        own = {flag for flags, _ in arguments for flag in flags}
        parser = (groups[group] if group else sub).add_parser(
            action, help=help, parents=[_common(own, parents)])
        parser.set_defaults(func=func)
        for flags, kwargs in arguments:
            parser.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ovirt-storage", description="oVirt storage pool admin tool",
        epilog="The pool's options come from --config-file/--config-dir "
        f"([{STORAGE_GROUP}], or the section --backend or --glance-store "
        "names); the flags override them.")
    for flags, kwargs in _GLOBALS:
        parser.add_argument(*flags, **kwargs)
    _add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def _print(out: Output, as_json: bool) -> None:
    if as_json:
        print(json.dumps(out.data, indent=2, sort_keys=True))
    else:
        for line in out.lines:
            print(line)


_KNOWN = (errors.StorageError, ConfigError, OSError)


def _cause(e: BaseException) -> BaseException:
    """The engine or OS error under a library's wrapper (TaskFlow's
    ``StorageFailure`` over an ENOSPC while saving the logbook), else
    ``e``."""
    seen = []
    cause: BaseException | None = e
    while cause is not None and cause not in seen:
        if isinstance(cause, _KNOWN):
            return cause
        seen.append(cause)
        cause = getattr(cause, "cause", None) or cause.__cause__
    return e


def _error(e: BaseException) -> str:
    """One line saying what went wrong."""
    e = _cause(e)
    if isinstance(e, OSError) and e.strerror:
        where = "" if e.filename is None else str(e.filename)
        if e.filename2 is not None:
            where = f"{where} -> {e.filename2}"
        text = f"{where}: {e.strerror}" if where else e.strerror
    elif isinstance(e, _KNOWN):
        text = str(e)
    else:
        text = f"unexpected {type(e).__name__}: {e}"
    return " ".join(text.split()) or type(e).__name__


class _OneLine(logging.Formatter):
    """``warning: <message>`` on one line, without a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        text = " ".join(record.getMessage().split())
        return f"{record.levelname.lower()}: {text}"


def _setup_logging(debug: bool) -> None:
    """The engine's warnings as one line each on stderr (Python's last
    resort handler would print tracebacks); everything with --debug."""
    if logging.root.handlers:
        return      # configured by whoever called main()
    handler = logging.StreamHandler(sys.stderr)
    if debug:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("ovirt_cinder").setLevel(logging.DEBUG)
    else:
        handler.setFormatter(_OneLine())
        handler.setLevel(logging.WARNING)
    logging.root.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    args = build_parser().parse_args(argv)
    args.progress = args.progress or sys.stderr.isatty()
    # TaskFlow imports eventlet, which warns on stderr that it is
    # deprecated: nothing the admin can act on.
    warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
    _setup_logging(args.debug)
    try:
        with _progress(args.progress and not _read_only(args), sys.stderr):
            out = args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {_error(e)}", file=sys.stderr)
        return 2
    _print(out, args.json)
    return out.rc


if __name__ == "__main__":
    sys.exit(main())
