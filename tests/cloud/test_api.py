"""The ovirt-cinder driver and Glance store through the cloud's APIs.

What only the running services show, checked by content (the bytes
Glance gets from ``os-volume_upload_image``), never by status alone:

* manageable listings of Cinder's API, unmanage and manage again of
  volumes and of snapshots;
* three concurrent first uses of a new image in the domain that does
  not hold its Glance template: one template copy, no reschedule;
* retypes that change the format (host-assisted copies between
  backends and within one);
* uploads of a volume with a chain of snapshots and of a volume made
  from a snapshot in the middle of it.

Run against the cloud of ``make cloud`` (tools/cloud/cloud.py)::

    . .cloud/openrc && .cloud/venv/bin/python -m pytest -q tests/cloud
"""

from __future__ import annotations

import concurrent.futures
import json
import urllib.parse
import uuid

from tests.cloud import api
from tests.cloud.api import Cloud
from tests.cloud.api import overwrite
from tests.cloud.api import sha256
from tests.cloud.api import storage


def digests(cloud: Cloud, vols: list[dict]) -> list[str]:
    """:meth:`Cloud.digest` of each volume, the uploads at once."""
    with concurrent.futures.ThreadPoolExecutor(len(vols)) as ex:
        return list(ex.map(lambda v: cloud.digest(v, "up"), vols))


def entry_for(entries: list[dict], ref: str) -> dict:
    found = [e for e in entries if e["reference"] == {"source-name": ref}]
    assert len(found) == 1, f"{ref} listed {len(found)} times: {entries}"
    return found[0]


def backend_of(vol: dict) -> str:
    return vol["os-vol-host-attr:host"].split("#", 1)[0]


def sd_of(vol: dict) -> str:
    return vol["os-vol-host-attr:host"].split("#", 1)[1]


def leaf_of(tree: dict) -> dict:
    return next(v for v in tree["volumes"] if v["vol_id"] == tree["leaf"])


def check_listings(cloud: Cloud, backend: str) -> None:
    """Both manageable listings answer, in summary and in detail; details
    carry ``extra_info`` dicts (Cinder's objects refuse anything else)."""
    for kind in ("volumes", "snapshots"):
        for entry in cloud.manageable(kind, backend, detail=False):
            assert isinstance(entry["reference"], dict), entry
            assert isinstance(entry["safe_to_manage"], bool), entry
        for entry in cloud.manageable(kind, backend):
            assert isinstance(entry["extra_info"], dict), entry


def test_unmanage_and_manage_volume(cloud: Cloud, image: dict,
                                    pattern: bytes) -> None:
    """An unmanaged volume's image is listed safe to manage by its image
    id; managed again, it keeps its bytes."""
    vol = cloud.create_volume("unmanaged", imageRef=image["id"],
                              volume_type="ovirt1")
    host, backend, img_id = (vol["os-vol-host-attr:host"], backend_of(vol),
                             cloud.name_id(vol))
    check_listings(cloud, backend)
    used = entry_for(cloud.manageable("volumes", backend), img_id)
    assert not used["safe_to_manage"], used
    assert used["cinder_id"] == vol["id"], used

    cloud.unmanage_volume(vol["id"])
    cloud.keep_managed_volume(host, img_id, "ovirt1")
    check_listings(cloud, backend)
    entry = entry_for(cloud.manageable("volumes", backend), img_id)
    assert entry["safe_to_manage"] and entry["cinder_id"] is None, entry
    assert entry["size"] == vol["size"], entry
    assert entry["extra_info"] == {"domain": sd_of(vol)}, entry
    summary = entry_for(cloud.manageable("volumes", backend, False), img_id)
    assert summary["safe_to_manage"], summary

    managed = cloud.manage_volume(host, img_id, "ovirt1", "managed")
    assert managed["os-vol-host-attr:host"] == host, managed
    assert cloud.name_id(managed) == img_id, managed
    assert managed["bootable"] == "false", managed
    assert cloud.digest(managed, "managed") == sha256(pattern)


