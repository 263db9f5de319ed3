"""Domains the engine writes keep oVirt's rules (tests/ovirt_rules.py).

Domains are made by ``ovirt-storage pool create`` / ``domain create``
(the CLI, in-process), by ``StoragePool.create`` / ``add_domain``, and by
``sd.create_domain`` for 4K domains; then volumes are created,
snapshotted, cloned, thin-cloned, imported, adopted (the Glance store's
path) and copied to the other domain, under a restrictive (077) and a
permissive (000) umask. Each domain is then checked on its bytes: the
metadata and its checksum, the lockspace, the SDM resource, the xleases
index, every volume's lease, the modes and, when configured, the owner
and group. The checker itself is shown to catch each kind of violation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from ovirt_cinder.cmd import storage as cli
from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import sanlock_direct
from ovirt_cinder.storage import sd
from ovirt_cinder.storage import xlease
from ovirt_cinder.storage.pool import StoragePool
from tests import ovirt_rules
from tests import qemuio

MiB = sc.MiB
# vdsm:kvm. The ids need not exist on this host.
VDSM, KVM = 36, 36

pytestmark = pytest.mark.skipif(not sanlock_direct.available(),
                                reason="the sanlock program is missing")


def uid():
    return str(uuid.uuid4())


@pytest.fixture(params=[0o077, 0o000], ids=["umask077", "umask000"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


@pytest.fixture
def conf(tmp_path, monkeypatch):
    """The CLI's own [storage] file: image locks in the test's directory,
    new files owned by vdsm:kvm (36:36)."""
    path = tmp_path / "ovirt-storage.conf"
    path.write_text(f"[storage]\novirt_lock_path = {tmp_path}/locks\n"
                    f"ovirt_file_owner = {VDSM}\n"
                    f"ovirt_file_group = {KVM}\n")
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_FILE", str(tmp_path / "none"))
    return ["--config-file", str(path)]


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv] + ["--json"])
    out, err = capsys.readouterr()
    assert code == 0, (argv, out, err)
    return json.loads(out)


def raw_file(path, size=4 * MiB, pattern=0x55):
    with open(path, "wb") as f:
        f.truncate(size)
    qemuio.write_pattern(str(path), "raw", 0, MiB, pattern)
    return str(path)


# The CLI

def test_cli_domains(capsys, umask, conf, tmp_path, mount, mount2):
    created = run(capsys, *conf, "pool", "create", "--path", mount,
                  "--type", "NFS", "--remote-path", "127.0.0.1:/exports/a",
                  "--description", "nfs")
    sd1 = created["master_domain_id"]
    paths = [*conf, "-p", mount]
    sd2 = run(capsys, *paths, "domain", "create", "--path", mount2,
              "--type", "POSIXFS", "--remote-path", "/dev/vdb1",
              "--file-owner", "0", "--file-group", "0")["domain_id"]
    paths += ["-p", mount2]

    img = run(capsys, *paths, "volume", "create", sd1, "--size", "8M")[
        "image_id"]
    run(capsys, *paths, "snapshot", "create", sd1, img)
    run(capsys, *paths, "image", "clone", sd1, img, "--to-domain", sd2)
    tmpl = run(capsys, *paths, "volume", "import", sd1,
               raw_file(tmp_path / "src.raw"), "--template")["image_id"]
    run(capsys, *paths, "image", "thin-clone", sd1, tmpl)
    run(capsys, *paths, "image", "copy", sd1, img, sd2)

    md1 = ovirt_rules.assert_domain(os.path.join(mount, sd1), owner=VDSM,
                                    group=KVM)
    assert (md1["TYPE"], md1["REMOTE_PATH"], md1["ROLE"]) == (
        "NFS", "127.0.0.1:/exports/a", "Master")
    # domain create's flags win over the file: root's; the volumes made
    # later by commands reading only the file: 36's.
    dom2 = os.path.join(mount2, sd2)
    md2 = ovirt_rules.assert_domain(dom2, owner=None, group=None)
    assert (md2["TYPE"], md2["REMOTE_PATH"], md2["ROLE"]) == (
        "POSIXFS", "/dev/vdb1", "Regular")
    assert os.stat(dom2).st_uid == 0
    images = os.path.join(dom2, "images")
    for name in os.listdir(images):
        assert os.stat(os.path.join(images, name)).st_uid == VDSM


def test_cli_defaults(capsys, tmp_path, monkeypatch, mount):
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_FILE", str(tmp_path / "none"))
    sd_id = run(capsys, "pool", "create", "--path", mount)[
        "master_domain_id"]
    md = ovirt_rules.assert_domain(os.path.join(mount, sd_id))
    assert (md["TYPE"], md["REMOTE_PATH"]) == ("LOCALFS", mount)
    st = os.stat(os.path.join(mount, sd_id))
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


def test_cli_rejects_bad_type_and_owner(capsys, tmp_path, monkeypatch,
                                        mount):
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(SystemExit):
        cli.main(["pool", "create", "--path", mount, "--type", "ISCSI"])
    code = cli.main(["pool", "create", "--path", mount, "--file-owner",
                     "no-such-user-here"])
    assert code == 2
    assert "no-such-user-here" in capsys.readouterr().err
    assert os.listdir(mount) == []


# The API

def every_operation(pool, sd1, sd2, tmp_path, mount):
    img = uid()
    pool.create_volume(sd1, img, 8 * MiB, fmt=sc.VolumeFormat.RAW)
    pool.snapshot(sd1, img, uid())
    pool.create_volume(sd1, uid(), 4 * MiB,
                       prealloc=sc.Preallocation.PREALLOCATED)
    pool.clone(sd1, img, uid())
    pool.clone(sd1, img, uid(), dst_sd_id=sd2)
    pool.import_volume(sd1, uid(), raw_file(tmp_path / "import.raw"),
                       "raw", 4 * MiB)
    # The Glance store's path: a file written on the domain's
    # filesystem, renamed into a template image.
    staged = raw_file(os.path.join(mount, ".staged-upload"))
    os.chmod(staged, 0o600)
    tmpl = uid()
    pool.adopt_volume(sd1, tmpl, staged, 4 * MiB,
                      voltype=sc.VolumeType.SHARED)
    pool.thin_clone(sd1, tmpl, uid())
    pool.copy_image(sd1, img, sd2)
    # A revert to an older snapshot keeps the later ones as a side branch
    # of INTERNAL volumes: vdsm's getChain still finds one LEAF.
    snaps = [uid(), uid()]
    for snap in snaps:
        pool.snapshot(sd1, img, snap)
    pool.revert_to_snapshot(sd1, img, snaps[0])
    pool.delete_snapshot(sd1, img, snaps[0])
    return img, tmpl


def test_pool_domains(umask, tmp_path, mount, mount2):
    owner = sd.Ownership.resolve(str(VDSM), str(KVM))
    pool = StoragePool.create(mount, ownership=owner,
                              domain_type=sc.DomainType.GLUSTERFS,
                              remote_path="gluster1:/vol")
    sd2 = pool.add_domain(mount2, domain_type=sc.DomainType.NFS,
                          remote_path="10.0.0.1:/exports/b").sd_id
    every_operation(pool, pool.master.sd_id, sd2, tmp_path, mount)
    md = ovirt_rules.assert_domain(pool.master.path, owner=VDSM, group=KVM)
    assert (md["TYPE"], md["REMOTE_PATH"]) == ("GLUSTERFS", "gluster1:/vol")
    md = ovirt_rules.assert_domain(pool.domain(sd2).path, owner=VDSM,
                                   group=KVM)
    assert (md["TYPE"], md["REMOTE_PATH"]) == ("NFS", "10.0.0.1:/exports/b")
    # Reopened (as the services open it): the owner still applies.
    again = StoragePool.open([mount, mount2], ownership=owner)
    again.create_volume(sd2, uid(), MiB)
    ovirt_rules.assert_domain(pool.domain(sd2).path, owner=VDSM, group=KVM)


def test_pool_without_owner(tmp_path, mount, mount2):
    pool = StoragePool.create(mount)
    sd2 = pool.add_domain(mount2).sd_id
    every_operation(pool, pool.master.sd_id, sd2, tmp_path, mount)
    for dom in pool.domains.values():
        ovirt_rules.assert_domain(dom.path, owner=os.getuid(),
                                  group=os.getgid())


def test_sizes_as_vdsm_leaves_them(pool):
    dom = pool.master
    sizes = {n: os.path.getsize(dom.dom_md(n)) for n in sc.SPECIAL_FILES}
    assert sizes == {"ids": MiB, "leases": 2 * MiB,
                     "xleases": MiB + xlease.INDEX_SIZE,
                     "inbox": 16 * MiB, "outbox": 16 * MiB}
    # Sparse: only what sanlock and the index wrote is allocated.
    for name in ("inbox", "outbox", "leases", "xleases"):
        assert os.stat(dom.dom_md(name)).st_blocks * 512 <= MiB
    vol = pool.create_volume(dom.sd_id, uid(), MiB)
    assert os.path.getsize(vol.path + sc.LEASE_EXT) == MiB
    index = xlease.read_index(dom.dom_md("xleases"), alignment=MiB,
                              block_size=512)
    assert (index.lockspace, index.records()) == (dom.sd_id, [])


@pytest.mark.parametrize("alignment", [MiB, 2 * MiB])
def test_4k_domain(umask, tmp_path, mount, alignment):
    dom = sd.create_domain(mount, sd_id=uid(), pool_id=uid(),
                           role=sc.DomainRole.MASTER,
                           block_size=sc.BLOCK_SIZE_4K, alignment=alignment)
    assert dom.sdm_lease_offset == alignment
    pool = StoragePool(dom.pool_id, [dom])
    img = uid()
    pool.create_volume(dom.sd_id, img, 8 * MiB)
    pool.snapshot(dom.sd_id, img, uid())
    tmpl = uid()
    pool.import_volume(dom.sd_id, tmpl, raw_file(tmp_path / "t.raw"),
                       "raw", 4 * MiB, voltype=sc.VolumeType.SHARED)
    pool.thin_clone(dom.sd_id, tmpl, uid())
    md = ovirt_rules.assert_domain(dom.path)
    assert (md["BLOCK_SIZE"], md["ALIGNMENT"]) == ("4096", str(alignment))
    assert os.path.getsize(dom.dom_md("leases")) == 2 * alignment
    assert os.path.getsize(dom.dom_md("ids")) == alignment


def test_failed_create_leaves_nothing(mount, monkeypatch):
    def fail(*args, **kwargs):
        raise sanlock_direct.SanlockDirectError(
            action="init", lease="x", rc=-5, reason="Input/output error")

    monkeypatch.setattr(sanlock_direct, "init_resource", fail)
    with pytest.raises(sanlock_direct.SanlockDirectError):
        StoragePool.create(mount)
    assert os.listdir(mount) == []


def test_without_the_sanlock_program(mount, monkeypatch, caplog):
    # The areas are left as zeros of the final sizes, for the sanlock
    # backend's init_domain to format; the checker says what is missing.
    monkeypatch.setattr(sanlock_direct, "available", lambda: False)
    pool = StoragePool.create(mount)
    dom = pool.master
    vol = pool.create_volume(dom.sd_id, uid(), MiB)
    assert "sanlock program is missing" in caplog.text
    for path, size in ((dom.dom_md("ids"), MiB),
                       (dom.dom_md("leases"), 2 * MiB),
                       (vol.path + sc.LEASE_EXT, MiB)):
        assert os.path.getsize(path) == size
        with open(path, "rb") as f:
            assert not f.read().strip(b"\0")
    problems = ovirt_rules.check_domain(dom.path)
    assert [p.split(":")[0] for p in problems] == [
        "ids", "leases", vol.path + sc.LEASE_EXT]


# The checker catches what it should

def test_checker_catches_violations(pool, sd_id, tmp_path):
    dom = pool.master
    vol = pool.create_volume(sd_id, uid(), MiB)
    assert ovirt_rules.check_domain(dom.path) == []

    def broken(mutate, expected, **owners):
        mutate()
        found = ovirt_rules.check_domain(dom.path, **owners)
        assert len(found) == 1 and expected in found[0], found
        return found

    md_path = dom.dom_md("metadata")
    with open(md_path, "rb") as f:
        md = f.read()
    broken(lambda: open(md_path, "wb").write(
        md.replace(b"ROLE=Master", b"ROLE=Regular")), "wrong checksum")
    open(md_path, "wb").write(md)
    os.chmod(md_path, sc.FILE_MODE)

    os.chmod(vol.path, 0o644)
    broken(lambda: None, "mode 644")
    os.chmod(vol.path, 0o660)

    image_dir = os.path.dirname(vol.path)
    broken(lambda: os.chmod(image_dir, 0o755), "mode 755")
    os.chmod(image_dir, 0o775)

    lease = vol.path + sc.LEASE_EXT
    sanlock_direct.init_resource(lease, sd_id, "someone-else",
                                 alignment=MiB, block_size=512)
    broken(lambda: None, "no resource")
    sanlock_direct.init_resource(lease, sd_id, vol.vol_id, alignment=MiB,
                                 block_size=512)

    leases = dom.dom_md("leases")
    with open(leases, "r+b") as f:
        f.seek(MiB)
        saved = f.read(MiB)
        f.seek(MiB)
        f.write(bytes(MiB))
    broken(lambda: None, "no SDM")
    with open(leases, "r+b") as f:
        f.seek(MiB)
        f.write(saved)

    xleases = dom.dom_md("xleases")
    with open(xleases, "r+b") as f:
        f.seek(MiB + 70)
        f.write(b"u")
    broken(lambda: None, "updating flag")
    with pytest.raises(xlease.IndexIsUpdating):
        xlease.read_index(xleases, alignment=MiB, block_size=512)
    xlease.format_index(xleases, sd_id, alignment=MiB, block_size=512)

    ids = dom.dom_md("ids")
    other = uid()
    sanlock_direct.init_lockspace(ids, other, alignment=MiB,
                                  block_size=512)
    broken(lambda: None, "no lockspace")
    sanlock_direct.init_lockspace(ids, sd_id, alignment=MiB, block_size=512)

    assert ovirt_rules.check_domain(dom.path) == []
    broken(lambda: os.chown(lease, VDSM, os.getgid()), "owner 36",
           owner=os.getuid(), group=os.getgid())
    os.chown(lease, os.getuid(), os.getgid())

    # Two LEAF volumes in one image: vdsm's getChain picks one at random.
    pool.snapshot(sd_id, vol.meta.image, uid())
    base = pool.image(sd_id, vol.meta.image).get(vol.vol_id)
    dom.write_volume_meta(vol.meta.image, vol.vol_id,
                          base.meta.with_next_generation(
                              voltype=sc.VolumeType.LEAF))
    broken(lambda: None, "2 LEAF volumes")


# sanlock_direct

def test_sanlock_direct_reads_and_errors(tmp_path):
    ls, path = uid(), str(tmp_path / "with:colon")
    os.mkdir(path)
    lease = os.path.join(path, "vol.lease")
    open(lease, "wb").close()
    geo = {"alignment": MiB, "block_size": 512}
    with pytest.raises(sanlock_direct.SanlockDirectError) as e:
        sanlock_direct.read_leader(lease, ls, "vol", **geo)
    assert e.value.rc is not None and e.value.rc < 0
    os.truncate(lease, MiB)
    with pytest.raises(sanlock_direct.SanlockDirectError) as e:
        sanlock_direct.read_leader(lease, ls, "vol", **geo)
    assert e.value.rc == -223 and "no lease" in str(e.value)
    sanlock_direct.init_resource(lease, ls, "vol", **geo)
    leader = sanlock_direct.read_leader(lease, ls, "vol", **geo)
    assert (leader.lockspace, leader.resource, leader.sector_size) == (
        ls, "vol", 512)
    with pytest.raises(sanlock_direct.SanlockDirectError) as e:
        sanlock_direct.read_leader(lease, ls, "other", **geo)
    assert e.value.rc == -227
    assert [(r.offset, r.lockspace, r.resource) for r in
            sanlock_direct.dump(lease, **geo)] == [(0, ls, "vol")]
    with pytest.raises(sanlock_direct.SanlockDirectError) as e:
        sanlock_direct.init_resource(str(tmp_path / "missing"), ls, "v",
                                     **geo)
    assert e.value.rc == -2
    with pytest.raises(errors.InvalidParameter):
        sanlock_direct.init_resource(os.path.join(path, "a:b"), ls, "v",
                                     **geo)
    with pytest.raises(errors.InvalidParameter):
        sanlock_direct.init_resource(lease, ls, "v", alignment=2 * MiB,
                                     block_size=512)


def test_lease_write_cost(tmp_path):
    """One ``sanlock direct init`` a volume: report what it costs."""
    ls, times = uid(), []
    for i in range(20):
        path = str(tmp_path / f"{i}.lease")
        open(path, "wb").close()
        start = time.monotonic()
        sanlock_direct.init_resource(path, ls, f"v{i}", alignment=MiB,
                                     block_size=512)
        times.append(time.monotonic() - start)
    median = sorted(times)[len(times) // 2]
    print(f"\nsanlock direct init -r: median {median * 1000:.1f} ms")
    assert median < 0.1


def test_subprocess_cli_under_umask(tmp_path, mount):
    """A real ``ovirt-storage`` process with umask 077 (systemd's
    UMask=0077, say): modes are still oVirt's."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    proc = subprocess.run(
        ["sh", "-c", 'umask 077 && exec "$0" -m ovirt_cinder.cmd.storage '
         '--lock-path "$1" pool create --path "$2" --json',
         sys.executable, str(tmp_path / "locks"), mount],
        cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sd_id = json.loads(proc.stdout)["master_domain_id"]
    ovirt_rules.assert_domain(os.path.join(mount, sd_id))
