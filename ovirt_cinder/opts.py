"""Options for ``oslo-config-generator`` (namespace ``ovirt_cinder``).

Entry point (setup.cfg)::

    [entry_points]
    oslo.config.opts =
        ovirt_cinder = ovirt_cinder.opts:list_opts

Each component contributes its groups through a small function here;
:func:`list_opts` joins them. The options shared by every component
(:data:`ovirt_cinder.storage.config.POOL_OPTS`) appear in each group that
reads them, once per group:

``backend_defaults``
    the Cinder driver (any backend section);
``ovirt``
    the Glance store (stands for each glance_store backend section);
``storage``
    the ``ovirt-storage`` CLI's own file,
    ``/etc/ovirt-cinder/ovirt-storage.conf``;
``ovirt_cinder_privileged``
    our oslo.privsep context (:mod:`ovirt_cinder.privsep`): the
    ``helper_command`` a non-root cinder-volume starts it with.
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


def _cli_opts() -> list[tuple[str, list[cfg.Opt]]]:
    from ovirt_cinder.storage import config
    return [("storage", list(config.POOL_OPTS))]


def _privsep_opts() -> list[tuple[str, list[cfg.Opt]]]:
    from oslo_privsep import priv_context
    return [("ovirt_cinder_privileged", list(priv_context.OPTS))]


def _once(opts: list[cfg.Opt]) -> list[cfg.Opt]:
    """``opts`` without a second option of the same name."""
    unique: dict[str, cfg.Opt] = {}
    for opt in opts:
        unique.setdefault(opt.dest, opt)
    return list(unique.values())


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """Every option of ovirt_cinder, as (group, options) pairs."""
    return [(group, _once(opts))
            for group, opts in [*_cinder_opts(), *_glance_opts(),
                                *_cli_opts(), *_privsep_opts()]]
