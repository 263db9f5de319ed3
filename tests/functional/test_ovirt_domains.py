"""Domains oVirt wrote (tests/fixtures/ovirt): read, attach, upgrade, use.

The fixtures were written with vdsm's own serializers (README.md there):
a detached V3 and V4 data domain, and a V5 domain detached from the pool
it was the master of; V4 and V5 hold a template shared by hard links. The
engine must read each by content, attach them to its pool, upgrade V3 and
V4 in place (crash safe, as vdsm does), then snapshot, merge and clone on
them, and the Cinder driver must manage their volumes.
"""

import hashlib
import os
import uuid

import pytest

from ovirt_cinder.cmd import storage as cli
from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fileutil
from ovirt_cinder.storage import fsck
from ovirt_cinder.storage import image
from ovirt_cinder.storage import sd
from ovirt_cinder.storage import sdmeta
from ovirt_cinder.storage import xlease
from ovirt_cinder.storage.pool import StoragePool
from tests import ovirt_fixtures
from tests import qemuio

MiB = sc.MiB
FIXTURES = ovirt_fixtures.manifest()
GOLDEN_POOL = "66666666-6666-4666-8666-000000000001"


def uid():
    return str(uuid.uuid4())


@pytest.fixture
def ovirt_dir(tmp_path):
    path = tmp_path / "ovirt"
    path.mkdir()
    return str(path)


def attach(pool, ovirt_dir, name, **kwargs):
    mount, entry = ovirt_fixtures.copy_fixture(name, ovirt_dir)
    dom = pool.attach_domain(ovirt_fixtures.domain_path(mount, entry),
                             **kwargs)
    return dom, entry


def check_views(tree_of, entry):
    """Every image of a fixture reads as vdsm's chain, by content."""
    for img_id, info in entry["images"].items():
        tree = tree_of(img_id)
        top = tree.template() if info["template"] else tree.leaf()
        assert [v.vol_id for v in tree.chain(top.vol_id)] == info["chain"]
        assert tree.problems() == []
        assert ovirt_fixtures.view_sha256(top.path, top.qemu_format) == \
            info["sha256"], img_id


def files(dom):
    """sha256 of every file under images/, by relative path."""
    found = {}
    for root, _, names in os.walk(dom.images_dir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, dom.path)] = hashlib.sha256(
                    f.read()).hexdigest()
    return found


# Reading


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_reads_what_ovirt_wrote(ovirt_dir, name):
    mount, entry = ovirt_fixtures.copy_fixture(name, ovirt_dir)
    found, broken = sd.scan_domains(mount)
    assert broken == {}
    dom, = found
    assert dom.sd_id == entry["sd_id"]
    assert dom.metadata.version == entry["version"]
    assert sdmeta.is_detached(dom.metadata)
    assert dom.metadata.type == sc.DomainType.NFS
    assert (dom.metadata.block_size, dom.metadata.alignment) == (512, MiB)
    assert sorted(dom.list_images()) == sorted(entry["images"])
    check_views(lambda img_id: image.load(dom, img_id), entry)
    if name == "v3":
        # An older engine's DISKTYPE; qcow2 compat 0.10 under the leaf.
        meta = dom.read_volume_meta(*_first_chain(entry)[:2])
        assert meta.disktype == "2" and meta.sequence == 0
    if name == "v5-detached":
        assert dom.metadata.extra["MASTER_VERSION"] == "3"


def _first_chain(entry):
    img_id = next(i for i, v in entry["images"].items()
                  if not v["template"] and len(v["chain"]) == 2
                  and v["chain"][0].endswith("1b1"))
    return img_id, entry["images"][img_id]["chain"][0], \
        entry["images"][img_id]["chain"][1]


# Attaching


