"""Template images (one SHARED volume) in every engine operation and CLI
command that reads an image, and the template copies made for thin
clones in another domain.

Content is compared byte for byte: a template's guest view (``qemu-img
convert`` to raw) against an export, a clone and a copy of it.
"""

import filecmp
import os
import threading
import uuid

import pytest

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import description
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import fsck
from ovirt_cinder.storage import qemuimg
from tests import damaged
from tests import qemuio
from tests.functional.conftest import leftovers
from tests.functional.test_cli import cli_pool  # noqa: F401 -- fixture
from tests.functional.test_cli import own_config  # noqa: F401 -- fixture
from tests.functional.test_cli import run
from tests.functional.test_cli import run_json

MiB, GiB = sc.MiB, sc.GiB
SIZE = 16 * MiB
FORMATS = [sc.VolumeFormat.RAW, sc.VolumeFormat.COW]


def uid():
    return str(uuid.uuid4())


def raw_view(path, fmt, out):
    qemuimg.convert(path, str(out), src_fmt=fmt, dst_fmt="raw")
    return str(out)


def same_bytes(a, b):
    return filecmp.cmp(a, b, shallow=False)


@pytest.fixture
def sd2(pool, mount2):
    return pool.add_domain(mount2).sd_id


def make_template(pool, sd_id, tmp_path, fmt):
    """A template image as ``volume import --template`` makes it."""
    src = str(tmp_path / f"src-{fmt}")
    qemuimg.create(src, fmt.qemu, SIZE)
    qemuio.write_pattern(src, fmt.qemu, 0, MiB, 0x5a)
    qemuio.write_pattern(src, fmt.qemu, SIZE - MiB, MiB, 0xa5)
    img = uid()
    vol = pool.import_volume(sd_id, img, src, fmt.qemu, SIZE, fmt=fmt,
                             voltype=sc.VolumeType.SHARED)
    assert pool.image(sd_id, img).template() == vol
    return img, vol


def assert_clean(pool):
    for dom in pool.domains.values():
        assert leftovers(dom.path) == []
    assert fsck.check(pool).clean


# The engine


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_export_template(pool, sd_id, tmp_path, fmt, out_fmt):
    img, vol = make_template(pool, sd_id, tmp_path, fmt)
    out = str(tmp_path / "out")
    pool.export_volume(sd_id, img, out, fmt=out_fmt)
    assert same_bytes(raw_view(out, out_fmt, tmp_path / "a"),
                      raw_view(vol.path, fmt.qemu, tmp_path / "b"))
    assert_clean(pool)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("other_domain", [False, True])
def test_clone_template(pool, sd_id, sd2, tmp_path, fmt, other_domain):
    img, vol = make_template(pool, sd_id, tmp_path, fmt)
    dst = sd2 if other_domain else sd_id
    clone = pool.clone(sd_id, img, uid(), dst_sd_id=dst)
    # A normal image: its own LEAF, a full copy of the template's view.
    tree = pool.image(dst, clone.meta.image)
    assert tree.template() is None and tree.leaf() == clone
    assert clone.meta.voltype == sc.VolumeType.LEAF
    assert clone.parent is None and clone.meta.capacity == SIZE
    assert same_bytes(raw_view(clone.path, clone.qemu_format,
                               tmp_path / "a"),
                      raw_view(vol.path, fmt.qemu, tmp_path / "b"))
    # The template is untouched and still a template.
    assert pool.image(sd_id, img).template() == vol
    assert_clean(pool)


@pytest.mark.parametrize("fmt", FORMATS)
def test_copy_template(pool, sd_id, sd2, tmp_path, fmt):
    img, vol = make_template(pool, sd_id, tmp_path, fmt)
    tree = pool.copy_image(sd_id, img, sd2)
    copy = tree.template()
    assert copy is not None and copy.vol_id == vol.vol_id
    assert copy.meta.voltype == sc.VolumeType.SHARED
    # A plain copy is not a template copy the driver may collect.
    assert description.get(copy.meta.description, "copy") is None
    assert same_bytes(raw_view(copy.path, fmt.qemu, tmp_path / "a"),
                      raw_view(vol.path, fmt.qemu, tmp_path / "b"))
    # The copy is a template in its domain: thin clones work there.
    thin = pool.thin_clone(sd2, img, uid())
    qemuio.verify_pattern(thin.path, "qcow2", SIZE - MiB, MiB, 0xa5)
    assert_clean(pool)


