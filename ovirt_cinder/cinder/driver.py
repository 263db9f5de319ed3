"""Cinder volume driver for oVirt file storage domains.

One backend section serves one storage pool; every data domain of the pool
found under ``ovirt_domain_paths`` is one Cinder pool named by its
``sd_id``. A Cinder volume is the image ``volume.name_id``; its leaf volume
is the active layer. A Cinder snapshot is a frozen volume of that image
whose DESCRIPTION names the snapshot id (``snapshot.provider_location`` if
set, which is how managed snapshots keep their original id, else
``snapshot.id``).

Attach (``ovirt_export_protocol``; see :mod:`ovirt_cinder.storage.attach`
and ``doc/source/admin/cinder.rst``): ``create_export`` starts a
qemu-storage-daemon that opens the volume's chain and serves its guest
view as a raw file; ``remove_export`` stops it, ``ensure_export`` finds it
again (or starts it) after a restart. Then:

* ``iscsi`` (default): Cinder's target helper (``target_helper``) exports
  that view as LUN 1 of a target per volume with CHAP credentials
  (``provider_auth``); ``initialize_connection`` is the helper's.
* ``local``: ``driver_volume_type: local`` with the view as
  ``device_path``, for consumers on this host (backup, host-assisted
  migration).
* ``nfs``: on NFS domains, ``driver_volume_type: nfs`` with ``export``,
  ``name`` (``<sd_id>/images/<img>/<leaf>``) and ``format``; Nova opens
  the chain itself, so snapshots and extends of attached volumes are
  refused.

While a daemon serves a volume, snapshots, their deletion (merges) and
extends go through it live; a revert is refused; a clone or an upload of
it reads a temporary live snapshot, merged back afterwards.

Image transfer never goes through an attachment: ``copy_image_to_volume``
downloads to ``image_conversion_dir``, inspects the untrusted bytes
(:func:`ovirt_cinder.storage.inspect.inspect_untrusted`) and imports them;
``copy_volume_to_image`` exports a self-contained copy of the chain and
uploads it with Cinder's ``image_utils.upload_volume``.

Active-active (``SUPPORTS_ACTIVE_ACTIVE``): several cinder-volume services
of one Cinder ``cluster`` may serve the pool, each with the same backend
section, sharing the logbook; across hosts they need the ``sanlock`` lease
backend. Besides the recovery when it starts, each service runs one every
``ovirt_recovery_interval`` seconds (:meth:`OvirtVolumeDriver.
_recover_pending`), which finishes the flows its own host left and, once
sanlock declares another host dead, that host's. Attached volumes' daemons
are host-local (``ovirt_run_path``): see "Active-active" in
``doc/source/admin/cinder.rst`` for what that asks of a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
from collections.abc import Iterator
from typing import Any

from cinder import context as cinder_context
from cinder import exception
from cinder import interface
from cinder import objects
from cinder.common import constants
from cinder.image import image_utils
from cinder.volume import driver
from cinder.volume import volume_utils
from cinder.volume.targets import tgt as tgt_target
from oslo_config import cfg
from oslo_service import loopingcall
from oslo_utils import excutils
from oslo_utils import importutils

from ovirt_cinder.cinder import image_cache
from ovirt_cinder.cinder import manageable
from ovirt_cinder.cinder import options
from ovirt_cinder.cinder import tgt
from ovirt_cinder.cinder.translate import engine_errors
from ovirt_cinder.storage import config
from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import description
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import flows
from ovirt_cinder.storage import inspect
from ovirt_cinder.storage import validate
from ovirt_cinder.storage.pool import StoragePool

__all__ = ["OvirtVolumeDriver", "parse_location"]

LOG = logging.getLogger(__name__)
CONF = cfg.CONF
options.register(CONF)

GiB = sc.GiB
LOCATION_SCHEME = "ovirt"
_FORMATS = {"raw": sc.VolumeFormat.RAW, "qcow2": sc.VolumeFormat.COW}
_ALLOCATIONS = {"sparse": sc.Preallocation.SPARSE,
                "preallocated": sc.Preallocation.PREALLOCATED}
# How long a periodic recovery pass waits for the image leases of one
# unfinished flow: a flow running on this host holds them, and is left
# to finish (BUSY) rather than waited for (ovirt_lease_timeout, 60 s).
RECOVERY_LEASE_TIMEOUT = 1.0


def parse_location(url: str) -> tuple[str, str, str, str] | None:
    """(pool, sd, img, vol) of ``ovirt://<pool>/<sd>/<img>/<vol>``.

    Returns None for other schemes; raises InvalidUUID for a malformed
    oVirt location.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != LOCATION_SCHEME:
        return None
    ids = [parts.netloc, *parts.path.strip("/").split("/")]
    if len(ids) != 4:
        raise errors.InvalidParameter(name="location", value=url,
                                      reason="expected 4 UUIDs")
    names = ("pool id", "domain id", "image id", "volume id")
    pool_id, sd_id, img_id, vol_id = (
        validate.check_uuid(v, n) for v, n in zip(ids, names))
    return pool_id, sd_id, img_id, vol_id