def test_attach_detached_former_master(mount, ovirt_dir):
    pool = StoragePool.create(mount, pool_id=GOLDEN_POOL)
    mount5, entry = ovirt_fixtures.copy_fixture("v5-detached", ovirt_dir)
    path = ovirt_fixtures.domain_path(mount5, entry)
    before = files(sd.FileDomain.open(path))
    dom = pool.attach_domain(path)
    # One metadata write, byte for byte what vdsm's attachSD and
    # activateSD (setDomainRegularRole) write.
    with open(dom.dom_md(sc.METADATA), "rb") as f:
        assert f.read() == ovirt_fixtures.golden("v5-attached.metadata")
    assert dom.metadata.pool_id == GOLDEN_POOL
    assert dom.metadata.role == sc.DomainRole.REGULAR
    assert dom.metadata.extra["POOL_DOMAINS"] == f"{dom.sd_id}:Active"
    assert files(dom) == before     # images untouched

    reopened = StoragePool.open([mount, mount5])
    assert sorted(reopened.domains) == sorted([pool.master.sd_id,
                                               dom.sd_id])
    assert reopened.master.sd_id == pool.master.sd_id
    check_views(lambda i: reopened.image(dom.sd_id, i), entry)
    use_the_domain(reopened, dom.sd_id, entry)


def use_the_domain(pool, sd_id, entry):
    """Snapshot, merge, revert and clone on the chain; a thin clone of
    the template: every view by content."""
    img_id, base, top = _first_chain(entry)
    sha = ovirt_fixtures.view_sha256
    base_view = sha(*_path_fmt(pool.image(sd_id, img_id).get(base)))
    snap1, snap2 = uid(), uid()
    frozen = pool.snapshot(sd_id, img_id, snap1)
    assert frozen.vol_id == top
    leaf = pool.leaf(sd_id, img_id)
    qemuio.write_pattern(leaf.path, "qcow2", 0, 64 * 1024, 0x77)
    pool.snapshot(sd_id, img_id, snap2)
    snap2_view = sha(*_path_fmt(pool.leaf(sd_id, img_id)))
    pool.delete_snapshot(sd_id, img_id, snap1)        # a merge
    tree = pool.image(sd_id, img_id)
    assert sorted(tree.snapshots()) == [snap2]
    assert tree.chain()[0].vol_id == base
    # oVirt's volume under ours is intact; ours holds both writes.
    assert sha(*_path_fmt(tree.get(base))) == base_view
    assert sha(*_path_fmt(tree.find_snapshot(snap2))) == snap2_view
    qemuio.verify_pattern(tree.leaf().path, "qcow2", 0, 64 * 1024, 0x77)
    clone = pool.clone(sd_id, img_id, uid(), snap_id=snap2)
    assert sha(*_path_fmt(clone)) == snap2_view
    qemuio.write_pattern(tree.leaf().path, "qcow2", 0, 64 * 1024, 0x78)
    reverted = pool.revert_to_snapshot(sd_id, img_id, snap2)
    assert sha(*_path_fmt(reverted)) == snap2_view
    for tmpl, info in entry["images"].items():
        if info["template"]:
            thin = pool.thin_clone(sd_id, tmpl, uid())
            assert sha(*_path_fmt(thin)) == info["sha256"]
    for img in pool.list_images(sd_id):
        assert pool.image(sd_id, img).problems() == []


def _path_fmt(vol):
    return vol.path, vol.qemu_format


def _write_metadata(path, **changes):
    md = sdmeta.loads(open(path, "rb").read())
    md.update(changes)
    with open(path, "wb") as f:
        f.write(sdmeta.dumps(md))


