"""A userspace iSCSI target (tgtd) and initiator (libiscsi, qemu) on
127.0.0.1 for functional tests.

There is no kernel iSCSI on the test machines: the target is tgt's
``tgtd`` and the initiators are libiscsi's tools (``iscsi-inq``,
``iscsi-readcapacity16``) and qemu's ``iscsi://`` block driver
(``qemu-io``, ``qemu-img``). Every call has a timeout and runs with
``LC_ALL=C``; a failing tool raises :class:`CommandError` with its output.
Plain functions, no pytest fixtures: a test module wraps :meth:`Tgtd.ensure`
and :meth:`Tgtd.stop` in its own module-scoped fixture.

The one tgtd
------------
Cinder's ``TgtAdm`` runs ``tgtadm`` and ``tgt-admin`` without ``-C``, so
tests use the machine's default instance: control socket
``/var/run/tgtd/socket.0``, portal ``127.0.0.1:3260``.
:meth:`Tgtd.ensure` starts ``tgtd -f --iscsi portal=127.0.0.1:3260``
only when no tgtd answers ``tgtadm --op show``, and only a tgtd started
that way is stopped by :meth:`Tgtd.stop`.

Facts about tgt 1.0.85 (Debian 12), found by running it:

- **tgtd ignores SIGTERM**, with or without targets: its handler
  (``signal_catch`` in usr/tgtd.c) is empty. The clean stop is the one in
  tgt.service's ``ExecStop``: delete every target (``tgtadm --op delete
  --mode target --tid N --force``; without ``--force`` a target with a
  session is refused, "this target is still active"), then ``tgtadm --op
  delete --mode system``, which makes tgtd exit 0; it is refused (rc 22,
  "invalid request") while any target exists. SIGKILL is the last resort.
  The control socket files stay behind and do no harm to the next start.
- ``tgtadm --lld iscsi --op show --mode target`` prints, per target::

      Target 1: iqn.2024-01.test:a
          System information: (Driver, State)
          I_T nexus information:
              I_T nexus: 9                      <- one per session
                  Initiator: iqn.2008-11.org.linux-kvm alias: none
                  Connection: 0
                      IP Address: 127.0.0.1
          LUN information:
              LUN: 0                            <- the controller, no store
                  ... Backing store path: None
              LUN: 1
                  Type: disk ...
                  Size: 67 MB, Block size: 512  <- decimal MB, rounded
                  Backing store path: /path/to/file
          Account information:
              user1                             <- CHAP incoming users
          ACL information:
              ALL

  Accounts are global to tgtd (``--mode account``) and survive the
  deletion of the target they were bound to, also through ``tgt-admin
  --delete``; :meth:`Tgtd.delete_target` deletes those no other target
  uses. The discovery session (``iscsi-ls``) is not authenticated.
- **Sizes are read once**, when the LUN's backing store is opened. A file
  (or LV) that grows keeps its old size for every initiator, new logins
  included, and no UNIT ATTENTION is sent. What re-reads it:

  * ``tgtadm --op update --mode logicalunit --tid T --lun 1 --params
    online=0,path=<same path>`` (:meth:`Tgtd.reopen_lun`): tgtd closes and
    reopens the store (``tgt_device_path_update``, which requires the LUN
    offline; ``path=`` alone fails with rc 22) and puts it back online.
    Sessions stay (same I_T nexus) and new logins see the new size; an
    initiator already logged in must re-read the capacity itself
    (``iscsiadm -m session -R``, qemu ``block_resize``). There is no
    ``--op update`` for the size alone. Not tried under concurrent I/O:
    the store is closed and reopened between two commands of tgtd's
    event loop while its I/O threads may hold commands.
  * deleting and re-adding the target or LUN, which is what Cinder does.

- **Cinder's extend** (``cinder/volume/drivers/lvm.py`` ``extend_volume``
  -> ``ISCSITarget.extend_target``) runs ``tgt-admin --update IQN -f``,
  and only when ``volume.volume_attachment`` is set. ``tgt-admin
  --update`` deletes the target and recreates it from its config file;
  with ``-f`` it first unbinds the ACLs and deletes the connections, so
  the initiator loses its session ("IO disruption", says Cinder). qemu's
  libiscsi logs in again by itself about a second later (a new I_T
  nexus) and its next command gets UNIT ATTENTION "BUS RESET", which it
  retries. Without ``-f`` a target with a session is left as it is and
  tgt-admin still exits 0.
- ``tgt-admin`` (not tgtadm) refuses a backing store that another process
  holds open (``lsof``) unless ``-f`` or ``allow-in-use yes``: the target
  is created **without LUN 1** and tgt-admin exits 0. Cinder's
  ``TgtAdm.create_iscsi_target`` then sleeps 10 s and adds LUN 1 with
  ``tgtadm --op new --mode logicalunit``. Close the volume before
  exporting it.
- ``tgt-admin`` reads ``/etc/tgt/targets.conf``, which on Debian is
  ``include /etc/tgt/conf.d/*.conf`` (Config::General, globs allowed);
  an ``include`` of a missing or empty directory is harmless. Cinder
  writes one file per volume in ``volumes_dir`` and needs the tgt config
  to include ``volumes_dir/*`` (devstack does this):
  :func:`conf_include`.

The initiator side
------------------
- URL: ``iscsi://[user[%password]@]127.0.0.1:3260/<iqn>/<lun>``, the same
  for qemu and libiscsi (qemu 7.2 hands the URL to libiscsi's
  ``iscsi_parse_full_url``). The user ends at the first ``%``, the
  password at ``@``, and nothing is percent-decoded (a password
  ``A%41b`` logs in as written, ``AAb`` does not), so a user with ``%``,
  ``@`` or ``/`` or a password with ``@`` or ``/`` cannot be put in a URL
  (:func:`url` refuses them). qemu takes any credentials with
  ``--object secret,id=sec0,data=PASSWORD --image-opts
  driver=raw,file.driver=iscsi,file.transport=tcp,file.portal=...,
  file.target=IQN,file.lun=1,file.user=USER,file.password-secret=sec0``.
  Cinder's generated CHAP users and passwords are alphanumeric.
- A CHAP refusal (wrong password, or no credentials for a target with an
  account) is "Failed to log in to target. Status: Authentication
  failure(513)": ``iscsi-inq`` exits 10, ``qemu-io`` 1 with "can't open
  device". A missing target is "Target not found(515)", except when tgtd
  has no target at all: then it drops the connection and libiscsi says
  "Can not reconnect right now", as when nothing listens on the port.
- ``qemu-io`` 7.2 exits 1 on "Pattern verification failed".
- tgtd drops a session's I_T nexus when the initiator closes the
  connection; :func:`wait_no_sessions` polls for it.

Cinder's TgtAdm in-process
--------------------------
``cinder.volume.targets.tgt.TgtAdm`` runs its commands through
``cinder.privsep.targets.tgt`` (``processutils.execute``, no root helper,
no ``cinder.utils.execute``), so as root it only needs
``cinder.privsep.sys_admin_pctxt.set_client_mode(False)`` (no privsep
daemon, no sudo) and ``cinder.objects.register_all()``; it takes no
lock, so no ``lock_path``. Its configuration is a
``cinder.volume.configuration.Configuration`` whose ``safe_get`` reads
``target_prefix``, ``target_protocol`` and ``volumes_dir`` from oslo.config
(instance attributes are not seen by ``safe_get``). ``create_export``
looks the volume's ``provider_auth`` up with ``TgtAdm.db.volume_get``
(Cinder's DB API), and makes new random CHAP credentials when that raises
``NotFound``; it returns ``{'location': '127.0.0.1:3260,TID IQN 1',
'auth': 'CHAP user password'}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

__all__ = [
    "PORTAL", "CommandError", "TargetInfo", "Tgtd", "capacity",
    "conf_include", "login_ok", "parse_targets", "qemu_io",
    "read_pattern_ok", "sha256", "url", "wait_no_sessions", "write_pattern"]

PORTAL = "127.0.0.1:3260"
TGT_CONF = "/etc/tgt/targets.conf"
CONF_D = "/etc/tgt/conf.d"
TIMEOUT = 60
"""Seconds any one tool may run."""

_ENV = {**os.environ, "LC_ALL": "C"}
_AUTH_REFUSED = "Authentication failure"
_PATTERN_FAILED = "Pattern verification failed"
_QEMU_FAILURES = (_PATTERN_FAILED, "failed", "can't open")


class CommandError(Exception):
    """A tool failed or timed out; ``output`` is its stdout and stderr."""

    msg = "{argv} failed (rc={rc}): {output}"

    def __init__(self, argv: list[str], rc: int | None,
                 output: str) -> None:
        self.argv = argv
        self.rc = rc
        self.output = output
        super().__init__(self.msg.format(
            argv=" ".join(argv), rc=rc, output=output.strip()))


def _run(argv: list[str], *, check: bool = True,
         timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True,
                              env=_ENV, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        output = _text(e.stdout) + _text(e.stderr)
        raise CommandError(argv, None, f"timed out after {timeout}s: "
                           f"{output}") from e
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout + proc.stderr)
    return proc


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def _tgtadm(*args: str, check: bool = True,
            timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return _run(["tgtadm", "--lld", "iscsi", *args], check=check,
                timeout=timeout)


# The target


@dataclasses.dataclass
class TargetInfo:
    """One target as ``tgtadm --op show --mode target`` shows it."""

    tid: int
    iqn: str
    luns: dict[int, str] = dataclasses.field(default_factory=dict)
    """LUN -> backing store path, for LUNs with a store (not LUN 0)."""
    accounts: list[str] = dataclasses.field(default_factory=list)
    acl: list[str] = dataclasses.field(default_factory=list)
    sessions: int = 0
    """I_T nexus count."""
    nexus_ids: list[int] = dataclasses.field(default_factory=list,
                                             compare=False)
    """The I_T nexus numbers: a new one per login, so a session that was
    dropped and made again has a new number."""


_TARGET_RE = re.compile(r"^Target (\d+): (\S+)$")


def parse_targets(text: str) -> dict[str, TargetInfo]:
    """Parse ``tgtadm --lld iscsi --op show --mode target``."""
    targets: dict[str, TargetInfo] = {}
    target = section = lun = None
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if m := _TARGET_RE.match(line):
            target = TargetInfo(int(m[1]), m[2])
            targets[target.iqn] = target
        elif target is None or not stripped:
            continue
        elif indent == 4:
            section = stripped.rstrip(":")
        elif section == "I_T nexus information":
            _parse_nexus_line(target, stripped)
        elif section == "LUN information":
            lun = _parse_lun_line(target, stripped, lun)
        elif section == "Account information" and indent == 8:
            target.accounts.append(stripped)
        elif section == "ACL information" and indent == 8:
            target.acl.append(stripped)
    return targets


def _parse_nexus_line(target: TargetInfo, line: str) -> None:
    key, _, value = line.partition(": ")
    if key == "I_T nexus":
        target.sessions += 1
        target.nexus_ids.append(int(value))


def _parse_lun_line(target: TargetInfo, line: str,
                    lun: int | None) -> int | None:
    key, _, value = line.partition(": ")
    if key == "LUN":
        return int(value)
    if key == "Backing store path" and value != "None" and lun is not None:
        target.luns[lun] = value
    return lun


class Tgtd:
    """The machine's default tgtd (control socket
    ``/var/run/tgtd/socket.0``, portal :data:`PORTAL`)."""

    def __init__(self, proc: subprocess.Popen | None = None,
                 log_path: str | None = None) -> None:
        self.proc = proc
        self.log_path = log_path

    @property
    def started(self) -> bool:
        """Whether this object started tgtd (and so may stop it)."""
        return self.proc is not None

    @classmethod
    def ensure(cls, timeout: float = 10) -> Tgtd:
        """The running tgtd, or a new one started in the background."""
        if _answers():
            return cls()
        fd, log_path = tempfile.mkstemp(prefix="tgtd-", suffix=".log")
        try:
            proc = subprocess.Popen(
                ["tgtd", "-f", "--iscsi", f"portal={PORTAL}"],
                stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                env=_ENV, start_new_session=True)
        finally:
            os.close(fd)
        tgtd = cls(proc, log_path)
        tgtd._wait_ready(timeout)
        return tgtd

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not _answers(timeout=5):
            if self.proc.poll() is not None:
                if _answers():  # Another tgtd won the race: use it.
                    self._forget()
                    return
                self._fail(f"exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                self._kill()
                self._fail(f"not ready in {timeout}s")
            time.sleep(0.05)

    def _fail(self, reason: str) -> None:
        argv, output = self.proc.args, self.log()
        self._forget()
        raise CommandError(argv, None, f"{reason}: {output}")

    def log(self) -> str:
        """What the tgtd we started has printed."""
        if self.log_path is None:
            return ""
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 10) -> None:
        """Stop tgtd if we started it: delete every target, then ask it to
        exit (``--op delete --mode system``); SIGTERM (which tgtd
        ignores), then SIGKILL, if it does not."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._terminate(timeout)
        self._forget()

    def _terminate(self, timeout: float) -> None:
        try:
            for iqn in self.targets():
                self.delete_target(iqn)
            _run(["tgtadm", "--op", "delete", "--mode", "system"],
                 check=False, timeout=5)
        except CommandError:
            pass  # Exit anyway: SIGKILL below.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                self.proc.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                self.proc.send_signal(sig)
        else:
            self.proc.wait(timeout)

    def _kill(self) -> None:
        self.proc.kill()
        self.proc.wait(TIMEOUT)

    def _forget(self) -> None:
        self.proc = None
        if self.log_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.log_path)
            self.log_path = None

    def targets(self) -> dict[str, TargetInfo]:
        """iqn -> :class:`TargetInfo` for every target of tgtd."""
        out = _tgtadm("--op", "show", "--mode", "target").stdout
        return parse_targets(out)

    def target(self, iqn: str) -> TargetInfo:
        """The target ``iqn``; KeyError if there is none."""
        return self.targets()[iqn]

    def accounts(self) -> list[str]:
        """Every CHAP account of tgtd (accounts are global)."""
        out = _tgtadm("--op", "show", "--mode", "account").stdout
        return [line.strip() for line in out.splitlines()[1:]
                if line.strip()]

    def add_target(self, iqn: str, path: str, *,
                   chap: tuple[str, str] | None = None,
                   bsoflags: str | None = None) -> int:
        """A target ``iqn`` with LUN 1 backed by ``path``, open to every
        initiator, with the incoming CHAP account ``chap`` (user,
        password) if given; its tid. An account of the same user is
        replaced."""
        tid = max((t.tid for t in self.targets().values()), default=0) + 1
        _tgtadm("--op", "new", "--mode", "target", "--tid", str(tid),
                "-T", iqn)
        try:
            flags = ["--bsoflags", bsoflags] if bsoflags else []
            _tgtadm("--op", "new", "--mode", "logicalunit", "--tid",
                    str(tid), "--lun", "1", "-b", path, *flags)
            _tgtadm("--op", "bind", "--mode", "target", "--tid", str(tid),
                    "-I", "ALL")
            if chap is not None:
                self._bind_account(tid, *chap)
        except BaseException:
            _tgtadm("--op", "delete", "--mode", "target", "--force",
                    "--tid", str(tid), check=False)
            raise
        return tid

    def _bind_account(self, tid: int, user: str, password: str) -> None:
        if user in self.accounts():
            _tgtadm("--op", "delete", "--mode", "account", "--user", user)
        _tgtadm("--op", "new", "--mode", "account", "--user", user,
                "--password", password)
        _tgtadm("--op", "bind", "--mode", "account", "--tid", str(tid),
                "--user", user)

    def delete_target(self, iqn: str) -> None:
        """Delete the target ``iqn`` even with sessions, and its accounts
        that no other target uses; nothing if there is no such target."""
        targets = self.targets()
        target = targets.pop(iqn, None)
        if target is None:
            return
        _tgtadm("--op", "delete", "--mode", "target", "--force", "--tid",
                str(target.tid))
        in_use = {a for t in targets.values() for a in t.accounts}
        for user in set(target.accounts) - in_use:
            _tgtadm("--op", "delete", "--mode", "account", "--user", user,
                    check=False)

    def reopen_lun(self, iqn: str, lun: int = 1) -> None:
        """Make tgtd reopen the LUN's backing store and so read its size
        again (online extend), keeping the sessions."""
        target = self.target(iqn)
        _tgtadm("--op", "update", "--mode", "logicalunit", "--tid",
                str(target.tid), "--lun", str(lun), "--params",
                f"online=0,path={target.luns[lun]}")


