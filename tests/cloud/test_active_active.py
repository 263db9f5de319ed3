"""The cinder-volume cluster: two services, two sanlock hosts, one pool.

``make cloud`` runs ``cinder-volume-a`` and ``cinder-volume-b`` in the
Cinder cluster ``ovirt``: each is a storage host of its own (its own
sanlock daemon and host id, 1 and 2), both serve the backend ``ovirt3``
(one pool), Cinder spreads the cluster's work between them (RabbitMQ
hands each cast to one of them) and the flows' logbooks are in MariaDB.

Checked here, by content:

- work on one image from both services at once: creates from one image,
  snapshots, volumes from the snapshots and deletes, spread over both
  hosts, leave the right bytes and a clean pool;
- a storage host that dies mid-operation (its cinder-volume and its
  sanlock daemon SIGKILLed while its clone copies data): once sanlock
  declares it dead, the survivor's periodic recovery finishes the flow
  (or reverts it) and a finished clone has the source's bytes;
  Cinder's ``POST /workers/cleanup`` hands the dead service's volume to
  the survivor; nothing of the source is lost, nothing is left behind,
  and the host comes back.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess

import pytest

from tests.cloud import api
from tests.cloud.api import Cloud
from tests.cloud.api import sha256
from tests.cloud.api import storage

# Cluster-level calls: workers/cleanup needs 3.24, the services' cluster
# field 3.7.
CLEANUP_MICROVERSION = "3.24"
# Random data the dead host's clone was copying: long enough to be caught
# copying, small enough to upload in seconds.
DATA_SIZE = 768 * api.MiB
# sanlock declares a host dead 8 x io_timeout + 60 s after its last
# renewal (io_timeout 5 in the cloud); the survivor checks every 10 s.
TAKEOVER_TIMEOUT = 400.0
BACKEND = "ovirt3"
CLUSTER = f"ovirt@{BACKEND}"
HOSTS = [f"cloud-a@{BACKEND}", f"cloud-b@{BACKEND}"]


def services(cloud: Cloud) -> list[dict]:
    return cloud.volume_api(
        "GET", "/os-services?binary=cinder-volume",
        microversion=CLEANUP_MICROVERSION).json()["services"]


def service(cloud: Cloud, host: str) -> dict:
    return next(s for s in services(cloud) if s["host"] == host)


@pytest.fixture
def cluster(cloud: Cloud) -> Cloud:
    """The cloud, once both services of the cluster are up (a test that
    killed one restarts it)."""
    for host in HOSTS:
        svc = service(cloud, host)
        assert svc["cluster"] == CLUSTER, svc
        if svc["state"] != "up":
            pytest.fail(f"{host} is down: `cloud.py up` restarts it",
                        pytrace=False)
    return cloud


# The flows' logbooks, read as an operator would with the mysql client.


def books(backend: str) -> list[dict]:
    """Every logbook of ``backend``'s pool: its id, meta and the state of
    each step (an empty list once every flow is finished)."""
    import pymysql
    con = pymysql.connect(host="127.0.0.1", user="openstack",
                          password="secret",
                          database=f"ovirt_flows_{backend}")
    try:
        with con.cursor() as cur:
            cur.execute("SELECT uuid, meta FROM logbooks")
            found = []
            for uuid, meta in cur.fetchall():
                cur.execute(
                    "SELECT a.name, a.state FROM atomdetails a JOIN "
                    "flowdetails f ON a.parent_uuid = f.uuid "
                    "WHERE f.parent_uuid = %s", (uuid,))
                found.append({"uuid": uuid, "meta": json.loads(meta or "{}"),
                              "steps": dict(cur.fetchall())})
            return found
    finally:
        con.close()


def book_for(img_id: str, backend: str = BACKEND) -> dict | None:
    return next((b for b in books(backend)
                 if img_id in json.dumps(b["meta"].get("kwargs"))), None)


# Storage hosts


def kill_host(host: str) -> None:
    """SIGKILL cinder-volume-<host> and its sanlock daemon (process groups):
    the host loses power."""
    for name in (f"cinder-volume-{host}", f"sanlock-{host}"):
        with open(os.path.join(api.STATE, "run", f"{name}.pid")) as f:
            pid = int(f.read())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def recovery_outcome(book_id: str) -> str:
    """How host a's periodic recovery ended the flow: SUCCESS (run
    forward to its end) or REVERTED."""
    with open(api.VOLUME_LOGS[1], errors="replace") as f:
        said = [ln.rsplit(": ", 1)[1].strip() for ln in f
                if f"Recovery of flow clone ({book_id})" in ln]
    done = [o for o in said if o not in ("SKIPPED", "BUSY")]
    assert done and done[-1] in ("SUCCESS", "REVERTED"), \
        f"host a's log does not say it ended b's flow: {said}"
    return done[-1]


def restart_cloud() -> None:
    """``cloud.py up``: starts what is not running (the killed host)."""
    proc = subprocess.run(
        ["python3", os.path.join(api.TOP, "tools", "cloud", "cloud.py"),
         "up"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cluster_spreads_work_on_one_domain(
        cluster: Cloud, image: dict, pattern: bytes,
        log_start: dict[str, int]) -> None:
    """Four volumes from one image, a snapshot of each, a volume from
    each snapshot and every delete, all at once: both services work on
    the same domain, and every byte is right."""
    cloud = cluster
    n = 4  # 8 volumes: the default quota is 10
    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        posted = list(ex.map(lambda i: cloud.create_volume(
            f"aa{i}", wait=False, imageRef=image["id"],
            volume_type=BACKEND), range(n)))
        vols = [cloud.wait_volume(v["id"]) for v in posted]
        snaps = list(ex.map(
            lambda v: cloud.create_snapshot(v["id"], "aa"), vols))
        clones = list(ex.map(lambda s: cloud.create_volume(
            "aa-from-snap", snapshot_id=s["id"]), snaps))
        got = list(ex.map(lambda v: cloud.digest(v, "aa"),
                          [vols[0], clones[-1]]))
        assert got == [sha256(pattern)] * 2

        ids = [v["id"] for v in vols + clones] + [s["id"] for s in snaps]
        list(ex.map(lambda v: cloud.delete_volume(v["id"]), clones))
        list(ex.map(lambda s: cloud.delete_snapshot(s["id"]), snaps))
        list(ex.map(lambda v: cloud.delete_volume(v["id"]), vols))

    # Both services did some of it (each log names its own requests).
    for path in api.VOLUME_LOGS[1:]:
        offset = log_start[path]
        lines = api.log_lines_about(ids, {path: offset})
        assert any(i in ln for ln in lines for i in ids), \
            f"{os.path.basename(path)} did none of the work"
    lines = api.log_lines_about(ids, log_start)
    bad = [ln for ln in lines if " ERROR " in ln or "Traceback" in ln]
    assert not bad, "\n".join(bad)
    assert not books(BACKEND)
    storage(BACKEND, "fsck")  # exits 1 on any problem


def start_clone_on(cloud: Cloud, source: dict, host_id: int,
                   attempts: int = 4) -> tuple[dict, dict]:
    """Clone ``source`` until host ``host_id`` takes a clone; return that
    clone once its flow copies data (its ``create_volume`` step done, its
    ``convert`` not) and the flow's book. Clones the other host took
    finish and stay until the test's cleanup."""
    for _ in range(attempts):
        clone = cloud.create_volume("aa-clone", wait=False,
                                    source_volid=source["id"])
        book = api.wait_for(f"the flow of clone {clone['id']}",
                            lambda c=clone: book_for(c["id"]),
                            timeout=60, interval=0.02)
        if book["meta"]["owner"].get("host_id") != host_id:
            # Kept until the test ends: RabbitMQ hands the cluster's
            # casts out in turn, so a delete here would go to the other
            # host and the next clone to this one again.
            cloud.wait_volume(clone["id"])
            continue

        def copying(book: dict = book) -> dict | None:
            now = next((b for b in books(BACKEND)
                        if b["uuid"] == book["uuid"]), None)
            if now is None:
                raise api.CloudError("the clone finished before the kill: "
                                     "make DATA_SIZE larger")
            steps = now["steps"]
            return now if steps.get("create_volume") == "SUCCESS" \
                and steps.get("convert") != "SUCCESS" else None
        return clone, api.wait_for("the clone copies", copying,
                                   timeout=60, interval=0.01)
    pytest.fail(f"host {host_id} took none of {attempts} clones")


