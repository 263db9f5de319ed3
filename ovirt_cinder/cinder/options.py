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
"""

from __future__ import annotations

from oslo_config import cfg

__all__ = ["OVIRT_OPTS", "register", "list_opts"]

SHARED_GROUP = "backend_defaults"

OVIRT_OPTS = [
    cfg.StrOpt(
        "ovirt_pool_uuid",
        help="UUID of the oVirt storage pool this backend serves.\n\n"
             "Possible values: a UUID, or unset to use the only pool whose "
             "master domain is found in ovirt_domain_paths.\n\n"
             "Related options: ovirt_domain_paths."),
    cfg.ListOpt(
        "ovirt_domain_paths", default=[],
        help="Mount directories holding the pool's file storage domains "
             "(<mount>/<sd_id>); local directories, POSIX or NFS mounts "
             "mounted by the operator. Each domain found becomes a Cinder "
             "pool named by its sd_id.\n\n"
             "Related options: ovirt_pool_uuid."),
    cfg.StrOpt(
        "ovirt_volume_format", default="raw", choices=["raw", "qcow2"],
        help="Format of new volumes. Snapshots always add qcow2 layers.\n\n"
             "Possible values: raw, qcow2.\n\n"
             "A volume type extra spec ovirt:volume_format overrides it."),
    cfg.StrOpt(
        "ovirt_volume_allocation", default="sparse",
        choices=["sparse", "preallocated"],
        help="Allocation of new volumes.\n\n"
             "Possible values: sparse (thin), preallocated (thick).\n\n"
             "A volume type extra spec ovirt:volume_allocation overrides it."),
    cfg.StrOpt(
        "ovirt_lease_backend", default="local", choices=["local", "sanlock"],
        help="How metadata changes are fenced.\n\n"
             "Possible values: local (flock, a single host), sanlock "
             "(several hosts; needs the sanlock lease module).\n\n"
             "Related options: ovirt_host_id."),
    cfg.IntOpt(
        "ovirt_host_id", default=1, min=1, max=250,
        help="The sanlock host id of this cinder-volume host (1-250), "
             "unique among the hosts sharing the pool.\n\n"
             "Related options: ovirt_lease_backend."),
    cfg.StrOpt(
        "ovirt_flow_connection", default="",
        help="Where unfinished storage operations are recorded so they "
             "can be finished or reverted after a crash.\n\n"
             "Possible values: empty (a directory in the master domain, "
             "master/tasks), or an SQLAlchemy URL such as "
             "mysql+pymysql://user:pass@host/ovirt_flows.\n\n"
             "Related options: ovirt_domain_paths. Every service sharing "
             "the pool (Cinder and Glance) must use the same value."),
    cfg.IntOpt(
        "ovirt_io_timeout", default=10, min=1,
        help="sanlock I/O timeout in seconds. Joining a domain takes "
             "about 2 x this plus 1 s; a dead host's lease is free "
             "again after about 8 x this plus 60 s.\n\n"
             "Related options: ovirt_lease_backend."),
    cfg.IntOpt(
        "ovirt_max_image_virtual_size_gb", default=1024, min=1,
        help="Largest virtual size, in GiB, of an image accepted by "
             "copy_image_to_volume. Larger images are refused before any "
             "data is written."),
    cfg.BoolOpt(
        "ovirt_copy_offload", default=True,
        help="Let copies within one domain use copy offload (reflink, "
             "qemu-img convert -C) where the filesystem supports it."),
]


def register(conf: cfg.ConfigOpts = cfg.CONF) -> None:
    """Register the options in the shared backend_defaults group."""
    conf.register_opts(OVIRT_OPTS, group=SHARED_GROUP)


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """The options for oslo-config-generator, by group."""
    return [(SHARED_GROUP, list(OVIRT_OPTS))]
