#!/usr/bin/env python3
"""A single-host block-storage cloud on 127.0.0.1: ``make cloud``.

    python3 tools/cloud/cloud.py up      # install what is missing, start
    python3 tools/cloud/cloud.py down    # stop everything it started
    python3 tools/cloud/cloud.py status

RabbitMQ, MariaDB, Redis, Keystone, glance-api (our store as the
default backend), cinder-api, cinder-scheduler, cinder-backup (into a
directory) and three cinder-volume services:

- ``cinder-volume`` serves two backends of the ovirt-cinder driver:
  ``ovirt1`` on a pool of two local domains (the pool Glance stores
  images in) and ``ovirt2`` on a pool of one, so that Cinder can migrate
  and retype between backends and between the domains of one backend;
- ``cinder-volume-a`` and ``cinder-volume-b`` serve the backend
  ``ovirt3`` together, in the Cinder cluster ``ovirt`` (active-active).
  They play two storage hosts, ``cloud-a`` and ``cloud-b``: each has its
  own sanlock daemon (its own ``SANLOCK_RUN_DIR``) and sanlock host id (1
  and 2) in the pool's lockspaces, as two machines sharing NFS would.
  They coordinate through tooz on Redis and keep the flows' logbooks in
  MariaDB (``ovirt_flow_connection``), so that either can finish what the
  other left. The ``ovirt-storage`` CLI of the ``openrc`` is on host a
  (its daemon, host id 1). The cluster has a backend of its own because
  Cinder cannot address one pool of a clustered backend (a migration to
  ``cluster@backend#pool`` loses the pool), which the walkthrough and
  Tempest do between ovirt1's two domains. The cluster is the
  availability zone ``ovirt-cluster``, which only the volume type
  ``ovirt3`` asks for: Tempest's types without a backend stay on ovirt1
  and ovirt2.

Volumes are served with ``ovirt_export_protocol = local`` (this cloud has
no Nova and the machine no kernel iSCSI initiator); Cinder's
host-assisted copies attach them through os-brick's local connector.

Everything lives under ``.cloud/`` of the checkout (``OVIRT_CLOUD_DIR``):
configuration in ``etc/``, one log per service in ``log/``, pid files in
``run/``, databases, queues and the storage domains, and the ``openrc``
to source. Python packages go into ``.cloud/venv`` (the services, with this
checkout installed editable) and ``.cloud/tempest`` (Tempest). Debian
packages (the ``cloud`` profile of bindep.txt) are installed with apt-get
with their services held, so nothing starts outside ``.cloud``.

``up`` is idempotent: what runs is left running, databases, keys and
pools once made are kept, and the configuration files are written again
(a running service keeps what it started with: ``down``, then ``up``, to
apply a change). ``down`` stops every process ``up`` started and leaves
the state for the next ``up``; ``down --purge`` removes it too. Needs
root (apt-get; MariaDB, RabbitMQ and Cinder's privsep helpers run as root
here, with no sudo or rootwrap).
Only the standard library: the venvs do not exist when it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

TOP = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
HERE = os.path.join(TOP, "tools", "cloud")
STATE = os.path.abspath(os.environ.get("OVIRT_CLOUD_DIR",
                                       os.path.join(TOP, ".cloud")))
VENV = os.path.join(STATE, "venv")
TEMPEST_VENV = os.path.join(STATE, "tempest")
ETC = os.path.join(STATE, "etc")
LOG = os.path.join(STATE, "log")
RUN = os.path.join(STATE, "run")

HOST = "127.0.0.1"
PASSWORD = "secret"  # every service account; bound to 127.0.0.1 only
REGION = "RegionOne"
PORTS = {"mysql": 3306, "rabbitmq": 5672, "redis": 6379, "keystone": 5000,
         "glance": 9292, "cinder": 8776}
KEYSTONE_URL = f"http://{HOST}:{PORTS['keystone']}/v3"
DB_URL = f"mysql+pymysql://openstack:{PASSWORD}@{HOST}/{{}}?charset=utf8"
TRANSPORT_URL = f"rabbit://guest:guest@{HOST}:{PORTS['rabbitmq']}/"

# The storage pools of the two Cinder backends. ovirt1's pool is also the
# Glance store's, so volumes from its images are O(1) overlays.
POOLS = {
    "ovirt1": ("5b0e9c3a-2f4d-4a7b-8c1e-9d6f0a2b3c41", ["domain1",
                                                      "domain2"]),
    "ovirt2": ("8d2c4e6f-1a3b-4c5d-9e7f-0b1c2d3e4f52", ["domain3"]),
    "ovirt3": ("3e7a9c1d-5b2f-4e8a-a6c4-7d1f9b0e2a63", ["domain4"]),
}
# The backends of the single-host cinder-volume, and the clustered one.
SINGLE = ("ovirt1", "ovirt2")
CLUSTERED = "ovirt3"
STORAGE = os.path.join(STATE, "storage")
LOCKS = os.path.join(STORAGE, "locks")

# The storage hosts of the cluster serving CLUSTERED: name -> host id.
VOLUME_HOSTS = {"a": 1, "b": 2}
CLUSTER = "ovirt"
# The cluster's availability zone: only volumes of the type ovirt3 (whose
# RESKEY:availability_zones names it) go there, so that volume types
# without a backend (Tempest's own) stay on the single-host backends.
# Cinder records the scheduler's pick among a cluster's services as the
# host of a volume retyped in place, which Tempest's retype tests take
# for a move.
CLUSTER_AZ = "ovirt-cluster"
# sanlock declares a killed host dead after 8 x io_timeout + 60 s; 5 s
# keeps renewals safe on a loaded 2-core machine.
IO_TIMEOUT = 5
# Seconds between the drivers' recovery passes (ovirt_recovery_interval).
RECOVERY_INTERVAL = 10
SHIM_SOURCE = os.path.join(TOP, "tools", "sanlock", "preload_shim.c")

SANLOCK_SO = ("/usr/lib/python3/dist-packages/"
              "sanlock.cpython-311-x86_64-linux-gnu.so")
BASE_ENV = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LC_ALL": "C.UTF-8", "HOME": os.environ.get("HOME", "/root")}


class CloudError(Exception):
    pass


def log(msg: str) -> None:
    print(f"cloud: {msg}", flush=True)


def run(argv: list[str], *, env: dict | None = None, check: bool = True,
        timeout: float = 900, input: str | None = None
        ) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True,
                          env={**BASE_ENV, **(env or {})}, timeout=timeout,
                          input=input, stdin=None if input else
                          subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise CloudError(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return proc


def write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(textwrap.dedent(text).lstrip())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# Debian packages


def bindep_packages(profile: str) -> list[str]:
    """Packages of bindep.txt lines tagged with ``profile``."""
    names = []
    with open(os.path.join(TOP, "bindep.txt")) as f:
        for line in f:
            fields = line.split("#", 1)[0].split(None, 1)
            tags = fields[1].strip("[] \n").split() if len(fields) == 2 else []
            if profile in tags:
                names.append(fields[0])
    return names


def ensure_packages() -> None:
    wanted = bindep_packages("cloud")
    missing = [p for p in wanted if run(
        ["dpkg-query", "-W", "-f=${db:Status-Status}", p],
        check=False).stdout != "installed"]
    if not missing:
        return
    log(f"installing {' '.join(missing)}")
    policy = "/usr/sbin/policy-rc.d"
    ours = not os.path.exists(policy)
    if ours:  # the packages must not start their own services
        write(policy, "#!/bin/sh\nexit 101\n", 0o755)
    try:
        run(["apt-get", "update", "-qq"])
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
             *missing], env={"DEBIAN_FRONTEND": "noninteractive"})
    finally:
        if ours:
            os.unlink(policy)


# Python packages


def _stamp(files: list[str]) -> str:
    h = hashlib.sha256()
    for name in files:
        with open(name, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _tree(path: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path)
                  for f in fs if f.endswith((".py", ".toml")))


def ensure_venv(venv: str, requirements: str, editable: bool,
                packages: tuple[str, ...] = ()) -> None:
    """``venv`` with ``requirements``, this checkout (``editable``) and
    the local ``packages``; rebuilt when any of their files changed."""
    files = [requirements] + ([os.path.join(TOP, "setup.cfg")]
                              if editable else [])
    for package in packages:
        files += _tree(package)
    stamp = os.path.join(venv, ".installed")
    key = _stamp(files)
    if os.path.exists(stamp) and open(stamp).read() == key:
        return
    log(f"installing {os.path.relpath(requirements, TOP)} into "
        f"{os.path.relpath(venv, TOP)}")
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", venv])
    pip = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q"]
    run([*pip, "--upgrade", "pip"])
    run([*pip, "-r", requirements, *(["-e", TOP] if editable else []),
         *packages], timeout=1800)
    if editable:
        site = run([os.path.join(venv, "bin", "python"), "-c",
                    "import sysconfig; print(sysconfig.get_path('platlib'))"]
                   ).stdout.strip()
        if os.path.exists(SANLOCK_SO):
            shutil.copy(SANLOCK_SO, site)
    with open(stamp, "w") as f:
        f.write(key)


def vbin(name: str, venv: str = VENV) -> str:
    return os.path.join(venv, "bin", name)


# Processes


def pidfile(name: str) -> str:
    return os.path.join(RUN, f"{name}.pid")


def running(name: str) -> int | None:
    try:
        pid = int(open(pidfile(name)).read().strip())
    except (OSError, ValueError):
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None
    return None if state == "Z" else pid


def spawn(name: str, argv: list[str], env: dict | None = None) -> int:
    """Start ``argv`` in its own session, output to log/<name>.log."""
    pid = running(name)
    if pid:
        return pid
    os.makedirs(RUN, exist_ok=True)
    out = open(os.path.join(LOG, f"{name}.log"), "ab")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**BASE_ENV, **(env or {})}, cwd=STATE)
    out.close()
    with open(pidfile(name), "w") as f:
        f.write(f"{proc.pid}\n")
    return proc.pid


def stop(name: str, timeout: float = 30) -> None:
    pid = running(name)
    if pid is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile(name))
        return
    log(f"stopping {name} ({pid})")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running(name) and time.monotonic() < deadline:
        time.sleep(0.2)
    if running(name):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        while running(name):
            time.sleep(0.1)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile(name))


def wait_port(name: str, port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex((HOST, port)) == 0:
                return
        if not running(name) or time.monotonic() > deadline:
            tail = ""
            with contextlib.suppress(OSError):
                tail = open(os.path.join(LOG, f"{name}.log")).read()[-3000:]
            raise CloudError(f"{name} is not listening on {port}:\n{tail}")
        time.sleep(0.3)


# MariaDB


MYSQL_DIR = os.path.join(STATE, "mysql")
MYSQL_SOCK = os.path.join(RUN, "mysql.sock")


def mysql(sql: str) -> str:
    return run(["mariadb", "--socket", MYSQL_SOCK, "-uroot", "-N", "-e",
                sql]).stdout


def start_mysql() -> None:
    if not os.path.isdir(os.path.join(MYSQL_DIR, "mysql")):
        log("initializing MariaDB")
        os.makedirs(MYSQL_DIR, exist_ok=True)
        run(["mariadb-install-db", "--user=root", f"--datadir={MYSQL_DIR}",
             "--skip-test-db", "--auth-root-authentication-method=socket"])
    spawn("mysql", [
        "/usr/sbin/mariadbd", "--no-defaults", "--user=root",
        f"--datadir={MYSQL_DIR}", f"--socket={MYSQL_SOCK}",
        f"--pid-file={os.path.join(RUN, 'mariadbd.pid')}",
        f"--bind-address={HOST}", f"--port={PORTS['mysql']}",
        "--skip-name-resolve", "--max-connections=1000",
        "--innodb-flush-log-at-trx-commit=2", "--innodb-buffer-pool-size=256M",
        "--character-set-server=utf8mb4",
        "--collation-server=utf8mb4_general_ci",
        f"--log-error={os.path.join(LOG, 'mysql-error.log')}"])
    wait_port("mysql", PORTS["mysql"])
    grants = "".join(
        f"CREATE DATABASE IF NOT EXISTS {db};" for db in
        ("keystone", "glance", "cinder", flows_db(CLUSTERED)))
    for host in ("127.0.0.1", "localhost"):
        grants += (f"CREATE USER IF NOT EXISTS 'openstack'@'{host}' "
                   f"IDENTIFIED BY '{PASSWORD}';"
                   f"GRANT ALL ON *.* TO 'openstack'@'{host}';")
    mysql(grants)


def stop_mysql() -> None:
    if running("mysql"):
        run(["mariadb-admin", "--socket", MYSQL_SOCK, "-uroot", "shutdown"],
            check=False, timeout=60)
    stop("mysql")


# RabbitMQ


RABBIT_DIR = os.path.join(STATE, "rabbitmq")
RABBIT_ENV = {
    "HOME": RABBIT_DIR,  # its Erlang cookie
    "RABBITMQ_NODENAME": "rabbit@localhost",
    "RABBITMQ_NODE_IP_ADDRESS": HOST,
    "RABBITMQ_NODE_PORT": str(PORTS["rabbitmq"]),
    "ERL_EPMD_ADDRESS": HOST,
    "RABBITMQ_MNESIA_BASE": os.path.join(RABBIT_DIR, "mnesia"),
    "RABBITMQ_LOG_BASE": os.path.join(LOG, "rabbitmq"),
    "RABBITMQ_PID_FILE": os.path.join(RUN, "rabbitmq-server.pid"),
    "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(RABBIT_DIR,
                                                  "enabled_plugins"),
    "RABBITMQ_CONFIG_FILE": os.path.join(RABBIT_DIR, "rabbitmq"),
}


def rabbitmqctl(*args: str, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess:
    return run(["/usr/lib/rabbitmq/bin/rabbitmqctl", *args], env=RABBIT_ENV,
               check=check, timeout=timeout)


def start_rabbitmq() -> None:
    os.makedirs(os.path.join(LOG, "rabbitmq"), exist_ok=True)
    write(RABBIT_ENV["RABBITMQ_ENABLED_PLUGINS_FILE"], "[].\n")
    write(RABBIT_ENV["RABBITMQ_CONFIG_FILE"] + ".conf", f"""
        listeners.tcp.default = {HOST}:{PORTS['rabbitmq']}
        loopback_users.guest = true
        """)
    spawn("rabbitmq", ["/usr/lib/rabbitmq/bin/rabbitmq-server"],
          env=RABBIT_ENV)
    wait_port("rabbitmq", PORTS["rabbitmq"], timeout=180)
    rabbitmqctl("await_startup", timeout=180)


def stop_rabbitmq() -> None:
    if running("rabbitmq"):
        rabbitmqctl("stop", check=False)
    stop("rabbitmq")
    # epmd, the Erlang port mapper the node started, outlives it.
    run(["epmd", "-kill"], env=RABBIT_ENV, check=False)


# Redis (Cinder's tooz coordination backend)


def start_redis() -> None:
    data = os.path.join(STATE, "redis")
    os.makedirs(data, exist_ok=True)
    spawn("redis", ["redis-server", "--bind", HOST,
                    "--port", str(PORTS["redis"]), "--dir", data,
                    "--save", "", "--appendonly", "no",
                    "--daemonize", "no"])
    wait_port("redis", PORTS["redis"])


# sanlock: one daemon per storage host


def sanlock_env(host: str) -> dict[str, str]:
    """The environment of host ``host``'s sanlock clients."""
    return {"SANLOCK_RUN_DIR": os.path.join(RUN, f"sanlock-{host}")}


