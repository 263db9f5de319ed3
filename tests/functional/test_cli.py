"""The ``ovirt-storage`` CLI on real local-directory domains.

Commands run in-process through ``main()`` (output captured by capsys) and,
once, as a real ``python -m ovirt_cinder.cmd.storage`` subprocess. Data is
checked by content with qemu-io on the paths ``image show --json`` gives.
"""

import json
import os
import subprocess
import sys
import uuid

import pytest

from ovirt_cinder.cmd import storage
from ovirt_cinder.storage import actions
from ovirt_cinder.storage import constants as sc
from tests import qemuio

MiB = sc.MiB
REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def uid():
    return str(uuid.uuid4())


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
