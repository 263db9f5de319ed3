"""A real ``cinder-volume`` process configured with the driver.

The test builds a two-domain pool in tmp_path, writes a cinder.conf for
one backend (SQLite database, ``fake:/`` messaging, no Keystone, no
RabbitMQ), runs ``cinder-manage db sync`` and starts ``cinder-volume``
(the venv's console scripts, found next to ``sys.executable``) in its own
process group. What is observed from outside the process:

* the service row ``<host>@ovirt1`` / ``cinder-volume`` in the database,
  its ``report_count`` growing (the service is alive);
* the driver's capabilities as Cinder logs them at debug level
  ("Initialized capabilities list: {...}"), one pool per domain, named by
  its sd_id, and "Driver initialization completed successfully.";
* one real operation served by the process: a volume left in
  ``deleting`` with a ``workers`` entry (as an interrupted delete leaves
  it) is deleted by the service's startup cleanup through the driver, so
  its image disappears from the domain and its row is marked deleted.

``fake:/`` messaging works within one process only, so operations sent over
RPC are covered in-process by test_volume_manager.py.
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import pytest

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage.pool import StoragePool

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
BACKEND = "ovirt1"
HOST = "test-host"
SERVICE_HOST = f"{HOST}@{BACKEND}"
DRIVER = "ovirt_cinder.cinder.driver.OvirtVolumeDriver"
START_TIMEOUT = 90
CAPS = re.compile(r"Initialized capabilities list: (\{.*\})\. ")
INITIALIZED = "Driver initialization completed successfully."
CLEANED = re.compile(r"Service \d+ cleanup completed")
INIT_FAILED = "Failed to initialize driver."
ERROR_LINE = re.compile(r"^\S+ \S+ \d+ (ERROR|CRITICAL) ")


@pytest.fixture
def pool(tmp_path):
    mounts = [tmp_path / "mnt1", tmp_path / "mnt2"]
    for mount in mounts:
        mount.mkdir()
    pool = StoragePool.create(str(mounts[0]), description="master")
    pool.add_domain(str(mounts[1]), description="second")
    return pool


def write_conf(tmp_path: Path, pool: StoragePool) -> Path:
    paths = f"{tmp_path / 'mnt1'},{tmp_path / 'mnt2'}"
    conf = tmp_path / "cinder.conf"
    conf.write_text(f"""\
[DEFAULT]
transport_url = fake:/
enabled_backends = {BACKEND}
host = {HOST}
state_path = {tmp_path / "state"}
image_conversion_dir = {tmp_path / "conversion"}
log_file = {tmp_path / "cinder-volume.log"}
debug = True
report_interval = 1

[database]
connection = sqlite:///{tmp_path / "cinder.sqlite"}

[oslo_concurrency]
lock_path = {tmp_path / "locks"}

[coordination]
backend_url = file://{tmp_path / "coordination"}