def _shim() -> str:
    """The LD_PRELOAD shim the daemon needs here (the machine drops
    CAP_SYS_RESOURCE; see tools/sanlock/preload_shim.c)."""
    out = os.path.join(STATE, "sanlock", "preload_shim.so")
    if (not os.path.exists(out)
            or os.path.getmtime(out) < os.path.getmtime(SHIM_SOURCE)):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        run(["gcc", "-shared", "-fPIC", "-O2", "-o", out, SHIM_SOURCE,
             "-ldl"])
    return out


def start_sanlock(host: str) -> None:
    """Host ``host``'s daemon, as root (the lease files are root's), in
    the foreground, without a watchdog (there is no wdmd here)."""
    env = sanlock_env(host)
    os.makedirs(env["SANLOCK_RUN_DIR"], exist_ok=True)
    name = f"sanlock-{host}"
    spawn(name, ["sanlock", "daemon", "-D", "-w", "0", "-U", "root",
                 "-G", "root", "-L", "-1", "-S", "-1"],
          env={**env, "LD_PRELOAD": _shim()})
    deadline = time.monotonic() + 30
    while run(["sanlock", "client", "status"], env=env,
              check=False).returncode != 0:
        if not running(name) or time.monotonic() > deadline:
            raise CloudError(f"{name} does not answer; see "
                             f"{os.path.join(LOG, name + '.log')}")
        time.sleep(0.2)


