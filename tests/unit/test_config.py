"""ovirt_cinder.storage.config: the shared options and open_pool.

The pools are real (local directories); only the lease manager factory is
replaced where the test is about what it is given (sanlock is a process
boundary, tested in tests/functional/sanlock).
"""

import argparse
import contextlib
import os
import subprocess
import sys
import uuid

import pytest
from oslo_config import cfg
from taskflow.types import notifier

from ovirt_cinder.storage import config
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import lease
from ovirt_cinder.storage import qemuimg
from ovirt_cinder.storage import sd
from ovirt_cinder.storage.pool import StoragePool

SHARED = ["ovirt_pool_uuid", "ovirt_domain_paths", "ovirt_lease_backend",
          "ovirt_host_id", "ovirt_io_timeout", "ovirt_flow_connection",
          "ovirt_lease_timeout", "ovirt_lock_path", "ovirt_run_path",
          "ovirt_qemu_img_timeout", "ovirt_copy_stall_timeout",
          "ovirt_file_owner", "ovirt_file_group"]
MiB = 1024 * 1024


def opts(**values):
    found = {o.dest: o.default for o in config.POOL_OPTS}
    found.update(values)
    return argparse.Namespace(**found)


@pytest.fixture
def mounts(tmp_path):
    paths = [str(tmp_path / "mnt1"), str(tmp_path / "mnt2")]
    for path in paths:
        os.mkdir(path)
    return paths


@pytest.fixture
def storage(mounts, tmp_path):
    pool = StoragePool.create(mounts[0], lease_manager=lease.LocalLeaseManager(
        lock_path=str(tmp_path / "locks")))
    pool.add_domain(mounts[1])
    return pool


@pytest.fixture
def locks(tmp_path):
    return str(tmp_path / "locks")


class RecordingLeases(lease.LocalLeaseManager):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.initialised = []

    def init_domain(self, domain):
        self.initialised.append(domain.sd_id)


@contextlib.contextmanager
def interrupt_first_task(engine):
    """Stop a flow as its first task starts: it stays unfinished."""
    def on_change(event_type, details):
        if event_type == "RUNNING":
            raise KeyboardInterrupt
    engine.atom_notifier.register(notifier.Notifier.ANY, on_change)
    try:
        yield
    finally:
        engine.atom_notifier.deregister(notifier.Notifier.ANY, on_change)


# The options

def test_pool_opts():
    by_name = {o.name: o for o in config.POOL_OPTS}
    assert [o.name for o in config.POOL_OPTS] == SHARED
    timeout = by_name["ovirt_lease_timeout"]
    assert isinstance(timeout, cfg.FloatOpt)
    assert timeout.default == 60 and timeout.type.min == 1
    lock_path = by_name["ovirt_lock_path"]
    assert isinstance(lock_path, cfg.StrOpt)
    assert lock_path.default == "/var/lib/ovirt-cinder/locks"
    assert by_name["ovirt_lease_backend"].type.choices == {
        "local": None, "sanlock": None}
    assert by_name["ovirt_qemu_img_timeout"].default == 120
    assert by_name["ovirt_copy_stall_timeout"].default == 600
    for opt in config.POOL_OPTS:
        assert "Possible values" in opt.help, opt.name
        assert "Related options" in opt.help, opt.name


def test_defaults_without_oslo_config():
    """DEFAULTS, read without oslo.config, are the options' defaults;
    POOL_OPTS are declared once, on first use."""
    assert config.DEFAULTS == {o.dest: o.default for o in config.POOL_OPTS}
    assert list(config.DEFAULTS) == SHARED
    assert config.POOL_OPTS is config.POOL_OPTS
    proc = subprocess.run(
        [sys.executable, "-c", "import sys\n"
         "from ovirt_cinder.storage import config\n"
         "print('oslo_config' in sys.modules)\n"],
        capture_output=True, text=True, check=True)
    assert proc.stdout == "False\n"
    assert not hasattr(config, "POOL_OPT")


def test_declared_once_for_every_component():
    from ovirt_cinder import opts as generator
    from ovirt_cinder.cinder import options
    from ovirt_cinder.glance import store

    # The same option objects, not copies that could drift apart.
    assert options.OVIRT_OPTS[:len(SHARED)] == config.POOL_OPTS
    assert all(a is b for a, b in zip(options.OVIRT_OPTS,
                                      config.POOL_OPTS, strict=False))
    assert all(a is b for a, b in zip(store.OPTIONS, config.POOL_OPTS,
                                      strict=False))
    groups = generator.list_opts()
    assert [g for g, _ in groups] == ["backend_defaults", "ovirt",
                                      "storage", "ovirt_cinder_privileged"]
    for group, found in groups[:3]:
        names = [o.name for o in found]
        assert len(names) == len(set(names)), group
        assert names[:len(SHARED)] == SHARED, group
    assert dict(groups)["storage"] == config.POOL_OPTS
    # Our privsep context's options (helper_command, ...).
    assert "helper_command" in [o.name for o in groups[3][1]]


def test_registered_in_an_oslo_group(mounts, storage, locks):
    conf = cfg.ConfigOpts()
    conf.register_opts(config.POOL_OPTS, group="storage")
    conf(args=[], default_config_files=[], default_config_dirs=[])
    conf.set_override("ovirt_domain_paths", mounts, group="storage")
    conf.set_override("ovirt_lock_path", locks, group="storage")
    pool = config.open_pool(conf.storage)
    assert pool.pool_id == storage.pool_id
    assert sorted(pool.domains) == sorted(storage.domains)