def test_unmanage_and_manage_snapshot(cloud: Cloud, image: dict,
                                      pattern: bytes) -> None:
    """An unmanaged snapshot is listed safe to manage, with its volume as
    source; managed again, a volume from it has the snapshot's bytes."""
    vol = cloud.create_volume("snapped", imageRef=image["id"],
                              volume_type="ovirt1")
    backend = backend_of(vol)
    snap = cloud.create_snapshot(vol["id"], "snap")
    cloud.write(vol["id"], {3: 0xEE})  # the volume moves on
    # A later snapshot stays managed, and is listed as not safe.
    kept = cloud.create_snapshot(vol["id"], "kept")
    used = entry_for(cloud.manageable("snapshots", backend), snap["id"])
    assert not used["safe_to_manage"], used

    cloud.unmanage_snapshot(snap["id"])
    cloud.keep_managed_snapshot(vol, snap["id"])
    check_listings(cloud, backend)
    listed = cloud.manageable("snapshots", backend)
    entry = entry_for(listed, snap["id"])
    assert entry["safe_to_manage"] and entry["cinder_id"] is None, entry
    assert entry["source_reference"] == {"source-id": vol["id"]}, entry
    assert entry["extra_info"]["domain"] == sd_of(vol), entry
    assert not entry_for(listed, kept["id"])["safe_to_manage"], listed
    summary = entry_for(cloud.manageable("snapshots", backend, False),
                        snap["id"])
    assert summary["safe_to_manage"], summary

    managed = cloud.manage_snapshot(vol["id"], snap["id"], "managed")
    assert managed["volume_id"] == vol["id"], managed
    again = entry_for(cloud.manageable("snapshots", backend), snap["id"])
    assert not again["safe_to_manage"], again
    clone = cloud.create_volume("from-managed", snapshot_id=managed["id"])
    got = digests(cloud, [clone, vol])
    assert got == [sha256(pattern), sha256(overwrite(pattern, {3: 0xEE}))]


def test_unmanaged_only_snapshot_is_listed(cloud: Cloud) -> None:
    """The only snapshot of a volume, unmanaged, is listed too."""
    vol = cloud.create_volume("lone", volume_type="ovirt1")
    snap = cloud.create_snapshot(vol["id"], "lone")
    cloud.unmanage_snapshot(snap["id"])
    cloud.keep_managed_snapshot(vol, snap["id"])
    listed = cloud.manageable("snapshots", backend_of(vol))
    entry = entry_for(listed, snap["id"])
    assert entry["safe_to_manage"], entry
    assert entry["source_reference"] == {"source-id": vol["id"]}, entry


def test_manage_refuses_an_image_in_use(cloud: Cloud, image: dict,
                                        pattern: bytes) -> None:
    """Managing the image of an existing volume fails (two volumes on one
    image would lose data when either is deleted); the owner keeps its
    bytes."""
    vol = cloud.create_volume("owner", imageRef=image["id"],
                              volume_type="ovirt1")
    posted = cloud.volume_api("POST", "/manageable_volumes", json={
        "volume": {"host": vol["os-vol-host-attr:host"],
                   "ref": {"source-name": cloud.name_id(vol)},
                   "name": api.unique("twice"), "volume_type": "ovirt1",
                   "bootable": False}}).json()["volume"]
    cloud.on_cleanup(f"refused volume {posted['id']}",
                     lambda: cloud.delete_volume(posted["id"]))

    def refused() -> dict | None:
        got = cloud.volume(posted["id"])
        assert got is not None and got["status"] != "available", got
        # The API shows error_managing as "error".
        return got if got["status"].startswith("error") else None

    api.wait_for(f"manage of {posted['id']} refused", refused)
    cloud.delete_volume(posted["id"])
    assert cloud.volume(vol["id"])["status"] == "available"
    assert cloud.digest(vol, "owner") == sha256(pattern)


def parse_location(url: str) -> list[str]:
    """[pool, sd, img, vol] of ``ovirt://pool/sd/img/vol``."""
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme == "ovirt", url
    return [parts.netloc, *parts.path.strip("/").split("/")]


def create_at_once(cloud: Cloud, n: int, **fields: object) -> list[dict]:
    """POST ``n`` volumes concurrently; wait until all are available."""
    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        posted = list(ex.map(lambda i: cloud.create_volume(
            f"race{i}", wait=False, **fields), range(n)))
    return [cloud.wait_volume(v["id"]) for v in posted]


def template_copies(sd_id: str, img_id: str) -> list[dict]:
    return [e for e in storage("ovirt1", "image", "list", sd_id)
            if e["img_id"] == img_id]


def check_template_copy(pool1: dict, img_id: str) -> dict:
    """The one copy of template ``img_id`` in the second domain."""
    copies = template_copies(pool1["second"], img_id)
    assert len(copies) == 1 and copies[0]["template"], copies
    tree = storage("ovirt1", "image", "show", pool1["second"], img_id)
    assert len(tree["volumes"]) == 1, tree
    desc = json.loads(tree["volumes"][0]["description"])
    assert desc["copy"] == pool1["master"] and desc["tmpl"] == img_id, tree
    return tree["volumes"][0]