# Keystone


def write_ini(path: str, sections: dict[str, dict[str, object]]) -> None:
    lines = []
    for section, options in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {v}" for k, v in options.items()]
        lines.append("")
    write(path, "\n".join(lines))


def keystone_conf() -> str:
    path = os.path.join(ETC, "keystone", "keystone.conf")
    keys = os.path.join(STATE, "keystone")
    write_ini(path, {
        "DEFAULT": {"log_file": os.path.join(LOG, "keystone-app.log")},
        "database": {"connection": DB_URL.format("keystone")},
        "token": {"provider": "fernet"},
        "fernet_tokens": {"key_repository": f"{keys}/fernet-keys"},
        "fernet_receipts": {"key_repository": f"{keys}/fernet-keys"},
        "credential": {"key_repository": f"{keys}/credential-keys"},
    })
    return path


def start_keystone() -> None:
    conf = keystone_conf()
    manage = [vbin("keystone-manage"), "--config-file", conf]
    stamp = os.path.join(STATE, "keystone", ".bootstrapped")
    if not os.path.exists(stamp):
        log("setting up Keystone")
        run([*manage, "db_sync"])
        for what in ("fernet_setup", "credential_setup"):
            run([*manage, what, "--keystone-user", "root",
                 "--keystone-group", "root"])
        run([*manage, "bootstrap", "--bootstrap-password", PASSWORD,
             "--bootstrap-region-id", REGION,
             "--bootstrap-admin-url", KEYSTONE_URL,
             "--bootstrap-public-url", KEYSTONE_URL,
             "--bootstrap-internal-url", KEYSTONE_URL])
        write(stamp, "")
    spawn("keystone", _gunicorn("keystone", PORTS["keystone"], workers=2),
          env={"OS_KEYSTONE_CONFIG_DIR": os.path.dirname(conf)})
    wait_port("keystone", PORTS["keystone"])


