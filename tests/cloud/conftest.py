"""Fixtures of the API tier: the cloud, or a failure saying why not.

The tier needs the cloud of ``make cloud`` and its admin credentials
(``. .cloud/openrc``). Without them every test fails at setup with the
reason: a tier that skips could never fail.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
from typing import NoReturn

import pytest

from tests.cloud import api

if TYPE_CHECKING:
    import openstack.connection

BACKENDS = ("ovirt1", "ovirt2")


def pytest_configure(config: pytest.Config) -> None:
    # An import-time deprecation of openstacksdk's dependencies, and
    # openstacksdk announcing its own future removals on every call
    # (filters by module: no import of openstack here).
    config.addinivalue_line("filterwarnings",
                            "ignore:'cgi' is deprecated:DeprecationWarning")
    config.addinivalue_line(
        "filterwarnings", "ignore::PendingDeprecationWarning:openstack")


def _unreachable(reason: str) -> NoReturn:
    pytest.fail(f"the cloud is not reachable: {reason}. Start it with "
                "`python3 tools/cloud/cloud.py up` (make cloud), then "
                "`. .cloud/openrc`", pytrace=False)


def _volume_hosts(conn: openstack.connection.Connection) -> dict[str, str]:
    """backend name -> ``host@backend`` of the cinder-volume services that
    are up and enabled (one of the two services of the clustered
    ``ovirt3``)."""
    resp = conn.block_storage.get("/os-services?binary=cinder-volume")
    if resp.status_code != 200:
        _unreachable(f"Cinder answers {resp.status_code}: {resp.text}")
    return {s["host"].split("@", 1)[1]: s["host"]
            for s in resp.json()["services"]
            if "@" in s["host"] and s["state"] == "up"
            and s["status"] == "enabled"}


@pytest.fixture(scope="session")
def conn() -> openstack.connection.Connection:
    """An authenticated admin connection, checked against Keystone."""
    try:
        import openstack  # late: its imports warn, filtered by then
    except ImportError as e:
        pytest.fail(f"{e}: run the tier with the cloud's venv, "
                    ".cloud/venv/bin/python -m pytest tests/cloud",
                    pytrace=False)
    url = os.environ.get("OS_AUTH_URL")
    if not url:
        _unreachable("OS_AUTH_URL is not set")
    try:
        connection = openstack.connect(api_timeout=120)
        connection.authorize()
    except Exception as e:  # noqa: BLE001 -- any reason is the message
        _unreachable(f"Keystone at {url} does not answer: "
                     f"{type(e).__name__}: {e}")
    return connection


@pytest.fixture(scope="session")
def hosts(conn: openstack.connection.Connection) -> dict[str, str]:
    """``host@backend`` of ovirt1 and ovirt2, both up."""
    found = _volume_hosts(conn)
    missing = [b for b in BACKENDS if b not in found]
    if missing:
        _unreachable(f"cinder-volume backends {missing} are not up "
                     f"(up: {sorted(found.values())})")
    return found


@pytest.fixture
def cloud(request: pytest.FixtureRequest,
          conn: openstack.connection.Connection,
          hosts: dict[str, str]) -> api.Cloud:
    """The APIs; what the test creates is deleted after it."""
    c = api.Cloud(conn)
    request.addfinalizer(c.cleanup)
    return c


@pytest.fixture(scope="session")
def pattern() -> bytes:
    return api.pattern()


@pytest.fixture(scope="session")
def image(request: pytest.FixtureRequest,
          conn: openstack.connection.Connection, hosts: dict[str, str],
          pattern: bytes) -> dict:
    """One raw Glance image of the pattern for the session (a template
    of the ovirt1 pool)."""
    c = api.Cloud(conn)
    request.addfinalizer(c.cleanup)
    return c.create_image("image", pattern)


@pytest.fixture(scope="session")
def pool1(hosts: dict[str, str]) -> dict:
    """ovirt1's pool: ``master`` (where Glance keeps templates) and
    ``second``, its other domain."""
    shown = api.storage("ovirt1", "pool", "show")
    others = [d["sd_id"] for d in shown["domains"]
              if d["sd_id"] != shown["master"]]
    assert len(others) == 1, f"ovirt1 should have two domains: {shown}"
    return {"master": shown["master"], "second": others[0],
            "pool_id": shown["pool_id"]}


@pytest.fixture
def log_start() -> dict[str, int]:
    """The size of each cinder-volume's log when the test starts."""
    return api.log_offset()
