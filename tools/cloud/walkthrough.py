"""A walk through the cloud of `make cloud` with the ``openstack`` client.

    . .cloud/openrc && python tools/cloud/walkthrough.py

Every step prints the command it runs, so the output reads as a tutorial;
every result is checked, data by content: an image of known bytes goes
into Glance (our store), becomes a volume on the O(1) path (an overlay on
the image's template, checked with ``ovirt-storage``), is snapshotted,
cloned, extended, reverted, migrated between the domains of one backend
and to the other backend, unmanaged and managed again, and finally
uploaded back to Glance and downloaded: the bytes must be the image's.
Exits non-zero at the first failed step; cleans up what it made, then
``ovirt-storage fsck`` must find both pools clean.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))
STATE = os.path.abspath(os.environ.get("OVIRT_CLOUD_DIR",
                                       os.path.join(TOP, ".cloud")))
CINDER_CONF = os.path.join(STATE, "etc", "cinder", "cinder.conf")
MiB = 1024 * 1024
TIMEOUT = 300


class WalkFailed(Exception):
    pass


def sh(*argv: str, parse: bool = True):
    print("$", shlex.join(argv), flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise WalkFailed(f"{argv[0]} failed:\n{proc.stdout}{proc.stderr}")
    if not parse:
        return proc.stdout
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def osc(*args: str, parse: bool = True):
    fmt = ["-f", "json"] if parse else []
    return sh("openstack", *args, *fmt, parse=parse)


def storage(backend: str, *args: str):
    return sh("ovirt-storage", "--config-file", CINDER_CONF, "--backend",
              backend, "--json", *args)


def wait(kind: str, ident: str, field: str, want: str,
         timeout: float = TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run(["openstack", kind, "show", ident, "-f",
                               "json"], capture_output=True, text=True)
        if proc.returncode == 0:
            shown = json.loads(proc.stdout)
            value = shown.get(field)
            if value == want:
                return shown
            if value in ("error", "error_extending", "error_restoring",
                         "error_managing", "killed"):
                raise WalkFailed(f"{kind} {ident}: {field}={value}")
        if time.monotonic() > deadline:
            raise WalkFailed(f"{kind} {ident}: {field} never became {want}")
        time.sleep(1)


def wait_gone(kind: str, ident: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while subprocess.run(["openstack", kind, "show", ident],
                         capture_output=True).returncode == 0:
        if time.monotonic() > deadline:
            raise WalkFailed(f"{kind} {ident} is never deleted")
        time.sleep(1)


def pattern_image(path: str, size: int) -> str:
    """A raw disk of ``size`` bytes: a pattern per MiB, a hole at 1 MiB."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(size // MiB):
            block = (b"\0" * MiB if i == 1 else
                     bytes([(i * 37 + 11) % 256]) * MiB)
            f.write(block)
            h.update(block)
    return h.hexdigest()