def _gunicorn(app: str, port: int, workers: int) -> list[str]:
    return [vbin("gunicorn"), "--chdir", HERE, "--bind", f"{HOST}:{port}",
            "--workers", str(workers), "--threads", "4", "--timeout", "600",
            "--access-logfile", os.path.join(LOG, f"{app}-access.log"),
            "--name", app, f"wsgi_apps:{app}()"]


def _authtoken(user: str) -> dict[str, str]:
    return {"www_authenticate_uri": KEYSTONE_URL, "auth_url": KEYSTONE_URL,
            "auth_type": "password", "project_domain_name": "Default",
            "user_domain_name": "Default", "project_name": "service",
            "username": user, "password": PASSWORD}


def _paths(domains: list[str]) -> str:
    return ",".join(os.path.join(STORAGE, d) for d in domains)


def flows_db(backend: str) -> str:
    """The database of a pool's flow logbooks."""
    return f"ovirt_flows_{backend}"


def _pool_options(backend: str) -> dict[str, object]:
    """What every user of ``backend``'s pool (services, Glance, the CLI)
    must agree on; the clustered pool is fenced by sanlock (the host id
    here is host a's, for the CLI; each service's own file gives its own)
    and logs its flows in MariaDB."""
    pool_id, domains = POOLS[backend]
    options: dict[str, object] = {
        "ovirt_pool_uuid": pool_id,
        "ovirt_domain_paths": _paths(domains),
        "ovirt_lock_path": LOCKS,
    }
    if backend == CLUSTERED:
        options.update({
            "ovirt_lease_backend": "sanlock",
            "ovirt_io_timeout": IO_TIMEOUT,
            "ovirt_host_id": VOLUME_HOSTS["a"],
            "ovirt_flow_connection": DB_URL.format(flows_db(backend)),
            "ovirt_recovery_interval": RECOVERY_INTERVAL,
        })
    return options


