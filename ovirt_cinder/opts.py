"""Options for ``oslo-config-generator`` (namespace ``ovirt_cinder``).

Entry point (setup.cfg)::

    [entry_points]
    oslo.config.opts =
        ovirt_cinder = ovirt_cinder.opts:list_opts

Each component contributes its groups through a small function here;
:func:`list_opts` joins them.
"""

from __future__ import annotations

from oslo_config import cfg

__all__ = ["list_opts"]


def _cinder_opts() -> list[tuple[str, list[cfg.Opt]]]:
    from ovirt_cinder.cinder import options
    return options.list_opts()


def _glance_opts() -> list[tuple[str, list[cfg.Opt]]]:
    # The store's options belong to a glance_store backend section;
    # Glance's own generator finds them through glance_store.drivers.
    from ovirt_cinder.glance import store
    return store.list_opts()


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """Every option of ovirt_cinder, as (group, options) pairs."""
    return [*_cinder_opts(), *_glance_opts()]
