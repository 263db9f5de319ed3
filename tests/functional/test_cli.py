"""The ``ovirt-storage`` CLI on real local-directory domains.

Commands run in-process through ``main()`` (output captured by capsys) and
as a real ``python -m ovirt_cinder.cmd.storage`` subprocess where stderr
must be exactly one ``error:`` line. Data is checked by content with
qemu-io on the paths ``image show --json`` gives.

The configuration tests write real cinder.conf / glance-api.conf /
ovirt-storage.conf files; an unfinished flow is left in an SQL logbook by
a TaskFlow listener that interrupts the flow as its first task starts, so
only a CLI that reads the logbook named in the file sees it. Read-only and
full domains are a tmpfs of the test's own (mounted as root).
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from ovirt_cinder.cmd import storage
from ovirt_cinder.storage import actions
from ovirt_cinder.storage import config
from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import lease
from tests import qemuio
from tests.listeners import at_step

MiB = sc.MiB
REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def uid():
    return str(uuid.uuid4())


@pytest.fixture(autouse=True)
def own_config(tmp_path, monkeypatch):
    """In-process runs read a [storage] file of the test's own (as
    /etc/ovirt-cinder/ovirt-storage.conf) that only keeps the image locks
    in the test's directory."""
    path = tmp_path / "default-ovirt-storage.conf"
    path.write_text(f"[storage]\novirt_lock_path = {tmp_path}/locks\n")
    monkeypatch.setattr(storage, "DEFAULT_CONFIG_FILE", str(path))
    return str(path)


def run(capsys, *argv, rc=0):
    code = storage.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == rc, (argv, out, err)
    return out, err


def run_json(capsys, *argv, rc=0):
    out, _ = run(capsys, *argv, "--json", rc=rc)
    return json.loads(out)


def leaf(capsys, paths, sd_id, img_id):
    data = run_json(capsys, *paths, "image", "show", sd_id, img_id)
    vols = {v["vol_id"]: v for v in data["volumes"]}
    vol = vols[data["leaf"]]
    return vol["path"], "qcow2" if vol["format"] == "COW" else "raw"


def write(capsys, paths, sd_id, img_id, offset, pattern):
    path, fmt = leaf(capsys, paths, sd_id, img_id)
    qemuio.write_pattern(path, fmt, offset, MiB, pattern)


def verify(capsys, paths, sd_id, img_id, offset, pattern):
    path, fmt = leaf(capsys, paths, sd_id, img_id)
    qemuio.verify_pattern(path, fmt, offset, MiB, pattern)


@pytest.fixture
def cli_pool(capsys, mount):
    """(paths, sd_id) of a new pool created through the CLI."""
    data = run_json(capsys, "pool", "create", "--path", mount,
                    "--description", "cli")
    return ["-p", mount], data["master_domain_id"]


def snapshots(capsys, paths, sd_id, img_id):
    data = run_json(capsys, *paths, "image", "show", sd_id, img_id)
    return {v["snapshot_id"] for v in data["volumes"] if v["snapshot_id"]}


