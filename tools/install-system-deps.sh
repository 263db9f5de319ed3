#!/bin/bash
# Install the Debian packages listed in bindep.txt ([platform:dpkg] lines).
#
# Runs before any virtualenv exists, so it reads bindep.txt itself instead of
# needing the bindep tool. Idempotent: when every package is installed it
# touches nothing and makes no network request. Needs root (or sudo).
#
# The tests start their own tgtd and sanlock daemons, so the packages'
# services must not grab port 3260 or /run/sanlock first: while installing,
# a policy-rc.d of our own (only where the system has none) tells apt not to
# start services.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
bindep=${BINDEP_FILE:-$top/bindep.txt}
policy=/usr/sbin/policy-rc.d

wanted_packages() {
    # "name [platform:dpkg test]" -> name; lines for other platforms skipped.
    sed -e 's/#.*//' "$bindep" | awk '
        NF == 0 { next }
        NF == 1 || /platform:dpkg/ { print $1 }'
}

missing_packages() {
    local pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null \
                | grep -qx installed; then
            echo "$pkg"
        fi
    done
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        echo "install-system-deps: need root to run: $*" >&2
        return 1
    fi
}

hold_services() {
    [ -e "$policy" ] && return 0
    trap 'as_root rm -f "$policy"' EXIT
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
}

main() {
    if ! command -v dpkg-query >/dev/null; then
        echo "install-system-deps: not a Debian system; install by hand:" >&2
        wanted_packages >&2
        return 1
    fi
    local wanted missing
    mapfile -t wanted < <(wanted_packages)
    mapfile -t missing < <(missing_packages "${wanted[@]}")
    if [ "${#missing[@]}" -eq 0 ]; then
        echo "install-system-deps: all ${#wanted[@]} packages installed"
        return 0
    fi
    echo "install-system-deps: installing ${missing[*]}"
    hold_services
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" </dev/null
}

main "$@"
