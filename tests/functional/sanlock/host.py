"""A process of another host, run by the tests as a child::

    SANLOCK_RUN_DIR=<its daemon's run dir> python -m \\
        tests.functional.sanlock.host MODE HOST_ID DOMAIN_PATH ARGS...

Modes:

``race LOG N HOLD BARRIER``
    join, create ``BARRIER.<host_id>`` and wait for the other host's, then
    N times: take the SDM lease, append ``start <host> <pid>``, sleep HOLD
    seconds, append ``end <host> <pid>``, release.
``hold``
    take the SDM lease, print ``held``, sleep until killed.
``crash IMG_ID SNAP_ID TASK DAEMON_PID``
    open the pool with a listener that, when TASK starts running,
    SIGKILLs this host's daemon (its process group) and then this
    process; then snapshot IMG_ID as SNAP_ID (it dies holding SDM).
"""

import contextlib
import os
import signal
import sys
import time

from taskflow.types import notifier

from ovirt_cinder.storage import sanlock_lease
from ovirt_cinder.storage import sd
from ovirt_cinder.storage.pool import StoragePool

IO_TIMEOUT = 1


def manager(host_id):
    return sanlock_lease.SanlockLeaseManager(
        host_id=host_id, io_timeout=IO_TIMEOUT, lease_timeout=60,
        retry_interval=0.01)


def append(log, line):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


def wait_for(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {path}")
        time.sleep(0.01)


def race(host_id, dom, log, n, hold, barrier):
    with manager(host_id) as mgr:
        mgr.join(dom)
        append(f"{barrier}.{host_id}", "ready")
        wait_for(f"{barrier}.{3 - host_id}")
        me = f"{host_id} {os.getpid()}"
        for _ in range(int(n)):
            with mgr.domain_lease(dom):
                append(log, f"start {me}")
                time.sleep(float(hold))
                append(log, f"end {me}")
            # Let the other host in before asking again.
            time.sleep(float(hold))


def hold(host_id, dom):
    mgr = manager(host_id)
    with mgr.domain_lease(dom):
        print("held", flush=True)
        while True:
            time.sleep(60)


def crasher(task_name, daemon_pid):
    @contextlib.contextmanager
    def listen(engine):
        def on_change(event, details):
            if details.get("task_name") == task_name and \
                    event == "RUNNING":
                os.killpg(daemon_pid, signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)
        engine.atom_notifier.register(notifier.Notifier.ANY, on_change)
        yield
    return listen


def crash(host_id, dom, img_id, snap_id, task, daemon_pid):
    pool = StoragePool.open([dom.mount], lease_manager=manager(host_id),
                            listeners=[crasher(task, int(daemon_pid))])
    pool.snapshot(dom.sd_id, img_id, snap_id)
    sys.exit(3)     # not killed: the task never ran


def main():
    mode, host_id, path, *args = sys.argv[1:]
    dom = sd.FileDomain.open(path)
    {"race": race, "hold": hold, "crash": crash}[mode](
        int(host_id), dom, *args)


if __name__ == "__main__":
    main()