# Glance


def glance_conf() -> str:
    conf_dir = os.path.join(ETC, "glance")
    state = os.path.join(STATE, "glance")
    os.makedirs(conf_dir, exist_ok=True)
    shutil.copy(os.path.join(VENV, "etc", "glance", "glance-api-paste.ini"),
                conf_dir)
    write_ini(os.path.join(conf_dir, "glance-api.conf"), {
        "DEFAULT": {
            "log_file": os.path.join(LOG, "glance-app.log"),
            "enabled_backends": "ovirt:ovirt",
            # Cinder reads image locations (its O(1) path) from the API.
            "show_image_direct_url": True,
        },
        "database": {"connection": DB_URL.format("glance")},
        "keystone_authtoken": _authtoken("glance"),
        "paste_deploy": {"flavor": "keystone"},
        "glance_store": {"default_backend": "ovirt"},
        "ovirt": {
            "store_description": "Images as templates of the ovirt1 pool",
            **_pool_options("ovirt1"),
        },
        "os_glance_staging_store": {
            "filesystem_store_datadir": f"{state}/staging"},
        "os_glance_tasks_store": {
            "filesystem_store_datadir": f"{state}/tasks"},
        "oslo_concurrency": {"lock_path": f"{state}/locks"},
    })
    return conf_dir