def test_concurrent_first_uses_in_second_domain(
        cloud: Cloud, hosts: dict[str, str], pool1: dict, pattern: bytes,
        log_start: dict[str, int]) -> None:
    """Three volumes from a new image created at once in the domain
    without its template: one template copy, no reschedule, the bytes."""
    image = cloud.create_image("fresh", pattern)
    _, sd_id, img_id, _ = parse_location(image["direct_url"])
    assert sd_id == pool1["master"], image
    assert not template_copies(pool1["second"], img_id)
    # The scheduler's CapabilitiesFilter matches pool capabilities too:
    # pool_name pins the second domain, which the driver's
    # _target_sd_id takes from the host the scheduler chose.
    vtype = cloud.create_type(api.unique("ovirt1-d2"), {
        "volume_backend_name": "ovirt1", "pool_name": pool1["second"]})
    vols = create_at_once(cloud, 3, imageRef=image["id"],
                          volume_type=vtype["name"])

    want = f"{hosts['ovirt1']}#{pool1['second']}"
    assert [v["os-vol-host-attr:host"] for v in vols] == [want] * 3
    lines = api.log_lines_about([v["id"] for v in vols] + [img_id],
                                log_start)
    bad = [ln for ln in lines if "ImageExists" in ln or " ERROR " in ln
           or "schedul" in ln]
    assert not bad, "\n".join(bad)
    assert any("Copying template" in ln for ln in lines), lines
    copy = check_template_copy(pool1, img_id)
    for vol in vols:
        shared = [v for v in cloud.image_tree(vol)["volumes"]
                  if v["voltype"] == "SHARED"]
        assert [(v["image"], v["vol_id"]) for v in shared] == [
            (img_id, copy["vol_id"])], shared
        assert f"/{pool1['second']}/" in shared[0]["path"], shared
    assert digests(cloud, vols) == [sha256(pattern)] * 3

    # The copy goes with the image and the last volume that used it.
    cloud.delete_image(image["id"])
    for vol in vols:
        cloud.delete_volume(vol["id"])
    for sd in (pool1["master"], pool1["second"]):
        assert not template_copies(sd, img_id), sd


def test_retype_changes_format(cloud: Cloud, hosts: dict[str, str],
                               pattern: bytes) -> None:
    """A raw volume retyped to qcow2 on ovirt2, then to raw again: the
    leaf's format follows the type, the bytes stay."""
    suffix = uuid.uuid4().hex[:8]
    qcow2 = cloud.create_type(f"ovirt-qcow2-{suffix}", {
        "volume_backend_name": "ovirt2", "ovirt:volume_format": "qcow2"})
    raw = cloud.create_type(f"ovirt-raw-{suffix}", {
        "volume_backend_name": "ovirt2", "ovirt:volume_format": "raw"})
    vol = cloud.create_volume("raw", volume_type="ovirt1")
    assert leaf_of(cloud.image_tree(vol))["format"] == "RAW"
    cloud.write(vol["id"], api.pattern_writes())

    # To another backend and to qcow2, then to raw on the same backend:
    # both host-assisted copies (the driver's retype leaves format
    # changes to Cinder's migration).
    for vtype, fmt in ((qcow2, "COW"), (raw, "RAW")):
        moved = cloud.retype(vol["id"], vtype["name"])
        assert backend_of(moved) == hosts["ovirt2"], moved
        tree = cloud.image_tree(moved)
        assert len(tree["chain"]) == 1, tree
        assert leaf_of(tree)["format"] == fmt, tree
        assert cloud.digest(moved, vtype["name"]) == sha256(pattern)


def test_upload_volume_with_chain(cloud: Cloud, image: dict,
                                  pattern: bytes) -> None:
    """The upload of a volume with two snapshots is its guest view; a
    volume from the first snapshot has that snapshot's bytes."""
    vol = cloud.create_volume("chain", imageRef=image["id"],
                              volume_type="ovirt1")
    # Data into the template's hole, zeros over the template's data, and
    # data after the last snapshot.
    first, second, last = {1: 0xA1}, {4: 0x00}, {6: 0xC3}
    cloud.write(vol["id"], first)
    snap1 = cloud.create_snapshot(vol["id"], "snap1")
    cloud.write(vol["id"], second)
    cloud.create_snapshot(vol["id"], "snap2")
    cloud.write(vol["id"], last)
    tree = cloud.image_tree(cloud.volume(vol["id"]))
    assert len(tree["chain"]) == 4, tree  # template, 2 snapshots, leaf

    from_snap1 = cloud.create_volume("from-snap1", snapshot_id=snap1["id"])
    got = digests(cloud, [cloud.volume(vol["id"]), from_snap1])
    assert got == [sha256(overwrite(pattern, {**first, **second, **last})),
                   sha256(overwrite(pattern, first))]