@interface.volumedriver
class OvirtVolumeDriver(driver.VolumeDriver):
    """Volumes as images of oVirt file storage domains (format V5)."""

    VERSION = "1.0.0"
    CI_WIKI_NAME = "oVirt_Cinder_CI"
    # Several cinder-volume services of one ``cluster`` may serve the
    # pool: image leases serialise the operations of one host, the SDM
    # lease and each flow's plan check fence the hosts (sanlock), the
    # logbook is shared, and a periodic recovery pass takes over a dead
    # host's flows (ovirt_recovery_interval). doc/source/admin/cinder.rst,
    # "Active-active", has what a cluster needs.
    SUPPORTS_ACTIVE_ACTIVE = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.configuration.append_config_values(options.OVIRT_OPTS)
        self.pool: StoragePool | None = None
        # The periodic recovery pass (ovirt_recovery_interval).
        self._recovery: Any = None
        self.target_driver: Any = None
        if self.configuration.safe_get("ovirt_export_protocol") == "iscsi":
            # Cinder's own target helpers (tgtadm, lioadm), as the LVM
            # driver builds them.
            helper = self.configuration.safe_get("target_helper")
            self.target_driver = importutils.import_object(
                self.target_mapping[helper],
                configuration=self.configuration, executor=self._execute)

    @staticmethod
    def get_driver_options() -> list[cfg.Opt]:
        return list(options.OVIRT_OPTS)

    # Setup

    def do_setup(self, context: Any) -> None:
        conf = self.configuration
        if not conf.ovirt_domain_paths:
            raise exception.InvalidConfigurationValue(
                option="ovirt_domain_paths", value="")
        with engine_errors():
            # Finish or revert what a crashed cinder-volume left unfinished.
            self.pool = config.open_pool(conf, recover=True)
        if not conf.ovirt_copy_offload:
            for dom in self.pool.domains.values():
                dom.copy_offload = False
        if self.cluster_name and any(self._export_mode(sd_id) != "nfs"
                                     for sd_id in self.pool.domains):
            LOG.warning(
                "Cluster %s: attached volumes are served by daemons that "
                "only the host that attached them sees (ovirt_run_path); "
                "every cinder-volume of the cluster must run on this host, "
                "see 'Active-active' in the driver's documentation",
                self.cluster_name)
        self._start_recovery(conf.ovirt_recovery_interval)

    def _start_recovery(self, interval: int) -> None:
        """Run :meth:`_recover_pending` every ``interval`` seconds (none
        if 0); the first pass is ``interval`` seconds from now, since
        opening the pool has just recovered."""
        self._stop_recovery()
        if interval <= 0:
            return
        LOG.info("Recovering unfinished storage operations every %d s",
                 interval)
        self._recovery = loopingcall.FixedIntervalLoopingCall(
            self._recover_pending)
        self._recovery.start(interval=interval, initial_delay=interval)

    def _stop_recovery(self) -> None:
        recovery, self._recovery = self._recovery, None
        if recovery is not None:
            recovery.stop()

    def _recover_pending(self) -> None:
        """One periodic recovery pass: finish or revert the unfinished
        flows this service may run (its host's, a dead host's; see
        :meth:`StoragePool.recover`). A flow running on this host is left
        to it (``BUSY``) after a short wait, and tried again next pass.

        Never raises: a looping call whose function raises stops for
        good; a failure is logged and the next pass tries again.
        """
        pool = self.pool
        if pool is None:
            return
        try:
            done = pool.recover(lease_timeout=RECOVERY_LEASE_TIMEOUT)
        except Exception:
            LOG.exception("Periodic recovery of unfinished storage "
                          "operations failed; the next pass tries again")
            return
        for name, outcome in done:
            # BUSY and SKIPPED: left for later, nothing done; the pool
            # logs each book's outcome.
            if outcome not in (flows.BUSY, flows.SKIPPED):
                LOG.info("Periodic recovery of storage flow %s: %s", name,
                         outcome)

    def check_for_setup_error(self) -> None:
        if self.pool is None:
            raise exception.VolumeDriverException(
                message="storage pool is not open")
        with engine_errors():
            self.pool.master  # noqa: B018 -- raises without a master

    # Helpers

    @property
    def _pool(self) -> StoragePool:
        if self.pool is None:
            raise exception.VolumeDriverException(
                message="storage pool is not open")
        return self.pool

    def _sd_id(self, volume: Any) -> str:
        """The domain of an existing volume (its host pool, or a search)."""
        sd_id = volume_utils.extract_host(volume.host, "pool")
        if sd_id in self._pool.domains and \
                self._pool.domain(sd_id).has_image(volume.name_id):
            return sd_id
        with engine_errors(volume_id=volume.id):
            return self._pool.find_image(volume.name_id)

    def _target_sd_id(self, volume: Any) -> str:
        """The domain a new volume goes to: the pool the scheduler chose."""
        sd_id = volume_utils.extract_host(volume.host, "pool")
        if sd_id in self._pool.domains:
            return sd_id
        if sd_id is not None:
            raise exception.InvalidHost(reason=f"pool {sd_id} is not a "
                                        "domain of this backend")
        doms = self._pool.domains.values()
        return max(doms, key=lambda d: d.stats().free).sd_id

    def _spec(self, volume: Any, key: str, default: str) -> str:
        vtype = volume.volume_type if volume.volume_type_id else None
        specs = vtype.extra_specs if vtype else {}
        return (specs or {}).get(f"ovirt:{key}", default)

    def _format(self, volume: Any) -> sc.VolumeFormat:
        # Also for the target of a host-assisted migration or retype:
        # Cinder's copy writes the guest's bytes into the target's view,
        # whatever its format.
        name = self._spec(volume, "volume_format",
                          self.configuration.ovirt_volume_format)
        if name not in _FORMATS:
            raise exception.InvalidVolumeType(reason=f"format {name}")
        return _FORMATS[name]

    def _allocation(self, volume: Any) -> sc.Preallocation:
        name = self._spec(volume, "volume_allocation",
                          self.configuration.ovirt_volume_allocation)
        if name not in _ALLOCATIONS:
            raise exception.InvalidVolumeType(reason=f"allocation {name}")
        return _ALLOCATIONS[name]

    @staticmethod
    def _snap_id(snapshot: Any) -> str:
        return snapshot.provider_location or snapshot.id

    # Volumes

    def create_volume(self, volume: Any) -> None:
        sd_id = self._target_sd_id(volume)
        with engine_errors(volume_id=volume.id):
            self._pool.create_volume(
                sd_id, volume.name_id, volume.size * GiB,
                fmt=self._format(volume), prealloc=self._allocation(volume))

    def delete_volume(self, volume: Any) -> None:
        try:
            sd_id = self._sd_id(volume)
        except exception.VolumeNotFound:
            LOG.info("Volume %s is already gone", volume.id)
            return
        with engine_errors(volume_id=volume.id):
            tree = self._pool.image(sd_id, volume.name_id)
            if tree.snapshots():
                raise exception.VolumeIsBusy(volume_name=volume.name)
            copies = _template_copies(tree)
            self._pool.delete_image(sd_id, volume.name_id)
        for tmpl_img in copies:
            self._collect_template_copy(sd_id, tmpl_img)

    def _collect_template_copy(self, sd_id: str, tmpl_img: str) -> None:
        """Remove the copy of a Glance template that clone_image made in
        this domain, if no volume uses it and the image is deleted."""
        try:
            if self._pool.collect_template_copy(sd_id, tmpl_img):
                LOG.info("Removed the unused copy of image %s in domain "
                         "%s", tmpl_img, sd_id)
        except errors.StorageError as e:
            LOG.warning("Could not collect the copy of image %s in domain "
                        "%s (kept): %s", tmpl_img, sd_id, e)

    def extend_volume(self, volume: Any, new_size: int) -> None:
        """Grow the volume; an attached one live, in its daemon, and its
        iSCSI target is then told the new size (Cinder's target helper
        ``extend_target``, as the LVM driver does)."""
        self._refuse_nfs_attached(volume, "extend")
        sd_id = self._sd_id(volume)
        with engine_errors(volume_id=volume.id):
            self._pool.extend(sd_id, volume.name_id, new_size * GiB)
            served = self._pool.attached(volume.name_id)
        if served and self._export_mode(sd_id) == "iscsi":
            self._reopen_target(volume)

    def _reopen_target(self, volume: Any) -> None:
        """Make the target serve the view anew (its new size, or a new
        daemon's view) with Cinder's ``extend_target``; with tgtd, wait
        for the initiators to log in again (:mod:`tgt`)."""
        iqn = f"{self.configuration.target_prefix}{volume.name}"
        tgtadm = isinstance(self.target_driver, tgt_target.TgtAdm)
        before = tgt.sessions(iqn) if tgtadm else 0
        try:
            self.target_driver.extend_target(volume)
        except Exception as e:
            LOG.exception("Volume %s: its iSCSI target was not updated",
                          volume.id)
            raise exception.TargetUpdateFailed(volume_id=volume.id) from e
        if before:
            tgt.wait_sessions(iqn, before)

    def create_cloned_volume(self, volume: Any, src_vref: Any) -> None:
        src_sd = self._sd_id(src_vref)
        with engine_errors(volume_id=src_vref.id):
            self._pool.clone(
                src_sd, src_vref.name_id, volume.name_id,
                dst_sd_id=self._target_sd_id(volume),
                size=volume.size * GiB, fmt=self._format(volume),
                prealloc=self._allocation(volume))

    # Snapshots

    def create_snapshot(self, snapshot: Any) -> None:
        """Freeze the leaf; of an attached volume live, in its daemon."""
        volume = snapshot.volume
        self._refuse_nfs_attached(volume, "snapshot")
        sd_id = self._sd_id(volume)
        with engine_errors(volume_id=volume.id, snapshot_id=snapshot.id):
            self._pool.snapshot(sd_id, volume.name_id,
                                self._snap_id(snapshot))

    def delete_snapshot(self, snapshot: Any) -> None:
        """Merge the snapshot away; of an attached volume live."""
        volume = snapshot.volume
        self._refuse_nfs_attached(volume, "delete a snapshot of")
        try:
            sd_id = self._sd_id(volume)
            with engine_errors(volume_id=volume.id,
                               snapshot_id=snapshot.id):
                self._pool.delete_snapshot(sd_id, volume.name_id,
                                           self._snap_id(snapshot))
        except (exception.VolumeNotFound, exception.SnapshotNotFound):
            LOG.info("Snapshot %s is already gone", snapshot.id)

    def create_volume_from_snapshot(self, volume: Any,
                                    snapshot: Any) -> None:
        src = snapshot.volume
        src_sd = self._sd_id(src)
        with engine_errors(volume_id=src.id, snapshot_id=snapshot.id):
            self._pool.clone(
                src_sd, src.name_id, volume.name_id,
                snap_id=self._snap_id(snapshot),
                dst_sd_id=self._target_sd_id(volume),
                size=volume.size * GiB, fmt=self._format(volume),
                prealloc=self._allocation(volume))

    def revert_to_snapshot(self, context: Any, volume: Any,
                           snapshot: Any) -> None:
        sd_id = self._sd_id(volume)
        with engine_errors(volume_id=volume.id, snapshot_id=snapshot.id):
            self._pool.revert_to_snapshot(sd_id, volume.name_id,
                                          self._snap_id(snapshot))
            leaf = self._pool.leaf(sd_id, volume.name_id)
            if leaf.meta.capacity < volume.size * GiB:
                self._pool.extend(sd_id, volume.name_id, volume.size * GiB)

    # Attach

    def _export_mode(self, sd_id: str) -> str:
        """``iscsi``, ``local`` or ``nfs`` for volumes of ``sd_id``."""
        mode = self.configuration.ovirt_export_protocol
        if mode == "nfs":
            dom = self._pool.domain(sd_id)
            if dom.metadata.type != sc.DomainType.NFS:
                return "local"
        return mode

    def _view(self, volume: Any) -> str:
        """Serve the volume's guest view from its daemon; its path."""
        with engine_errors(volume_id=volume.id):
            return self._pool.attach(self._sd_id(volume), volume.name_id)

    def create_export(self, context: Any, volume: Any,
                      connector: Any) -> dict | None:
        mode = self._export_mode(self._sd_id(volume))
        if mode == "nfs":
            return None
        view = self._view(volume)
        if mode != "iscsi":
            return None
        try:
            export = self.target_driver.create_export(context, volume, view)
        except Exception:
            with excutils.save_and_reraise_exception():
                self._detach(volume)
        return {"provider_location": export["location"],
                "provider_auth": export["auth"]}

    def ensure_export(self, context: Any, volume: Any) -> dict | None:
        """After a restart: the daemon (still running, or started again)
        and the target serve the volume as before."""
        mode = self._export_mode(self._sd_id(volume))
        if mode == "nfs":
            return None
        restarted = self._pool.attached(volume.name_id) is None
        view = self._view(volume)
        if mode != "iscsi":
            return None
        update = self.target_driver.ensure_export(context, volume, view)
        if restarted:
            # A target that outlived its daemon holds the dead daemon's
            # view open: make the target open the new one.
            LOG.info("Serving volume %s from a new daemon; reopening its "
                     "target", volume.id)
            self._reopen_target(volume)
        return update

    def remove_export(self, context: Any, volume: Any) -> None:
        try:
            sd_id = self._sd_id(volume)
        except exception.VolumeNotFound:
            # Its image is gone: nothing to serve, and delete_volume must
            # still run (it treats a missing image as deleted).
            LOG.warning("Volume %s has no image %s; removing only its "
                        "target", volume.id, volume.name_id)
            if self.configuration.ovirt_export_protocol == "iscsi":
                self.target_driver.remove_export(context, volume)
            return
        if self._export_mode(sd_id) == "iscsi":
            self.target_driver.remove_export(context, volume)
        self._detach(volume)

    def _detach(self, volume: Any) -> None:
        with engine_errors(volume_id=volume.id):
            self._pool.detach(self._sd_id(volume), volume.name_id)

    def initialize_connection(self, volume: Any, connector: Any,
                              initiator_data: Any = None) -> dict:
        sd_id = self._sd_id(volume)
        mode = self._export_mode(sd_id)
        if mode == "iscsi":
            return self.target_driver.initialize_connection(volume,
                                                            connector)
        if mode == "local":
            # create_export started the daemon: its view, without a
            # second attach (lease, chain check, QMP) when it runs.
            path = self._pool.attached(volume.name_id) or self._view(volume)
            return {"driver_volume_type": "local",
                    "data": {"device_path": path}}
        with engine_errors(volume_id=volume.id):
            dom = self._pool.domain(sd_id)
            leaf = self._pool.leaf(sd_id, volume.name_id)
        name = f"{sd_id}/{sc.IMAGES}/{volume.name_id}/{leaf.vol_id}"
        return {"driver_volume_type": "nfs", "data": {
            "export": dom.metadata.remote_path, "name": name,
            "format": leaf.qemu_format}}

    def validate_connector(self, connector: dict) -> None:
        if self.target_driver is not None:
            self.target_driver.validate_connector(connector)

    def terminate_connection(self, volume: Any, connector: Any,
                             **kwargs: Any) -> None:
        if self._export_mode(self._sd_id(volume)) == "iscsi":
            self.target_driver.terminate_connection(volume, connector,
                                                    **kwargs)

    def _refuse_nfs_attached(self, volume: Any, operation: str) -> None:
        """Nova opens an NFS-attached chain itself: changing its files
        behind the guest is never done (no Nova-assisted snapshots)."""
        if (volume.attach_status == "attached"
                and self._export_mode(self._sd_id(volume)) == "nfs"):
            raise exception.InvalidVolume(
                reason=f"cannot {operation} volume {volume.id}: it is "
                "attached over NFS and the guest writes its files; detach "
                "it, or serve volumes with ovirt_export_protocol = iscsi")

    # Images

    def copy_image_to_volume(self, context: Any, volume: Any,
                             image_service: Any, image_id: str,
                             disable_sparse: bool = False) -> None:
        sd_id = self._sd_id(volume)
        meta = image_service.show(context, image_id)
        limit = self.configuration.ovirt_max_image_virtual_size_gb * GiB
        with _downloaded(context, image_service, image_id, volume) as tmp:
            with engine_errors(image_id=image_id, hide={tmp: image_id}):
                found = inspect.inspect_untrusted(
                    tmp, declared_format=meta.get("disk_format"),
                    max_virtual_size=min(limit, volume.size * GiB),
                    name=image_id)
            LOG.info("Image %s is %s, virtual size %d", image_id,
                     found.format, found.virtual_size)
            with engine_errors(volume_id=volume.id, image_id=image_id,
                               hide={tmp: f"image {image_id}"}):
                self._pool.delete_image(sd_id, volume.name_id)
                self._pool.import_volume(
                    sd_id, volume.name_id, tmp,
                    inspect.qemu_format(found.format), volume.size * GiB,
                    fmt=self._format(volume),
                    prealloc=self._allocation(volume))

    def copy_volume_to_image(self, context: Any, volume: Any,
                             image_service: Any, image_meta: dict) -> None:
        sd_id = self._sd_id(volume)
        fmt = "qcow2" if image_meta.get("disk_format") == "qcow2" else "raw"
        store_id = base_ref = None
        if volume.volume_type_id and volume.volume_type:
            store_id = volume.volume_type.extra_specs.get(
                "image_service:store_id")
        if volume.glance_metadata:
            base_ref = volume.glance_metadata.get("image_id")
        with image_utils.temporary_file(prefix="ovirt_upload_") as tmp:
            with engine_errors(volume_id=volume.id):
                self._pool.export_volume(sd_id, volume.name_id, tmp,
                                         fmt=fmt)
            image_utils.upload_volume(
                context, image_service, image_meta, tmp, volume_format=fmt,
                run_as_root=False, store_id=store_id,
                base_image_ref=base_ref)

    def clone_image(self, context: Any, volume: Any, image_location: Any,
                    image_meta: dict, image_service: Any
                    ) -> tuple[dict | None, bool]:
        for url in _location_urls(image_location):
            try:
                found = parse_location(url)
            except errors.StorageError as e:
                LOG.warning("Ignoring image location %s: %s", url, e)
                continue
            if found and found[0] == self._pool.pool_id:
                cloned = self._thin_clone(volume, image_meta, *found[1:])
                return None, cloned
        return None, self._clone_cached(context, volume, image_meta or {},
                                        image_service)

    def _clone_cached(self, context: Any, volume: Any, image_meta: dict,
                      image_service: Any) -> bool:
        """A thin clone of the image's cache entry in the volume's domain,
        made first if missing (:mod:`ovirt_cinder.cinder.image_cache`);
        False (Cinder copies the image) when the image is not cached."""
        conf = self.configuration
        host = conf.ovirt_host_id
        cache_id = image_cache.entry_id(image_meta, host)
        if (not conf.ovirt_image_cache or cache_id is None
                or image_service is None
                or image_meta.get("container_format", "bare") != "bare"
                or self._allocation(volume) == sc.Preallocation.PREALLOCATED):
            return False
        image_id = image_meta["id"]
        sd_id = self._target_sd_id(volume)
        tmpl = image_cache.lookup(self._pool, sd_id, cache_id)
        if tmpl is None:
            tmpl = self._cache_image(context, volume, image_meta,
                                     image_service, sd_id, cache_id)
        if tmpl.meta.capacity > volume.size * GiB:
            raise exception.ImageUnacceptable(
                image_id=image_id, reason=f"its virtual size "
                f"{tmpl.meta.capacity} is larger than the volume")
        with engine_errors(volume_id=volume.id, image_id=image_id):
            try:
                self._pool.thin_clone(sd_id, cache_id, volume.name_id,
                                      size=volume.size * GiB)
            except errors.ImageNotFound:
                # Evicted meanwhile by another service of this host.
                LOG.info("Cache entry %s of image %s is gone; Cinder "
                         "copies the image", cache_id, image_id)
                return False
        image_cache.touch(self._pool, sd_id, cache_id)
        LOG.info("Volume %s is a thin clone of the cache entry %s of "
                 "image %s", volume.id, cache_id, image_id)
        return True

    def _cache_image(self, context: Any, volume: Any, image_meta: dict,
                     image_service: Any, sd_id: str, cache_id: str) -> Any:
        """Download, inspect and convert the image into a new cache entry,
        then keep the host's entries within their bounds."""
        conf = self.configuration
        image_id = image_meta["id"]
        limit = conf.ovirt_max_image_virtual_size_gb * GiB
        with _downloaded(context, image_service, image_id, volume) as tmp:
            with engine_errors(image_id=image_id, hide={tmp: image_id}):
                found = inspect.inspect_untrusted(
                    tmp, declared_format=image_meta.get("disk_format"),
                    max_virtual_size=limit, name=image_id)
            LOG.info("Caching image %s (%s, virtual size %d) in domain %s "
                     "as %s", image_id, found.format, found.virtual_size,
                     sd_id, cache_id)
            with engine_errors(volume_id=volume.id, image_id=image_id,
                               hide={tmp: f"image {image_id}"}):
                try:
                    tmpl = image_cache.add(self._pool, sd_id, cache_id,
                                           image_id, conf.ovirt_host_id,
                                           tmp, found)
                except errors.ImageExists:
                    tmpl = image_cache.lookup(self._pool, sd_id, cache_id)
                    if tmpl is None:
                        raise
        image_cache.evict(self._pool, sd_id, conf.ovirt_host_id,
                          max_count=conf.ovirt_image_cache_max_count,
                          max_bytes=conf.ovirt_image_cache_max_size_gb * GiB,
                          keep=cache_id)
        return tmpl

    def _thin_clone(self, volume: Any, image_meta: dict, tmpl_sd: str,
                    tmpl_img: str, tmpl_vol: str) -> bool:
        """An overlay on the template; False (not cloned) when the
        template is no copy-on-write base for this image."""
        sd_id = self._target_sd_id(volume)
        with engine_errors(volume_id=volume.id):
            tmpl = self._pool.image(tmpl_sd, tmpl_img).template()
            if tmpl is None or tmpl.vol_id != tmpl_vol:
                raise exception.ImageUnacceptable(
                    image_id=tmpl_img, reason="not a template volume")
            reason = _not_a_cow_base(tmpl, image_meta or {})
            if reason:
                LOG.info("Image %s is not cloned from its template (%s); "
                         "Cinder copies it", tmpl_img, reason)
                return False
            if not self._pool.domain(sd_id).has_image(tmpl_img):
                # Under the template's leases: concurrent first uses wait
                # for the first copy and reuse it.
                LOG.info("Copying template %s to domain %s", tmpl_img,
                         sd_id)
                self._pool.copy_image(tmpl_sd, tmpl_img, sd_id,
                                      template_copy=True)
            self._pool.thin_clone(sd_id, tmpl_img, volume.name_id,
                                  size=volume.size * GiB)
        return True

    # Migration

    def _same_pool_target(self, volume: Any, host: dict) -> str | None:
        """The target sd_id if ``host`` is another domain of our pool."""
        caps = host.get("capabilities") or {}
        if caps.get("location_info") != self._location_info():
            return None
        sd_id = volume_utils.extract_host(host["host"], "pool")
        if sd_id not in self._pool.domains:
            return None
        return sd_id

    def _location_info(self) -> str:
        return f"{LOCATION_SCHEME}:{self._pool.pool_id}"

    def migrate_volume(self, context: Any, volume: Any,
                       host: dict) -> tuple[bool, dict | None]:
        if (volume.attach_status == "attached"
                or self._pool.attached(volume.name_id)):
            # No live migration between domains yet: Cinder's generic
            # migration (Nova's swap) moves an attached volume.
            return False, None
        dst_sd = self._same_pool_target(volume, host)
        if dst_sd is None:
            return False, None
        src_sd = self._sd_id(volume)
        if src_sd == dst_sd:
            return True, _same_cluster_host(volume, host)
        with engine_errors(volume_id=volume.id):
            copies = _template_copies(
                self._pool.image(src_sd, volume.name_id))
            self._pool.copy_image(src_sd, volume.name_id, dst_sd,
                                  move=True)
        # The volume no longer links the template copy it left.
        for tmpl_img in copies:
            self._collect_template_copy(src_sd, tmpl_img)
        return True, None

    def retype(self, context: Any, volume: Any, new_type: Any, diff: Any,
               host: dict) -> tuple[bool, dict | None]:
        specs = (diff or {}).get("extra_specs", {})
        if any(k.startswith("ovirt:") for k in specs):
            # Format or allocation changes need a copy: let Cinder migrate.
            return False, None
        return self.migrate_volume(context, volume, host)

    def update_migrated_volume(self, context: Any, volume: Any,
                               new_volume: Any,
                               original_volume_status: str) -> dict:
        return {"_name_id": new_volume.name_id,
                "provider_location": new_volume.provider_location}

    # Manage

    def _cinder_volumes(self) -> list:
        """Cinder's volumes of this backend (its cluster, else its host),
        as VolumeManager._get_my_volumes finds them."""
        filters = ({"cluster_name": self.cluster_name} if self.cluster_name
                   else {"host": self.host})
        return list(objects.VolumeList.get_all(
            cinder_context.get_admin_context(), filters=filters))

    @staticmethod
    def _cinder_snapshots(volume_id: str) -> list:
        """Cinder's snapshots of a volume."""
        return list(objects.SnapshotList.get_all_for_volume(
            cinder_context.get_admin_context(), volume_id))

    def _managed_image(self, volume: Any, existing_ref: dict) -> tuple:
        img_id = existing_ref.get("source-name") or existing_ref.get(
            "source-id")
        try:
            img_id = validate.check_uuid(img_id, "image id")
            owner = next((v.id for v in self._cinder_volumes()
                          if v.name_id == img_id and v.id != volume.id),
                         None)
            if owner is not None:
                # Two volumes on one image: deleting either destroys the
                # other's data.
                raise errors.InvalidOperation(
                    operation="manage",
                    reason=f"image is volume {owner}'s already")
            sd_id = self._target_sd_id(volume)
            tree = self._pool.image(sd_id, img_id)
            if tree.template() is not None:
                raise errors.InvalidOperation(operation="manage",
                                              reason="template image")
            problems = tree.check()
            if problems:
                raise problems[0]
            return sd_id, img_id, tree.leaf()
        except (errors.StorageError, exception.InvalidHost) as e:
            raise exception.ManageExistingInvalidReference(
                existing_ref=existing_ref, reason=str(e)) from e

    def manage_existing(self, volume: Any, existing_ref: dict) -> dict:
        sd_id, img_id, leaf = self._managed_image(volume, existing_ref)
        if leaf.meta.capacity < volume.size * GiB:
            with engine_errors(volume_id=volume.id):
                self._pool.extend(sd_id, img_id, volume.size * GiB)
        return {"_name_id": None if img_id == volume.id else img_id}

    def manage_existing_get_size(self, volume: Any,
                                 existing_ref: dict) -> int:
        leaf = self._managed_image(volume, existing_ref)[2]
        return manageable.size_gb(leaf.meta.capacity)

    def unmanage(self, volume: Any) -> None:
        LOG.info("Unmanaged volume %s keeps image %s", volume.id,
                 volume.name_id)

    def get_manageable_volumes(self, cinder_volumes: list, marker: Any,
                               limit: int, offset: int, sort_keys: list,
                               sort_dirs: list) -> list[dict]:
        used = {v.name_id: v.id for v in cinder_volumes}
        with engine_errors():
            entries = manageable.image_entries(self._pool, used)
        return volume_utils.paginate_entries_list(
            entries, marker, limit, offset, sort_keys, sort_dirs)

    def _managed_snapshot(self, snapshot: Any, existing_ref: dict) -> tuple:
        snap_id = existing_ref.get("source-name") or existing_ref.get(
            "source-id")
        volume = snapshot.volume
        try:
            snap_id = validate.check_uuid(snap_id, "snapshot id")
            owner = next((s.id for s in self._cinder_snapshots(volume.id)
                          if self._snap_id(s) == snap_id
                          and s.id != snapshot.id), None)
            if owner is not None:
                raise errors.InvalidOperation(
                    operation="manage",
                    reason=f"it is snapshot {owner} already")
            sd_id = self._sd_id(volume)
            vol = self._pool.image(sd_id, volume.name_id).find_snapshot(
                snap_id)
            return snap_id, vol
        except (errors.StorageError, exception.VolumeNotFound) as e:
            raise exception.ManageExistingInvalidReference(
                existing_ref=existing_ref, reason=str(e)) from e

    def manage_existing_snapshot(self, snapshot: Any,
                                 existing_ref: dict) -> dict:
        snap_id = self._managed_snapshot(snapshot, existing_ref)[0]
        return {"provider_location": snap_id}

    def manage_existing_snapshot_get_size(self, snapshot: Any,
                                          existing_ref: dict) -> int:
        vol = self._managed_snapshot(snapshot, existing_ref)[1]
        return manageable.size_gb(vol.meta.capacity)

    def unmanage_snapshot(self, snapshot: Any) -> None:
        LOG.info("Unmanaged snapshot %s stays in image %s", snapshot.id,
                 snapshot.volume.name_id)

    def get_manageable_snapshots(self, cinder_snapshots: list, marker: Any,
                                 limit: int, offset: int, sort_keys: list,
                                 sort_dirs: list) -> list[dict]:
        used = {self._snap_id(s) for s in cinder_snapshots}
        volumes = []
        # Every volume of the backend: an unmanaged snapshot may be the
        # only one its volume had.
        for volume in self._cinder_volumes():
            try:
                volumes.append((volume.id, self._sd_id(volume),
                                volume.name_id))
            except exception.VolumeNotFound:
                continue
        entries = manageable.snapshot_entries(
            self._pool, sorted(set(volumes)), used)
        return volume_utils.paginate_entries_list(
            entries, marker, limit, offset, sort_keys, sort_dirs)

    # Stats

    def get_volume_stats(self, refresh: bool = False) -> dict:
        if refresh or not self._stats:
            self._update_volume_stats()
        return self._stats

    def _update_volume_stats(self) -> None:
        conf = self.configuration
        types = {d.metadata.type for d in self._pool.domains.values()}
        mode = conf.ovirt_export_protocol
        if mode == "iscsi":
            protocol = constants.ISCSI
        elif mode == "nfs" and types == {sc.DomainType.NFS}:
            protocol = constants.NFS
        else:
            protocol = constants.FILE
        self._stats = {
            "volume_backend_name": (conf.safe_get("volume_backend_name")
                                    or self.__class__.__name__),
            "vendor_name": "oVirt", "driver_version": self.VERSION,
            "storage_protocol": protocol,
            "sparse_copy_volume": True,
            "pools": [self._pool_stats(d)
                      for _, d in sorted(self._pool.domains.items())],
        }

    def _pool_stats(self, dom: Any) -> dict:
        conf = self.configuration
        st = dom.stats()
        free = st.free
        if dom.metadata.version < sc.DOMAIN_VERSION:
            # Readable, but not written until upgraded: no new volumes.
            LOG.warning("Storage domain %s is V%d: no new volumes until "
                        "`ovirt-storage domain upgrade %s`", dom.sd_id,
                        dom.metadata.version, dom.sd_id)
            free = 0
        return {
            "pool_name": dom.sd_id,
            "total_capacity_gb": round(st.total / GiB, 2),
            "free_capacity_gb": round(free / GiB, 2),
            "provisioned_capacity_gb": round(_provisioned(
                self._pool, dom.sd_id) / GiB, 2),
            "reserved_percentage": conf.reserved_percentage,
            "max_over_subscription_ratio": (
                volume_utils.get_max_over_subscription_ratio(
                    conf.max_over_subscription_ratio, supports_auto=False)),
            "thin_provisioning_support": True,
            "thick_provisioning_support": True,
            "multiattach": False,
            "online_extend_support": (
                conf.ovirt_export_protocol != "nfs"
                or dom.metadata.type != sc.DomainType.NFS),
            "QoS_support": False,
            "location_info": self._location_info(),
            "ovirt_domain_type": str(dom.metadata.type),
            "ovirt_domain_version": dom.metadata.version,
            "ovirt_copy_offload": conf.ovirt_copy_offload,
        }