def test_done_when_walk(capsys, tmp_path, mount, mount2, cli_pool):
    paths, sd = cli_pool
    img = uid()
    run(capsys, *paths, "volume", "create", sd, "--image-id", img,
        "--size", "16M")
    snaps = [uid(), uid(), uid()]
    for i, snap in enumerate(snaps):
        write(capsys, paths, sd, img, i * MiB, 0x11 * (i + 1))
        run(capsys, *paths, "snapshot", "create", sd, img,
            "--snapshot-id", snap)
    write(capsys, paths, sd, img, 3 * MiB, 0x44)
    assert snapshots(capsys, paths, sd, img) == set(snaps)

    # Merge the middle snapshot away: the data stays.
    run(capsys, *paths, "snapshot", "delete", sd, img, snaps[1])
    assert snapshots(capsys, paths, sd, img) == {snaps[0], snaps[2]}
    for i, pattern in enumerate([0x11, 0x22, 0x33, 0x44]):
        verify(capsys, paths, sd, img, i * MiB, pattern)

    # Revert to the first snapshot.
    run(capsys, *paths, "snapshot", "revert", sd, img, snaps[0])
    verify(capsys, paths, sd, img, 0, 0x11)
    for i in range(1, 4):
        verify(capsys, paths, sd, img, i * MiB, 0)

    # A raw file imported as a template, then thin-cloned.
    src = tmp_path / "src.raw"
    src.write_bytes(b"")
    os.truncate(src, 4 * MiB + 100)     # rounded up to 512 on import
    qemuio.write_pattern(str(src), "raw", MiB, MiB, 0x55)
    tmpl = run_json(capsys, *paths, "volume", "import", sd, src,
                    "--template")["image_id"]
    shown = run_json(capsys, *paths, "image", "show", sd, tmpl)
    assert shown["template"] is True
    assert shown["volumes"][0]["capacity"] == 4 * MiB + 512
    thin = run_json(capsys, *paths, "image", "thin-clone", sd, tmpl,
                    "--size", "8M")["image_id"]
    verify(capsys, paths, sd, thin, MiB, 0x55)
    rows = {r["img_id"]: r for r in run_json(
        capsys, *paths, "image", "list", sd)}
    assert rows[tmpl]["template"] and not rows[thin]["template"]
    assert rows[thin]["capacity"] == 8 * MiB
    assert rows[img]["snapshots"] == 2

    # A second domain; copy the image (with its snapshots) to it.
    sd2 = run_json(capsys, *paths, "domain", "create",
                   "--path", mount2)["domain_id"]
    paths = ["-p", mount, "-p", mount2]
    run(capsys, *paths, "image", "copy", sd, img, sd2)
    assert snapshots(capsys, paths, sd2, img) == {snaps[0], snaps[2]}
    verify(capsys, paths, sd2, img, 0, 0x11)
    verify(capsys, paths, sd2, img, MiB, 0)

    pool = run_json(capsys, *paths, "pool", "show")
    counts = {d["sd_id"]: d["images"] for d in pool["domains"]}
    assert counts == {sd: 3, sd2: 1}

    report = run_json(capsys, *paths, "fsck")
    assert report["clean"] is True and report["problems"] == []
    out, _ = run(capsys, *paths, "fsck")
    assert "clean" in out


def test_clone_export_extend_delete(capsys, tmp_path, cli_pool):
    paths, sd = cli_pool
    img = run_json(capsys, *paths, "volume", "create", sd, "--size", "8M",
                   "--format", "raw")["image_id"]
    write(capsys, paths, sd, img, 0, 0x61)
    snap = run_json(capsys, *paths, "snapshot", "create", sd,
                    img)["snapshot_id"]
    write(capsys, paths, sd, img, 0, 0x62)
    clone = run_json(capsys, *paths, "image", "clone", sd, img,
                     "--snapshot", snap, "--size", "16M",
                     "--format", "qcow2")["image_id"]
    verify(capsys, paths, sd, clone, 0, 0x61)
    out = tmp_path / "out.qcow2"
    run(capsys, *paths, "image", "export", sd, img, out,
        "--format", "qcow2")
    qemuio.verify_pattern(str(out), "qcow2", 0, MiB, 0x62)
    data = run_json(capsys, *paths, "image", "extend", sd, img, "32M")
    assert data["capacity"] == 32 * MiB
    assert run_json(capsys, *paths, "image", "delete", sd,
                    img)["removed"] is True
    ids = [r["img_id"] for r in run_json(capsys, *paths, "image", "list",
                                         sd)]
    assert ids == [clone]


def test_image_show_human_draws_chain(capsys, cli_pool):
    paths, sd = cli_pool
    img = uid()
    run(capsys, *paths, "volume", "create", sd, "--image-id", img,
        "--size", "1M")
    snap = uid()
    run(capsys, *paths, "snapshot", "create", sd, img, "--snapshot-id",
        snap)
    out, _ = run(capsys, *paths, "image", "show", sd, img)
    chain = [line for line in out.splitlines()
             if line.startswith("chain:")]
    assert len(chain) == 1
    assert f"(snap {snap[:8]}) -> " in chain[0]
    assert "INTERNAL" in out and "LEAF" in out


def test_progress_bar(capsys, cli_pool):
    paths, sd = cli_pool
    img = run_json(capsys, *paths, "volume", "create", sd,
                   "--size", "4M")["image_id"]
    _, err = run(capsys, *paths, "image", "clone", sd, img, "--progress")
    assert "\r[" in err and "100%" in err
    assert actions.progress_callback is None
    # stderr is not a TTY under capsys: no bar without --progress.
    _, err = run(capsys, *paths, "image", "clone", sd, img)
    assert "%" not in err


