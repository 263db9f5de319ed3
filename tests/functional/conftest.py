import os

import pytest

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import counters
from ovirt_cinder.storage import pool as pool_mod


@pytest.fixture
def mount(tmp_path):
    path = tmp_path / "mnt1"
    path.mkdir()
    return str(path)


@pytest.fixture
def mount2(tmp_path):
    path = tmp_path / "mnt2"
    path.mkdir()
    return str(path)


@pytest.fixture
def pool(mount):
    return pool_mod.StoragePool.create(mount, description="test pool")


@pytest.fixture
def sd_id(pool):
    return pool.master.sd_id


def leftovers(dom_path):
    """Work-in-progress names that must never survive an operation."""
    found = []
    for root, dirs, files in os.walk(dom_path):
        for name in dirs + files:
            if name.startswith((".tmp-", "_remove_me_")) or name.endswith(
                    ".new"):
                found.append(os.path.join(root, name))
    return found


def assert_counters(pool):
    """Every V5 domain's counters record holds what a scan counts."""
    for dom in pool.domains.values():
        if dom.metadata.version >= sc.DOMAIN_VERSION:
            record = counters.read(dom)
            assert record.counters == counters.scan(dom), dom.sd_id


def pytest_terminal_summary(terminalreporter):
    from tests.functional import test_crash
    if test_crash.MATRIX:
        terminalreporter.write_sep("=", "crash matrix")
        terminalreporter.write_line(
            test_crash.pytest_terminal_summary_matrix())