def test_template_copy_is_marked_and_reused(pool, sd_id, sd2, tmp_path):
    img, vol = make_template(pool, sd_id, tmp_path, sc.VolumeFormat.COW)
    copy = pool.copy_image(sd_id, img, sd2, template_copy=True).template()
    assert description.get(copy.meta.description, "copy") == sd_id
    # Another caller that waited for the leases reuses the copy.
    again = pool.copy_image(sd_id, img, sd2, template_copy=True).template()
    assert again == copy
    # A plain copy of an existing image is still refused.
    with pytest.raises(errors.ImageExists):
        pool.copy_image(sd_id, img, sd2)
    assert_clean(pool)


def test_template_copy_of_a_copy_names_the_original(pool, sd_id, sd2,
                                                     mount, tmp_path):
    sd3 = pool.add_domain(mount).sd_id
    img, _ = make_template(pool, sd_id, tmp_path, sc.VolumeFormat.RAW)
    pool.copy_image(sd_id, img, sd2, template_copy=True)
    copy = pool.copy_image(sd2, img, sd3, template_copy=True).template()
    assert description.get(copy.meta.description, "copy") == sd_id


def test_template_copy_needs_a_template(pool, sd_id, sd2):
    img = uid()
    pool.create_volume(sd_id, img, MiB)
    with pytest.raises(errors.InvalidOperation):
        pool.copy_image(sd_id, img, sd2, template_copy=True)
    assert pool.list_images(sd2) == []


def test_copying_a_thin_clone_makes_a_template_copy(pool, sd_id, sd2,
                                                    tmp_path):
    img, vol = make_template(pool, sd_id, tmp_path, sc.VolumeFormat.RAW)
    thin = uid()
    pool.thin_clone(sd_id, img, thin)
    pool.copy_image(sd_id, thin, sd2)
    copy = pool.image(sd2, img).template()
    assert description.get(copy.meta.description, "copy") == sd_id
    # Used by the copied thin clone: kept, even once the original goes.
    pool.delete_image(sd_id, thin)
    pool.delete_image(sd_id, img)
    assert not pool.collect_template_copy(sd2, img)
    pool.delete_image(sd2, thin)
    assert pool.collect_template_copy(sd2, img)
    assert pool.list_images(sd2) == [] and pool.list_images(sd_id) == []
    assert_clean(pool)


def test_concurrent_copies_of_a_thin_clone_template(pool, sd_id, sd2,
                                                    tmp_path):
    # Two thin clones of one template copied at once: the second waits
    # for the first one's template copy and links it.
    img, _ = make_template(pool, sd_id, tmp_path, sc.VolumeFormat.COW)
    thins = [uid(), uid()]
    for thin in thins:
        pool.thin_clone(sd_id, img, thin)
    barrier = threading.Barrier(2)
    failures = []

    def copy(thin):
        barrier.wait()
        try:
            pool.copy_image(sd_id, thin, sd2)
        except Exception as e:  # noqa: BLE001 -- reported below
            failures.append(e)

    threads = [threading.Thread(target=copy, args=(t,)) for t in thins]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert sorted(pool.list_images(sd2)) == sorted([img, *thins])
    assert os.stat(pool.image(sd2, img).template().path).st_nlink == 3
    assert_clean(pool)


# The CLI


def cli_template(capsys, paths, sd, tmp_path, fmt):
    src = str(tmp_path / f"src.{fmt}")
    qemuimg.create(src, fmt, SIZE)
    qemuio.write_pattern(src, fmt, 0, MiB, 0x5a)
    qemuio.write_pattern(src, fmt, SIZE - MiB, MiB, 0xa5)
    data = run_json(capsys, *paths, "volume", "import", sd, src,
                    "--template", "--format",
                    "qcow2" if fmt == "qcow2" else "raw")
    return data["image_id"], raw_view(src, fmt, tmp_path / "src.view")


def view_of(capsys, paths, sd, img, out):
    data = run_json(capsys, *paths, "image", "show", sd, img)
    vol = data["volumes"][0] if data["template"] else next(
        v for v in data["volumes"] if v["vol_id"] == data["leaf"])
    fmt = "qcow2" if vol["format"] == "COW" else "raw"
    return raw_view(vol["path"], fmt, out)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_cli_template_export_clone_copy(capsys, tmp_path, mount, mount2,
                                        cli_pool, fmt):  # noqa: F811
    paths, sd = cli_pool
    img, view = cli_template(capsys, paths, sd, tmp_path, fmt)

    out = tmp_path / "exported.raw"
    run(capsys, *paths, "image", "export", sd, img, out)
    assert same_bytes(str(out), view)

    clone = run_json(capsys, *paths, "image", "clone", sd, img)["image_id"]
    assert same_bytes(view_of(capsys, paths, sd, clone, tmp_path / "c"),
                      view)

    sd2 = run_json(capsys, *paths, "domain", "create",
                   "--path", mount2)["domain_id"]
    paths = ["-p", mount, "-p", mount2]
    run(capsys, *paths, "image", "copy", sd, img, sd2)
    assert run_json(capsys, *paths, "image", "show", sd2, img)["template"]
    assert same_bytes(view_of(capsys, paths, sd2, img, tmp_path / "d"),
                      view)
    clone2 = run_json(capsys, *paths, "image", "clone", sd, img,
                      "--to-domain", sd2)["image_id"]
    assert same_bytes(view_of(capsys, paths, sd2, clone2, tmp_path / "e"),
                      view)
    assert run_json(capsys, *paths, "fsck")["clean"] is True