@pytest.mark.parametrize("argv", [
    ["volume", "create", "{sd}", "--image-id", "not-a-uuid",
     "--size", "1M"],
    ["volume", "create", "{sd}", "--image-id", "{upper}", "--size", "1M"],
    ["snapshot", "create", "{sd}", "{img}", "--snapshot-id", "x"],
])
def test_bad_uuid(capsys, cli_pool, argv):
    paths, sd = cli_pool
    img = run_json(capsys, *paths, "volume", "create", sd,
                   "--size", "1M")["image_id"]
    before = run_json(capsys, *paths, "image", "show", sd, img)
    argv = [a.format(sd=sd, img=img, upper=uid().upper()) for a in argv]
    with pytest.raises(SystemExit) as e:
        storage.main(paths + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "is not a UUID" in err and "Traceback" not in err
    ids = [r["img_id"] for r in run_json(capsys, *paths, "image", "list",
                                         sd)]
    assert ids == [img]
    assert run_json(capsys, *paths, "image", "show", sd, img) == before


def test_bad_pool_uuid_creates_nothing(capsys, mount):
    with pytest.raises(SystemExit) as e:
        storage.main(["pool", "create", "--path", mount, "--pool-id", "1"])
    assert e.value.code == 2
    assert "Invalid pool id" in capsys.readouterr().err
    assert os.listdir(mount) == []


def test_storage_error_exit_2(capsys, cli_pool):
    paths, sd = cli_pool
    missing = uid()
    _, err = run(capsys, *paths, "image", "show", sd, missing, rc=2)
    assert err == f"error: Image {missing} not found in domain {sd}\n"
    _, err = run(capsys, *paths, "image", "thin-clone", sd, uid(), rc=2)
    assert err.startswith("error: Image ")


def test_no_paths(capsys, monkeypatch):
    monkeypatch.delenv(storage.PATHS_ENV, raising=False)
    _, err = run(capsys, "pool", "show", rc=2)
    assert "OVIRT_STORAGE_PATHS" in err


def test_paths_from_environment(capsys, monkeypatch, mount, mount2,
                                cli_pool):
    _, sd = cli_pool
    sd2 = run_json(capsys, "-p", mount, "domain", "create", "--path",
                   mount2)["domain_id"]
    monkeypatch.setenv(storage.PATHS_ENV, f"{mount}:{mount2}")
    rows = run_json(capsys, "domain", "list")
    assert {(r["sd_id"], r["role"]) for r in rows} == {
        (sd, "Master"), (sd2, "Regular")}


def test_fsck_leftover_and_repair(capsys, cli_pool):
    paths, sd = cli_pool
    img = run_json(capsys, *paths, "volume", "create", sd,
                   "--size", "1M")["image_id"]
    path, _ = leaf(capsys, paths, sd, img)
    junk = os.path.join(os.path.dirname(path), "x.meta.new")
    with open(junk, "w") as f:
        f.write("partial")
    report = run_json(capsys, *paths, "fsck", rc=1)
    assert [(p["kind"], p["img_id"], p["garbage"])
            for p in report["problems"]] == [("leftover", img, True)]
    out, _ = run(capsys, *paths, "fsck", rc=1)
    assert "leftover" in out and "x.meta.new" in out
    assert os.path.exists(junk)
    out, _ = run(capsys, *paths, "fsck", "--repair")
    assert "removed leftover" in out and "clean" in out
    assert not os.path.exists(junk)
    run(capsys, *paths, "fsck")
    out, _ = run(capsys, *paths, "recover")
    assert out == "nothing to recover\n"


@pytest.mark.parametrize("text,size", [
    ("512", 512), ("1K", 1024), ("512M", 512 * MiB), ("1G", sc.GiB),
    ("2GiB", 2 * sc.GiB), ("1t", 1024 * sc.GiB)])
def test_parse_size(text, size):
    assert storage.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "1.5G", "100", "0", "-1M", "1X"])
def test_parse_size_invalid(text):
    with pytest.raises(Exception, match="invalid size"):
        storage.parse_size(text)


def _subprocess(*argv, env):
    return subprocess.run(
        [sys.executable, "-m", "ovirt_cinder.cmd.storage", *argv],
        capture_output=True, text=True, cwd=REPO, check=False,
        env={**os.environ, "PYTHONPATH": REPO, **env})


