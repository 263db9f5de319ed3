"""Steps of `make cloud` that run in the cloud's venv (.cloud/venv).

    bootstrap.py pool <pool uuid> <domain path>...   create or open a pool
    bootstrap.py flows <sqlalchemy url>...            make logbook schemas
    bootstrap.py keystone <password>                  service users, catalog
    bootstrap.py wait <binary:host>... [--timeout]    Cinder services up
    bootstrap.py types <backend>...                   one volume type each

Each is idempotent. The OpenStack ones read the admin credentials from the
``OS_*`` environment (the cloud's openrc).
"""

from __future__ import annotations

import argparse
import sys
import time

HOST = "127.0.0.1"
REGION = "RegionOne"
CATALOG = [
    # (name, type, url)
    ("glance", "image", f"http://{HOST}:9292"),
    ("cinderv3", "volumev3", f"http://{HOST}:8776/v3/%(project_id)s"),
    ("cinder", "block-storage", f"http://{HOST}:8776/v3/%(project_id)s"),
]


def pool(args: argparse.Namespace) -> None:
    from ovirt_cinder.storage import sd
    from ovirt_cinder.storage.pool import StoragePool

    paths = args.paths
    ours = {p: [d for d in sd.find_domains(p) if d.pool_id == args.pool_id]
            for p in paths}
    if any(ours.values()):
        storage = StoragePool.open(paths, args.pool_id)
    else:
        storage = StoragePool.create(paths[0], pool_id=args.pool_id)
        ours[paths[0]] = [storage.master]
    for path in paths:
        if not ours[path]:
            storage.add_domain(path)


def flows(args: argparse.Namespace) -> None:
    """Create the logbook tables once, before the services that share
    them start (two services upgrading one schema at once would race)."""
    from ovirt_cinder.storage import logbook

    for url in args.urls:
        logbook.fetch(url).close()


def _connect():
    import openstack
    return openstack.connect()


def keystone(args: argparse.Namespace) -> None:
    conn = _connect()
    ident = conn.identity
    project = ident.find_project("service", domain_id="default")
    if project is None:
        project = ident.create_project(name="service", domain_id="default")
    roles = {}
    for name in ("admin", "service", "member", "reader"):
        roles[name] = (ident.find_role(name)
                       or ident.create_role(name=name))
    for name in ("glance", "cinder"):
        user = ident.find_user(name, domain_id="default")
        if user is None:
            user = ident.create_user(name=name, password=args.password,
                                     domain_id="default")
        for role in ("admin", "service"):
            ident.assign_project_role_to_user(project, user, roles[role])
    for name, type_, url in CATALOG:
        service = next((s for s in ident.services() if s.type == type_),
                       None)
        if service is None:
            service = ident.create_service(name=name, type=type_)
        have = {e.interface for e in ident.endpoints(service_id=service.id)}
        for interface in ("public", "internal", "admin"):
            if interface not in have:
                ident.create_endpoint(service_id=service.id,
                                      interface=interface, url=url,
                                      region_id=REGION)


def wait(args: argparse.Namespace) -> None:
    conn = _connect()
    deadline = time.monotonic() + args.timeout
    wanted = set(args.services)
    while True:
        up = {f"{s.binary}:{s.host}" for s in conn.block_storage.services()
              if s.state == "up" and s.status == "enabled"}
        if wanted <= up:
            return
        if time.monotonic() > deadline:
            sys.exit(f"not up: {sorted(wanted - up)} (up: {sorted(up)}); "
                     f"see .cloud/log/")
        time.sleep(2)


def types(args: argparse.Namespace) -> None:
    """A volume type per backend (``backend[:availability zone]``), whose
    volumes go to that backend (and zone)."""
    conn = _connect()
    have = {t.name: t for t in conn.block_storage.types()}
    for arg in args.backends:
        backend, _, zone = arg.partition(":")
        specs = {"volume_backend_name": backend}
        if zone:
            specs["RESKEY:availability_zones"] = zone
        vtype = have.get(backend)
        if vtype is None:
            conn.block_storage.create_type(name=backend, extra_specs=specs)
        elif any(vtype.extra_specs.get(k) != v for k, v in specs.items()):
            conn.block_storage.update_type_extra_specs(vtype, **specs)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pool")
    p.add_argument("pool_id")
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=pool)
    p = sub.add_parser("flows")
    p.add_argument("urls", nargs="+")
    p.set_defaults(func=flows)
    p = sub.add_parser("keystone")
    p.add_argument("password")
    p.set_defaults(func=keystone)
    p = sub.add_parser("wait")
    p.add_argument("services", nargs="+")
    p.add_argument("--timeout", type=float, default=180)
    p.set_defaults(func=wait)
    p = sub.add_parser("types")
    p.add_argument("backends", nargs="+", metavar="BACKEND[:ZONE]")
    p.set_defaults(func=types)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