def start_glance() -> None:
    conf_dir = glance_conf()
    stamp = os.path.join(STATE, "glance", ".synced")
    if not os.path.exists(stamp):
        log("setting up Glance")
        run([vbin("glance-manage"), "--config-file",
             os.path.join(conf_dir, "glance-api.conf"), "db_sync"])
        write(stamp, "")
    spawn("glance", _gunicorn("glance", PORTS["glance"], workers=2),
          env={"OS_GLANCE_CONFIG_DIR": conf_dir})
    wait_port("glance", PORTS["glance"])


# Cinder


CINDER_CONF = os.path.join(ETC, "cinder", "cinder.conf")


def cinder_conf() -> str:
    state = os.path.join(STATE, "cinder")
    venv_etc = os.path.join(VENV, "etc", "cinder")
    privsep = f"{vbin('privsep-helper')} --config-file {CINDER_CONF}"
    sections: dict[str, dict[str, object]] = {
        "DEFAULT": {
            "transport_url": TRANSPORT_URL,
            "auth_strategy": "keystone",
            "my_ip": HOST,
            "state_path": state,
            "enabled_backends": ",".join(SINGLE),
            "default_volume_type": "ovirt1",
            "glance_api_servers": f"http://{HOST}:{PORTS['glance']}",
            "osapi_volume_listen": HOST,
            "osapi_volume_listen_port": PORTS["cinder"],
            "osapi_volume_workers": 2,
            "api_paste_config": f"{venv_etc}/api-paste.ini",
            "rootwrap_config": f"{venv_etc}/rootwrap.conf",
            # Which list filters the API honours (name, status, ...).
            "resource_query_filters_file":
                f"{venv_etc}/resource_filters.json",
            "image_conversion_dir": f"{state}/conversion",
            "rpc_response_timeout": 120,
            # cinder-backup into a directory: backups read and restores
            # write volumes through the driver's local connections.
            "backup_driver": "cinder.backup.drivers.posix.PosixBackupDriver",
            "backup_posix_path": f"{state}/backups",
            "backup_compression_algorithm": "none",
        },
        "database": {"connection": DB_URL.format("cinder"),
                     "max_pool_size": 20, "max_overflow": 40},
        "keystone_authtoken": _authtoken("cinder"),
        "oslo_concurrency": {"lock_path": f"{state}/locks"},
        # Active-active needs a coordination backend every service of
        # the cluster shares.
        "coordination": {
            "backend_url": f"redis://{HOST}:{PORTS['redis']}"},
        # Root already: the privsep daemons need no sudo or rootwrap.
        "privsep_osbrick": {"helper_command": privsep},
        "cinder_sys_admin": {"helper_command": privsep},
        "ovirt_cinder_privileged": {"helper_command": privsep},
    }
    for name in POOLS:
        sections[name] = {
            "volume_driver": "ovirt_cinder.cinder.driver.OvirtVolumeDriver",
            "volume_backend_name": name,
            **_pool_options(name),
            # The cluster's services are on this machine: they share the
            # daemons serving attached volumes.
            "ovirt_run_path": os.path.join(RUN, name),
            "ovirt_export_protocol": "local",
        }
    write_ini(CINDER_CONF, sections)
    for host, host_id in VOLUME_HOSTS.items():
        write_ini(volume_conf(host), {
            "DEFAULT": {"host": f"cloud-{host}", "cluster": CLUSTER,
                        "enabled_backends": CLUSTERED,
                        "storage_availability_zone": CLUSTER_AZ},
            CLUSTERED: {"ovirt_host_id": host_id}})
    return CINDER_CONF