def test_subprocess(mount):
    env = {storage.PATHS_ENV: mount}
    proc = _subprocess("pool", "create", "--path", mount, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    created = json.loads(proc.stdout)
    proc = _subprocess("pool", "show", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["pool_id"] == created["pool_id"]
    assert shown["master"] == created["master_domain_id"]
    proc = _subprocess("image", "show", created["master_domain_id"],
                       uid(), env=env)
    assert proc.returncode == 2
    assert "error: Image " in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _subprocess("volume", "create", "nope", "--size", "1M", env=env)
    assert proc.returncode == 2
    assert "is not a UUID" in proc.stderr


def test_help_imports_no_engine():
    """Asking for help costs no TaskFlow, eventlet or oslo.config."""
    proc = subprocess.run(
        [sys.executable, "-c",
         "import sys\n"
         "from ovirt_cinder.cmd import storage\n"
         "try:\n"
         "    storage.main(['volume', 'create', '--help'])\n"
         "except SystemExit:\n"
         "    pass\n"
         "print(sorted(m for m in ('taskflow', 'eventlet', 'oslo_config')\n"
         "             if m in sys.modules))\n"],
        capture_output=True, text=True, cwd=REPO, check=True,
        env={**os.environ, "PYTHONPATH": REPO})
    assert proc.stdout.splitlines()[-1] == "[]", proc.stdout


# Runs main(argv) in a new interpreter, DEFAULT_CONFIG_FILE being
# argv[1]; prints main's output, then its exit code and which of the
# libraries that make a start slow it imported.
_WHAT_IMPORTED = """\
import json, sys
from ovirt_cinder.cmd import storage
storage.DEFAULT_CONFIG_FILE = sys.argv[1]
rc = storage.main(sys.argv[2:])
slow = ("taskflow", "eventlet", "oslo_privsep", "oslo_config")
print(json.dumps([rc, [m for m in slow if m in sys.modules]]))
"""


def what_imported(default_config, *argv):
    """(exit code, slow libraries imported, output) of ``main(argv)``."""
    proc = subprocess.run(
        [sys.executable, "-c", _WHAT_IMPORTED, default_config, *argv],
        capture_output=True, text=True, cwd=REPO, check=True,
        env={**os.environ, "PYTHONPATH": REPO})
    *out, last = proc.stdout.splitlines()
    rc, imported = json.loads(last)
    return rc, imported, "\n".join(out)


@pytest.mark.parametrize("with_file", [False, True],
                         ids=["no-config-file", "config-file"])
def test_read_only_commands_import_no_engine(tmp_path, mount, with_file):
    """The read-only commands import no TaskFlow, oslo.privsep or eventlet
    (nor oslo.config when no file is read); a command that changes the
    pool imports them all and works."""
    conf = tmp_path / "ovirt-storage.conf"
    if with_file:
        conf.write_text(f"[storage]\novirt_lock_path = {tmp_path}/locks\n"
                        f"ovirt_domain_paths = {mount}\n")
    read_conf = ["oslo_config"] if with_file else []
    locks = [] if with_file else ["--lock-path", str(tmp_path / "locks")]
    paths = [] if with_file else ["-p", mount, *locks]

    rc, _, out = what_imported(
        str(conf), "pool", "create", "--path", mount, *locks, "--json")
    assert rc == 0
    sd = json.loads(out)["master_domain_id"]
    rc, imported, out = what_imported(
        str(conf), *paths, "volume", "create", sd, "--size", "1M", "--json")
    assert rc == 0
    assert {"taskflow", "eventlet", "oslo_privsep"} <= set(imported)
    img = json.loads(out)["image_id"]

    for argv, shown in [(["pool", "show"], sd), (["domain", "list"], sd),
                        (["image", "list", sd], img),
                        (["image", "show", sd, img], "[leaf]")]:
        rc, imported, out = what_imported(str(conf), *paths, *argv)
        assert (rc, imported) == (0, read_conf), argv
        assert shown in out, argv


def test_broken_image_still_shown(capsys, cli_pool):
    paths, sd = cli_pool
    img = run_json(capsys, *paths, "volume", "create", sd,
                   "--size", "1M")["image_id"]
    run(capsys, *paths, "snapshot", "create", sd, img)
    path, _ = leaf(capsys, paths, sd, img)
    os.remove(path + ".meta")
    out, _ = run(capsys, *paths, "image", "show", sd, img)
    assert "chain: broken" in out
    # Global options before the command work too.
    out, _ = run(capsys, "--json", *paths, "image", "show", sd, img)
    assert json.loads(out)["leaf"] is None
    out, _ = run(capsys, *paths, "image", "list", sd)
    assert "broken: " in out
    report = run_json(capsys, *paths, "fsck", rc=1)
    assert {p["kind"] for p in report["problems"]} >= {"orphan"}


def test_pool_create_needs_path(capsys):
    with pytest.raises(SystemExit) as e:
        storage.main(["pool", "create"])
    assert e.value.code == 2
    assert "--path" in capsys.readouterr().err


# Configuration: the CLI reads the services' files

def _interrupt():
    raise KeyboardInterrupt


# A FlowRunner listener: stop the flow as its first task starts, leaving
# it unfinished in the logbook (as a crash would).
_interrupt_first_task = at_step(None, _interrupt)


def pool_opts(**values):
    opts = {o.dest: o.default for o in config.POOL_OPTS}
    opts.update(values)
    return argparse.Namespace(**opts)


def leave_unfinished_flow(mount, sd, url, lock_path):
    """One unfinished create_volume in the logbook at ``url``."""
    pool = config.open_pool(
        pool_opts(ovirt_domain_paths=[mount], ovirt_flow_connection=url,
                  ovirt_lock_path=lock_path),
        listeners=[_interrupt_first_task])
    img = uid()
    with pytest.raises(KeyboardInterrupt):
        pool.create_volume(sd, img, MiB)
    return img


def write_conf(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.fixture
def cinder_conf(tmp_path, mount, cli_pool):
    """cinder.conf with two backends; the logbook in backend_defaults."""
    url = f"sqlite:///{tmp_path}/flows.sqlite"
    path = write_conf(tmp_path / "cinder.conf", f"""
        [DEFAULT]
        enabled_backends = ovirt1, ovirt2
        debug = true

        [backend_defaults]
        ovirt_flow_connection = {url}
        ovirt_lock_path = {tmp_path}/locks-shared

        [ovirt1]
        volume_driver = ovirt_cinder.cinder.driver.OvirtVolumeDriver
        volume_backend_name = ovirt1
        ovirt_domain_paths = {mount}
        ovirt_volume_format = qcow2
        ovirt_lock_path = {tmp_path}/locks1

        [ovirt2]
        volume_driver = ovirt_cinder.cinder.driver.OvirtVolumeDriver
        ovirt_domain_paths = {tmp_path}/missing
        """)
    return ["--config-file", path], url


def test_backend_section_sql_logbook(capsys, tmp_path, mount, cli_pool,
                                     cinder_conf):
    paths, sd = cli_pool
    conf, url = cinder_conf
    img = leave_unfinished_flow(mount, sd, url, str(tmp_path / "locks"))
    assert os.path.exists(tmp_path / "flows.sqlite")

    # Without the configuration the CLI looks in the master domain's
    # logbook and sees nothing.
    assert run_json(capsys, *paths, "fsck")["clean"] is True

    # With it: the flow recorded in the SQL logbook (set in
    # [backend_defaults], which [ovirt1] falls back to).
    report = run_json(capsys, *conf, "--backend", "ovirt1", "fsck", rc=1)
    assert [p["kind"] for p in report["problems"]] == ["unfinished-flow"]
    out, _ = run(capsys, *conf, "--backend", "ovirt1", "recover")
    assert out != "nothing to recover\n" and out.count("\n") == 1
    out, _ = run(capsys, *conf, "--backend", "ovirt1", "recover")
    assert out == "nothing to recover\n"
    # The recovered create finished or was reverted: fsck is clean.
    run(capsys, *conf, "--backend", "ovirt1", "fsck")
    ids = {r["img_id"] for r in run_json(capsys, *conf, "--backend",
                                         "ovirt1", "image", "list", sd)}
    assert ids <= {img}


def test_backend_section_lock_path(capsys, tmp_path, cli_pool, cinder_conf):
    _, sd = cli_pool
    conf, _ = cinder_conf
    img = run_json(capsys, *conf, "--backend", "ovirt1", "volume", "create",
                   sd, "--size", "1M")["image_id"]
    # [ovirt1] sets its own lock path over [backend_defaults]'s.
    assert f"{sd}.{img}.lock" in os.listdir(tmp_path / "locks1")
    assert not os.path.exists(tmp_path / "locks-shared")


def test_backend_picks_its_section(capsys, tmp_path, mount, cli_pool,
                                   cinder_conf):
    conf, _ = cinder_conf
    shown = run_json(capsys, *conf, "--backend", "ovirt1", "pool", "show")
    assert shown["master"] == cli_pool[1]
    _, err = run(capsys, *conf, "--backend", "ovirt2", "pool", "show",
                 rc=2)
    assert err.startswith("error: ") and "missing" in err
    _, err = run(capsys, *conf, "--backend", "ovirt3", "pool", "show",
                 rc=2)
    assert err == (f"error: no section [ovirt3] in the configuration "
                   f"({conf[1]})\n")


def test_flags_override_the_file(capsys, tmp_path, mount, cli_pool,
                                 cinder_conf):
    _, sd = cli_pool
    conf, url = cinder_conf
    leave_unfinished_flow(mount, sd, url, str(tmp_path / "locks"))
    backend = [*conf, "--backend", "ovirt1"]
    # -p over [ovirt2]'s missing path.
    run(capsys, *conf, "--backend", "ovirt2", "-p", mount, "pool", "show")
    # --flow-connection '' over the SQL logbook: the master domain's.
    out, _ = run(capsys, *backend, "--flow-connection", "", "recover")
    assert out == "nothing to recover\n"
    # --lock-path over [ovirt1]'s.
    img = run_json(capsys, *backend, "--lock-path", tmp_path / "flag-locks",
                   "volume", "create", sd, "--size", "1M")["image_id"]
    assert os.listdir(tmp_path / "flag-locks") == [f"{sd}.{img}.lock"]
    # The file's logbook still holds the flow.
    out, _ = run(capsys, *backend, "recover")
    assert out.count("\n") == 1 and out != "nothing to recover\n"


def test_settings_precedence(tmp_path, monkeypatch, mount, mount2):
    monkeypatch.delenv(storage.PATHS_ENV, raising=False)
    path = write_conf(tmp_path / "cinder.conf", f"""
        [backend_defaults]
        ovirt_host_id = 5
        ovirt_io_timeout = 3
        [ovirt1]
        ovirt_domain_paths = {mount}
        ovirt_lease_backend = sanlock
        ovirt_host_id = 7
        ovirt_lease_timeout = 2.5
        ovirt_pool_uuid = {uid()}
        """)

    def settings(*argv):
        args = storage.build_parser().parse_args(
            ["--config-file", path, "--backend", "ovirt1", *argv,
             "pool", "show"])
        return storage.settings(args)

    opts = settings()
    assert (opts.ovirt_domain_paths, opts.ovirt_lease_backend,
            opts.ovirt_host_id, opts.ovirt_io_timeout,
            opts.ovirt_lease_timeout, opts.ovirt_flow_connection) == (
        [mount], "sanlock", 7, 3, 2.5, "")
    pool_id = uid()
    opts = settings("-p", mount2, "--pool-id", pool_id, "--lease-backend",
                    "local", "--host-id", "9", "--flow-connection",
                    "sqlite://", "--lock-path", "/run/x")
    assert (opts.ovirt_domain_paths, opts.ovirt_pool_uuid,
            opts.ovirt_lease_backend, opts.ovirt_host_id,
            opts.ovirt_flow_connection, opts.ovirt_lock_path) == (
        [mount2], pool_id, "local", 9, "sqlite://", "/run/x")
    monkeypatch.setenv(storage.PATHS_ENV, f"{mount2}:{mount}")
    assert settings().ovirt_domain_paths == [mount2, mount]
    assert settings("-p", mount).ovirt_domain_paths == [mount]


def test_own_config_file(capsys, tmp_path, monkeypatch, mount, cli_pool):
    monkeypatch.delenv(storage.PATHS_ENV, raising=False)
    _, sd = cli_pool
    url = f"sqlite:///{tmp_path}/own.sqlite"
    own = write_conf(tmp_path / "ovirt-storage.conf", f"""
        [storage]
        ovirt_domain_paths = {mount}
        ovirt_flow_connection = {url}
        ovirt_lock_path = {tmp_path}/locks
        """)
    leave_unfinished_flow(mount, sd, url, str(tmp_path / "locks"))
    monkeypatch.setattr(storage, "DEFAULT_CONFIG_FILE", own)
    report = run_json(capsys, "fsck", rc=1)
    assert [p["kind"] for p in report["problems"]] == ["unfinished-flow"]
    # Not read when another file is given.
    other = write_conf(tmp_path / "other.conf", f"""
        [storage]
        ovirt_domain_paths = {mount}
        """)
    assert run_json(capsys, "--config-file", other, "fsck")["clean"]
    # Not there: -p alone still works.
    monkeypatch.setattr(storage, "DEFAULT_CONFIG_FILE",
                        str(tmp_path / "absent.conf"))
    assert run_json(capsys, "-p", mount, "fsck")["clean"]


def test_glance_store_section(capsys, tmp_path, mount, cli_pool):
    path = write_conf(tmp_path / "glance-api.conf", f"""
        [DEFAULT]
        enabled_backends = fast:ovirt, file1:file

        [glance_store]
        default_backend = fast

        [fast]
        store_description = templates
        ovirt_domain_paths = {mount}
        ovirt_chunk_size = 4194304
        """)
    shown = run_json(capsys, "--config-file", path, "--glance-store", "fast",
                     "pool", "show")
    assert shown["master"] == cli_pool[1]
    _, err = run(capsys, "--config-file", path, "--glance-store", "fast",
                 "--backend", "ovirt1", "pool", "show", rc=2)
    assert err == "error: give --backend or --glance-store, not both\n"


def test_config_dir(capsys, tmp_path, mount, cli_pool):
    conf_dir = tmp_path / "cinder.conf.d"
    conf_dir.mkdir()
    write_conf(conf_dir / "50-ovirt.conf", f"""
        [ovirt1]
        ovirt_domain_paths = {mount}
        """)
    shown = run_json(capsys, "--config-dir", conf_dir, "--backend", "ovirt1",
                     "pool", "show")
    assert shown["master"] == cli_pool[1]


class RecordingLeases(lease.LocalLeaseManager):
    """Local leases that remember the domains they prepared."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.initialised = []

    def init_domain(self, domain):
        self.initialised.append(domain.sd_id)


def test_create_uses_the_lease_backend(capsys, monkeypatch, tmp_path, mount,
                                       mount2):
    # The sanlock daemon is a process boundary (tests/functional/sanlock
    # runs the real one); here: what the CLI asks for, and that the new
    # domains are prepared (init_domain formats sanlock's areas).
    made = []

    def make(backend, host_id=1, io_timeout=10, **kwargs):
        made.append(RecordingLeases(**kwargs))
        made[-1].args = (backend, host_id, io_timeout, kwargs)
        return made[-1]

    monkeypatch.setattr(lease, "make_lease_manager", make)
    path = write_conf(tmp_path / "ovirt-storage.conf", f"""
        [storage]
        ovirt_lease_backend = sanlock
        ovirt_host_id = 4
        ovirt_io_timeout = 5
        ovirt_lease_timeout = 3
        ovirt_lock_path = {tmp_path}/locks
        """)
    conf = ["--config-file", path]
    sd = run_json(capsys, *conf, "pool", "create", "--path",
                  mount)["master_domain_id"]
    sd2 = run_json(capsys, *conf, "--host-id", "6", "-p", mount, "domain",
                   "create", "--path", mount2)["domain_id"]
    locks = str(tmp_path / "locks")
    options = {"lease_timeout": 3.0, "lock_path": locks}
    assert [m.args for m in made] == [("sanlock", 4, 5, options),
                                      ("sanlock", 6, 5, options)]
    assert made[0].initialised == [sd]
    assert made[1].initialised == [sd, sd2]


# Errors: one line on stderr, exit 2, never a traceback

def assert_one_error_line(proc, *expected):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def _bad_configs(tmp_path, mount):
    return {
        "missing file": (["--config-file", tmp_path / "nope.conf"],
                         "nope.conf"),
        "missing dir": (["--config-dir", tmp_path / "nope.d"], "nope.d"),
        "unparsable": (["--config-file", write_conf(
            tmp_path / "garbage.conf", "[storage]\nthis is not ini\n")],
            "garbage.conf"),
        "bad value": (["--config-file", write_conf(
            tmp_path / "bad.conf", f"[ovirt1]\novirt_domain_paths = {mount}"
            "\novirt_host_id = 400\n"), "--backend", "ovirt1"],
            "ovirt_host_id"),
        "bad choice": (["--config-file", write_conf(
            tmp_path / "choice.conf", f"[storage]\novirt_domain_paths = "
            f"{mount}\novirt_lease_backend = nfs\n")], "ovirt_lease_backend"),
        "no section": (["--config-file", write_conf(
            tmp_path / "empty.conf", "[DEFAULT]\n"), "--backend", "ovirt1"],
            "[ovirt1]"),
        "missing path": (["-p", tmp_path / "no-such-mount"], "no-such-mount"),
        "bad pool uuid in file": (["--config-file", write_conf(
            tmp_path / "uuid.conf", f"[storage]\novirt_domain_paths = "
            f"{mount}\novirt_pool_uuid = 42\n")], "42"),
    }


@pytest.mark.parametrize("case", [
    "missing file", "missing dir", "unparsable", "bad value", "bad choice",
    "no section", "missing path", "bad pool uuid in file"])
def test_config_and_path_errors(tmp_path, mount, case):
    assert storage.main(["pool", "create", "--path", mount]) == 0
    argv, expected = _bad_configs(tmp_path, mount)[case]
    proc = _subprocess(*map(str, argv), "pool", "show", env={})
    assert_one_error_line(proc, expected)


@pytest.fixture
def small_mount(tmp_path):
    """A 64 MiB tmpfs of our own, to make read-only or full."""
    path = tmp_path / "small"
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m",
                           "tmpfs", str(path)], capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        pytest.skip("needs to mount a tmpfs (root with CAP_SYS_ADMIN): "
                    f"{proc.stderr.strip()}")
    yield str(path)
    subprocess.run(["umount", "-l", str(path)], check=True)


def test_read_only_domain(capsys, tmp_path, small_mount):
    data = run_json(capsys, "pool", "create", "--path", small_mount)
    sd = data["master_domain_id"]
    subprocess.run(["mount", "-o", "remount,ro", small_mount], check=True)
    env = {storage.PATHS_ENV: small_mount}
    args = ["--lock-path", str(tmp_path / "locks")]
    proc = _subprocess(*args, "volume", "create", sd, "--size", "1M",
                       env=env)
    assert_one_error_line(proc, "Read-only file system")
    proc = _subprocess(*args, "pool", "create", "--path", small_mount,
                       env=env)
    assert_one_error_line(proc, "Read-only file system")
    # Reading still works.
    proc = _subprocess(*args, "pool", "show", env=env)
    assert proc.returncode == 0, proc.stderr


def test_full_master_domain(capsys, tmp_path, small_mount):
    data = run_json(capsys, "pool", "create", "--path", small_mount)
    sd = data["master_domain_id"]
    with open(os.path.join(small_mount, "filler"), "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\1" * MiB)
    env = {storage.PATHS_ENV: small_mount}
    proc = _subprocess("--lock-path", str(tmp_path / "locks"), "volume",
                       "create", sd, "--size", "4M", "--preallocated",
                       env=env)
    assert_one_error_line(proc)
    assert "space" in proc.stderr.lower()
    # The logbook on the full master is never torn: once space is back,
    # recovery and fsck work and leave the pool clean.
    os.unlink(os.path.join(small_mount, "filler"))
    proc = _subprocess("--lock-path", str(tmp_path / "locks"), "fsck",
                       "--repair", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_engine_log_is_one_line(capsys, mount, mount2, cli_pool):
    paths, _ = cli_pool
    sd2 = run_json(capsys, *paths, "domain", "create", "--path",
                   mount2)["domain_id"]
    with open(os.path.join(mount2, sd2, "dom_md", "metadata"), "w") as f:
        f.write("garbage\n")
    proc = _subprocess("-p", mount, "-p", mount2, "pool", "show", env={})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "not usable" in lines[0], proc.stderr
    assert lines[0].startswith("error: Storage domain at ")


def test_debug_shows_the_traceback(tmp_path):
    proc = _subprocess("--debug", "-p", str(tmp_path / "no-such-mount"),
                       "pool", "show", env={})
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: ")
