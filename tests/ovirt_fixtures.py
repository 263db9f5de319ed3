"""The oVirt domains of tests/fixtures/ovirt/, and older formats on demand.

``copy_fixture`` copies one fixture mount into a test directory and makes
the hard links git does not keep (``links`` of ``fixtures.json``; see
tests/fixtures/ovirt/README.md). ``downgrade`` rewrites a domain made by
the engine as a V3 or V4 domain, for tests that need one with more
history than the fixtures hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import sdmeta
from ovirt_cinder.storage import volmeta
from tests import qemuio

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "fixtures", "ovirt")
GOLDEN = os.path.join(FIXTURES, "golden")


def manifest() -> dict:
    """fixtures.json: by fixture name, its domain, images and views."""
    with open(os.path.join(FIXTURES, "fixtures.json")) as f:
        return json.load(f)


def golden(name: str) -> bytes:
    with open(os.path.join(GOLDEN, name), "rb") as f:
        return f.read()


def copy_fixture(name: str, dst_dir: str) -> tuple[str, dict]:
    """Copy fixture ``name`` to ``dst_dir/name`` (a mount) and link the
    shared template files; return (mount, its manifest entry)."""
    entry = manifest()[name]
    mount = os.path.join(dst_dir, entry["mount"])
    shutil.copytree(os.path.join(FIXTURES, entry["mount"]), mount)
    for dst, src in entry["links"]:
        os.link(os.path.join(mount, src), os.path.join(mount, dst))
    return mount, entry


def domain_path(mount: str, entry: dict) -> str:
    return os.path.join(mount, entry["sd_id"])


def view_sha256(path: str, fmt: str) -> str:
    """sha256 of the guest view of the volume at ``path``."""
    out = path + ".view"
    try:
        subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw",
                        path, out], check=True, capture_output=True)
        h = hashlib.sha256()
        with open(out, "rb") as f:
            for block in iter(lambda: f.read(sc.MiB), b""):
                h.update(block)
        return h.hexdigest()
    finally:
        if os.path.exists(out):
            os.unlink(out)


def downgrade(dom, version: int) -> None:
    """Rewrite ``dom`` (a V5 domain the engine made, 512 / 1 MiB) as a V3
    or V4 domain: its metadata, and every volume record in the V4
    format. Records are rewritten in place, so hard links stay. The
    engine's counters go too: oVirt keeps none."""
    md = dom.metadata.replace(version=version)
    counters = dom.dom_md(sc.COUNTERS)
    if os.path.exists(counters):
        os.unlink(counters)
    with open(dom.dom_md(sc.METADATA), "wb") as f:
        f.write(sdmeta.format_metadata(md))
    dom.metadata = md
    if version < 4:
        xleases = dom.dom_md("xleases")
        if os.path.exists(xleases):
            os.unlink(xleases)
    for img_id in dom.list_images():
        for vol_id in dom.list_volumes(img_id):
            meta = dom.read_volume_meta(img_id, vol_id)
            path = dom.volume_path(img_id, vol_id) + sc.META_EXT
            with open(path, "r+b") as f:
                f.truncate(0)
                f.write(volmeta.legacy_bytes(meta))


def make_v4_domain(pool, mount: str, raw_file: str) -> str:
    """Add a domain to ``pool`` in ``mount`` holding a snapshot chain, a
    template (imported from ``raw_file``, 16 MiB) and an image over it,
    then make it V4 (:func:`downgrade`); return its id."""
    MiB = sc.MiB
    sd4 = pool.add_domain(mount).sd_id
    img = str(uuid.uuid4())
    pool.create_volume(sd4, img, 4 * MiB, fmt=sc.VolumeFormat.RAW)
    leaf = pool.leaf(sd4, img)
    qemuio.write_pattern(leaf.path, "raw", 0, MiB, 0x44)
    pool.snapshot(sd4, img, str(uuid.uuid4()))
    leaf = pool.leaf(sd4, img)
    qemuio.write_pattern(leaf.path, "qcow2", MiB, MiB, 0x45)
    tmpl = str(uuid.uuid4())
    pool.import_volume(sd4, tmpl, raw_file, "raw", 16 * MiB,
                       voltype=sc.VolumeType.SHARED)
    leaf = pool.thin_clone(sd4, tmpl, str(uuid.uuid4()))
    qemuio.write_pattern(leaf.path, "qcow2", 2 * MiB, MiB, 0x46)
    downgrade(pool.domain(sd4), 4)
    return sd4


def records(dom) -> dict[str, bytes]:
    """Every volume record of ``dom`` by its path below the domain."""
    found = {}
    for img_id in dom.list_images():
        for vol_id in dom.list_volumes(img_id):
            path = dom.volume_path(img_id, vol_id) + sc.META_EXT
            with open(path, "rb") as f:
                found[os.path.relpath(path, dom.path)] = f.read()
    return found


def check_v5(dom) -> None:
    """``dom`` is a V5 domain on storage, every record V5 format, every
    template record still shared by hard links with its own image's."""
    with open(dom.dom_md(sc.METADATA), "rb") as f:
        md = sdmeta.parse(f.read())
    assert md.version == 5, md
    assert (md.block_size, md.alignment) == (512, sc.MiB)
    assert not set(md.extra) & {"LOGBLKSIZE", "PHYBLKSIZE"}
    for img_id in dom.list_images():
        for vol_id in dom.list_volumes(img_id):
            path = dom.volume_path(img_id, vol_id) + sc.META_EXT
            with open(path, "rb") as f:
                data = f.read()
            meta = volmeta.VolumeMetadata.from_bytes(data)
            assert data == meta.to_bytes(), path
            if meta.image != img_id:
                own = dom.volume_path(meta.image, vol_id) + sc.META_EXT
                assert os.path.samefile(own, path), path
