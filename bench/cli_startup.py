"""Wall time of short ``ovirt-storage`` commands, next to their floors.

An admin runs ``ovirt-storage`` by hand and from scripts, often many times
in a row: a read-only command should cost little more than starting
Python. This runs each command ``--repeat`` times (default 10) in a fresh
process on a pool created in a temporary directory (``--dir``, default a
new one under ``$TMPDIR``, removed afterwards) and prints the median wall
time in ms of:

- ``python -c pass`` and ``qemu-img --version``: the floors (starting the
  interpreter; starting the one tool every operation runs);
- ``ovirt-storage --help``, ``pool show``, ``image list SD`` (read only:
  no TaskFlow, no eventlet) and ``volume create SD`` (runs a flow: imports
  TaskFlow and writes the logbook),

against the target for the read-only commands (150 ms). The commands run
with their bytecode cached, as an installed package's is (into the
temporary directory, through ``PYTHONPYCACHEPREFIX``, even when
``PYTHONDONTWRITEBYTECODE`` is set: compiling the engine's sources again
at each start would be measured otherwise). Not a test: it exits 0 when
the target is missed::

    python bench/cli_startup.py [--repeat 10] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_MS = 150.0
READ_ONLY = ("--help", "pool show", "image list")


def _cli() -> list[str]:
    """The installed console script next to this interpreter, else the
    module."""
    script = os.path.join(os.path.dirname(sys.executable), "ovirt-storage")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "ovirt_cinder.cmd.storage"]


def _run(argv: list[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): "
                         f"{proc.stderr.strip()}")
    return proc.stdout


def _median_ms(argv: list[str], repeat: int, env: dict[str, str]
               ) -> float:
    _run(argv, env)     # warm the page cache and the bytecode cache
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        _run(argv, env)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--dir", help="where to create the pool (default: "
                        "a new temporary directory, removed afterwards)")
    args = parser.parse_args()

    work = args.dir or tempfile.mkdtemp(prefix="ovirt-cli-startup-")
    mount = os.path.join(work, "mnt")
    os.makedirs(mount, exist_ok=True)
    cli = _cli()
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")
    try:
        _run(cli + ["--json", "pool", "create", "--path", mount], env)
        sd_id = next(n for n in os.listdir(mount)
                     if os.path.isdir(os.path.join(mount, n, "dom_md")))
        pool = cli + ["-p", mount]
        cases = [
            ("python -c pass", [sys.executable, "-c", "pass"], None),
            ("qemu-img --version", ["qemu-img", "--version"], None),
            ("ovirt-storage --help", cli + ["--help"], "--help"),
            ("pool show", pool + ["pool", "show"], "pool show"),
            ("image list SD", pool + ["image", "list", sd_id], "image list"),
            ("volume create SD", pool + ["volume", "create", sd_id,
                                         "--size", "1M"], None),
        ]
        print(f"median wall time of {args.repeat} runs (ms); target for "
              f"read-only commands: < {TARGET_MS:.0f} ms")
        for label, argv, kind in cases:
            ms = _median_ms(argv, args.repeat, env)
            verdict = ""
            if kind in READ_ONLY:
                verdict = "  ok" if ms < TARGET_MS else "  MISSED"
            print(f"{label:22} {ms:8.1f}{verdict}")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