def volume_conf(host: str) -> str:
    """cinder-volume-<host>'s own options, read after cinder.conf."""
    return os.path.join(ETC, "cinder", f"cinder-volume-{host}.conf")


CINDER_SERVICES = ("cinder-api", "cinder-scheduler", "cinder-volume",
                   "cinder-backup")
VOLUME_SERVICES = tuple(f"cinder-volume-{h}" for h in VOLUME_HOSTS)


def start_cinder() -> None:
    conf = cinder_conf()
    stamp = os.path.join(STATE, "cinder", ".synced")
    if not os.path.exists(stamp):
        log("setting up Cinder")
        run([vbin("cinder-manage"), "--config-file", conf, "db", "sync"])
        write(stamp, "")
    for name in CINDER_SERVICES:
        spawn(name, [vbin(name), "--config-file", conf, "--log-file",
                     os.path.join(LOG, f"{name}.log")])
    for host in VOLUME_HOSTS:
        start_volume(host)
    wait_port("cinder-api", PORTS["cinder"])


def start_volume(host: str) -> None:
    """Storage host ``host``: its sanlock daemon and its cinder-volume."""
    start_sanlock(host)
    name = f"cinder-volume-{host}"
    spawn(name, [vbin("cinder-volume"), "--config-file", CINDER_CONF,
                 "--config-file", volume_conf(host),
                 "--log-file", os.path.join(LOG, f"{name}.log")],
          env=sanlock_env(host))


# Storage


def ensure_pools() -> None:
    os.makedirs(LOCKS, exist_ok=True)
    for pool_id, domains in POOLS.values():
        paths = [os.path.join(STORAGE, d) for d in domains]
        for path in paths:
            os.makedirs(path, exist_ok=True)
        run([vbin("python"), os.path.join(HERE, "bootstrap.py"), "pool",
             pool_id, *paths])
    run([vbin("python"), os.path.join(HERE, "bootstrap.py"), "flows",
         DB_URL.format(flows_db(CLUSTERED))])


# Walkthrough credentials


def write_openrc() -> None:
    write(os.path.join(STATE, "openrc"), f"""
        # Source me: admin of the cloud that tools/cloud/cloud.py runs.
        export OS_AUTH_URL={KEYSTONE_URL}
        export OS_IDENTITY_API_VERSION=3
        export OS_USERNAME=admin
        export OS_PASSWORD={PASSWORD}
        export OS_PROJECT_NAME=admin
        export OS_USER_DOMAIN_NAME=Default
        export OS_PROJECT_DOMAIN_NAME=Default
        export OS_REGION_NAME={REGION}
        export OS_VOLUME_API_VERSION=3
        # ovirt-storage runs on storage host a: its sanlock daemon.
        export SANLOCK_RUN_DIR={sanlock_env("a")["SANLOCK_RUN_DIR"]}
        export PATH={os.path.join(VENV, 'bin')}:$PATH
        """)


def openrc_env() -> dict:
    env = {}
    with open(os.path.join(STATE, "openrc")) as f:
        for line in f:
            if line.startswith("export ") and not line.startswith(
                    "export PATH"):
                key, value = line[7:].strip().split("=", 1)
                env[key] = value
    return env


