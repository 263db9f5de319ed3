"""Sphinx configuration for the ovirt-cinder release notes (reno)."""

project = "ovirt-cinder Release Notes"
copyright = "ovirt-cinder developers"
extensions = ["reno.sphinxext"]
source_suffix = ".rst"
master_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = []
