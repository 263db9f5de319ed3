"""OvirtVolumeDriver implements Cinder's driver interfaces for real.

Cinder's compliance test relies on ``CinderInterface.__subclasshook__``,
which finds no methods on Python 3 (``inspect.ismethod`` is False for
plain functions of a class), so it asserts nothing. Here every public
function of the interfaces must resolve, on our class, to a function we
wrote (not a NotImplementedError default of Cinder's base classes), except
the few generic helpers Cinder's base driver provides on purpose, and
must accept the interface's parameters.
"""

import inspect

import pytest
from cinder import interface
from cinder import objects

objects.register_all()

from cinder.interface import volume_driver  # noqa: E402
from cinder.interface import volume_manageable_driver  # noqa: E402
from cinder.interface import volume_snapshot_revert  # noqa: E402
from cinder.interface import volume_snapshotmanagement_driver  # noqa: E402

from ovirt_cinder.cinder.driver import OvirtVolumeDriver  # noqa: E402

INTERFACES = [
    volume_driver.VolumeDriverCore,
    volume_snapshot_revert.VolumeSnapshotRevertDriver,
    volume_manageable_driver.VolumeListManageableDriver,
    volume_snapshotmanagement_driver.VolumeSnapshotManagementDriver,
]

# Generic implementations of Cinder's BaseVD that are correct for us.
INHERITED = {
    "set_initialized", "initialized", "supported", "set_throttle",
    "init_capabilities", "update_provider_info", "before_volume_copy",
    "after_volume_copy",
}


def interface_methods():
    for iface in INTERFACES:
        for name, func in inspect.getmembers(iface, inspect.isfunction):
            if not name.startswith("_"):
                yield pytest.param(iface, name, func,
                                   id=f"{iface.__name__}.{name}")


def test_interfaces_have_methods():
    # Guards against an interface module losing its functions (which
    # would make every check below vacuous).
    assert len(list(interface_methods())) >= 30


def test_registered_as_volume_driver():
    assert OvirtVolumeDriver in interface._volume_register


@pytest.mark.parametrize("iface,name,func", interface_methods())
def test_method_implemented(iface, name, func):
    ours = inspect.getattr_static(OvirtVolumeDriver, name, None)
    assert ours is not None, f"{name} is missing"
    owner = next(c for c in OvirtVolumeDriver.__mro__ if name in vars(c))
    if name not in INHERITED:
        assert owner.__module__.startswith("ovirt_cinder."), (
            f"{name} is inherited from {owner.__module__}.{owner.__name__}")


@pytest.mark.parametrize("iface,name,func", interface_methods())
def test_method_signature(iface, name, func):
    ours = getattr(OvirtVolumeDriver, name)
    if isinstance(inspect.getattr_static(OvirtVolumeDriver, name),
                  property):
        return
    expected = inspect.signature(func)
    actual = inspect.signature(ours)
    required = [p for p in expected.parameters.values()
                if p.default is p.empty and p.kind in (
                    p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    positional = [p.name for p in actual.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_varargs = any(p.kind is p.VAR_POSITIONAL
                      for p in actual.parameters.values())
    if isinstance(inspect.getattr_static(OvirtVolumeDriver, name),
                  staticmethod):
        required = [p for p in required if p.name != "self"]
    assert has_varargs or len(positional) >= len(required), (
        f"{name}{actual} cannot take {name}{expected}")
    # Every parameter the interface names is accepted by name.
    has_kwargs = any(p.kind is p.VAR_KEYWORD
                     for p in actual.parameters.values())
    for param in expected.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        assert has_kwargs or param.name in actual.parameters, (
            f"{name}{actual} lacks {param.name}")
