"""Cinder's real VolumeManager over SQLite, the fake transport and a real
two-domain pool in tmp_path, as Cinder's own functional tests set it up
(cinder/tests/unit/test.py: ``fake:/`` messaging, ``sqlite://`` database
built by ``cinder.db.migration``).

Only the Glance API is replaced (tests.unit.cinder.fakes.ImageService).
"""

import shutil
import tempfile
from unittest import mock

import pytest
from cinder import objects

objects.register_all()

from cinder import context as cinder_context  # noqa: E402
from cinder import coordination  # noqa: E402
from cinder import privsep as cinder_privsep  # noqa: E402
from cinder import rpc  # noqa: E402
from cinder.tests.unit import test as cinder_test  # noqa: E402
from cinder.volume import manager  # noqa: E402
from oslo_config import cfg  # noqa: E402
from oslo_messaging import conffixture  # noqa: E402

from ovirt_cinder.cinder import options  # noqa: E402
from ovirt_cinder.storage import attach  # noqa: E402
from ovirt_cinder.storage.pool import StoragePool  # noqa: E402
from tests.unit.cinder import fakes  # noqa: E402

CONF = cfg.CONF
BACKEND = "ovirt1"
HOST = f"test-host@{BACKEND}"
DRIVER = "ovirt_cinder.cinder.driver.OvirtVolumeDriver"


@pytest.fixture
def mounts(tmp_path):
    paths = []
    for name in ("mnt1", "mnt2"):
        (tmp_path / name).mkdir()
        paths.append(str(tmp_path / name))
    return paths


@pytest.fixture
def storage(mounts):
    pool = StoragePool.create(mounts[0], description="master")
    pool.add_domain(mounts[1], description="second")
    return pool


@pytest.fixture(autouse=True, scope="session")
def _no_privsep_daemon():
    """We run as root without sudo: privileged calls run in-process."""
    cinder_privsep.sys_admin_pctxt.set_client_mode(False)
    from os_brick.privileged import default as brick_privileged
    brick_privileged.set_client_mode(False)


@pytest.fixture
def run_path():
    """Where attached volumes' daemons live: short (unix socket paths),
    and every daemon left there is stopped afterwards."""
    path = tempfile.mkdtemp(prefix="oc-", dir="/tmp")
    yield path
    att = attach.Attachments(path)
    for img_id in att.images():
        att.stop(img_id)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def export_protocol():
    """How the backend serves attached volumes; os-brick cannot attach
    iSCSI on these machines, so Cinder's own attaches use ``local``."""
    return "local"


@pytest.fixture
def cinder_conf(tmp_path, mounts, storage, run_path, export_protocol):
    options.register(CONF)
    CONF([], project="cinder", default_config_files=[])
    messaging = conffixture.ConfFixture(CONF)
    messaging.setUp()
    messaging.transport_url = "fake:/"
    CONF.set_override("connection", "sqlite://", group="database")
    CONF.set_override("sqlite_synchronous", False, group="database")
    CONF.set_override("enabled_backends", [BACKEND])
    CONF.set_override("host", "test-host")
    CONF.set_override("state_path", str(tmp_path))
    CONF.set_override("image_conversion_dir", str(tmp_path / "conv"))
    CONF.set_override("lock_path", str(tmp_path / "locks"),
                      group="oslo_concurrency")
    CONF.register_group(cfg.OptGroup(BACKEND))
    for name, value in {"volume_driver": DRIVER,
                        "volume_backend_name": BACKEND}.items():
        CONF.set_override(name, value, group="backend_defaults")
    for name, value in {"ovirt_domain_paths": mounts,
                        "ovirt_pool_uuid": storage.pool_id,
                        "ovirt_run_path": run_path,
                        "ovirt_export_protocol": export_protocol,
                        # No periodic recovery outlives the test.
                        "ovirt_recovery_interval": 0}.items():
        CONF.set_override(name, value, group="backend_defaults")
    CONF.set_override("backend_url", f"file://{tmp_path}/coordination",
                      group="coordination")
    rpc.init(CONF)
    db = cinder_test.Database()
    db.setUp()
    coordination.COORDINATOR.start()
    yield CONF
    coordination.COORDINATOR.stop()
    db.cleanUp()
    rpc.cleanup()
    messaging.cleanUp()
    CONF.reset()
    CONF.clear_override("connection", group="database")


@pytest.fixture
def ctx(cinder_conf):
    return cinder_context.get_admin_context()


@pytest.fixture
def images():
    service = fakes.ImageService()
    with mock.patch("cinder.image.glance.get_remote_image_service",
                    side_effect=lambda ctx, href: (service, href)), \
            mock.patch("cinder.image.glance.get_default_image_service",
                       return_value=service):
        yield service


@pytest.fixture
def volume_manager(cinder_conf, ctx, images):
    service = objects.Service(ctx, host=HOST, binary="cinder-volume",
                              topic="cinder-volume", report_count=0,
                              availability_zone="nova")
    service.create()
    mgr = manager.VolumeManager(service_name=BACKEND, host=HOST)
    mgr.init_host(service_id=service.id)
    assert mgr.driver.initialized
    return mgr


def new_volume(ctx, sd_id, size=1, **kw):
    volume = objects.Volume(
        ctx, host=f"{HOST}#{sd_id}", size=size,
        status="creating", attach_status="detached", user_id=ctx.user_id,
        project_id=ctx.project_id, **kw)
    volume.create()
    return volume