def _not_a_cow_base(tmpl: Any, image_meta: dict) -> str | None:
    """Why the template ``tmpl`` may not be the copy-on-write base of the
    Glance image ``image_meta`` describes (None: it may).

    The template's real format (the format the store detected, else its
    volume format) must be raw or qcow2, agree with its volume format, and
    be the image's ``disk_format`` in a ``bare`` container.
    """
    real = description.get(tmpl.meta.description, "fmt") or tmpl.qemu_format
    if tmpl.meta.disktype == sc.DiskType.ISOF:
        real = "iso"
    if real not in _FORMATS:
        return f"its content is {real}"
    if _FORMATS[real] != tmpl.meta.format:
        return f"its content is {real} in a {tmpl.meta.format} volume"
    container = image_meta.get("container_format")
    if container != "bare":
        return f"container_format is {container}, not bare"
    declared = image_meta.get("disk_format")
    if declared != real:
        return f"disk_format is {declared}, its content is {real}"
    return None


def _same_cluster_host(volume: Any, host: dict) -> dict | None:
    """The model update of a volume that stays in its domain.

    Within one Cinder cluster (active-active) the scheduler names one of
    the cluster's services as the target of a retype or migration, and
    Cinder would record that service as the volume's ``host``: a volume
    whose data did not move would then seem to have moved. It keeps its
    host; any service of the cluster serves it."""
    cluster = host.get("cluster_name")
    if cluster and volume.cluster_name and (
            volume_utils.extract_host(cluster, "backend")
            == volume_utils.extract_host(volume.cluster_name, "backend")):
        return {"host": volume.host}
    return None