def sha256(path: str, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size if size is not None else os.path.getsize(path)
        while left:
            block = f.read(min(MiB, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


class Walk:
    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.volumes: list[str] = []
        self.snapshots: list[str] = []
        self.images: list[str] = []
        self.host = sh("hostname", parse=False).strip()

    def volume(self, name: str, *args: str) -> dict:
        created = osc("volume", "create", *args, name)
        self.volumes.append(created["id"])
        return wait("volume", created["id"], "status", "available")

    def pool_of(self, volume_id: str) -> str:
        return osc("volume", "show", volume_id)["os-vol-host-attr:host"]

    def image_show(self, volume: dict) -> dict:
        host = volume["os-vol-host-attr:host"]
        backend, sd_id = host.split("@")[1].split("#")
        img = volume.get("os-vol-mig-status-attr:name_id") or volume["id"]
        return storage(backend, "image", "show", sd_id, img)

    def download_check(self, volume_id: str, want: str, size: int,
                       name: str, fmt: str = "raw") -> None:
        """Upload the volume to Glance as ``fmt``, download it, compare
        its guest bytes with ``want``."""
        up = osc("image", "create", "--volume", volume_id,
                 "--disk-format", fmt, "--container-format", "bare", name)
        image_id = up["image_id"]
        self.images.append(image_id)
        wait("image", image_id, "status", "active")
        wait("volume", volume_id, "status", "available")
        out = os.path.join(self.tmp, f"{name}.{fmt}")
        osc("image", "save", "--file", out, image_id, parse=False)
        if fmt != "raw":
            raw = os.path.join(self.tmp, f"{name}.raw")
            sh("qemu-img", "convert", "-f", fmt, "-O", "raw", out, raw,
               parse=False)
            os.unlink(out)
            out = raw
        got = sha256(out, size)
        os.unlink(out)
        if got != want:
            raise WalkFailed(f"{name}: downloaded bytes differ")
        print(f"# {name}: the first {size // MiB} MiB are the image's")

    def run(self) -> None:
        size = 64 * MiB
        raw = os.path.join(self.tmp, "disk.raw")
        want = pattern_image(raw, size)

        print("# An image in Glance is a template in the ovirt1 pool")
        image = osc("image", "create", "--disk-format", "raw",
                    "--container-format", "bare", "--file", raw,
                    "walk-image")
        self.images.append(image["id"])
        image = wait("image", image["id"], "status", "active")
        if "ovirt://" not in json.dumps(image):
            raise WalkFailed("the image has no ovirt:// location")

        print("# A volume from it is an overlay on the template: O(1)")
        t0 = time.monotonic()
        v1 = self.volume("walk-v1", "--size", "1", "--type", "ovirt1",
                         "--image", image["id"])
        print(f"# ... available in {time.monotonic() - t0:.1f} s")
        tree = self.image_show(v1)
        if not _has_template(tree):
            raise WalkFailed(f"volume is no overlay: {tree}")

        print("# Snapshot, volume from the snapshot, clone")
        snap = osc("volume", "snapshot", "create", "--volume", v1["id"],
                   "walk-snap")
        self.snapshots.append(snap["id"])
        wait("volume snapshot", snap["id"], "status", "available")
        from_snap = self.volume("walk-from-snap", "--snapshot", snap["id"])
        clone = self.volume("walk-clone", "--source", v1["id"])

        print("# Revert to the snapshot (Cinder wants the snapshot's size), "
              "then extend")
        osc("--os-volume-api-version", "3.40", "volume", "revert",
            snap["id"], parse=False)
        wait("volume", v1["id"], "status", "available")
        osc("volume", "set", "--size", "2", v1["id"], parse=False)
        wait("volume", v1["id"], "size", 2)

        print("# Migrate the clone to the other domain of ovirt1 (the "
              "driver moves it), then retype it to ovirt2 (Cinder copies)")
        pools = osc("volume", "backend", "pool", "list")
        names = sorted(p["Name"] for p in pools)
        src = self.pool_of(clone["id"])
        other = next(n for n in names if "@ovirt1#" in n and n != src)
        osc("volume", "migrate", "--host", other, clone["id"], parse=False)
        shown = wait("volume", clone["id"], "os-vol-mig-status-attr:migstat",
                     "success")
        if shown["os-vol-host-attr:host"] != other:
            raise WalkFailed(f"clone is on {shown} not {other}")
        osc("volume", "set", "--type", "ovirt2", "--retype-policy",
            "on-demand", clone["id"], parse=False)
        shown = wait("volume", clone["id"], "type", "ovirt2")
        wait("volume", clone["id"], "status", "available")
        if "@ovirt2#" not in self.pool_of(clone["id"]):
            raise WalkFailed(f"retyped clone is not on ovirt2: {shown}")

        print("# Unmanage the volume from the snapshot, manage it again")
        host = self.pool_of(from_snap["id"])
        osc("volume", "delete", "--remote", from_snap["id"], parse=False)
        wait_gone("volume", from_snap["id"])
        self.volumes.remove(from_snap["id"])
        listed = osc("--os-volume-api-version", "3.8", "block", "storage",
                     "volume", "manageable", "list", host.split("#")[0])
        refs = [json.dumps(e["reference"]) for e in listed
                if e.get("safe_to_manage")]
        if not any(from_snap["id"] in r for r in refs):
            raise WalkFailed(f"{from_snap['id']} is not manageable: {listed}")
        managed = self.volume("walk-managed", "--remote-source",
                              f"source-name={from_snap['id']}", "--host",
                              host, "--type", "ovirt1",
                              # the client sends bootable=null otherwise,
                              # which the API refuses
                              "--non-bootable")

        print("# Upload volumes back to Glance and compare the bytes")
        self.download_check(v1["id"], want, size, "walk-v1-up")
        self.download_check(managed["id"], want, size, "walk-managed-up",
                            fmt="qcow2")
        self.download_check(clone["id"], want, size, "walk-clone-up",
                            fmt="qcow2")

    def cleanup(self) -> None:
        print("# Cleaning up")
        for snap in self.snapshots:
            subprocess.run(["openstack", "volume", "snapshot", "delete",
                            snap], capture_output=True)
            _quiet_wait_gone("volume snapshot", snap)
        for volume in self.volumes:
            subprocess.run(["openstack", "volume", "delete", "--force",
                            volume], capture_output=True)
        for volume in self.volumes:
            _quiet_wait_gone("volume", volume)
        for image in self.images:
            subprocess.run(["openstack", "image", "delete", image],
                           capture_output=True)


def _has_template(tree) -> bool:
    text = json.dumps(tree)
    return '"SHARED"' in text


def _quiet_wait_gone(kind: str, ident: str) -> None:
    try:
        wait_gone(kind, ident)
    except WalkFailed as e:
        print(f"# warning: {e}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="walk-") as tmp:
        walk = Walk(tmp)
        try:
            walk.run()
        except (WalkFailed, StopIteration, KeyError) as e:
            print(f"walkthrough FAILED: {e!r}", file=sys.stderr)
            walk.cleanup()
            return 1
        walk.cleanup()
    for backend in ("ovirt1", "ovirt2"):
        try:
            sh("ovirt-storage", "--config-file", CINDER_CONF, "--backend",
               backend, "fsck", parse=False)
        except WalkFailed as e:
            print(f"walkthrough FAILED: {e}", file=sys.stderr)
            return 1
    print("walkthrough passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
