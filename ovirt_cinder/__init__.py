"""ovirt-cinder: oVirt-style storage domains for Cinder and Glance."""
