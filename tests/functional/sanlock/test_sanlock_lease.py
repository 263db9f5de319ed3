"""The sanlock lease backend against real sanlock daemons.

Host 1 is this process (and its children) on the module's daemon; host 2
is a second daemon with its own run directory, used by child processes
(tests/functional/sanlock/host.py). io_timeout is 1 s, so joining takes
about 3 s and a dead host's lease is free after about 68 s (the tests
marked slow).
"""

import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fsck
from ovirt_cinder.storage import lease
from ovirt_cinder.storage import sanlock_lease
from ovirt_cinder.storage import sanlockd
from ovirt_cinder.storage.pool import StoragePool
from tests import qemuio
from tests.functional.sanlock.conftest import record

MiB = sc.MiB
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
TAKEOVER_BOUND = 120


def spawn(host, mode, host_id, dom, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "tests.functional.sanlock.host", mode,
         str(host_id), dom.path, *map(str, args)],
        cwd=ROOT, env=host.env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def sdm_record(dom):
    with open(dom.dom_md("leases"), "rb") as f:
        f.seek(dom.sdm_lease_offset)
        return f.read(dom.metadata.block_size)


def lease_areas(dom):
    """The bytes of the lockspace and of the SDM resource."""
    align = dom.metadata.alignment
    with open(dom.dom_md("ids"), "rb") as f:
        ids = f.read(align)
    with open(dom.dom_md("leases"), "rb") as f:
        f.seek(dom.sdm_lease_offset)
        return ids, f.read(align)


# Without a daemon

def test_factory():
    assert isinstance(lease.make_lease_manager("local"),
                      lease.LocalLeaseManager)
    mgr = lease.make_lease_manager("sanlock", host_id=7, io_timeout=3)
    assert isinstance(mgr, sanlock_lease.SanlockLeaseManager)
    assert (mgr.host_id, mgr.io_timeout) == (7, 3)
    with pytest.raises(errors.InvalidParameter):
        lease.make_lease_manager("nfs")


@pytest.mark.parametrize("host_id", [0, 251])
def test_invalid_host_id(host_id):
    with pytest.raises(errors.InvalidParameter):
        sanlock_lease.SanlockLeaseManager(host_id=host_id)


NO_DAEMON = """
import sys
from ovirt_cinder.storage import sanlock_lease, sanlockd, sd
mgr = sanlock_lease.SanlockLeaseManager(io_timeout=1)
dom = sd.FileDomain.open(sys.argv[1])
for step in (mgr.init_domain, mgr.join):
    try:
        step(dom)
    except sanlockd.DaemonUnavailable as e:
        print(type(e).__name__, e.rc, e)
"""


