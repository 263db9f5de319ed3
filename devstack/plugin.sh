#!/bin/bash
# devstack plugin for ovirt-cinder.
#
#   enable_plugin ovirt-cinder <repository URL>
#
# Installs the package and qemu-img. With OVIRT_CINDER_ENABLE_BACKEND=True it
# also creates the storage pool (OVIRT_CINDER_POOL_UUID) with a domain in
# each of OVIRT_CINDER_DOMAIN_PATHS, adds a Cinder backend section
# (OVIRT_CINDER_BACKEND_NAME, ovirt1 by default) using the ovirt-cinder
# volume driver, appends it to enabled_backends, and creates a volume type
# of the same name. OVIRT_CINDER_ENABLE_GLANCE_STORE=True makes the pool
# Glance's default store too (the same options as `make cloud`).

_XTRACE_OVIRT_CINDER=$(set +o | grep xtrace)
set -o xtrace

function install_ovirt_cinder {
    # qemu-system-common: qemu-storage-daemon, which serves attached
    # volumes (with fuse3); tgt: the iSCSI target Cinder's tgtadm helper
    # drives.
    install_package qemu-utils qemu-block-extra qemu-system-common fuse3 tgt
    setup_develop "$OVIRT_CINDER_DIR"
    # cinder-rootwrap (filters_path /etc/cinder/rootwrap.d) lets
    # cinder-volume start our privsep helper.
    sudo install -d -o root -m 0755 /etc/cinder/rootwrap.d
    sudo install -o root -m 0644 \
        "$OVIRT_CINDER_DIR/etc/ovirt-cinder/rootwrap.d/ovirt-cinder.filters" \
        /etc/cinder/rootwrap.d/
}

# Create the pool (its master domain in the first path) and a domain in
# each other path, unless they exist already.
function init_ovirt_cinder_pool {
    local path
    local paths=(${OVIRT_CINDER_DOMAIN_PATHS//,/ })
    for path in "${paths[@]}" "$OVIRT_CINDER_LOCK_PATH"; do
        sudo install -d -o "$STACK_USER" "$path"
    done
    "$PYTHON" - "$OVIRT_CINDER_POOL_UUID" "${paths[@]}" <<'PYTHON'
import sys

from ovirt_cinder.storage import sd
from ovirt_cinder.storage.pool import StoragePool

pool_id, paths = sys.argv[1], sys.argv[2:]
ours = {p: [d for d in sd.find_domains(p) if d.pool_id == pool_id]
        for p in paths}
if any(ours.values()):
    pool = StoragePool.open(paths, pool_id)
else:
    pool = StoragePool.create(paths[0], pool_id=pool_id)
    ours[paths[0]] = [pool.master]
for path in paths:
    if not ours[path]:
        pool.add_domain(path)
PYTHON
}

function configure_ovirt_cinder_backend {
    local name=$OVIRT_CINDER_BACKEND_NAME

    iniset "$CINDER_CONF" "$name" volume_driver \
        ovirt_cinder.cinder.driver.OvirtVolumeDriver
    iniset "$CINDER_CONF" "$name" volume_backend_name "$name"
    iniset "$CINDER_CONF" "$name" ovirt_pool_uuid "$OVIRT_CINDER_POOL_UUID"
    iniset "$CINDER_CONF" "$name" ovirt_domain_paths \
        "$OVIRT_CINDER_DOMAIN_PATHS"
    # Cinder, Glance and ovirt-storage on this host share the image locks.
    iniset "$CINDER_CONF" "$name" ovirt_lock_path "$OVIRT_CINDER_LOCK_PATH"
    # Attached volumes: a qemu-storage-daemon per volume, exported over
    # iSCSI by Cinder's tgtadm helper with CHAP, as for the LVM driver.
    iniset "$CINDER_CONF" "$name" ovirt_export_protocol \
        "$OVIRT_CINDER_EXPORT_PROTOCOL"
    iniset "$CINDER_CONF" "$name" target_helper "$CINDER_TARGET_HELPER"
    iniset "$CINDER_CONF" "$name" target_ip_address "$HOST_IP"
    # tgtd without its page cache in front of the daemon's view.
    iniset "$CINDER_CONF" "$name" iscsi_target_flags direct
    # The daemons run as root through our privsep context.
    iniset "$CINDER_CONF" ovirt_cinder_privileged helper_command \
        "sudo cinder-rootwrap $CINDER_CONF_DIR/rootwrap.conf privsep-helper --config-file $CINDER_CONF"
    if [[ "$CINDER_TARGET_HELPER" == "tgtadm" ]]; then
        # tgtd reads the target files Cinder's helper writes.
        echo "include $CINDER_STATE_PATH/volumes/*" | \
            sudo tee /etc/tgt/conf.d/ovirt-cinder.conf >/dev/null
    fi

    local enabled
    enabled=$(iniget "$CINDER_CONF" DEFAULT enabled_backends)
    if [[ ",$enabled," != *",$name,"* ]]; then
        iniset "$CINDER_CONF" DEFAULT enabled_backends \
            "${enabled:+$enabled,}$name"
    fi
}

# Glance keeps images as templates of the backend's pool (the default
# store), and shows their locations so that Cinder takes the O(1) path.
function configure_ovirt_cinder_glance_store {
    local enabled
    enabled=$(iniget "$GLANCE_API_CONF" DEFAULT enabled_backends)
    if [[ ",$enabled," != *",ovirt:ovirt,"* ]]; then
        iniset "$GLANCE_API_CONF" DEFAULT enabled_backends \
            "ovirt:ovirt${enabled:+,$enabled}"
    fi
    iniset "$GLANCE_API_CONF" glance_store default_backend ovirt
    iniset "$GLANCE_API_CONF" DEFAULT show_image_direct_url True
    iniset "$GLANCE_API_CONF" ovirt ovirt_pool_uuid "$OVIRT_CINDER_POOL_UUID"
    iniset "$GLANCE_API_CONF" ovirt ovirt_domain_paths \
        "$OVIRT_CINDER_DOMAIN_PATHS"
    iniset "$GLANCE_API_CONF" ovirt ovirt_lock_path "$OVIRT_CINDER_LOCK_PATH"
}

function create_ovirt_cinder_volume_type {
    local name=$OVIRT_CINDER_BACKEND_NAME
    local os=(openstack --os-cloud devstack-admin
              --os-region-name "$REGION_NAME")
    if ! "${os[@]}" volume type show "$name" >/dev/null 2>&1; then
        "${os[@]}" volume type create \
            --property "volume_backend_name=$name" "$name"
    fi
}

if [[ "$1" == "stack" && "$2" == "install" ]]; then
    echo_summary "Installing ovirt-cinder"
    install_ovirt_cinder
elif [[ "$1" == "stack" && "$2" == "post-config" ]]; then
    if [[ "$OVIRT_CINDER_ENABLE_BACKEND" == "True" ]] \
            && is_service_enabled cinder; then
        echo_summary "Configuring the ovirt-cinder backend"
        init_ovirt_cinder_pool
        configure_ovirt_cinder_backend
        if [[ "$OVIRT_CINDER_ENABLE_GLANCE_STORE" == "True" ]] \
                && is_service_enabled g-api; then
            configure_ovirt_cinder_glance_store
        fi
    fi
elif [[ "$1" == "stack" && "$2" == "extra" ]]; then
    if [[ "$OVIRT_CINDER_ENABLE_BACKEND" == "True" ]] \
            && is_service_enabled cinder; then
        create_ovirt_cinder_volume_type
    fi
fi

$_XTRACE_OVIRT_CINDER