def test_attach_refusals(pool, mount2, ovirt_dir):
    mount4, entry = ovirt_fixtures.copy_fixture("v4", ovirt_dir)
    path = ovirt_fixtures.domain_path(mount4, entry)
    md_path = os.path.join(path, sc.DOM_MD, sc.METADATA)
    original = open(md_path, "rb").read()

    def unchanged_after(error, **kwargs):
        data = open(md_path, "rb").read()
        with pytest.raises(error):
            pool.attach_domain(path, **kwargs)
        assert open(md_path, "rb").read() == data
        assert entry["sd_id"] not in pool.domains

    _write_metadata(md_path, CLASS="Iso")
    unchanged_after(errors.InvalidOperation)
    _write_metadata(md_path, CLASS="Data", VERSION="2")
    unchanged_after(errors.UnsupportedVersion)
    with open(md_path, "wb") as f:
        f.write(original.replace(b"DESCRIPTION=", b"DESCRIPTION=x"))
    unchanged_after(errors.ChecksumMismatch)
    with pytest.raises(errors.DomainNotFound):
        pool.attach_domain(mount4)       # the mount, not the domain

    # Another pool's master: only with force.
    other = uid()
    with open(md_path, "wb") as f:
        f.write(original)
    _write_metadata(md_path, POOL_UUID=other, ROLE="Master")
    unchanged_after(errors.DomainAttached)
    dom = pool.attach_domain(path, force=True)
    assert (dom.metadata.pool_id, dom.metadata.role) == (
        pool.pool_id, sc.DomainRole.REGULAR)
    # Already in this pool.
    unchanged_after_attached = open(md_path, "rb").read()
    with pytest.raises(errors.DomainAttached, match="already in this pool"):
        pool.attach_domain(path)
    assert open(md_path, "rb").read() == unchanged_after_attached
    # ... and to another pool of ours only with force.
    with pytest.raises(errors.DomainAttached, match="force"):
        StoragePool.create(mount2).attach_domain(path)


# Upgrading


@pytest.mark.parametrize("name", ["v3", "v4"])
def test_upgrade(pool, ovirt_dir, name):
    dom, entry = attach(pool, ovirt_dir, name)
    img_id, base, top = _first_chain(entry)
    records = ovirt_fixtures.records(dom)
    data = files(dom)
    # Changing a V3/V4 domain is refused before anything is written.
    with pytest.raises(errors.DomainNeedsUpgrade, match="domain upgrade"):
        pool.snapshot(dom.sd_id, img_id, uid())
    with pytest.raises(errors.DomainNeedsUpgrade):
        pool.create_volume(dom.sd_id, uid(), MiB)
    assert ovirt_fixtures.records(dom) == records
    assert list(pool.runner.unfinished()) == []
    # Reading is fine.
    check_views(lambda i: pool.image(dom.sd_id, i), entry)

    assert fsck.check(pool).clean
    pool.upgrade_domain(dom.sd_id)
    assert dom.metadata.version == 5
    ovirt_fixtures.check_v5(dom)
    assert list(pool.runner.unfinished()) == []
    assert fsck.check(pool).clean
    # The records vdsm's finalize_volumes_metadata writes, byte for byte.
    for vol_id in (base, top):
        path = dom.volume_path(img_id, vol_id) + sc.META_EXT
        assert open(path, "rb").read() == ovirt_fixtures.golden(
            f"{name}-{vol_id[-3:]}.finalize.meta")
    assert {p: s for p, s in files(dom).items()
            if not p.endswith(sc.META_EXT)} == {
        p: s for p, s in data.items() if not p.endswith(sc.META_EXT)}
    if name == "v3":
        index = xlease.read_index(dom.dom_md("xleases"), alignment=MiB,
                                  block_size=512)
        assert index is not None
    check_views(lambda i: pool.image(dom.sd_id, i), entry)
    # Again: nothing left to do.
    records = ovirt_fixtures.records(dom)
    pool.upgrade_domain(dom.sd_id)
    assert ovirt_fixtures.records(dom) == records
    reopened = StoragePool.open([pool.master.mount, dom.mount])
    assert reopened.domain(dom.sd_id).metadata.version == 5
    use_the_domain(reopened, dom.sd_id, entry)


class _FailingWrites:
    """fileutil.atomic_write that raises ENOSPC on chosen writes."""

    def __init__(self, monkeypatch, fail):
        self.real = fileutil.atomic_write
        self.fail = fail
        self.count = 0
        monkeypatch.setattr(fileutil, "atomic_write", self)

    def __call__(self, path, data, *args, **kwargs):
        if self.fail(path, data):
            raise OSError(28, "No space left on device", path)
        return self.real(path, data, *args, **kwargs)


