"""Operations for the crash matrix, and the child process that runs one.

The child opens the pool with a TaskFlow listener that SIGKILLs the
process when a named task reaches a state (RUNNING: before it runs,
SUCCESS: after it ran), then runs one operation::

    python -m tests.functional.crash_ops WORKDIR OP TASK STATE [LOGBOOK]

TASK "progress" kills the process group once a copy reports STATE
percent instead.

WORKDIR holds ``mnt1``, ``mnt2`` and ``ctx.json`` (ids made by setup).
"""

import json
import os
import shutil
import signal
import sys

from ovirt_cinder.storage import actions
from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage.pool import StoragePool
from tests.listeners import listener

MiB = sc.MiB

# New ids used by the operations (fixed, so a check knows what to look
# for after the crash).
NEW_IMG = "0a0a0a0a-0000-4000-8000-000000000001"
NEW_SNAP = "0a0a0a0a-0000-4000-8000-000000000002"


def op_create(pool, ctx):
    pool.create_volume(ctx["sd"], NEW_IMG, 16 * MiB)


def op_import(pool, ctx):
    pool.import_volume(ctx["sd"], NEW_IMG, ctx["raw_file"], "raw",
                       16 * MiB, voltype=sc.VolumeType.SHARED)


def op_adopt(pool, ctx):
    # As the Glance store does: a staged file on the domain's filesystem
    # is moved into a new template image.
    staged = os.path.join(pool.domain(ctx["sd"]).mount,
                          f".tmp-{ctx['sd']}-upload-crash")
    shutil.copyfile(ctx["raw_file"], staged)
    pool.adopt_volume(ctx["sd"], NEW_IMG, staged, 16 * MiB,
                      voltype=sc.VolumeType.SHARED)


def op_snapshot(pool, ctx):
    pool.snapshot(ctx["sd"], ctx["img"], NEW_SNAP)


def op_merge_commit(pool, ctx):
    pool.delete_snapshot(ctx["sd"], ctx["img"], ctx["snaps"][1])


def op_merge_stream(pool, ctx):
    pool.delete_snapshot(ctx["sd"], ctx["img"], ctx["snaps"][0])


def op_revert(pool, ctx):
    pool.revert_to_snapshot(ctx["sd"], ctx["img"], ctx["snaps"][0])


def op_clone(pool, ctx):
    pool.clone(ctx["sd"], ctx["img"], NEW_IMG, snap_id=ctx["snaps"][1])


def op_thin_clone(pool, ctx):
    pool.thin_clone(ctx["sd"], ctx["tmpl"], NEW_IMG)


def op_extend(pool, ctx):
    pool.extend(ctx["sd"], ctx["img"], 32 * MiB)


def op_copy(pool, ctx):
    pool.copy_image(ctx["sd"], ctx["img"], ctx["sd2"])


def op_move(pool, ctx):
    pool.copy_image(ctx["sd"], ctx["img"], ctx["sd2"], move=True)


def op_delete(pool, ctx):
    pool.delete_image(ctx["sd"], ctx["img"])


def op_update_volume(pool, ctx):
    # b0 has two children (b0's side branch and the leaf): deleting it
    # only hides the snapshot in the volume's description.
    pool.delete_snapshot(ctx["sd"], ctx["img_b"], ctx["b_snaps"][0])


def op_remove_volume(pool, ctx):
    # b2 is childless, on a side branch over an anonymous layer that only
    # it keeps alive: both volumes are removed.
    pool.delete_snapshot(ctx["sd"], ctx["img_b"], ctx["b_snaps"][2])


def op_copy_thin(pool, ctx):
    # An image over a template: the template is copied first (its own
    # flow), then the image, linking the template copy in.
    pool.copy_image(ctx["sd"], ctx["thin"], ctx["sd2"])


def op_upgrade(pool, ctx):
    # A V4 domain to V5 in place (the golden world's sd4).
    pool.upgrade_domain(ctx["sd4"])


OPS = {name[3:]: fn for name, fn in globals().items()
       if name.startswith("op_")}


def killer(task_name, state):
    """A listener factory: SIGKILL this process at (task, state).

    ``task_name`` may end in ``#N``: the Nth task of that name the
    operation runs (an operation that runs several flows, such as a copy
    that copies a template first, repeats names)."""
    name, _, nth = task_name.partition("#")
    seen = [0]

    def on_change(event, details):
        if details.get("task_name") == name and event == state:
            seen[0] += 1
            if seen[0] == int(nth or 1):
                os.kill(os.getpid(), signal.SIGKILL)
    return listener(on_change)


def recorder(names):
    """A listener factory: append each step's name as it starts."""
    def on_change(event, details):
        if event == "RUNNING":
            names.append(details["task_name"])
    return listener(on_change)


def open_pool(workdir, listeners=(), flow_connection=None):
    return StoragePool.open([os.path.join(workdir, "mnt1"),
                             os.path.join(workdir, "mnt2")],
                            listeners=listeners,
                            flow_connection=flow_connection)


def main():
    workdir, op, task_name, state = sys.argv[1:5]
    connection = sys.argv[5] if len(sys.argv) > 5 else None
    with open(os.path.join(workdir, "ctx.json")) as f:
        ctx = json.load(f)
    if task_name == "progress":
        # Kill the whole process group, qemu-img too, as a host crash
        # would, once the copy reported STATE percent.
        def on_progress(percent):
            if percent >= float(state):
                os.killpg(0, signal.SIGKILL)
        actions.progress_callback = on_progress
        pool = open_pool(workdir, (), connection)
    else:
        pool = open_pool(workdir, [killer(task_name, state)], connection)
    OPS[op](pool, ctx)
    sys.exit(3)     # not killed: the kill point was not reached


if __name__ == "__main__":
    main()
