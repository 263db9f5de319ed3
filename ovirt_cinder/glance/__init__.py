"""The Glance store: maps glance_store calls to engine calls."""