def test_cli_image_list_counts_shared(capsys, tmp_path, cli_pool):  # noqa: F811
    paths, sd = cli_pool
    img, _ = cli_template(capsys, paths, sd, tmp_path, "qcow2")
    thin = run_json(capsys, *paths, "image", "thin-clone", sd,
                    img)["image_id"]
    plain = run_json(capsys, *paths, "volume", "create", sd,
                     "--size", "1M")["image_id"]
    rows = {r["img_id"]: r for r in run_json(capsys, *paths, "image",
                                             "list", sd)}
    assert (rows[img]["volumes"], rows[img]["shared"]) == (1, 1)
    assert rows[img]["template"] is True
    # The thin clone's directory holds its leaf and the linked template.
    assert (rows[thin]["volumes"], rows[thin]["shared"]) == (2, 1)
    assert (rows[plain]["volumes"], rows[plain]["shared"]) == (1, 0)
    out, _ = run(capsys, *paths, "image", "list", sd)
    header, *lines = out.splitlines()
    assert header.split() == ["IMAGE", "VOLUMES", "SHARED", "SNAPSHOTS",
                              "FORMAT", "CAPACITY", "TEMPLATE"]
    by_id = {line.split()[0]: line.split() for line in lines}
    assert by_id[img][1:3] == ["1", "1"] and by_id[img][-1] == "yes"
    assert by_id[thin][1:3] == ["2", "1"]


# The CLI refuses damaged images


@pytest.mark.parametrize("damage", sorted(damaged.DAMAGES))
@pytest.mark.parametrize("template", [False, True])
def test_cli_import_damaged_refused(capsys, tmp_path, cli_pool,  # noqa: F811
                                    damage, template):
    paths, sd = cli_pool
    path = damaged.DAMAGES[damage](str(tmp_path / "damaged.qcow2"))
    argv = ["volume", "import", sd, path] + (["--template"] if template
                                             else [])
    _, err = run(capsys, *paths, *argv, rc=2)
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    if damage in damaged.CHECK_FINDS:
        assert "is damaged" in err
    assert run_json(capsys, *paths, "image", "list", sd) == []
    assert run_json(capsys, *paths, "fsck")["clean"] is True


def test_cli_import_max_virtual_size(capsys, tmp_path, cli_pool):  # noqa: F811
    paths, sd = cli_pool
    src = str(tmp_path / "big.qcow2")
    qemuimg.create(src, "qcow2", 2 * GiB)
    _, err = run(capsys, *paths, "volume", "import", sd, src,
                 "--max-virtual-size", "1G", rc=2)
    assert "over the limit" in err
    assert run_json(capsys, *paths, "image", "list", sd) == []
    data = run_json(capsys, *paths, "volume", "import", sd, src,
                    "--format", "qcow2", "--max-virtual-size", "2G")
    assert data["capacity"] == 2 * GiB


def test_cli_import_default_limit_is_the_drivers(capsys, tmp_path,
                                                 cli_pool):  # noqa: F811
    from ovirt_cinder.cinder import options
    from ovirt_cinder.cmd import storage

    opt = next(o for o in options.DRIVER_OPTS
               if o.name == "ovirt_max_image_virtual_size_gb")
    assert storage.DEFAULT_MAX_VIRTUAL_SIZE == opt.default * GiB
    paths, sd = cli_pool
    src = str(tmp_path / "huge.qcow2")
    qemuimg.create(src, "qcow2", 1025 * GiB)
    _, err = run(capsys, *paths, "volume", "import", sd, src, rc=2)
    assert "over the limit" in err
    assert run_json(capsys, *paths, "fsck")["clean"] is True


def test_cli_import_leaked_clusters_accepted(capsys, tmp_path,
                                             cli_pool):  # noqa: F811
    paths, sd = cli_pool
    src = damaged.leaked(str(tmp_path / "leaked.qcow2"))
    img = run_json(capsys, *paths, "volume", "import", sd, src)["image_id"]
    out = tmp_path / "out.raw"
    run(capsys, *paths, "image", "export", sd, img, out)
    qemuio.verify_pattern(str(out), "raw", 0, MiB, 0x5a)
