"""``make demo`` end to end: ``python -m ovirt_cinder.demo`` must keep
working, through the engine, the Glance store and the Cinder driver."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

SECTIONS = ("== storage engine (ovirt_cinder.storage)",
            "== Glance store (ovirt_cinder.glance.store)",
            "== Cinder driver (ovirt_cinder.cinder.driver)")


def test_demo_runs_every_section(tmp_path):
    demo_dir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "ovirt_cinder.demo", "--dir", str(demo_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for title in SECTIONS:
        assert title in out
    assert "skipped" not in out
    assert "fsck" in out and "clean" in out
    assert "problems" not in out
    assert out.count(": ok") >= 10
    assert "\nDone: " in out
    assert (demo_dir / "mnt1").is_dir()
