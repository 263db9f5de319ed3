"""Live operations for the attached-image crash matrix, and the child
process that runs one and is killed at a step.

    python -m tests.functional.live_crash_ops WORKDIR OP N STATE

The parent attached the image (its daemon is not this process's child, so
it survives the kill, as it survives a killed cinder-volume). WORKDIR
holds ``mnt`` (the pool), ``run`` (the daemons' run path, a symlink to a
short directory) and ``ctx.json``. The process is killed when the Nth
step (from 1, across every flow the operation runs) reaches STATE
(RUNNING: before it runs, SUCCESS: after it ran): step names carry volume
ids that differ from run to run, their order does not.
"""

import json
import os
import signal
import sys

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage.pool import StoragePool
from tests.listeners import listener

MiB = sc.MiB
NEW_SNAP = "0b0b0b0b-0000-4000-8000-000000000001"


def op_snapshot(pool, ctx):
    pool.snapshot(ctx["sd"], ctx["img"], NEW_SNAP)


def op_delete_leaf_snapshot(pool, ctx):
    # The snapshot's child is the layer the daemon writes.
    pool.delete_snapshot(ctx["sd"], ctx["img"], ctx["snaps"][1])


def op_delete_middle_snapshot(pool, ctx):
    pool.delete_snapshot(ctx["sd"], ctx["img"], ctx["snaps"][0])


def op_extend(pool, ctx):
    pool.extend(ctx["sd"], ctx["img"], 32 * MiB)


def nth_step_killer(nth, state):
    """A listener factory: SIGKILL this process when the ``nth`` step
    reaches ``state``."""
    seen = [0]

    def on_change(event, details):
        if event == state:
            seen[0] += 1
            if seen[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
    return listener(on_change)


OPS = {name[3:]: fn for name, fn in globals().items()
       if name.startswith("op_")}


def open_pool(workdir, listeners=()):
    return StoragePool.open([os.path.join(workdir, "mnt")],
                            listeners=listeners,
                            run_path=os.path.realpath(
                                os.path.join(workdir, "run")))


def main():
    workdir, op, nth, state = sys.argv[1:5]
    with open(os.path.join(workdir, "ctx.json")) as f:
        ctx = json.load(f)
    pool = open_pool(workdir, [nth_step_killer(int(nth), state)])
    OPS[op](pool, ctx)
    sys.exit(3)     # not killed: the kill point was not reached


if __name__ == "__main__":
    main()
