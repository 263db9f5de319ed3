"""Options of a storage pool, shared by every service, and opening it.

The Cinder driver (a backend section), the Glance store (a glance_store
backend section) and the ``ovirt-storage`` CLI (its ``[storage]`` section,
or either of the services' sections) serve the same pool and must agree on
how it is found, fenced and logged, so these options are declared once,
here, as :data:`POOL_OPTS`; each service adds its own options to them::

    ovirt_pool_uuid = 5a0c6c1e-0b8e-4a57-9a1e-2c1f3d4b5e6f
    ovirt_domain_paths = /srv/ovirt/local1,/mnt/nfs1
    ovirt_lease_backend = sanlock
    ovirt_host_id = 3
    ovirt_flow_connection = mysql+pymysql://user:pass@db/ovirt_flows
    ovirt_lock_path = /var/lib/ovirt-cinder/locks
    ovirt_file_owner = vdsm
    ovirt_file_group = kvm

:func:`open_pool` opens the pool such a section describes. It takes any
object with the options as attributes: an oslo.config group, a Cinder
``Configuration``, an ``argparse.Namespace``.

Like the rest of the engine this module imports no Cinder or Glance code;
the pool is imported only when a pool is opened, and with it TaskFlow
unless the caller only reads (``open_pool(opts, engine=False)``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from collections.abc import Iterable
from typing import TYPE_CHECKING
from typing import Any

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import lease
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage import sd

if TYPE_CHECKING:
    from ovirt_cinder.storage.pool import StoragePool

__all__ = ["POOL_OPTS", "DEFAULTS", "open_pool", "lease_manager",
           "ownership"]

# Every option's default, the value of an option no file sets; apart
# from the declarations so that a caller reading no file (``ovirt-storage
# pool show`` without a configuration file) imports no oslo.config.
DEFAULTS: dict[str, Any] = {
    "ovirt_pool_uuid": None,
    "ovirt_domain_paths": [],
    "ovirt_lease_backend": "local",
    "ovirt_host_id": 1,
    "ovirt_io_timeout": 10,
    "ovirt_flow_connection": "",
    "ovirt_lease_timeout": lease.DEFAULT_LEASE_TIMEOUT,
    "ovirt_lock_path": lease.DEFAULT_LOCK_PATH,
    "ovirt_run_path": sc.DEFAULT_RUN_PATH,
    "ovirt_qemu_img_timeout": 120,
    "ovirt_copy_stall_timeout": 600,
    "ovirt_file_owner": None,
    "ovirt_file_group": None,
}
# The options (oslo.config Opt objects), made by __getattr__ on first use.
POOL_OPTS: list[Any]
_opts_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    """:data:`POOL_OPTS`, declared on first use (with oslo.config)."""
    if name != "POOL_OPTS":
        raise AttributeError(f"module {__name__!r} has no attribute "
                             f"{name!r}")
    with _opts_lock:
        if "POOL_OPTS" not in globals():
            globals()["POOL_OPTS"] = _pool_opts()
    return globals()["POOL_OPTS"]


def _pool_opts() -> list[Any]:
    from oslo_config import cfg

    return [
        cfg.StrOpt("ovirt_pool_uuid",
                   help="""
The UUID of the oVirt storage pool this service serves.

The pool is found from the domains under ``ovirt_domain_paths``. When
those paths hold domains of a single pool, this option may be left unset.