def test_upgrade_failing_before_the_version_write(pool, ovirt_dir,
                                                  monkeypatch):
    """A V4 domain whose records got CAP, some of them: still a valid
    V4 domain, and nothing is left to recover."""
    dom, entry = attach(pool, ovirt_dir, "v4")
    img_id, base, top = _first_chain(entry)
    writes = []

    def fail(path, data):
        if path.endswith(sc.META_EXT):
            writes.append(path)
        return len(writes) == 2

    failing = _FailingWrites(monkeypatch, fail)
    with pytest.raises(OSError, match="No space"):
        pool.upgrade_domain(dom.sd_id)
    monkeypatch.setattr(fileutil, "atomic_write", failing.real)
    assert list(pool.runner.unfinished()) == []
    on_disk = sd.FileDomain.open(dom.path)
    assert on_disk.metadata.version == 4
    # The first record is vdsm's convert_volumes_metadata output.
    converted = writes[0]
    golden = ovirt_fixtures.golden(
        f"v4-{os.path.basename(converted)[-8:-5]}.convert.meta")
    assert open(converted, "rb").read() == golden
    check_views(lambda i: image.load(on_disk, i), entry)
    with pytest.raises(errors.DomainNeedsUpgrade):
        pool.snapshot(dom.sd_id, img_id, uid())
    pool.upgrade_domain(dom.sd_id)
    ovirt_fixtures.check_v5(dom)
    check_views(lambda i: pool.image(dom.sd_id, i), entry)


def test_upgrade_failing_after_the_version_write(pool, ovirt_dir,
                                                 monkeypatch):
    """Past the version write the flow only goes forward: the domain is
    V5 and readable with records of both formats, and recovery ends
    it."""
    dom, entry = attach(pool, ovirt_dir, "v4")
    img_id, _, _ = _first_chain(entry)
    v5_records = []

    def fail(path, data):
        if path.endswith(sc.META_EXT) and b"SEQ=" in data:
            v5_records.append(path)
        return len(v5_records) == 2

    _FailingWrites(monkeypatch, fail)
    with pytest.raises(errors.OperationIncomplete):
        pool.upgrade_domain(dom.sd_id)
    monkeypatch.undo()
    pending, = pool.runner.unfinished()
    assert pending.name == "upgrade_domain"
    assert sd.FileDomain.open(dom.path).metadata.version == 5
    check_views(lambda i: pool.image(dom.sd_id, i), entry)
    assert pool.recover() == [("upgrade_domain", "SUCCESS")]
    ovirt_fixtures.check_v5(dom)
    check_views(lambda i: pool.image(dom.sd_id, i), entry)
    pool.snapshot(dom.sd_id, img_id, uid())


def test_upgrade_keeps_unreadable_records(pool, ovirt_dir):
    """A record that does not parse is skipped, as vdsm skips it."""
    dom, entry = attach(pool, ovirt_dir, "v4")
    img_id, base, top = _first_chain(entry)
    path = dom.volume_path(img_id, base) + sc.META_EXT
    with open(path, "wb") as f:
        f.write(b"NONE=" + b"#" * 500 + b"\nEOF\n")
    pool.upgrade_domain(dom.sd_id)
    assert dom.metadata.version == 5
    assert open(path, "rb").read().startswith(b"NONE=")


# The command line