def test_engine_module_imports_no_service():
    code = ("import sys, ovirt_cinder.storage.config; print(sorted({m."
            "split('.')[0] for m in sys.modules} & {'cinder', 'glance', "
            "'glance_store', 'taskflow'}))")
    out = subprocess.run([sys.executable, "-c", code], check=True,
                         capture_output=True, text=True).stdout
    assert out == "[]\n"


# open_pool

def test_open_pool_wiring(monkeypatch, tmp_path, mounts, storage, locks):
    calls = []
    made = []

    def make(backend, host_id=1, io_timeout=10, *, lease_timeout,
             lock_path):
        calls.append((backend, host_id, io_timeout, lease_timeout,
                      lock_path))
        made.append(RecordingLeases(lease_timeout=lease_timeout,
                                    lock_path=lock_path))
        return made[-1]

    monkeypatch.setattr(lease, "make_lease_manager", make)
    url = f"sqlite:///{tmp_path}/flows.sqlite"
    events = []

    @contextlib.contextmanager
    def record(engine):
        def on_change(event_type, details):
            events.append((details["task_name"], event_type))
        engine.atom_notifier.register(notifier.Notifier.ANY, on_change)
        yield

    pool = config.open_pool(
        opts(ovirt_domain_paths=mounts, ovirt_pool_uuid=storage.pool_id,
             ovirt_lease_backend="sanlock", ovirt_host_id=7,
             ovirt_io_timeout=3, ovirt_lease_timeout=2.5,
             ovirt_lock_path=locks, ovirt_flow_connection=url),
        listeners=[record])
    assert calls == [("sanlock", 7, 3, 2.5, locks)]
    assert pool.lease_manager is made[0]
    assert sorted(made[0].initialised) == sorted(storage.domains)
    assert pool.pool_id == storage.pool_id
    # The logbook is the SQL database; the listeners see the flows.
    pool.create_volume(storage.master.sd_id, str(uuid.uuid4()), MiB)
    assert os.path.exists(tmp_path / "flows.sqlite")
    assert not os.listdir(storage.master.master_dir)
    assert "RUNNING" in {state for _, state in events}


def test_open_pool_defaults(mounts, storage, monkeypatch):
    calls = []

    def make(backend, host_id=1, io_timeout=10, **kwargs):
        calls.append((backend, host_id, io_timeout, kwargs))
        return RecordingLeases(**kwargs)

    monkeypatch.setattr(lease, "make_lease_manager", make)
    pool = config.open_pool(opts(ovirt_domain_paths=mounts[:1],
                                 ovirt_pool_uuid=""))
    # An unset pool uuid: the only pool found; an empty logbook
    # connection: the master domain's directory.
    assert pool.pool_id == storage.pool_id
    assert list(pool.domains) == [storage.master.sd_id]
    assert calls == [("local", 1, 10, {
        "lease_timeout": 60.0, "lock_path": "/var/lib/ovirt-cinder/locks"})]


@pytest.mark.parametrize("recover", [False, True])
def test_open_pool_recover(tmp_path, mounts, storage, locks, recover):
    url = f"sqlite:///{tmp_path}/flows.sqlite"
    options = opts(ovirt_domain_paths=mounts, ovirt_flow_connection=url,
                   ovirt_lock_path=locks)
    pool = config.open_pool(options, listeners=[interrupt_first_task])
    with pytest.raises(KeyboardInterrupt):
        pool.create_volume(storage.master.sd_id, str(uuid.uuid4()), MiB)
    pool = config.open_pool(options, recover=recover)
    left = list(pool.runner.unfinished())
    assert len(left) == (0 if recover else 1)


def test_open_pool_needs_mounts():
    with pytest.raises(errors.InvalidParameter, match="ovirt_domain_paths"):
        config.open_pool(opts())


def test_open_pool_missing_mount(tmp_path):
    with pytest.raises((errors.StorageError, OSError)):
        config.open_pool(opts(ovirt_domain_paths=[str(tmp_path / "no")]))


def test_open_pool_sets_qemu_img_timeouts(mounts, storage, monkeypatch):
    monkeypatch.setattr(qemuimg, "QUICK_TIMEOUT", qemuimg.QUICK_TIMEOUT)
    monkeypatch.setattr(qemuimg, "STALL_TIMEOUT", qemuimg.STALL_TIMEOUT)
    config.open_pool(opts(ovirt_domain_paths=mounts[:1],
                          ovirt_pool_uuid=storage.pool_id,
                          ovirt_qemu_img_timeout=7,
                          ovirt_copy_stall_timeout=9))
    assert (qemuimg.QUICK_TIMEOUT, qemuimg.STALL_TIMEOUT) == (7, 9)


def test_ownership_options(mounts, storage, locks):
    assert config.ownership(opts()) == sd.Ownership(-1, -1)
    assert config.ownership(opts(ovirt_file_owner="36",
                                 ovirt_file_group="root")) == \
        sd.Ownership(36, 0)
    assert config.ownership(opts(ovirt_file_owner="root")).uid == 0
    with pytest.raises(errors.InvalidParameter, match="ovirt-no-such"):
        config.ownership(opts(ovirt_file_group="ovirt-no-such-group"))
    # open_pool hands it to every domain: what operations create is owned.
    pool = config.open_pool(opts(ovirt_domain_paths=mounts,
                                 ovirt_lock_path=locks,
                                 ovirt_file_owner="36",
                                 ovirt_file_group="36"))
    assert {d.ownership for d in pool.domains.values()} == {
        sd.Ownership(36, 36)}
    vol = pool.create_volume(storage.master.sd_id, str(uuid.uuid4()), MiB)
    for path in (vol.path, vol.path + ".meta", vol.path + ".lease",
                 os.path.dirname(vol.path)):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (36, 36), path