Possible values:
    * A UUID (the ``POOL_UUID`` of the pool's domains)
    * Unset, when the paths hold the master domain of a single pool

Related options:
    * ``ovirt_domain_paths``
"""),
        cfg.ListOpt("ovirt_domain_paths",
                    default=DEFAULTS["ovirt_domain_paths"],
                    help="""
Mount directories that hold the pool's file storage domains.

Each path is a directory containing one or more domain directories
(``<mount>/<sd_id>``): a local directory, a POSIX or an NFS mount, mounted
by the operator. In Cinder each domain found becomes a Cinder pool named by
its ``sd_id``. Glance stages uploads in hidden files in these directories,
so glance-api must be able to write there.

Possible values:
    * A comma separated list of absolute paths

Related options:
    * ``ovirt_pool_uuid``
"""),
        cfg.StrOpt("ovirt_lease_backend",
                   default=DEFAULTS["ovirt_lease_backend"],
                   choices=["local", "sanlock"],
                   help="""
How metadata changes of the pool's domains are fenced.

Every service sharing the pool (each Cinder backend, each Glance store
and the ``ovirt-storage`` CLI) must use the same backend: a flock
(``local``) does not exclude a sanlock holder on another host.

Possible values:
    * local: flock on the domain's ``dom_md/ids`` (a single host)
    * sanlock: the domain's SDM lease (several hosts; needs sanlock)

Related options:
    * ``ovirt_host_id``
    * ``ovirt_io_timeout``
    * ``ovirt_lease_timeout``
"""),
        cfg.IntOpt("ovirt_host_id",
                   default=DEFAULTS["ovirt_host_id"], min=1, max=250,
                   help="""
The sanlock host id of this host in the lockspace of every domain.

Possible values:
    * 1-250, unique among the hosts sharing the pool; the services of
      one host (cinder-volume, glance-api, ``ovirt-storage``) share it

Related options:
    * ``ovirt_lease_backend``
"""),
        cfg.IntOpt("ovirt_io_timeout",
                   default=DEFAULTS["ovirt_io_timeout"], min=1,
                   help="""
The sanlock I/O timeout in seconds.

Joining a domain takes about 2 x this plus 1 s; a dead host's lease is
free again after about 8 x this plus 60 s.

Possible values:
    * A number of seconds

Related options:
    * ``ovirt_lease_backend``
"""),
        cfg.StrOpt("ovirt_flow_connection",
                   default=DEFAULTS["ovirt_flow_connection"],
                   help="""
Where unfinished storage operations are recorded, so they can be finished
or reverted after a crash.

Every service sharing the pool (Cinder, Glance and the ``ovirt-storage``
CLI) must use the same value, or it does not see the others' unfinished
work.

Possible values:
    * Empty: a directory in the pool's master domain
      (``master/ovirt-cinder/flows``)
    * An SQLAlchemy URL, e.g. ``mysql+pymysql://user:pass@host/flows``

Related options:
    * ``ovirt_domain_paths``
"""),
        cfg.FloatOpt("ovirt_lease_timeout",
                     default=DEFAULTS["ovirt_lease_timeout"], min=1,
                     help="""
How long, in seconds, an operation waits for a domain or an image lease
before it fails with a retryable error.

Possible values:
    * A number of seconds, at least 1

Related options:
    * ``ovirt_lease_backend``
    * ``ovirt_lock_path``
"""),
        cfg.StrOpt("ovirt_lock_path",
                   default=DEFAULTS["ovirt_lock_path"],
                   help="""
A host-local directory for the image locks that every process of this
host working on the pool shares.

Cinder, Glance and the ``ovirt-storage`` CLI on one host must use the same
directory, or their operations on one image do not exclude each other. It
is created when missing; it must not be on shared storage.

Possible values:
    * An absolute path

Related options:
    * ``ovirt_lease_timeout``
"""),
        cfg.StrOpt("ovirt_run_path",
                   default=DEFAULTS["ovirt_run_path"],
                   help="""
A host-local directory for the state of attached volumes: one
qemu-storage-daemon per attached volume keeps its QMP socket, pid file and
the raw view the iSCSI target serves in ``<path>/attached/<image id>/``.

Keep it on a tmpfs (``/run``): the daemons do not survive a reboot, and
neither should their state. The path must be short (a unix socket path
under it is at most 107 bytes).

Possible values:
    * An absolute path

Related options:
    * ``ovirt_export_protocol`` (Cinder driver)
"""),
        cfg.FloatOpt("ovirt_qemu_img_timeout",
                     default=DEFAULTS["ovirt_qemu_img_timeout"], min=1,
                     help="""
How long, in seconds, a short ``qemu-img`` command (info, create, resize,
an unsafe rebase) may run before it is killed and the operation fails.

Possible values:
    * A number of seconds, at least 1

Related options:
    * ``ovirt_copy_stall_timeout``
"""),
        cfg.FloatOpt("ovirt_copy_stall_timeout",
                     default=DEFAULTS["ovirt_copy_stall_timeout"], min=1,
                     help="""
How long, in seconds, a copy (``qemu-img convert``, ``commit``, a safe
``rebase``) may go without progress before it is killed and the operation
fails. A copy that keeps moving data is never killed, however long it
takes.

Possible values:
    * A number of seconds, at least 1

Related options:
    * ``ovirt_qemu_img_timeout``
"""),
        cfg.StrOpt("ovirt_file_owner",
                   help="""
The owner of the files and directories the engine creates in the pool's
domains (new domains, images, volume data, metadata and leases).

oVirt hosts run vdsm as user ``vdsm`` (uid 36) and expect it to own a
domain's files; set this where the domains are shared with oVirt. Every
service sharing the pool should use the same value. Changing the owner
needs root (or CAP_CHOWN).

Possible values:
    * Unset: files belong to the user of the process that creates them
    * A user name (``vdsm``) or a numeric uid (``36``)

Related options:
    * ``ovirt_file_group``
"""),
        cfg.StrOpt("ovirt_file_group",
                   help="""
The group of the files and directories the engine creates in the pool's
domains. Files are mode 0660 and directories 0775 whatever the umask, so
the group can read and write them.

Possible values:
    * Unset: the group of the process that creates them
    * A group name (``kvm``) or a numeric gid (``36``, oVirt's ``kvm``)

Related options:
    * ``ovirt_file_owner``
"""),
    ]


def lease_manager(opts: Any) -> lease.LeaseManager:
    """The lease manager the options of ``opts`` configure."""
    return lease.make_lease_manager(
        opts.ovirt_lease_backend, host_id=opts.ovirt_host_id,
        io_timeout=opts.ovirt_io_timeout,
        lease_timeout=opts.ovirt_lease_timeout,
        lock_path=opts.ovirt_lock_path)


def ownership(opts: Any) -> sd.Ownership:
    """The owner and group ``opts`` configure for new files (names are
    resolved on this host); raises :class:`errors.InvalidParameter`."""
    return sd.Ownership.resolve(getattr(opts, "ovirt_file_owner", None),
                                getattr(opts, "ovirt_file_group", None))


def open_pool(opts: Any, *, recover: bool = False,
              listeners: Iterable[Callable[[Any], Any]] = (),
              engine: bool = True) -> StoragePool:
    """Open the pool ``opts`` configures, ready for work.

    Builds the lease manager, opens the pool from ``ovirt_domain_paths``,
    prepares every domain's lease areas and, with ``recover``, finishes or
    reverts the unfinished operations in the logbook. ``listeners`` are
    TaskFlow listener factories passed to the pool's flow runner.
    ``engine``: import the modules of mutating work now, in this thread
    (:func:`pool.load_engine`), so that a service's request threads find
    them imported; False for a caller that only reads (the CLI's
    read-only commands), whose first mutating call would import them.
    Raises :class:`errors.StorageError` or ``OSError``.
    """
    from ovirt_cinder.storage.pool import StoragePool
    from ovirt_cinder.storage.pool import load_engine

    if engine:
        load_engine()

    if not opts.ovirt_domain_paths:
        raise errors.InvalidParameter(
            name="ovirt_domain_paths", value=[],
            reason="no mount directory of the pool is configured")
    qemuimg.set_timeouts(opts.ovirt_qemu_img_timeout,
                         opts.ovirt_copy_stall_timeout)
    leases = lease_manager(opts)
    pool = StoragePool.open(
        opts.ovirt_domain_paths, pool_id=opts.ovirt_pool_uuid or None,
        lease_manager=leases,
        flow_connection=opts.ovirt_flow_connection or None,
        listeners=listeners, ownership=ownership(opts),
        run_path=opts.ovirt_run_path)
    for dom in pool.domains.values():
        leases.init_domain(dom)
    if recover:
        pool.recover()
    return pool

