"""Fixtures: real sanlock daemons ("hosts") and lease managers.

The tests skip only when the ``sanlock`` program or the ``sanlock``
Python binding is missing (``make test`` installs both). Host 1's daemon
serves this test process (``SANLOCK_RUN_DIR`` is set for the module);
host 2 is a second daemon, used by child processes.
"""

import os
import shutil
import time

import pytest

from ovirt_cinder.storage import pool as pool_mod
from ovirt_cinder.storage import sanlock_lease
from ovirt_cinder.storage import sanlockd
from tests.functional.sanlock import daemon as daemon_mod

IO_TIMEOUT = 1

# name -> seconds, printed at the end of the run.
TIMINGS: dict[str, float] = {}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: waits for sanlock to expire a dead host's "
        "lease (about 70 s)")


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_sep("=", "sanlock timings")
        for name, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{name}: {seconds:.3f} s")


def record(name, seconds):
    TIMINGS[name] = seconds


@pytest.fixture(scope="session")
def sanlock_program():
    path = shutil.which("sanlock", path=os.environ.get("PATH", "") +
                        ":/usr/sbin:/sbin")
    if path is None:
        pytest.skip("the sanlock program is missing "
                    "(apt-get install sanlock)")
    if not sanlockd.available():
        pytest.skip("the sanlock Python binding is missing "
                    "(apt-get install python3-sanlock; copy "
                    "sanlock.cpython-*.so into the venv)")
    return path


@pytest.fixture(scope="session")
def shim(sanlock_program, tmp_path_factory):
    return daemon_mod.build_shim(str(tmp_path_factory.mktemp("shim")))


@pytest.fixture(scope="session")
def host1(sanlock_program, shim, tmp_path_factory):
    """Host 1's daemon; this process's sanlock clients use it.

    libsanlock reads ``SANLOCK_RUN_DIR`` once per process, at its first
    request, so this daemon lives for the whole session and no test may
    point this process at another daemon (use a child process).
    """
    workdir = str(tmp_path_factory.mktemp("sanlock"))
    with daemon_mod.Daemon(sanlock_program, shim, workdir, "host1") as d:
        saved = os.environ.get("SANLOCK_RUN_DIR")
        os.environ["SANLOCK_RUN_DIR"] = d.run_dir
        try:
            fd = sanlockd.register()
        except sanlockd.DaemonUnavailable as e:
            pytest.fail(f"this process already talks to another sanlock "
                        f"daemon: {e}")
        os.close(fd)
        try:
            yield d
        finally:
            if saved is None:
                del os.environ["SANLOCK_RUN_DIR"]
            else:
                os.environ["SANLOCK_RUN_DIR"] = saved


@pytest.fixture
def host2(sanlock_program, shim, tmp_path):
    """Host 2: a second daemon, for child processes (``host2.env``)."""
    with daemon_mod.Daemon(sanlock_program, shim, str(tmp_path),
                           "host2") as d:
        yield d


@pytest.fixture(scope="module")
def mgr(host1):
    with sanlock_lease.SanlockLeaseManager(
            host_id=1, io_timeout=IO_TIMEOUT, lease_timeout=30,
            retry_interval=0.05) as m:
        yield m


@pytest.fixture
def lease_mgr(mgr):
    """The module's manager, its lease timeout reset after the test."""
    yield mgr
    mgr.lease_timeout = 30


def formatted_pool(mount, mgr):
    pool = pool_mod.StoragePool.create(mount, lease_manager=mgr)
    mgr.init_domain(pool.master)
    start = time.monotonic()
    mgr.join(pool.master)
    record("add_lockspace (join), io_timeout=1", time.monotonic() - start)
    return pool


@pytest.fixture
def sanlock_pool(mount, lease_mgr):
    """A new pool whose master domain is formatted and joined."""
    return formatted_pool(mount, lease_mgr)


@pytest.fixture(scope="module")
def shared_pool(tmp_path_factory, mgr):
    """One formatted, joined pool for the single-host tests."""
    return formatted_pool(str(tmp_path_factory.mktemp("shared")), mgr)
