"""The Cinder volume driver: maps Cinder objects to engine calls."""