[{BACKEND}]
volume_driver = {DRIVER}
volume_backend_name = {BACKEND}
ovirt_domain_paths = {paths}
ovirt_pool_uuid = {pool.pool_id}
""")
    return conf


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def db_sync(conf: Path, tmp_path: Path) -> None:
    res = subprocess.run(
        [str(BIN / "cinder-manage"), "--config-file", str(conf), "db",
         "sync"], cwd=tmp_path, env=child_env(), capture_output=True,
        text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]


def seed_interrupted_delete(db: Path, sd_id: str, vol_id: str) -> None:
    """A volume in ``deleting`` with its worker entry, owned by our service
    row, as a cinder-volume killed during a delete leaves them."""
    then = (datetime.datetime.now(datetime.UTC)
            - datetime.timedelta(seconds=5)).strftime("%Y-%m-%d %H:%M:%S.%f")
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        (vtype,) = con.execute(
            "SELECT id FROM volume_types WHERE name = '__DEFAULT__'"
        ).fetchone()
        cur = con.execute(
            "INSERT INTO services (created_at, deleted, host, binary, topic,"
            " report_count, disabled, availability_zone, uuid)"
            " VALUES (?, 0, ?, 'cinder-volume', 'cinder-volume', 0, 0,"
            " 'nova', ?)", (then, SERVICE_HOST, str(uuid.uuid4())))
        service_id = cur.lastrowid
        con.execute(
            "INSERT INTO volumes (id, created_at, deleted, user_id,"
            " project_id, host, size, status, attach_status,"
            " availability_zone, volume_type_id, use_quota)"
            " VALUES (?, ?, 0, 'user', 'project', ?, 1, 'deleting',"
            " 'detached', 'nova', ?, 1)",
            (vol_id, then, f"{SERVICE_HOST}#{sd_id}", vtype))
        con.execute(
            "INSERT INTO workers (created_at, updated_at, deleted,"
            " resource_type, resource_id, status, service_id)"
            " VALUES (?, ?, 0, 'Volume', ?, 'deleting', ?)",
            (then, then, vol_id, service_id))


def query(db: Path, sql: str, *args: object) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db)) as con:
        return con.execute(sql, args).fetchall()


@contextlib.contextmanager
def cinder_volume(conf: Path, tmp_path: Path) -> Iterator[subprocess.Popen]:
    out = open(tmp_path / "cinder-volume.out", "wb")
    proc = subprocess.Popen(
        [str(BIN / "cinder-volume"), "--config-file", str(conf)],
        cwd=tmp_path, env=child_env(), stdin=subprocess.DEVNULL,
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)
        out.close()


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    # The launcher's forked workers share the group; reap them all.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def log_tail(tmp_path: Path, lines: int = 40) -> str:
    """The first error of each log with what follows it, and its tail."""
    text = ""
    for name in ("cinder-volume.log", "cinder-volume.out"):
        path = tmp_path / name
        if not path.exists():
            continue
        all_lines = path.read_text(errors="replace").splitlines()
        first = next((i for i, line in enumerate(all_lines)
                      if ERROR_LINE.match(line)), None)
        if first is not None:
            text += f"\n--- {name} (first error) ---\n" + "\n".join(
                all_lines[first:first + lines])
        text += f"\n--- {name} (tail) ---\n" + "\n".join(
            all_lines[-lines:])
    return text


def wait_for(check: Callable[[], bool], proc: subprocess.Popen,
             tmp_path: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not check():
        if proc.poll() is not None:
            pytest.fail(f"cinder-volume exited ({proc.returncode}) before "
                        f"{what}{log_tail(tmp_path)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {START_TIMEOUT} s"
                        f"{log_tail(tmp_path)}")
        time.sleep(0.2)


def reported_caps(log: Path) -> dict | None:
    if not log.exists():
        return None
    found = CAPS.search(log.read_text(errors="replace"))
    return ast.literal_eval(found.group(1)) if found else None


def test_cinder_volume_serves_pool(tmp_path, pool):
    conf = write_conf(tmp_path, pool)
    db = tmp_path / "cinder.sqlite"
    log = tmp_path / "cinder-volume.log"
    db_sync(conf, tmp_path)
    second = next(d.sd_id for d in pool.domains.values() if not d.is_master)
    vol_id = str(uuid.uuid4())
    pool.create_volume(second, vol_id, sc.GiB, fmt=sc.VolumeFormat.RAW)
    seed_interrupted_delete(db, second, vol_id)
    log.unlink(missing_ok=True)  # db sync logged there too

    with cinder_volume(conf, tmp_path) as proc:
        def started() -> bool:
            text = log.read_text(errors="replace") if log.exists() else ""
            if INIT_FAILED in text:
                pytest.fail(f"driver failed to start{log_tail(tmp_path)}")
            return INITIALIZED in text and bool(CLEANED.search(text))

        wait_for(started, proc, tmp_path, "driver initialization")
        wait_for(lambda: query(
            db, "SELECT report_count FROM services WHERE host = ?",
            SERVICE_HOST)[0][0] > 0, proc, tmp_path, "service report")
        assert proc.poll() is None, log_tail(tmp_path)
        caps = reported_caps(log)
        services = query(
            db, "SELECT host, binary, topic, disabled FROM services"
            " WHERE deleted = 0")
        volume = query(db, "SELECT status, deleted FROM volumes"
                       " WHERE id = ?", vol_id)
        tail = log_tail(tmp_path)

    assert services == [(SERVICE_HOST, "cinder-volume", "cinder-volume",
                         0)], tail
    assert caps is not None, tail
    assert caps["volume_backend_name"] == BACKEND
    assert {p["pool_name"] for p in caps["pools"]} == set(pool.domains)
    for p in caps["pools"]:
        assert p["location_info"] == f"ovirt:{pool.pool_id}"
        assert p["total_capacity_gb"] > 0
    # The interrupted delete was finished by the service, through the
    # driver, on the domain the volume lives in.
    assert volume == [("deleted", 1)], tail
    assert vol_id not in pool.list_images(second)
