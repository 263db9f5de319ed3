"""Our oslo.privsep context: the only way root work is done.

Functions decorated with ``@sys_admin_pctxt.entrypoint`` (all below
``ovirt_cinder``, e.g. in :mod:`ovirt_cinder.storage.qsd`) run in a
privsep daemon started through ``privsep-helper`` (allowed by
``etc/ovirt-cinder/rootwrap.d/ovirt-cinder.filters``) with only the
capabilities listed here, and take and return plain data.

A process that is already root (the ``ovirt-storage`` CLI, the tests, a
cinder-volume running as root) needs no helper: :func:`init` puts the
context in client mode False, so the entry points run in-process.
"""

from __future__ import annotations

import os

from oslo_privsep import capabilities as caps
from oslo_privsep import priv_context

__all__ = ["init", "sys_admin_pctxt"]

sys_admin_pctxt = priv_context.PrivContext(
    "ovirt_cinder",
    cfg_section="ovirt_cinder_privileged",
    pypath=__name__ + ".sys_admin_pctxt",
    capabilities=[
        caps.CAP_SYS_ADMIN,
        caps.CAP_DAC_OVERRIDE,
        caps.CAP_DAC_READ_SEARCH,
        caps.CAP_CHOWN,
        caps.CAP_FOWNER,
        caps.CAP_KILL,
    ],
)


def init() -> None:
    """Run the entry points in-process when this process is root.

    Cheap and idempotent: call it before the first privileged call.
    Leaves the context alone for other users (their calls go through
    the privsep daemon, started on first use).
    """
    if os.geteuid() == 0:
        sys_admin_pctxt.set_client_mode(False)