def test_no_daemon(sanlock_program, mount, tmp_path):
    # In a child: libsanlock keeps the first SANLOCK_RUN_DIR it sees.
    pool = StoragePool.create(mount)
    out = subprocess.run(
        [sys.executable, "-c", NO_DAEMON, pool.master.path], cwd=ROOT,
        env={**os.environ, "SANLOCK_RUN_DIR": str(tmp_path / "none")},
        capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 2
    for line in out:
        assert line.startswith("DaemonUnavailable -2 ")
        assert "is it running?" in line


# One host

def test_pool_operations(shared_pool, mgr):
    pool, dom = shared_pool, shared_pool.master
    img = str(uuid.uuid4())
    pool.create_volume(dom.sd_id, img, 16 * MiB)
    leaf = pool.leaf(dom.sd_id, img)
    qemuio.write_pattern(leaf.path, "qcow2", 0, MiB, 0x5a)
    snap = str(uuid.uuid4())
    pool.snapshot(dom.sd_id, img, snap)
    assert snap in pool.image(dom.sd_id, img).snapshots()
    qemuio.verify_pattern(pool.leaf(dom.sd_id, img).path, "qcow2", 0, MiB,
                          0x5a)
    assert fsck.check(pool).clean
    # Each operation acquired and released SDM: the leader shows it.
    assert sanlockd.read_resource(
        dom.dom_md("leases"), dom.sdm_lease_offset, align=sc.ALIGNMENT,
        sector=512) == (dom.sd_id, "SDM")


def test_acquire_time_and_reentry(shared_pool, mgr):
    dom = shared_pool.master
    start = time.monotonic()
    with mgr.domain_lease(dom):
        record("acquire SDM (uncontended)", time.monotonic() - start)
        with mgr.domain_lease(dom):
            # Re-entry does not ask sanlock again (it would say EEXIST).
            pass
        assert mgr.host_status(dom)[1] == "live"
    start = time.monotonic()
    with mgr.domain_lease(dom):
        pass
    record("acquire + release SDM", time.monotonic() - start)


def test_init_domain_is_idempotent(shared_pool, mgr):
    dom = shared_pool.master
    with mgr.domain_lease(dom):
        before = sdm_record(dom)
        mgr.init_domain(dom)    # a held lease is not rewritten
        assert sdm_record(dom) == before
    with mgr.domain_lease(dom):     # and still works
        pass


def test_threads_serialise(shared_pool, mgr):
    dom = shared_pool.master
    inside = []
    entered = threading.Event()
    release = threading.Event()

    def first():
        with mgr.domain_lease(dom):
            inside.append("first")
            entered.set()
            release.wait(10)
            inside.append("first done")

    def second():
        entered.wait(10)
        with mgr.domain_lease(dom):
            inside.append("second")

    threads = [threading.Thread(target=f) for f in (first, second)]
    for t in threads:
        t.start()
    entered.wait(10)
    time.sleep(0.3)
    assert inside == ["first"]      # second waits for the lease
    release.set()
    for t in threads:
        t.join(10)
    assert inside == ["first", "first done", "second"]


def test_volume_lease(shared_pool, mgr):
    pool, dom = shared_pool, shared_pool.master
    img = str(uuid.uuid4())
    vol = pool.create_volume(dom.sd_id, img, 16 * MiB).vol_id
    with mgr.volume_lease(dom, img, vol):
        with mgr.volume_lease(dom, img, vol):
            pass
    assert sanlockd.read_resource(
        vol_path := dom.volume_path(img, vol) + sc.LEASE_EXT, 0,
        align=sc.ALIGNMENT, sector=512) == (dom.sd_id, vol)
    with open(vol_path, "rb") as f:
        f.seek(sc.ALIGNMENT)
        assert f.read() == b""      # nothing written past the lease
    with pytest.raises(errors.VolumeNotFound):
        with mgr.volume_lease(dom, img, str(uuid.uuid4())):
            pass


def test_init_domain_leaves_created_areas_alone(mount, mgr):
    # Created with local leases: the engine wrote the lockspace and SDM
    # with the sanlock program; the daemon reads them and keeps them.
    dom = StoragePool.create(mount).master
    before = lease_areas(dom)
    assert sanlockd.read_lockspace(dom.dom_md("ids"), align=sc.ALIGNMENT,
                                   sector=512) == dom.sd_id
    mgr.init_domain(dom)
    assert lease_areas(dom) == before
    # (test_pool_formats_the_domains_it_creates acquires them.)


def test_uninitialised_domain(mount, mgr):
    # Areas of zeros (a domain made without the sanlock program, or by
    # an older release), opened without init_domain.
    dom = StoragePool.create(mount, lease_manager=mgr).master
    with open(dom.dom_md("leases"), "r+b") as f:
        f.seek(dom.sdm_lease_offset)
        f.write(bytes(sc.ALIGNMENT))
    pool = StoragePool.open([mount], lease_manager=mgr)
    with pytest.raises(sanlockd.LeaseCorrupt) as e:
        pool.create_volume(pool.master.sd_id, str(uuid.uuid4()), MiB)
    assert e.value.rc == -223
    assert "not initialised or corrupt" in str(e.value)


def test_pool_formats_the_domains_it_creates(mount, mount2, mgr):
    pool = StoragePool.create(mount, lease_manager=mgr)
    dom2 = pool.add_domain(mount2)
    for dom in (pool.master, dom2):
        pool.create_volume(dom.sd_id, str(uuid.uuid4()), MiB)


def test_garbage_ids(mount, mgr):
    pool = StoragePool.create(mount, lease_manager=mgr)
    dom = pool.master
    with open(dom.dom_md("ids"), "r+b") as f:
        f.write(os.urandom(sc.ALIGNMENT))
    with pytest.raises(sanlockd.LeaseCorrupt):
        mgr.init_domain(dom)    # garbage is not silently wiped
    with pytest.raises(errors.LeaseError) as e:
        with mgr.domain_lease(dom):
            pass
    assert isinstance(e.value, sanlockd.LeaseCorrupt)
    assert e.value.rc == -223
    mgr.init_domain(dom, force=True)
    with mgr.domain_lease(dom):
        pass


# Two hosts

def test_two_hosts_race(sanlock_pool, host1, host2, tmp_path):
    dom = sanlock_pool.master
    log = tmp_path / "race.log"
    n = 5
    procs = [spawn(host, "race", host_id, dom, log, n, 0.1,
                   tmp_path / "barrier")
             for host_id, host in ((1, host1), (2, host2))]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    lines = log.read_text().splitlines()
    holder = None
    for line in lines:
        what, who = line.split(" ", 1)
        if what == "start":
            assert holder is None, f"{who} entered while {holder} inside"
            holder = who
        else:
            assert holder == who
            holder = None
    starts = [line.split()[1] for line in lines if line.startswith("start")]
    assert sorted(starts) == ["1"] * n + ["2"] * n


def start_holder(host2, dom):
    holder = spawn(host2, "hold", 2, dom)
    line = holder.stdout.readline()
    assert line == "held\n", holder.stderr.read()
    return holder


def wait_takeover(mgr, dom, crashed_at):
    mgr.lease_timeout = TAKEOVER_BOUND
    with mgr.domain_lease(dom):
        took = time.monotonic() - crashed_at
        status = mgr.host_status(dom)
    return took, status


@pytest.mark.slow
def test_takeover(sanlock_pool, lease_mgr, host2):
    mgr = lease_mgr
    dom = sanlock_pool.master
    holder = start_holder(host2, dom)
    try:
        mgr.lease_timeout = 1
        start = time.monotonic()
        with pytest.raises(errors.LeaseTimeout) as e:
            with mgr.domain_lease(dom):
                pass
        record("acquire held by a live host -> LeaseTimeout(1 s)",
               time.monotonic() - start)
        assert e.value.rc == sanlockd.SANLK_ACQUIRE_IDLIVE
        assert mgr.host_status(dom)[2] == "live"
        assert not mgr.is_host_dead(dom, 2)
        host2.crash()
    finally:
        holder.kill()
        holder.wait()
    took, status = wait_takeover(mgr, dom, time.monotonic())
    record("takeover after host 2 crashed holding SDM", took)
    assert took < TAKEOVER_BOUND
    assert status[2] == "dead"
    assert mgr.is_host_dead(dom, 2)


@pytest.mark.slow
def test_recover_after_takeover(sanlock_pool, lease_mgr, host2):
    mgr = lease_mgr
    pool, dom = sanlock_pool, sanlock_pool.master
    img, snap1, snap2 = (str(uuid.uuid4()) for _ in range(3))
    pool.create_volume(dom.sd_id, img, 16 * MiB)
    qemuio.write_pattern(pool.leaf(dom.sd_id, img).path, "qcow2", 0, MiB,
                         0x61)
    pool.snapshot(dom.sd_id, img, snap1)
    qemuio.write_pattern(pool.leaf(dom.sd_id, img).path, "qcow2", MiB, MiB,
                         0x62)
    # Host 2 dies (with its daemon) in the middle of a snapshot flow.
    crasher = spawn(host2, "crash", 2, dom, img, snap2, "freeze_leaf",
                    host2.pid)
    crasher.communicate(timeout=60)
    crashed_at = time.monotonic()
    assert crasher.returncode == -9, crasher.stderr
    assert not host2.running() or host2.proc.wait(5) is not None
    assert not fsck.check(pool).clean      # the unfinished flow
    # Until sanlock declares host 2 dead its flow is left alone; then
    # recovery takes it over.
    assert pool.recover() == [("snapshot", "SKIPPED")]
    while True:
        recovered = pool.recover()
        if recovered != [("snapshot", "SKIPPED")]:
            break
        assert time.monotonic() - crashed_at < TAKEOVER_BOUND
        time.sleep(1)
    record("recover() after host 2 crashed mid-flow",
           time.monotonic() - crashed_at)
    assert recovered == [("snapshot", "SUCCESS")]
    assert mgr.is_host_dead(dom, 2)
    assert fsck.check(pool).clean
    tree = pool.image(dom.sd_id, img)
    assert snap1 in tree.snapshots()
    leaf = tree.leaf().path
    qemuio.verify_pattern(leaf, "qcow2", 0, MiB, 0x61)
    qemuio.verify_pattern(leaf, "qcow2", MiB, MiB, 0x62)
    qemuio.verify_pattern(tree.snapshots()[snap1].path, "qcow2", 0, MiB,
                          0x61)


def test_cinder_driver_with_sanlock(mount, mgr, tmp_path):
    """cinder-volume configured with ovirt_lease_backend = sanlock."""
    from cinder import objects
    objects.register_all()
    from cinder import context
    from cinder.tests.unit import fake_volume
    from cinder.volume import configuration
    from oslo_config import cfg

    from ovirt_cinder.cinder import driver as ovirt_driver

    pool = StoragePool.create(mount)     # local leases: not formatted
    conf = cfg.CONF
    group = "ovirt_sanlock"
    conf.register_group(cfg.OptGroup(group))
    overrides = {"ovirt_domain_paths": [mount],
                 "ovirt_lease_backend": "sanlock", "ovirt_host_id": 1,
                 "ovirt_io_timeout": 1, "ovirt_recovery_interval": 0}
    for name, value in overrides.items():
        conf.set_override(name, value, group="backend_defaults")
    try:
        drv = ovirt_driver.OvirtVolumeDriver(
            configuration=configuration.Configuration(
                [], config_group=group), host=f"host@{group}")
        drv.do_setup(None)
        assert isinstance(drv.pool.lease_manager,
                          sanlock_lease.SanlockLeaseManager)
        vol = fake_volume.fake_volume_obj(
            context.get_admin_context(), size=1, host=f"host@{group}#"
            f"{pool.master.sd_id}")
        drv.create_volume(vol)
        # The driver formatted the domain's lockspace and holds it.
        status = drv.pool.lease_manager.host_status(pool.master)
        assert status.get(1) == "live"
        leaf = drv.pool.leaf(pool.master.sd_id, vol.name_id)
        assert leaf.meta.capacity == sc.GiB
        drv.pool.lease_manager.close()
    finally:
        for name in overrides:
            conf.clear_override(name, group="backend_defaults")