def test_dead_host_flow_taken_over(cluster: Cloud) -> None:
    """Host b dies while its clone copies: host a finishes or reverts the
    flow once sanlock declares b dead, Cinder's cleanup puts the volume
    in error, a finished clone has the source's bytes, the source keeps
    them, nothing is left, b comes back."""
    cloud = cluster
    data = os.urandom(DATA_SIZE)
    image = cloud.create_image("aa-random", data)
    source = cloud.create_volume("aa-source", imageRef=image["id"],
                                 volume_type=BACKEND)
    sd_id = source["os-vol-host-attr:host"].split("#", 1)[1]
    want = sha256(data + bytes(source["size"] * api.GiB - DATA_SIZE))

    clone, book = start_clone_on(cloud, source, host_id=2)
    try:
        kill_host("b")
        # Host a's service keeps working on other images meanwhile.
        other = cloud.create_volume("aa-meanwhile", volume_type=BACKEND)

        # The survivor leaves the flow alone while b may be alive, then
        # takes it over once sanlock declares b dead: it finishes the
        # copy (the flow resumes forward) or reverts it.
        api.wait_for("host a recovers host b's flow",
                     lambda: book_for(clone["id"]) is None,
                     timeout=TAKEOVER_TIMEOUT, interval=2)
        outcome = recovery_outcome(book["uuid"])
        listed = [e["img_id"] for e in
                  storage(BACKEND, "image", "list", sd_id)]
        assert (clone["id"] in listed) == (outcome == "SUCCESS"), \
            (outcome, listed)

        # Cinder: b is down; the cleanup goes to a, which marks the
        # volume b left creating as error.
        api.wait_for("Cinder sees cloud-b down", lambda: service(
            cloud, HOSTS[1])["state"] == "down",
            timeout=TAKEOVER_TIMEOUT, interval=2)
        resp = cloud.volume_api(
            "POST", "/workers/cleanup", microversion=CLEANUP_MICROVERSION,
            json={"cluster_name": CLUSTER, "host": HOSTS[1]})
        cleaning = [s["host"] for s in resp.json()["cleaning"]]
        assert cleaning == [HOSTS[1]], resp.json()
        api.wait_for("the cleanup marks the clone error", lambda: (
            cloud.volume(clone["id"]) or {}).get("status") == "error")
        if outcome == "SUCCESS":
            # What host a finished is a whole copy: made available by
            # the admin, it has the source's bytes.
            cloud.volume_api("POST", f"/volumes/{clone['id']}/action",
                             json={"os-reset_status": {
                                 "status": "available"}})
            assert cloud.digest(cloud.wait_volume(clone["id"]), "aa-done",
                                source["size"] * api.GiB) == want
        cloud.delete_volume(clone["id"])
        cloud.delete_volume(other["id"])
    finally:
        restart_cloud()

    # The source is whole, its image usable by either host again.
    size = source["size"] * api.GiB
    assert cloud.digest(source, "aa-source", size) == want
    again = cloud.create_volume("aa-clone-again", source_volid=source["id"])
    assert cloud.digest(again, "aa-again", size) == want
    assert not books(BACKEND)
    storage(BACKEND, "fsck")  # exits 1 on any problem
