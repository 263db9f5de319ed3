"""Command-line tools: the ``ovirt-storage`` admin CLI."""
