"""Sphinx configuration for the ovirt-cinder documentation."""

project = "ovirt-cinder"
copyright = "ovirt-cinder developers"
extensions = ["sphinx.ext.autodoc"]
source_suffix = ".rst"
master_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
autodoc_member_order = "bysource"
