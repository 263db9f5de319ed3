"""Helpers of the API tier: Cinder and Glance over HTTP, known bytes.

:class:`Cloud` sends raw REST calls through an openstacksdk connection
(Keystone auth, the catalog's endpoints, Cinder microversions) and keeps
an undo stack: whatever a test creates is deleted by
:meth:`Cloud.cleanup`, newest first, even when the test fails half way.

Data is checked by content: :func:`pattern` is a raw disk with one byte
value per MiB and a zero hole; :meth:`Cloud.digest` uploads a volume to
Glance (``os-volume_upload_image``, raw) and hashes the first
:data:`CHECK_SIZE` bytes of the download.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    import openstack.connection
    import requests

MiB = 1024 * 1024
GiB = 1024 * MiB
CHECK_SIZE = 32 * MiB
TIMEOUT = 300.0
# Attachments' mode needs 3.54; manageable listings need 3.8.
MICROVERSION = "3.54"

TOP = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
STATE = os.path.abspath(os.environ.get("OVIRT_CLOUD_DIR",
                                       os.path.join(TOP, ".cloud")))
CINDER_CONF = os.path.join(STATE, "etc", "cinder", "cinder.conf")
# cinder-volume (ovirt1, ovirt2), then the cluster's services serving
# ovirt3: host a's and host b's.
VOLUME_LOGS = tuple(os.path.join(STATE, "log", f"cinder-volume{h}.log")
                    for h in ("", "-a", "-b"))

# This host as a consumer of ``driver_volume_type: local`` attachments.
CONNECTOR = {"host": socket.gethostname(), "ip": "127.0.0.1",
             "initiator": "iqn.2026-01.org.ovirt-cinder:tests-cloud",
             "platform": "x86_64", "os_type": "linux", "multipath": False}

RUN_ID = uuid.uuid4().hex[:8]
_REQ = re.compile(r"\[(?:None )?(req-[0-9a-f-]+)")
# Volume states still changing: cleanup waits for them to settle.
_BUSY = {"creating", "downloading", "uploading", "retyping", "attaching",
         "detaching", "maintenance", "backing-up", "restoring-backup",
         "extending", "deleting"}
# States of a resource on its way out (deleted or unmanaged).
_GOING = {"deleting", "unmanaging", "error_managing_deleting"}


class CloudError(Exception):
    """An API call or a wait did not give what the test needs (not an
    AssertionError: an xfail for a wrong answer must not hide it)."""


def unique(label: str) -> str:
    """A name no other run (or test) uses."""
    return f"apitest-{RUN_ID}-{label}-{uuid.uuid4().hex[:6]}"


# Known bytes


def pattern_writes(size: int = CHECK_SIZE) -> dict[int, int]:
    """MiB index -> byte of :func:`pattern`."""
    return {i: 0 if i == 1 else (i * 37 + 11) % 256
            for i in range(size // MiB)}


def pattern(size: int = CHECK_SIZE) -> bytes:
    """A raw disk: MiB ``i`` holds byte ``(37 i + 11) % 256``, MiB 1 is a
    hole of zeros (distinct values for the first 256 MiB)."""
    return overwrite(bytes(size), pattern_writes(size))


def overwrite(data: bytes, writes: dict[int, int]) -> bytes:
    """``data`` with each MiB index of ``writes`` filled with its byte."""
    buf = bytearray(data)
    for mib, byte in writes.items():
        buf[mib * MiB:(mib + 1) * MiB] = bytes([byte]) * MiB
    return bytes(buf)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Polling


def wait_for(what: str, probe: Callable[[], Any],
             timeout: float = TIMEOUT, interval: float = 1.0) -> Any:
    """Call ``probe`` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise CloudError(f"timed out after {timeout:.0f} s: {what}")
        time.sleep(interval)


# The storage side: ovirt-storage and the cinder-volume log