def _answers(timeout: float = 5) -> bool:
    try:
        proc = _tgtadm("--op", "show", "--mode", "target", check=False,
                       timeout=timeout)
    except CommandError:
        return False
    return proc.returncode == 0


def wait_no_sessions(iqn: str, timeout: float = 10) -> None:
    """Wait until the target ``iqn`` has no session (or is gone)."""
    deadline = time.monotonic() + timeout
    while True:
        target = Tgtd().targets().get(iqn)
        if target is None or target.sessions == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{iqn} still has {target.sessions} "
                               f"session(s) after {timeout}s")
        time.sleep(0.1)


@contextlib.contextmanager
def conf_include(volumes_dir: str) -> Iterator[str]:
    """Make tgt-admin read ``volumes_dir/*`` (where Cinder's TgtAdm writes
    one target per file) through a file in /etc/tgt/conf.d, removed on
    exit; yields the path of that file."""
    _check_conf_d()
    pid = os.getpid()
    for n in range(100):
        suffix = f"-{n}" if n else ""
        path = os.path.join(CONF_D, f"ovirt-cinder-test-{pid}{suffix}.conf")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"too many {CONF_D}/ovirt-cinder-test-{pid}*")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"include {os.path.abspath(volumes_dir)}/*\n")
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _check_conf_d() -> None:
    with open(TGT_CONF) as f:
        conf = f.read()
    if not re.search(rf"^\s*include\s+{CONF_D}/\*", conf, re.MULTILINE):
        raise RuntimeError(f"{TGT_CONF} does not include {CONF_D}/*")