def wait_volume_services(timeout: float = 180) -> None:
    """Until every backend of every cinder-volume is up, and
    cinder-backup."""
    host = socket.gethostname()
    run([vbin("python"), os.path.join(HERE, "bootstrap.py"), "wait",
         *(f"cinder-volume:{host}@{b}" for b in SINGLE),
         *(f"cinder-volume:cloud-{h}@{CLUSTERED}" for h in VOLUME_HOSTS),
         f"cinder-backup:{host}", "--timeout", str(timeout)],
        env=openrc_env(), timeout=timeout + 60)


# Commands


def up(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise CloudError("needs root: apt-get, MariaDB, RabbitMQ, privsep")
    for d in (ETC, LOG, RUN):
        os.makedirs(d, exist_ok=True)
    ensure_packages()
    ensure_venv(VENV, os.path.join(HERE, "requirements.txt"), editable=True)
    if args.tempest:
        ensure_venv(TEMPEST_VENV,
                    os.path.join(HERE, "tempest-requirements.txt"),
                    editable=False,
                    packages=(os.path.join(HERE, "tempest-plugin"),))
    start_mysql()
    start_rabbitmq()
    start_redis()
    start_keystone()
    write_openrc()
    run([vbin("python"), os.path.join(HERE, "bootstrap.py"), "keystone",
         PASSWORD], env=openrc_env())
    ensure_pools()
    start_glance()
    start_cinder()
    wait_volume_services()
    run([vbin("python"), os.path.join(HERE, "bootstrap.py"), "types",
         *(f"{name}:{CLUSTER_AZ}" if name == CLUSTERED else name
           for name in POOLS)], env=openrc_env())
    log(f"up: source {os.path.relpath(os.path.join(STATE, 'openrc'))}; "
        f"logs in {os.path.relpath(LOG)}")


SERVICES = ("cinder-backup", "cinder-volume", *VOLUME_SERVICES,
            "cinder-scheduler",
            "cinder-api", "glance", "keystone")
# After their clients: a daemon ignores SIGTERM while it has lockspaces.
DAEMONS = (*(f"sanlock-{h}" for h in VOLUME_HOSTS), "redis")


def down(args: argparse.Namespace) -> None:
    for name in SERVICES:
        stop(name)
    if os.path.isdir(RUN):
        # Daemons serving attached volumes, started through privsep.
        for pid_path in _daemon_pidfiles():
            _kill_pidfile(pid_path)
    for name in DAEMONS:
        stop(name, timeout=3)
    stop_rabbitmq()
    stop_mysql()
    left = [n for n in (*SERVICES, *DAEMONS, "rabbitmq", "mysql")
            if running(n)]
    if left:
        raise CloudError(f"still running: {', '.join(left)}")
    if args.purge:
        log(f"removing {STATE}")
        shutil.rmtree(STATE)
    log("down")


def _daemon_pidfiles() -> list[str]:
    found = []
    for root, _, files in os.walk(RUN):
        found += [os.path.join(root, f) for f in files if f == "pid"]
    return found


def _kill_pidfile(path: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        pid = int(open(path).read().strip())
        log(f"stopping qemu-storage-daemon {pid}")
        os.kill(pid, signal.SIGTERM)


def status(args: argparse.Namespace) -> int:
    down_ = 0
    for name in ("mysql", "rabbitmq", *reversed(DAEMONS),
                 *reversed(SERVICES)):
        pid = running(name)
        print(f"{name:18} {'running ' + str(pid) if pid else 'stopped'}")
        down_ += pid is None
    return 1 if down_ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="install what is missing and start")
    p.add_argument("--tempest", action="store_true",
                   help="also install Tempest into .cloud/tempest")
    p.set_defaults(func=up)
    p = sub.add_parser("down", help="stop everything up started")
    p.add_argument("--purge", action="store_true",
                   help="then remove .cloud/ (state, venvs, logs)")
    p.set_defaults(func=down)
    sub.add_parser("status").set_defaults(func=status)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except CloudError as e:
        print(f"cloud: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
