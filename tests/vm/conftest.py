"""Fixtures of the VM tier: Cinder's VolumeManager on this machine (the
storage host, from tests/functional/cinder) serving iSCSI on the machine's
tgtd, and a QEMU guest (the Nova host) that attaches with os-brick.

The image is built by ``tools/vm/build.py`` when missing (cached, so a
built one costs a hash); every run prints how long the build, the boot
and the steps of the scenario took.
"""

import contextlib
import time

import pytest

# The storage host: Cinder's VolumeManager over a real pool, exporting
# with Cinder's TgtAdm on the machine's tgtd.
from tests.functional.cinder.conftest import *  # noqa: F403
from tests.functional.cinder.conftest import _no_privsep_daemon  # noqa: F401
from tests.functional.cinder.test_iscsi_export import export_protocol  # noqa: F401
from tests.functional.cinder.test_iscsi_export import iscsi_conf  # noqa: F401
from tests.functional.cinder.test_iscsi_export import mgr  # noqa: F401
from tests.functional.cinder.test_iscsi_export import tgtd  # noqa: F401
from tests.vm import guest as guest_mod

INITIATOR = "iqn.2004-10.org.example:vm-guest"
"""The guest's initiator name, as Nova's host would have one."""

TIMINGS: dict[str, float] = {}
"""Seconds per step of this run, printed at the end."""
FACTS: dict[str, str] = {}
"""What the scenario saw (write counts, the snapshot's cut), printed at
the end."""


@contextlib.contextmanager
def timed(name: str):
    start = time.monotonic()
    try:
        yield
    finally:
        TIMINGS[name] = time.monotonic() - start


@pytest.fixture(scope="session")
def vm_image():
    """The built image's directory (built now if needed)."""
    TIMINGS["build (or cache check)"] = guest_mod.build_image()
    return guest_mod.IMAGE_DIR


@pytest.fixture(scope="module")
def guest(vm_image, tmp_path_factory):
    """A booted guest with iscsid running and os-brick set up; powered
    off (or killed) at the end, whatever happened. Its console.log and
    diagnostics.txt (iSCSI sessions, iscsid's log, dmesg) stay in pytest's
    temporary directory."""
    workdir = str(tmp_path_factory.mktemp("guest"))
    with guest_mod.booted(workdir, image_dir=vm_image) as vm:
        TIMINGS["boot to agent"] = vm.boot_seconds
        with timed("guest setup (iscsid, os-brick)"):
            vm.call("setup", initiator=INITIATOR)
        yield vm
        vm.save_diagnostics()


def pytest_runtest_logreport(report):
    if report.when == "call" and report.nodeid.startswith("tests/vm/"):
        key = "scenario (the tests' calls)"
        TIMINGS[key] = TIMINGS.get(key, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if not TIMINGS:
        return
    terminalreporter.write_sep("=", "VM tier timings")
    for name, seconds in TIMINGS.items():
        terminalreporter.write_line(f"{name:<44} {seconds:6.1f}s")
    for name, fact in FACTS.items():
        terminalreporter.write_line(f"{name}: {fact}")