# The initiator


def url(iqn: str, lun: int = 1,
        chap: tuple[str, str] | None = None) -> str:
    """``iscsi://[user%password@]127.0.0.1:3260/<iqn>/<lun>``, for qemu and
    libiscsi."""
    auth = ""
    if chap is not None:
        user, password = chap
        if set(user) & set("%@/") or set(password) & set("@/"):
            raise ValueError(f"CHAP credentials {chap!r} do not fit in a URL")
        auth = f"{user}%{password}@"
    return f"iscsi://{auth}{PORTAL}/{iqn}/{lun}"


def qemu_io(iqn: str, cmds: list[str], *,
            chap: tuple[str, str] | None = None, lun: int = 1) -> str:
    """Run the qemu-io commands ``cmds`` on the LUN, as raw; its stdout.
    CommandError if qemu-io fails, a pattern included."""
    argv = ["qemu-io", "-f", "raw"]
    for cmd in cmds:
        argv += ["-c", cmd]
    argv.append(url(iqn, lun, chap))
    proc = _run(argv, check=False)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 or any(f in output for f in _QEMU_FAILURES):
        raise CommandError(argv, proc.returncode, output)
    return proc.stdout


def write_pattern(iqn: str, offset: int, length: int, pattern: int, *,
                  chap: tuple[str, str] | None = None) -> None:
    """Fill ``length`` bytes at ``offset`` of LUN 1 with the byte
    ``pattern``."""
    qemu_io(iqn, [f"write -P {pattern:#04x} {offset} {length}"], chap=chap)


