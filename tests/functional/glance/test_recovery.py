"""A glance-api killed in the middle of publishing an upload."""

import os
import subprocess
import sys
import textwrap
import uuid

from ovirt_cinder.storage import fsck
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage.pool import StoragePool
from tests import qemuio
from tests.functional.glance.conftest import staged_leftovers
from tests.unit.glance import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

CHILD = textwrap.dedent("""
    import os, signal, sys
    from tests.functional.crash_ops import killer
    from ovirt_cinder.storage.pool import StoragePool
    mount, src, img = sys.argv[1:4]
    pool = StoragePool.open([mount], listeners=[killer("legalize",
                                                       "RUNNING")])
    pool.adopt_volume(pool.master.sd_id, img, src, os.path.getsize(src))
""")


def test_configure_recovers_a_killed_upload(tmp_path):
    mount = tmp_path / "mnt"
    mount.mkdir()
    pool = StoragePool.create(str(mount))
    staged = os.path.join(str(mount), f".tmp-{pool.master.sd_id}-upload-x")
    qemuimg.create(staged, "raw", 4 * 1024 * 1024)
    qemuio.write_pattern(staged, "raw", 0, 1024 * 1024, 0x5a)
    img = str(uuid.uuid4())
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(mount), staged, img], cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
        text=True, timeout=120)
    assert child.returncode == -9, child.stderr[-2000:]
    assert not fsck.check(StoragePool.open([str(mount)])).clean

    with fixtures.entry_point(str(tmp_path / "ep")):
        files = tmp_path / "files"
        files.mkdir()
        conf = fixtures.multi_store_conf([str(mount)], str(files))
        try:
            fixtures.store_of()     # configure_add recovers
        finally:
            conf.reset()

    pool = StoragePool.open([str(mount)])
    assert fsck.check(pool).clean
    assert staged_leftovers(pool) == []
    vol = pool.leaf(pool.master.sd_id, img)
    qemuio.verify_pattern(vol.path, "raw", 0, 1024 * 1024, 0x5a)