def _template_copies(tree: Any) -> list[str]:
    """The template copies (made by clone_image in another domain than
    the original's) that the image ``tree`` links."""
    return sorted({v.meta.image for v in tree.volumes.values()
                   if v.meta.image != tree.img_id
                   and description.get(v.meta.description, "copy")})


def _provisioned(pool: StoragePool, sd_id: str) -> int:
    """Sum of the virtual sizes of the images of a domain (of each
    template's, else its leaf's), from the domain's counters: one small
    read, whatever the number of images (a scan when they are bad)."""
    return pool.domain_counters(sd_id).provisioned


@contextlib.contextmanager
def _downloaded(context: Any, image_service: Any, image_id: str,
                volume: Any) -> Iterator[str]:
    """The image's bytes in a local file: Cinder's own download if the
    create flow already made one, else a temporary file of ours."""
    path = image_utils.TemporaryImages.for_image_service(
        image_service).get(context, image_id)
    if path:
        yield path
        return
    with image_utils.temporary_file(prefix="ovirt_image_") as tmp:
        image_utils.fetch(context, image_service, image_id, tmp,
                          volume.user_id, volume.project_id)
        yield tmp


def _location_urls(image_location: Any) -> list[str]:
    """URLs of Cinder's (direct_url, [{'url': ...}, ...]) location tuple."""
    if not image_location:
        return []
    direct_url, locations = image_location
    urls = [direct_url] if direct_url else []
    urls += [loc.get("url") for loc in locations or [] if loc.get("url")]
    return urls
