"""The storage engine: pools, domains, images, volumes, leases, flows.

Imports no Cinder or Glance code; usable alone (CLI, tests).
"""
