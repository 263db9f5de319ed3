"""ovirt-cinder: oVirt-style storage domains for OpenStack Cinder and Glance."""