def test_cli_attach_and_upgrade(mount, ovirt_dir, capsys):
    pool = StoragePool.create(mount)
    mount3, entry = ovirt_fixtures.copy_fixture("v3", ovirt_dir)
    path = ovirt_fixtures.domain_path(mount3, entry)
    assert cli.main(["-p", mount, "domain", "attach", path]) == 0
    out = capsys.readouterr().out
    assert f"domain id: {entry['sd_id']}" in out
    assert "format V3" in out and mount3 in out
    assert cli.main(["-p", mount, "domain", "attach", path]) == 2
    assert "already in this pool" in capsys.readouterr().err
    assert cli.main(["-p", mount, "-p", mount3, "snapshot", "create",
                     entry["sd_id"], _first_chain(entry)[0]]) == 2
    assert "domain upgrade" in capsys.readouterr().err
    assert cli.main(["-p", mount, "-p", mount3, "--json", "domain",
                     "upgrade", entry["sd_id"]]) == 0
    assert '"version": 5' in capsys.readouterr().out
    assert cli.main(["-p", mount, "-p", mount3, "domain", "list"]) == 0
    assert entry["sd_id"] in capsys.readouterr().out
    assert StoragePool.open([mount, mount3]).pool_id == pool.pool_id


# Cinder


@pytest.fixture
def cinder_driver(tmp_path):
    pytest.importorskip("cinder")
    from cinder import objects
    objects.register_all()
    from cinder.volume import configuration
    from oslo_config import cfg

    from ovirt_cinder.cinder import driver as ovirt_driver

    def make(mounts, pool_id):
        conf = cfg.CONF
        backend = "ovirt1"
        if backend not in conf:
            conf.register_group(cfg.OptGroup(backend))
        overrides = {"ovirt_domain_paths": mounts,
                     "ovirt_pool_uuid": pool_id,
                     "ovirt_recovery_interval": 0}
        for name, value in overrides.items():
            conf.set_override(name, value, group="backend_defaults")
        conf.set_override("image_conversion_dir", str(tmp_path / "conv"))
        conf.set_override("lock_path", str(tmp_path / "locks"),
                          group="oslo_concurrency")
        made.append(overrides)
        drv = ovirt_driver.OvirtVolumeDriver(
            configuration=configuration.Configuration(
                [], config_group=backend), host=f"host@{backend}")
        drv.do_setup(None)
        drv.check_for_setup_error()
        return drv

    made = []
    yield make
    conf = cfg.CONF
    conf.reset()
    conf.clear_override("image_conversion_dir")
    conf.clear_override("lock_path", group="oslo_concurrency")
    for overrides in made:
        for name in overrides:
            conf.clear_override(name, group="backend_defaults")


def test_cinder_manages_a_volume_of_an_attached_domain(mount, ovirt_dir,
                                                       cinder_driver,
                                                       monkeypatch):
    from cinder import context as cinder_context
    from cinder.tests.unit import fake_volume

    pool = StoragePool.create(mount)
    dom, entry = attach(pool, ovirt_dir, "v4")
    pool.upgrade_domain(dom.sd_id)
    drv = cinder_driver([mount, dom.mount], pool.pool_id)
    # No Cinder database here: Cinder has no volumes yet.
    monkeypatch.setattr(drv, "_cinder_volumes", lambda: [])
    img_id, base, top = _first_chain(entry)
    vid = uid()
    volume = fake_volume.fake_volume_obj(
        cinder_context.get_admin_context(), id=vid, name=f"volume-{vid}",
        size=1, host=f"host@ovirt1#{dom.sd_id}")
    ref = {"source-name": img_id}
    listed = drv.get_manageable_volumes([], None, 10, 0, ["size"], ["asc"])
    assert ref in [e["reference"] for e in listed]
    assert drv.manage_existing_get_size(volume, ref) == 1
    update = drv.manage_existing(volume, ref)
    assert update == {"_name_id": img_id}
    volume.update(update)
    leaf = drv.pool.leaf(dom.sd_id, img_id)
    assert leaf.vol_id == top
    assert leaf.meta.capacity == sc.GiB
    # Grown, not changed: the first MiB is oVirt's data.
    qemuio.verify_pattern(leaf.path, "qcow2", 0, 256 * 1024, 0x14)
    qemuio.verify_pattern(leaf.path, "qcow2", 256 * 1024, 256 * 1024,
                          0x24)
    qemuio.verify_zero(leaf.path, "qcow2", MiB, MiB)
