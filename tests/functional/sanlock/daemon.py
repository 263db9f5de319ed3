"""A real sanlock daemon for tests, without a watchdog.

Each :class:`Daemon` is one "host": its own run directory (the daemon and
its clients find each other through ``SANLOCK_RUN_DIR``, so it never
touches ``/run/sanlock`` and a second daemon on the same machine is a
second host), running as root (pytest's tmp files are not readable by the
``sanlock`` user), in the foreground (``-D``), logging to a file only.
The daemon needs :file:`tools/sanlock/preload_shim.c` (built with gcc
into tmp) because the machine drops CAP_SYS_RESOURCE; ``make cloud`` runs
its two sanlock daemons with it too.

``start()`` waits until ``sanlock client status`` answers; ``stop()``
terminates the daemon's process group, then kills it; ``crash()`` kills
it at once (SIGKILL), as a host losing power.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
SHIM_SOURCE = os.path.join(TOP, "tools", "sanlock", "preload_shim.c")


def build_shim(workdir: str) -> str:
    """Compile the LD_PRELOAD shim into ``workdir``; its path."""
    out = os.path.join(workdir, "preload_shim.so")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", out,
                    SHIM_SOURCE, "-ldl"], check=True, capture_output=True)
    return out


class Daemon:
    """One sanlock daemon (one host) with a private run directory."""

    def __init__(self, sanlock: str, shim: str, workdir: str,
                 name: str) -> None:
        self.sanlock = sanlock
        self.shim = shim
        self.name = name
        self.run_dir = os.path.join(workdir, name)
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients of this daemon."""
        return {**os.environ, "SANLOCK_RUN_DIR": self.run_dir}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        cmd = [self.sanlock, "daemon", "-D", "-w", "0", "-U", "root",
               "-G", "root", "-L", "-1", "-S", "-1"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, env={**self.env, "LD_PRELOAD": self.shim},
                stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sanlock daemon {self.name} exited "
                                   f"rc={self.proc.returncode}: "
                                   f"{self.log()}")
            status = subprocess.run(
                [self.sanlock, "client", "status"], env=self.env,
                capture_output=True)
            if status.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sanlock daemon {self.name} not ready "
                                   f"after {timeout} s: {self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def crash(self) -> None:
        """SIGKILL the daemon and its helper: the host is gone."""
        self._signal_group(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        """Terminate the daemon, then kill it (it ignores SIGTERM while
        it has lockspaces); never leaves it running."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(1)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)
        self.proc.wait()

    def _signal_group(self, sig: int) -> None:
        # The daemon leads its own session: its group is its pid.
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
