"""Tempest's volume API tests against the cloud of `make cloud`.

    python tools/cloud/tempest.py [--regex R] [--concurrency N]

Run with the cloud's venv (.cloud/venv, for the ``openstack`` client) and
the cloud up (``cloud.py up --tempest``). It uploads a small raw image for
the tests that make volumes from an image, writes a workspace in
``.cloud/tempest-work`` whose ``etc/tempest.conf`` describes this cloud
(two backends of our driver, the features we support, what the driver
reports as protocol and vendor), and runs ``tempest.api.volume``,
cinder-tempest-plugin and our own plugin (``tools/cloud/tempest-plugin``:
Tempest's classes that a cloud without Neutron would skip whole), minus
the tests listed with their reason in ``tools/cloud/tempest-exclude.txt``.

Tests that need a service this cloud lacks skip themselves. Each skipped
class or test must be listed, with its reason, in
``tools/cloud/tempest-skips.txt``; a skip not listed there (a feature
that silently stopped being tested) or a listed one that ran fails the
run as a Tempest failure does. Exits non-zero on either.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))
STATE = os.path.abspath(os.environ.get("OVIRT_CLOUD_DIR",
                                       os.path.join(TOP, ".cloud")))
TEMPEST = os.path.join(STATE, "tempest", "bin", "tempest")
WORK = os.path.join(STATE, "tempest-work")
EXCLUDE = os.path.join(HERE, "tempest-exclude.txt")
SKIPS = os.path.join(HERE, "tempest-skips.txt")
SKIPPED = re.compile(r"^(?:\{\d+\} )?(?:setUpClass \()?([\w.]+)\)? "
                     r"(?:\[[^]]*\] )?\.\.\. SKIPPED")
REGEX = (r"^(tempest\.api\.volume|cinder_tempest_plugin\.api"
         r"|ovirt_cinder_tempest\.api)\.")
IMAGE_NAME = "tempest-raw"
BACKENDS = ("ovirt1", "ovirt2")
MiB = 1024 * 1024


def osc(*args: str):
    out = subprocess.run(["openstack", *args, "-f", "json"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else None


def test_image() -> str:
    """A 16 MiB raw disk with a pattern, uploaded once."""
    found = [i for i in osc("image", "list", "--name", IMAGE_NAME)]
    if found:
        return found[0]["ID"]
    path = os.path.join(STATE, "tempest-raw.img")
    with open(path, "wb") as f:
        for i in range(16):
            f.write(bytes([i + 1]) * MiB)
    image = osc("image", "create", "--disk-format", "raw",
                "--container-format", "bare", "--public", "--file", path,
                IMAGE_NAME)
    os.unlink(path)
    return image["id"]


def backend_capabilities() -> tuple[str, str]:
    pools = osc("volume", "backend", "pool", "list", "--long")
    protocols = {p["Capabilities"]["storage_protocol"] for p in pools}
    vendors = {p["Capabilities"]["vendor_name"] for p in pools}
    if len(protocols) != 1:
        sys.exit(f"backends report several protocols: {protocols}")
    return protocols.pop(), (vendors.pop() if len(vendors) == 1
                             else "oVirt")


def tempest_conf(image_id: str, protocol: str, vendor: str) -> str:
    env = os.environ
    sections = {
        "DEFAULT": {"log_file": os.path.join(STATE, "log", "tempest.log"),
                    "debug": True},
        "auth": {"admin_username": env["OS_USERNAME"],
                 "admin_password": env["OS_PASSWORD"],
                 "admin_project_name": env["OS_PROJECT_NAME"],
                 "admin_domain_name": "Default",
                 "use_dynamic_credentials": True,
                 "create_isolated_networks": False},
        "identity": {"uri_v3": env["OS_AUTH_URL"], "auth_version": "v3",
                     "region": env["OS_REGION_NAME"]},
        "identity-feature-enabled": {"api_v2": False, "api_v3": True},
        "service_available": {"cinder": True, "glance": True,
                              "nova": False, "neutron": False,
                              "swift": False, "placement": False},
        "compute": {"image_ref": image_id, "image_ref_alt": image_id},
        # No servers to reach: no keypairs or security groups either.
        "validation": {"run_validation": False},
        "image": {"disk_formats": "raw,qcow2"},
        "volume": {
            "backend_names": ",".join(BACKENDS),
            "volume_type": "ovirt1",
            "storage_protocol": protocol,
            "vendor_name": vendor,
            "build_timeout": 300,
            "max_microversion": "latest",
            # Our references: the image id of the volume and the id of
            # the snapshot, not Cinder's LVM-style names.
            "manage_volume_ref": "source-name,%s",
            "manage_snapshot_ref": "source-name,%s",
        },
        "volume-feature-enabled": {
            "multi_backend": True, "backup": True, "snapshot": True,
            "clone": True, "manage_volume": True, "manage_snapshot": True,
            "volume_revert": True, "extend_attached_volume": False,
            "consistency_group": False, "api_extensions": "all",
            "enable_volume_image_dep_tests": True,
        },
    }
    lines = []
    for name, options in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {v}" for k, v in options.items()]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regex", default=REGEX)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    if not os.path.exists(TEMPEST):
        sys.exit("no Tempest: run tools/cloud/cloud.py up --tempest")
    if not os.path.isdir(WORK):
        # Registered in a workspace file of the cloud's own, not the
        # user's ~/.tempest (where another checkout's name may be taken).
        subprocess.run([TEMPEST, "init", "--workspace-path",
                        os.path.join(STATE, "tempest-workspace.yaml"),
                        "--name", "ovirt-cinder-cloud", WORK], check=True)
    conf = tempest_conf(test_image(), *backend_capabilities())
    with open(os.path.join(WORK, "etc", "tempest.conf"), "w") as f:
        f.write(conf)
    argv = [TEMPEST, "run", "--regex", args.regex, "--exclude-list", EXCLUDE,
            "--concurrency", str(args.concurrency)]
    print("$", " ".join(argv), flush=True)
    skipped = set()
    with subprocess.Popen(argv, cwd=WORK, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            m = SKIPPED.match(line)
            if m:
                skipped.add(m.group(1))
    rc = proc.returncode
    if args.regex == REGEX and not check_skips(skipped):
        rc = rc or 1
    return rc


def expected_skips() -> set[str]:
    """Test or class ids of tempest-skips.txt ("id  # reason" lines)."""
    with open(SKIPS) as f:
        return {line.split("#", 1)[0].strip() for line in f
                if line.split("#", 1)[0].strip()}


def check_skips(skipped: set[str]) -> bool:
    expected = expected_skips()
    unexpected, ran = skipped - expected, expected - skipped
    for name in sorted(unexpected):
        print(f"tempest: skipped but not in {SKIPS}: {name}")
    for name in sorted(ran):
        print(f"tempest: listed in {SKIPS} but not skipped: {name}")
    print(f"tempest: {len(skipped)} skipped, as listed"
          if not (unexpected or ran) else "tempest: skip list out of date")
    return not (unexpected or ran)


if __name__ == "__main__":
    sys.exit(main())
