"""API tier: the driver and the Glance store behind real OpenStack APIs.

These tests talk HTTP to the single-host cloud of ``make cloud``
(tools/cloud/cloud.py: Keystone, Glance with our store, Cinder with the
``ovirt1`` and ``ovirt2`` backends) and check what only the running
services show: manageable listings, manage/unmanage, concurrent first
uses of an image, retypes that change the format, uploads of chains.

    . .cloud/openrc && .cloud/venv/bin/python -m pytest -q tests/cloud

They fail, never skip, when the cloud does not answer.
"""