def read_pattern_ok(iqn: str, offset: int, length: int, pattern: int, *,
                    chap: tuple[str, str] | None = None) -> bool:
    """Whether ``length`` bytes at ``offset`` of LUN 1 all equal
    ``pattern``; CommandError if they cannot be read."""
    try:
        qemu_io(iqn, [f"read -P {pattern:#04x} {offset} {length}"],
                chap=chap)
    except CommandError as e:
        if _PATTERN_FAILED in e.output:
            return False
        raise
    return True


def sha256(iqn: str, size: int, *, chap: tuple[str, str] | None = None,
           tmpdir: str | None = None) -> str:
    """sha256 of the first ``size`` bytes of LUN 1 (its whole content when
    ``size`` is its size), read with ``qemu-img convert`` into a sparse
    temporary file in ``tmpdir``. CommandError if the LUN is shorter."""
    fd, copy = tempfile.mkstemp(dir=tmpdir, suffix=".lun")
    os.close(fd)
    try:
        _run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
              url(iqn, 1, chap), copy])
        return _file_sha256(copy, size)
    finally:
        os.unlink(copy)


def _file_sha256(path: str, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while (left := size - f.tell()) > 0:
            block = f.read(min(left, 1024 * 1024))
            if not block:
                raise CommandError(["sha256", path], None,
                                   f"LUN shorter than {size} bytes")
            h.update(block)
    return h.hexdigest()


def capacity(iqn: str, *, chap: tuple[str, str] | None = None,
             lun: int = 1) -> int:
    """The LUN's size in bytes as a new login sees it (READ CAPACITY 16)."""
    out = _run(["iscsi-readcapacity16", url(iqn, lun, chap)]).stdout
    m = re.search(r"^Total size:(\d+)$", out, re.MULTILINE)
    if m is None:
        raise CommandError(["iscsi-readcapacity16"], 0, out)
    return int(m[1])


def login_ok(iqn: str, *, chap: tuple[str, str] | None = None) -> bool:
    """Whether a login to LUN 1 with these credentials is accepted (an
    INQUIRY with ``iscsi-inq``): False on a CHAP refusal, CommandError on
    any other failure (no such target, no tgtd)."""
    proc = _run(["iscsi-inq", url(iqn, 1, chap)], check=False)
    if proc.returncode == 0:
        return True
    if _AUTH_REFUSED in proc.stdout + proc.stderr:
        return False
    raise CommandError(proc.args, proc.returncode, proc.stdout + proc.stderr)