def storage(backend: str, *args: str) -> Any:
    """``ovirt-storage --backend <backend> --json <args>`` parsed."""
    cli = os.path.join(os.path.dirname(sys.executable), "ovirt-storage")
    argv = [cli, "--config-file", CINDER_CONF, "--backend", backend,
            "--json", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise CloudError(f"{' '.join(argv)}: {proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout)


def log_offset() -> dict[str, int]:
    """The size of each cinder-volume's log."""
    return {path: os.path.getsize(path) for path in VOLUME_LOGS}


def log_lines_about(ids: Iterable[str],
                    since: dict[str, int]) -> list[str]:
    """Lines the cinder-volumes wrote after ``since`` that name one of
    ``ids`` or belong to a request whose lines do (tracebacks name no
    volume)."""
    lines = []
    for path, offset in since.items():
        with open(path, errors="replace") as f:
            f.seek(offset)
            lines += f.read().splitlines()
    ids = list(ids)
    reqs = {m.group(1) for line in lines if any(i in line for i in ids)
            for m in [_REQ.search(line)] if m}
    return [line for line in lines if any(i in line for i in ids)
            or any(r in line for r in reqs)]


# The APIs


class Cloud:
    """Cinder and Glance of one connection, with an undo stack."""

    def __init__(self, conn: openstack.connection.Connection) -> None:
        self.conn = conn
        self._undo: list[tuple[str, Callable[[], None]]] = []
        # References managed again: their keep_managed_* undo is moot.
        self._managed: set[str] = set()

    # Plumbing

    def volume_api(self, method: str, url: str,
                   ok: Iterable[int] = (200, 202),
                   **kwargs: Any) -> requests.Response:
        kwargs.setdefault("microversion", MICROVERSION)
        resp = self.conn.block_storage.request(url, method, **kwargs)
        return _checked(resp, method, url, ok)

    def image_api(self, method: str, url: str,
                  ok: Iterable[int] = (200, 201, 204),
                  **kwargs: Any) -> requests.Response:
        resp = self.conn.image.request(url, method, **kwargs)
        return _checked(resp, method, url, ok)

    def on_cleanup(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def cleanup(self) -> None:
        """Undo everything, newest first; raise if anything failed."""
        failed = []
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as e:  # noqa: BLE001 -- report them all
                failed.append(f"{what}: {e}")
        if failed:
            raise CloudError("cleanup failed:\n" + "\n".join(failed))

    # Volumes

    def create_volume(self, label: str, wait: bool = True,
                      **fields: Any) -> dict:
        body = {"size": 1, "name": unique(label), **fields}
        vol = self.volume_api("POST", "/volumes",
                              json={"volume": body}).json()["volume"]
        self.on_cleanup(f"volume {vol['id']}",
                        lambda: self.delete_volume(vol["id"]))
        return self.wait_volume(vol["id"]) if wait else vol

    def volume(self, vol_id: str) -> dict | None:
        resp = self.volume_api("GET", f"/volumes/{vol_id}", ok=(200, 404))
        return resp.json()["volume"] if resp.status_code == 200 else None

    def wait_volume(self, vol_id: str, status: str = "available",
                    **fields: Any) -> dict:
        """Until the volume has ``status`` and ``fields``; fail at once on
        an error state."""
        def probe() -> dict | None:
            vol = self.volume(vol_id)
            if vol is None:
                raise CloudError(f"volume {vol_id} is gone")
            if vol["status"].startswith("error") or vol.get(
                    "migration_status") == "error":
                raise CloudError(f"volume {vol_id} failed: {vol}")
            want = {"status": status, **fields}
            return vol if all(vol.get(k) == v for k, v in
                              want.items()) else None
        return wait_for(f"volume {vol_id} {status} {fields}", probe)

    def delete_volume(self, vol_id: str) -> None:
        vol = wait_for(f"volume {vol_id} settles", lambda: _settled(
            self.volume(vol_id)))
        if vol["status"] == "gone":
            return
        for att in vol.get("attachments") or []:
            self.volume_api("DELETE", f"/attachments/{att['attachment_id']}",
                            ok=(200, 404))
        resp = self.volume_api("DELETE", f"/volumes/{vol_id}?cascade=true",
                               ok=(202, 400, 404))
        if resp.status_code == 400:
            self.volume_api("POST", f"/volumes/{vol_id}/action",
                            json={"os-force_delete": {}}, ok=(202, 404))
        self.wait_gone("volume", f"/volumes/{vol_id}")

    def wait_gone(self, kind: str, url: str) -> None:
        """Until a deleted (unmanaged) resource is gone; fail as soon as
        it leaves the deleting state (a refused delete: VolumeIsBusy)."""
        def probe() -> bool:
            resp = self.volume_api("GET", url, ok=(200, 404))
            if resp.status_code == 404:
                return True
            if resp.json()[kind]["status"] not in _GOING:
                raise CloudError(f"{kind} {url} is not deleted: "
                                 f"{resp.json()}")
            return False
        wait_for(f"{kind} {url} deleted", probe)

    def name_id(self, vol: dict) -> str:
        """The volume's image id on storage."""
        return vol.get("os-vol-mig-status-attr:name_id") or vol["id"]

    def image_tree(self, vol: dict) -> dict:
        """``ovirt-storage image show`` of the volume's image."""
        host = vol["os-vol-host-attr:host"]
        backend, sd_id = host.split("@", 1)[1].split("#")
        return storage(backend, "image", "show", sd_id, self.name_id(vol))

    def retype(self, vol_id: str, new_type: str) -> dict:
        self.volume_api("POST", f"/volumes/{vol_id}/action", json={
            "os-retype": {"new_type": new_type,
                          "migration_policy": "on-demand"}})
        return self.wait_volume(vol_id, volume_type=new_type,
                                migration_status="success")

    def unmanage_volume(self, vol_id: str) -> None:
        self.volume_api("POST", f"/volumes/{vol_id}/action",
                        json={"os-unmanage": {}})
        self.wait_gone("volume", f"/volumes/{vol_id}")

    def write(self, vol_id: str, writes: dict[int, int]) -> None:
        """Fill MiBs of the volume's guest view through a local
        attachment (as a host consumer would), then detach."""
        att = self.volume_api("POST", "/attachments", json={"attachment": {
            "volume_uuid": vol_id, "connector": CONNECTOR,
            "mode": "rw"}}).json()["attachment"]
        try:
            path = att["connection_info"]["device_path"]
            with open(path, "r+b") as f:
                for mib, byte in writes.items():
                    f.seek(mib * MiB)
                    f.write(bytes([byte]) * MiB)
                f.flush()
                os.fsync(f.fileno())
            self.volume_api("POST", f"/attachments/{att['id']}/action",
                            json={"os-complete": {}}, ok=(204,))
        finally:
            self.volume_api("DELETE", f"/attachments/{att['id']}")
        self.wait_volume(vol_id)

    # Snapshots

    def create_snapshot(self, vol_id: str, label: str) -> dict:
        snap = self.volume_api("POST", "/snapshots", json={"snapshot": {
            "volume_id": vol_id, "name": unique(label)}}).json()["snapshot"]
        self.on_cleanup(f"snapshot {snap['id']}",
                        lambda: self.delete_snapshot(snap["id"]))
        return self.wait_snapshot(snap["id"])

    def snapshot(self, snap_id: str) -> dict | None:
        resp = self.volume_api("GET", f"/snapshots/{snap_id}",
                               ok=(200, 404))
        return resp.json()["snapshot"] if resp.status_code == 200 else None

    def wait_snapshot(self, snap_id: str) -> dict:
        def probe() -> dict | None:
            snap = self.snapshot(snap_id)
            if snap is None or snap["status"].startswith("error"):
                raise CloudError(f"snapshot {snap_id} failed: {snap}")
            return snap if snap["status"] == "available" else None
        return wait_for(f"snapshot {snap_id} available", probe)

    def delete_snapshot(self, snap_id: str) -> None:
        snap = wait_for(f"snapshot {snap_id} settles", lambda: _settled(
            self.snapshot(snap_id)))
        if snap["status"] == "gone":
            return
        self.volume_api("DELETE", f"/snapshots/{snap_id}", ok=(202, 404))
        self.wait_gone("snapshot", f"/snapshots/{snap_id}")

    def unmanage_snapshot(self, snap_id: str) -> None:
        self.volume_api("POST", f"/snapshots/{snap_id}/action",
                        json={"os-unmanage": {}})
        self.wait_gone("snapshot", f"/snapshots/{snap_id}")

    # Manageable resources

    def manageable(self, kind: str, backend: str,
                   detail: bool = True) -> list[dict]:
        """GET /manageable_<kind>[/detail]?host=<host@backend>."""
        url = f"/manageable_{kind}{'/detail' if detail else ''}"
        resp = self.volume_api("GET", f"{url}?host={backend}", ok=(200,))
        return resp.json()[f"manageable-{kind}"]

    def manage_volume(self, host: str, img_id: str, vtype: str,
                      label: str) -> dict:
        vol = self.volume_api("POST", "/manageable_volumes", json={
            "volume": {"host": host, "ref": {"source-name": img_id},
                       "name": unique(label), "volume_type": vtype,
                       # null, the clients' default, is refused
                       "bootable": False}}).json()["volume"]
        self._managed.add(img_id)
        self.on_cleanup(f"managed volume {vol['id']}",
                        lambda: self.delete_volume(vol["id"]))
        return self.wait_volume(vol["id"])

    def manage_snapshot(self, vol_id: str, snap_ref: str,
                        label: str) -> dict:
        snap = self.volume_api("POST", "/manageable_snapshots", json={
            "snapshot": {"volume_id": vol_id,
                         "ref": {"source-name": snap_ref},
                         "name": unique(label)}}).json()["snapshot"]
        self._managed.add(snap_ref)
        self.on_cleanup(f"managed snapshot {snap['id']}",
                        lambda: self.delete_snapshot(snap["id"]))
        return self.wait_snapshot(snap["id"])

    def keep_managed_volume(self, host: str, img_id: str,
                            vtype: str) -> None:
        """On cleanup, an image still unmanaged is managed and deleted."""
        def undo() -> None:
            if img_id not in self._managed and _safe_entry(
                    self.manageable("volumes", _backend(host)), img_id):
                self.manage_volume(host, img_id, vtype, "leftover")
        self.on_cleanup(f"unmanaged image {img_id}", undo)

    def keep_managed_snapshot(self, vol: dict, snap_ref: str) -> None:
        """On cleanup, a snapshot still unmanaged (still in the volume's
        chain) is managed and deleted: else the volume's image cannot be
        deleted."""
        def undo() -> None:
            current = self.volume(vol["id"])
            if snap_ref in self._managed or current is None:
                return
            frozen = {v["snapshot_id"] for v in
                      self.image_tree(current)["volumes"]}
            if snap_ref in frozen:
                self.manage_snapshot(vol["id"], snap_ref, "leftover")
        self.on_cleanup(f"unmanaged snapshot {snap_ref}", undo)

    # Volume types

    def create_type(self, name: str, extra_specs: dict[str, str]) -> dict:
        vtype = self.volume_api("POST", "/types", json={"volume_type": {
            "name": name, "extra_specs": extra_specs}}).json()["volume_type"]
        self.on_cleanup(f"volume type {name}", lambda: self.volume_api(
            "DELETE", f"/types/{vtype['id']}", ok=(202, 404)))
        return vtype

    # Images

    def create_image(self, label: str, data: bytes) -> dict:
        """A raw/bare Glance image of ``data``, active."""
        img = self.image_api("POST", "/images", json={
            "name": unique(label), "disk_format": "raw",
            "container_format": "bare"}).json()
        self.on_cleanup(f"image {img['id']}",
                        lambda: self.delete_image(img["id"]))
        self.image_api("PUT", f"/images/{img['id']}/file", data=data,
                       headers={"Content-Type": "application/octet-stream"})
        return self.wait_image(img["id"])

    def image(self, image_id: str) -> dict | None:
        resp = self.image_api("GET", f"/images/{image_id}", ok=(200, 404))
        return resp.json() if resp.status_code == 200 else None

    def wait_image(self, image_id: str) -> dict:
        def probe() -> dict | None:
            img = self.image(image_id)
            if img is None or img["status"] in ("killed", "deleted"):
                raise CloudError(f"image {image_id} failed: {img}")
            return img if img["status"] == "active" else None
        return wait_for(f"image {image_id} active", probe)

    def delete_image(self, image_id: str) -> None:
        self.image_api("DELETE", f"/images/{image_id}", ok=(204, 404))

    def head(self, image_id: str, size: int = CHECK_SIZE) -> bytes:
        """The first ``size`` bytes of the image, streamed."""
        resp = self.image_api("GET", f"/images/{image_id}/file",
                              ok=(200,), stream=True)
        chunks, got = [], 0
        try:
            for chunk in resp.iter_content(MiB):
                chunks.append(chunk)
                got += len(chunk)
                if got >= size:
                    break
        finally:
            resp.close()
        return b"".join(chunks)[:size]

    def upload(self, vol_id: str, label: str) -> dict:
        """os-volume_upload_image (raw); the active image."""
        resp = self.volume_api("POST", f"/volumes/{vol_id}/action", json={
            "os-volume_upload_image": {
                "image_name": unique(label), "disk_format": "raw",
                "container_format": "bare", "force": False}})
        image_id = resp.json()["os-volume_upload_image"]["image_id"]
        self.on_cleanup(f"image {image_id}",
                        lambda: self.delete_image(image_id))
        img = self.wait_image(image_id)
        self.wait_volume(vol_id)
        return img

    def digest(self, vol: dict, label: str, size: int = CHECK_SIZE) -> str:
        """sha256 of the first ``size`` bytes of the volume, as Glance
        gets it from an upload."""
        img = self.upload(vol["id"], label)
        if img["size"] != vol["size"] * GiB:
            raise CloudError(f"upload of {vol['id']} is {img['size']} "
                             f"bytes, not {vol['size']} GiB: {img}")
        data = self.head(img["id"], size)
        self.delete_image(img["id"])
        return sha256(data)


def _checked(resp: requests.Response, method: str, url: str,
             ok: Iterable[int]) -> requests.Response:
    if resp.status_code not in tuple(ok):
        raise CloudError(f"{method} {url}: {resp.status_code} "
                         f"{resp.text[:2000]}")
    return resp


def _settled(obj: dict | None) -> dict | None:
    """``obj`` unless its status is still changing; gone is settled."""
    if obj is None:
        return {"status": "gone"}
    return None if obj["status"] in _BUSY else obj


def _backend(host: str) -> str:
    """``host@backend`` of ``host@backend#pool``."""
    return host.split("#", 1)[0]


def _safe_entry(entries: list[dict], ref: str) -> dict | None:
    return next((e for e in entries if e["safe_to_manage"]
                 and e["reference"] == {"source-name": ref}), None)
