"""Lease scopes and waits of the local lease manager, with real flocks.

Image leases serialise operations on one image across threads and
processes and leave other images alone; domain (SDM) leases are held only
around metadata changes, so a long copy does not hold them; every wait is
bounded; in an eventlet process a wait never stalls the hub.
"""

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import lease
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage.pool import StoragePool

MiB = sc.MiB
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


@pytest.fixture
def leases(tmp_path):
    return lease.LocalLeaseManager(lease_timeout=0.5,
                                   lock_path=str(tmp_path / "locks"))


@pytest.fixture
def pool(tmp_path, leases):
    mount = tmp_path / "mnt"
    mount.mkdir()
    return StoragePool.create(str(mount), lease_manager=leases)


def hold_in_child(code: str) -> subprocess.Popen:
    """Run ``code`` in a child that prints "held" once it holds a lock,
    then sleeps until killed."""
    script = textwrap.dedent(code) + textwrap.dedent("""
        print("held", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def stop(child: subprocess.Popen) -> None:
    child.kill()
    child.wait()


def test_image_lease_times_out_while_another_process_holds_it(pool,
                                                               tmp_path):
    dom = pool.master
    img = str(uuid.uuid4())
    child = hold_in_child(f"""
        import time
        from ovirt_cinder.storage import lease
        mgr = lease.LocalLeaseManager(lock_path={str(tmp_path / 'locks')!r})

        class Dom:
            sd_id = {dom.sd_id!r}

        ctx = mgr.image_lease(Dom(), {img!r})
        ctx.__enter__()
    """)
    try:
        start = time.monotonic()
        with pytest.raises(errors.LeaseTimeout):
            pool.create_volume(dom.sd_id, img, MiB)
        assert time.monotonic() - start >= 0.5
        assert not dom.has_image(img)
        # Another image of the same domain is not blocked.
        pool.create_volume(dom.sd_id, str(uuid.uuid4()), MiB)
    finally:
        stop(child)
    pool.create_volume(dom.sd_id, img, MiB)


def test_image_lease_serialises_threads(leases, pool):
    dom = pool.master
    img = str(uuid.uuid4())
    inside = []
    overlap = []

    def work():
        with leases.image_lease(dom, img):
            if inside:
                overlap.append(True)
            inside.append(1)
            time.sleep(0.02)
            inside.pop()

    threads = [threading.Thread(target=work) for _ in range(8)]
    leases.lease_timeout = 10
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlap


def test_image_lease_is_reentrant(leases, pool):
    dom = pool.master
    img = str(uuid.uuid4())
    with leases.image_lease(dom, img):
        with leases.image_lease(dom, img):
            pass
        with leases.image_leases([(dom, img), (dom, str(uuid.uuid4()))]):
            pass


@contextlib.contextmanager
def image_lease_held(holder, leases, dom, img, lock_path):
    """``img``'s image lease held by another thread of this process (the
    in-process lock) or by another process of the host (the flock)."""
    if holder == "process":
        child = hold_in_child(f"""
            import time
            from ovirt_cinder.storage import lease
            mgr = lease.LocalLeaseManager(lock_path={lock_path!r})

            class Dom:
                sd_id = {dom.sd_id!r}

            ctx = mgr.image_lease(Dom(), {img!r})
            ctx.__enter__()
        """)
        try:
            yield
        finally:
            stop(child)
        return
    held, release = threading.Event(), threading.Event()

    def hold():
        with leases.image_lease(dom, img):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(10)
        yield
    finally:
        release.set()
        thread.join()


@pytest.mark.parametrize("holder", ["thread", "process"])
def test_image_lease_timeout_bounds_one_wait(leases, pool, tmp_path,
                                             holder):
    """``timeout`` replaces lease_timeout for one image lease request."""
    dom = pool.master
    img = str(uuid.uuid4())
    leases.lease_timeout = 60
    with image_lease_held(holder, leases, dom, img,
                          str(tmp_path / "locks")):
        start = time.monotonic()
        with pytest.raises(errors.LeaseTimeout) as e:
            with leases.image_leases([(dom, img)], timeout=0.2):
                pass
        waited = time.monotonic() - start
        assert 0.15 <= waited < 10
        assert e.value.timeout == 0.2
        # Without one, lease_timeout still applies.
        leases.lease_timeout = 0.3
        start = time.monotonic()
        with pytest.raises(errors.LeaseTimeout):
            with leases.image_lease(dom, img):
                pass
        assert time.monotonic() - start >= 0.25
    with leases.image_lease(dom, img, timeout=0.2):
        pass


def test_domain_lease_times_out_while_another_process_holds_it(pool):
    dom = pool.master
    child = hold_in_child(f"""
        import fcntl, os, time
        fd = os.open({dom.dom_md('ids')!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
    """)
    try:
        with pytest.raises(errors.LeaseTimeout):
            pool.create_volume(dom.sd_id, str(uuid.uuid4()), MiB)
    finally:
        stop(child)


def test_long_copy_does_not_hold_the_domain_lease(pool, leases):
    """While a clone copies data, the SDM lease is free: another image of
    the domain can be created and snapshotted."""
    dom = pool.master
    src = str(uuid.uuid4())
    vol = pool.create_volume(dom.sd_id, src, 64 * MiB,
                             fmt=sc.VolumeFormat.RAW)
    with open(vol.path, "r+b") as f:
        f.write(os.urandom(64 * MiB))
    dom.copy_offload = False
    copying = threading.Event()
    release = threading.Event()
    real_convert = qemuimg.convert

    def slow_convert(*args, **kwargs):
        copying.set()
        release.wait(10)
        return real_convert(*args, **kwargs)

    result = []
    qemuimg.convert = slow_convert
    try:
        cloner = threading.Thread(target=lambda: result.append(
            pool.clone(dom.sd_id, src, str(uuid.uuid4()))))
        cloner.start()
        assert copying.wait(10)
        other = str(uuid.uuid4())
        # With a 0.5 s lease timeout these would fail if the copy held
        # the domain lease.
        pool.create_volume(dom.sd_id, other, MiB)
        pool.snapshot(dom.sd_id, other, str(uuid.uuid4()))
        # The copy's source image is busy: its lease is the clone's.
        with pytest.raises(errors.LeaseTimeout):
            pool.snapshot(dom.sd_id, src, str(uuid.uuid4()))
    finally:
        release.set()
        cloner.join()
        qemuimg.convert = real_convert
    assert result and result[0].legal


EVENTLET_WAIT = """
import eventlet
eventlet.monkey_patch()
import sys, time
from ovirt_cinder.storage import errors, lease

class Dom:
    sd_id = sys.argv[2]
    def dom_md(self, name):
        return sys.argv[1]

mgr = lease.LocalLeaseManager(lease_timeout=1.0,
                              lock_path=sys.argv[3])
ticks = []

def ticker():
    while True:
        ticks.append(time.monotonic())
        eventlet.sleep(0.01)

eventlet.spawn(ticker)
eventlet.sleep(0)
try:
    with mgr.domain_lease(Dom()):
        print("acquired")
except errors.LeaseTimeout:
    print("timeout", len(ticks))
"""


def test_lease_wait_does_not_block_the_eventlet_hub(pool, tmp_path):
    """A green thread waiting for a held flock lets the others run."""
    dom = pool.master
    child = hold_in_child(f"""
        import fcntl, os, time
        fd = os.open({dom.dom_md('ids')!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
    """)
    try:
        out = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", EVENTLET_WAIT,
             dom.dom_md("ids"), dom.sd_id, str(tmp_path / "locks")],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        stop(child)
    assert out.returncode == 0, out.stderr
    word, ticks = out.stdout.split()
    assert word == "timeout"
    # About 100 ticks in the 1 s wait; a blocking flock would give 1.
    assert int(ticks) > 20
