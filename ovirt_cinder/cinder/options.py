"""Configuration options of the oVirt file-domain Cinder driver.

The options are registered in Cinder's shared ``backend_defaults`` group so
that ``Configuration.append_config_values`` finds them in every backend
section, as Cinder's own drivers do. A backend section looks like::

    [ovirt1]
    volume_driver = ovirt_cinder.cinder.driver.OvirtVolumeDriver
    volume_backend_name = ovirt1
    ovirt_pool_uuid = 5a0c6c1e-...
    ovirt_domain_paths = /srv/ovirt/local1,/mnt/nfs1
    ovirt_volume_format = raw

``ovirt_domain_paths`` lists mount directories; each holds one or more
storage domains as ``<mount>/<sd_id>``. Each domain of the pool found there
becomes one Cinder pool named by its ``sd_id``.

The options that find, fence and log the pool (``ovirt_pool_uuid``,
``ovirt_domain_paths``, ``ovirt_lease_backend``, ``ovirt_host_id``,
``ovirt_io_timeout``, ``ovirt_flow_connection``, ``ovirt_lease_timeout``,
``ovirt_lock_path``) are :data:`ovirt_cinder.storage.config.POOL_OPTS`,
shared with the Glance store and the ``ovirt-storage`` CLI
(``ovirt-storage --config-file /etc/cinder/cinder.conf --backend ovirt1``
reads this section).
"""

from __future__ import annotations

from oslo_config import cfg

from ovirt_cinder.storage import config

__all__ = ["OVIRT_OPTS", "POOL_OPTS", "DRIVER_OPTS", "register",
           "list_opts"]

SHARED_GROUP = "backend_defaults"

# The options Cinder shares with the Glance store and the CLI.
POOL_OPTS = config.POOL_OPTS

# The options of the driver alone.
DRIVER_OPTS = [
    cfg.StrOpt(
        "ovirt_volume_format", default="raw", choices=["raw", "qcow2"],
        help="""
Format of new volumes. Snapshots always add qcow2 layers.

Possible values:
    * raw
    * qcow2

Related options:
    * A volume type extra spec ``ovirt:volume_format`` overrides it
"""),
    cfg.StrOpt(
        "ovirt_volume_allocation", default="sparse",
        choices=["sparse", "preallocated"],
        help="""
Allocation of new volumes.

Possible values:
    * sparse: thin
    * preallocated: thick

Related options:
    * A volume type extra spec ``ovirt:volume_allocation`` overrides it
"""),
    cfg.IntOpt(
        "ovirt_max_image_virtual_size_gb", default=1024, min=1,
        help="""
Largest virtual size, in GiB, of an image accepted by
copy_image_to_volume. Larger images are refused before any data is
written. ``ovirt-storage volume import`` applies the same default
(``--max-virtual-size``, 1 TiB).

Possible values:
    * A number of GiB

Related options:
    * None
"""),
    cfg.StrOpt(
        "ovirt_export_protocol", default="iscsi",
        choices=["iscsi", "local", "nfs"],
        help="""
How attached volumes are served. In every mode but ``nfs`` a
qemu-storage-daemon on this host opens the volume's chain and serves its
guest view as one raw file; snapshots, merges and extends of attached
volumes then go through that daemon, live.

Possible values:
    * iscsi: an iSCSI target per volume on that view, made by Cinder's
      target helper (``target_helper``: ``tgtadm`` or ``lioadm``), with
      CHAP credentials in the volume's ``provider_auth``. For Nova hosts
      anywhere.
    * local: ``driver_volume_type: local`` with the view's path, for a
      consumer on this host only (cinder-backup, host-assisted migration,
      tests).
    * nfs: on NFS domains, ``driver_volume_type: nfs`` with the leaf's
      path: Nova opens the qcow2 chain itself. Snapshots, merges and
      extends of attached volumes are then refused (they would change
      files a running guest writes). Other domains are served as
      ``local``.

Related options:
    * ``target_helper``, ``target_ip_address``, ``target_port``,
      ``target_prefix``, ``volumes_dir`` (Cinder's target options)
"""),
    cfg.BoolOpt(
        "ovirt_copy_offload", default=True,
        help="""
Let copies within one domain use copy offload (reflink, ``qemu-img
convert -C``) where the filesystem supports it.

Possible values:
    * true, false

Related options:
    * None
"""),
    cfg.BoolOpt(
        "ovirt_image_cache", default=True,
        help="""
Keep Glance images that are not templates of this pool (images of other
stores) as templates in the domains, so that volumes from one image are
thin clones of one converted copy. The first volume from an image
downloads and converts it into the volume's domain; later volumes from
the image in that domain take O(1). An image without a hash
(``os_hash_value`` or ``checksum``) and volumes of a type with
``ovirt:volume_allocation = preallocated`` are copied as without the
cache. Each storage host (``ovirt_host_id``) keeps its own entries. It
takes precedence over Cinder's image-volume cache.

Possible values:
    * true, false

Related options:
    * ``ovirt_image_cache_max_count``, ``ovirt_image_cache_max_size_gb``
"""),
    cfg.IntOpt(
        "ovirt_image_cache_max_count", default=50, min=0,
        help="""
Most cached images a storage host keeps per domain; the least recently
used go first. A removed entry's space is freed with the last volume
cloned from it.

Possible values:
    * 0: no limit
    * A number of images

Related options:
    * ``ovirt_image_cache``
"""),
    cfg.IntOpt(
        "ovirt_image_cache_max_size_gb", default=0, min=0,
        help="""
Most space, in GiB, the cached images of a storage host may take per
domain (allocated bytes); the least recently used go first. The entry
just made is always kept.

Possible values:
    * 0: no limit
    * A number of GiB

Related options:
    * ``ovirt_image_cache``
"""),
    cfg.IntOpt(
        "ovirt_recovery_interval", default=60, min=0,
        help="""
Seconds between passes that finish or revert unfinished storage
operations (flows): those of this service's own host id that a crash
left, and, with ``ovirt_lease_backend = sanlock``, those of another host
once sanlock declares that host dead, so that a surviving cinder-volume
of a cluster (active-active) takes over the flows of a dead one. The
service also runs one pass when it starts. A pass does not wait for a
flow that is running on this host: it tries again next time.

Possible values:
    * 0: only when the service starts
    * A number of seconds

Related options:
    * ``ovirt_lease_backend``, ``ovirt_host_id``: which hosts' flows a
      pass may take over
    * ``cluster`` ([DEFAULT]): Cinder active-active
"""),
]

# Everything a backend section may hold: what the driver registers and
# oslo-config-generator lists.
OVIRT_OPTS = [*POOL_OPTS, *DRIVER_OPTS]


def register(conf: cfg.ConfigOpts = cfg.CONF) -> None:
    """Register the options in the shared backend_defaults group."""
    conf.register_opts(OVIRT_OPTS, group=SHARED_GROUP)


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """The options for oslo-config-generator, by group."""
    return [(SHARED_GROUP, list(OVIRT_OPTS))]
