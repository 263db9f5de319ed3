"""oVirt's rules for a V5 file storage domain, checked on its bytes.

Tests use :func:`assert_domain` to prove that a domain the engine wrote is
one that oVirt (vdsm) attaches. The rules come from vdsm's sources
(``fileSD.py``, ``persistent.py``, ``clusterlock.py``, ``xlease.py``,
``volume.py``, ``volumemetadata.py``) and are encoded here on their own:
nothing of the engine's codecs (``sdmeta``, ``volmeta``, ``xlease``,
``sanlock_direct``) is used, so a bug there cannot hide behind the same
bug here. Sanlock areas are read by the ``sanlock`` program itself.

``dom_md/metadata``
    ``KEY=value`` lines sorted by key, then ``_SHA_CKSUM=<sha1>``: the
    SHA-1 of the ``KEY=value`` strings concatenated without newlines
    (ASCII, ``xmlcharrefreplace``). VERSION=5, SDUUID the directory name,
    TYPE a file domain type, CLASS, ROLE, DESCRIPTION (at most 50
    characters), POOL_UUID (empty or UUIDs), LOCKPOLICY, the four lease
    numbers, REMOTE_PATH, BLOCK_SIZE and ALIGNMENT (a pair sanlock
    takes).
``dom_md/ids``
    the lockspace named by the sd id at offset 0 (``sanlock direct
    read_leader -s``; ``dump`` lists no host until one joined), at least
    ALIGNMENT long.
``dom_md/leases``
    nothing in slot 0; the resource ``SDM`` of lockspace sd id at
    1 x ALIGNMENT (``sanlock direct dump``), at least 2 x ALIGNMENT long.
``dom_md/xleases``
    a valid index at 1 x ALIGNMENT: magic, version ``0001``, the sd id,
    a numeric mtime, not updating; 3960 well-formed records.
``dom_md/inbox``, ``outbox``
    16 MiB each. vdsm opens the files of ``dom_md`` by name and never
    lists it: any other name (the engine's ``ovirt-cinder-counters``) is
    ignored; this check allows that one.
``images/<img>/<vol>``
    data, ``.meta`` (at most 512 bytes, ``DOMAIN`` the sd id, ending
    with ``EOF``) and ``.lease``: the resource ``<vol>`` of lockspace sd
    id at offset 0, ALIGNMENT long. No other names (work in progress).
Image shape (vdsm's ``getChain`` and ``isLegal``)
    among the volumes whose ``IMAGE`` is the image, a lone SHARED volume
    (a template) or exactly one LEAF, from which the ``PUUID`` links
    reach the blank UUID, or a SHARED volume of another image, without a
    loop; every volume of the directory LEGAL. Volumes outside the leaf's
    chain (snapshots kept after a revert) are allowed as long as none is
    a LEAF.
Modes and owners
    files 0660, directories (the domain, ``dom_md``, ``images``, each
    image, ``master``) 0775; the owner and group when given.

Not checked: what a master domain needs for oVirt's ``connectStoragePool``
(MASTER_VERSION, POOL_* keys) and the volume metadata beyond the above.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess

MiB = 1024 * 1024
# Not oVirt's: the engine's counters (ovirt_cinder/storage/counters.py).
COUNTERS = "ovirt-cinder-counters"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-"
                     r"[0-9a-f]{12}$")
FILE_TYPES = {"NFS", "POSIXFS", "GLUSTERFS", "LOCALFS"}
GEOMETRIES = {(512, MiB), (4096, MiB), (4096, 2 * MiB), (4096, 4 * MiB),
              (4096, 8 * MiB)}
REQUIRED = {"VERSION", "SDUUID", "TYPE", "CLASS", "DESCRIPTION", "ROLE",
            "POOL_UUID", "LOCKPOLICY", "LOCKRENEWALINTERVALSEC",
            "LEASETIMESEC", "IOOPTIMEOUTSEC", "LEASERETRIES", "REMOTE_PATH",
            "BLOCK_SIZE", "ALIGNMENT"}
# xleases: a 512-byte metadata block and 3960 records of 64 bytes.
INDEX_SIZE = 62 * 4096
RECORDS = (INDEX_SIZE - 512) // 64
FILE_MODE, DIR_MODE = 0o660, 0o775


def sanlock(*args: str, cwd: str) -> subprocess.CompletedProcess:
    program = shutil.which("sanlock", path=os.environ.get("PATH", "") +
                           ":/usr/sbin:/sbin")
    assert program, "the sanlock program is needed to check lease areas"
    return subprocess.run([program, "direct", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LC_ALL": "C"})


def dump(path: str, offset: int, size: int, block_size: int,
         alignment: int) -> list[tuple[int, str, str]] | str:
    """(offset, lockspace, resource) of the records sanlock lists, or the
    error."""
    proc = sanlock("dump", f"{os.path.basename(path)}:{offset}:{size}",
                   "-Z", str(block_size), "-A", f"{alignment // MiB}M",
                   cwd=os.path.dirname(path))
    if proc.returncode:
        return f"sanlock direct dump failed: {proc.stdout}{proc.stderr}"
    rows = []
    for line in proc.stdout.splitlines()[1:]:
        parts = line.split()
        rows.append((int(parts[0]), parts[1], parts[2]))
    return rows


def read_metadata(path: str, problems: list[str]) -> dict[str, str]:
    with open(path, "rb") as f:
        text = f.read().decode("utf-8")
    if not text.endswith("\n"):
        problems.append("metadata: does not end with a newline")
    lines = text.splitlines()
    if not lines or not lines[-1].startswith("_SHA_CKSUM="):
        problems.append("metadata: the last line is not _SHA_CKSUM")
        return {}
    pairs = []
    for line in lines[:-1]:
        if "=" not in line:
            problems.append(f"metadata: line without '=': {line!r}")
            continue
        pairs.append(line.split("=", 1))
    keys = [k for k, _ in pairs]
    if keys != sorted(keys) or len(set(keys)) != len(keys):
        problems.append(f"metadata: keys not sorted and unique: {keys}")
    digest = hashlib.sha1(usedforsecurity=False)
    for key, value in sorted(pairs):
        digest.update(f"{key}={value}".encode("ascii", "xmlcharrefreplace"))
    if lines[-1] != f"_SHA_CKSUM={digest.hexdigest()}":
        problems.append(f"metadata: wrong checksum {lines[-1]!r}")
    return dict(pairs)


def check_metadata(md: dict[str, str], sd_id: str,
                   problems: list[str]) -> tuple[int, int]:
    missing = REQUIRED - set(md)
    if missing:
        problems.append(f"metadata: missing keys {sorted(missing)}")
    want = {"VERSION": "5", "SDUUID": sd_id}
    for key, value in want.items():
        if md.get(key) != value:
            problems.append(f"metadata: {key}={md.get(key)!r}, expected "
                            f"{value!r}")
    for key, allowed in (("TYPE", FILE_TYPES),
                         ("CLASS", {"Data", "Iso", "Backup"}),
                         ("ROLE", {"Regular", "Master"})):
        if md.get(key) not in allowed:
            problems.append(f"metadata: {key}={md.get(key)!r}")
    if len(md.get("DESCRIPTION", "")) > 50:
        problems.append("metadata: DESCRIPTION longer than 50")
    pools = md.get("POOL_UUID", "")
    if pools and not all(UUID_RE.match(p) for p in pools.split(",")):
        problems.append(f"metadata: POOL_UUID={pools!r}")
    for key in ("LOCKRENEWALINTERVALSEC", "LEASETIMESEC", "IOOPTIMEOUTSEC",
                "LEASERETRIES"):
        if not md.get(key, "").isdigit():
            problems.append(f"metadata: {key}={md.get(key)!r}")
    if not md.get("REMOTE_PATH"):
        problems.append("metadata: REMOTE_PATH is empty")
    try:
        geometry = (int(md["BLOCK_SIZE"]), int(md["ALIGNMENT"]))
    except (KeyError, ValueError):
        geometry = (0, 0)
    if geometry not in GEOMETRIES:
        problems.append(f"metadata: BLOCK_SIZE/ALIGNMENT {geometry}")
        return 512, MiB
    return geometry


def check_ids(path: str, sd_id: str, block_size: int, alignment: int,
              problems: list[str]) -> None:
    if os.path.getsize(path) < alignment:
        problems.append(f"ids: {os.path.getsize(path)} bytes")
    proc = sanlock("read_leader", "-s", f"{sd_id}:1:ids:0", "-Z",
                   str(block_size), "-A", f"{alignment // MiB}M",
                   cwd=os.path.dirname(path))
    names = dict(line.partition(" ")[::2]
                 for line in proc.stdout.splitlines())
    if proc.returncode or names.get("space_name") != sd_id:
        problems.append(f"ids: no lockspace {sd_id} at 0: "
                        f"{proc.stdout.splitlines()[:1]}")


def check_leases(path: str, sd_id: str, block_size: int, alignment: int,
                 problems: list[str]) -> None:
    if os.path.getsize(path) < 2 * alignment:
        problems.append(f"leases: {os.path.getsize(path)} bytes")
    with open(path, "rb") as f:
        if f.read(block_size).strip(b"\0"):
            problems.append("leases: slot 0 is not empty")
    rows = dump(path, alignment, alignment, block_size, alignment)
    if rows != [(alignment, sd_id, "SDM")]:
        problems.append(f"leases: no SDM of {sd_id} at {alignment}: {rows}")


def check_xleases(path: str, sd_id: str, alignment: int,
                  problems: list[str]) -> None:
    with open(path, "rb") as f:
        f.seek(alignment)
        index = f.read(INDEX_SIZE)
    if len(index) != INDEX_SIZE:
        problems.append(f"xleases: index of {len(index)} bytes")
        return
    meta = index[:512]
    fields = [
        (meta[0:4] == b"\x12\x15\x20\x16", "magic"),
        (meta[4:5] + meta[9:10] + meta[58:59] + meta[69:70] == b"\0" * 4,
         "separators"),
        (meta[5:9] == b"0001", "version"),
        (meta[10:58].rstrip(b"\0") == sd_id.encode(), "lockspace"),
        (meta[59:69].isdigit(), "mtime"),
        (meta[70:71] == b"-", "updating flag"),
        (meta[71:511] == bytes(440) and meta[511:] == b"\n", "padding"),
    ]
    for ok, name in fields:
        if not ok:
            problems.append(f"xleases: bad {name} in {meta[:80]!r}")
    for n in range(RECORDS):
        rec = index[512 + 64 * n:512 + 64 * (n + 1)]
        name = rec[:48].rstrip(b"\0")
        ok = (rec[48:49] == b"\0" and rec[49:60].isdigit()
              and rec[60:61] == b"\0" and rec[61:62] in (b"-", b"u")
              and rec[62:64] == b"-\n" and name.isascii()
              and b"\0" not in name
              and (name or rec[49:60] == b"0" * 11))
        if not ok:
            problems.append(f"xleases: bad record {n}: {rec!r}")
            break


def check_volume(directory: str, vol_id: str, sd_id: str, block_size: int,
                 alignment: int, problems: list[str]) -> None:
    base = os.path.join(directory, vol_id)
    for path in (base, base + ".lease"):
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
            return
    with open(base + ".meta", "rb") as f:
        meta = f.read()
    lines = meta.decode("utf-8", "replace").splitlines()
    if (len(meta) > 512 or not lines or lines[-1] != "EOF"
            or f"DOMAIN={sd_id}" not in lines):
        problems.append(f"{base}.meta: not a volume of {sd_id}: {meta!r}")
    lease = base + ".lease"
    if os.path.getsize(lease) != alignment:
        problems.append(f"{lease}: {os.path.getsize(lease)} bytes")
    rows = dump(lease, 0, alignment, block_size, alignment)
    if rows != [(0, sd_id, vol_id)]:
        problems.append(f"{lease}: no resource {sd_id}:{vol_id}: {rows}")


BLANK = "00000000-0000-0000-0000-000000000000"


def _volume_records(directory: str) -> dict[str, dict[str, str]]:
    records = {}
    for name in os.listdir(directory):
        if name.endswith(".meta"):
            with open(os.path.join(directory, name), "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            records[name[:-5]] = dict(
                line.split("=", 1) for line in lines if "=" in line)
    return records


def check_image_shape(directory: str, problems: list[str]) -> None:
    """vdsm's getChain: one LEAF (or a lone SHARED volume) and a chain
    from it; isLegal: every volume LEGAL."""
    img = os.path.basename(directory)
    records = _volume_records(directory)
    for vol, rec in sorted(records.items()):
        if rec.get("LEGALITY") != "LEGAL":
            problems.append(f"{directory}/{vol}: {rec.get('LEGALITY')}")
    own = {v: r for v, r in records.items() if r.get("IMAGE") == img}
    if len(own) == 1 and next(iter(own.values())).get("VOLTYPE") == \
            "SHARED":
        return
    leaves = [v for v, r in own.items() if r.get("VOLTYPE") == "LEAF"]
    if len(leaves) != 1:
        problems.append(f"{directory}: {len(leaves)} LEAF volumes")
        return
    seen, vol = set(), leaves[0]
    while vol != BLANK:
        if vol in seen or vol not in records:
            problems.append(f"{directory}: chain broken at {vol}")
            return
        seen.add(vol)
        rec = records[vol]
        if rec.get("IMAGE") != img:
            if rec.get("VOLTYPE") != "SHARED":
                problems.append(f"{directory}/{vol}: a foreign parent that "
                                "is not SHARED")
            return
        vol = rec.get("PUUID", BLANK)


def check_owner_mode(path: str, mode: int, owner: int | None,
                     group: int | None, problems: list[str]) -> None:
    st = os.lstat(path)
    if stat.S_IMODE(st.st_mode) != mode:
        problems.append(f"{path}: mode {stat.S_IMODE(st.st_mode):o}, "
                        f"expected {mode:o}")
    if owner is not None and st.st_uid != owner:
        problems.append(f"{path}: owner {st.st_uid}, expected {owner}")
    if group is not None and st.st_gid != group:
        problems.append(f"{path}: group {st.st_gid}, expected {group}")


def check_domain(path: str, *, owner: int | None = None,
                 group: int | None = None) -> list[str]:
    """Every rule the domain at ``path`` (``<mount>/<sd_id>``) breaks."""
    problems: list[str] = []
    sd_id = os.path.basename(os.path.normpath(path))
    dom_md = os.path.join(path, "dom_md")
    md = read_metadata(os.path.join(dom_md, "metadata"), problems)
    block_size, alignment = check_metadata(md, sd_id, problems)
    check_ids(os.path.join(dom_md, "ids"), sd_id, block_size, alignment,
              problems)
    check_leases(os.path.join(dom_md, "leases"), sd_id, block_size,
                 alignment, problems)
    check_xleases(os.path.join(dom_md, "xleases"), sd_id, alignment,
                  problems)
    for name in ("inbox", "outbox"):
        if os.path.getsize(os.path.join(dom_md, name)) != 16 * MiB:
            problems.append(f"{name}: not 16 MiB")
    dirs = [path, dom_md, os.path.join(path, "images")]
    if os.path.isdir(os.path.join(path, "master")):
        dirs.append(os.path.join(path, "master"))
    files = [os.path.join(dom_md, n) for n in (
        "metadata", "ids", "leases", "xleases", "inbox", "outbox")]
    # vdsm opens these by name and never lists dom_md (fileSD.py), so
    # the engine's own counters file may sit next to them.
    if os.path.exists(os.path.join(dom_md, COUNTERS)):
        files.append(os.path.join(dom_md, COUNTERS))
    if sorted(os.listdir(dom_md)) != sorted(os.path.basename(f)
                                            for f in files):
        problems.append(f"dom_md holds {sorted(os.listdir(dom_md))}")
    images = os.path.join(path, "images")
    for img in sorted(os.listdir(images)):
        directory = os.path.join(images, img)
        if not UUID_RE.match(img) or not os.path.isdir(directory):
            problems.append(f"{directory}: not an image")
            continue
        dirs.append(directory)
        names = sorted(os.listdir(directory))
        vols = [n[:-5] for n in names if n.endswith(".meta")]
        expected = sorted(v + ext for v in vols
                          for ext in ("", ".meta", ".lease"))
        if names != expected or not all(UUID_RE.match(v) for v in vols):
            problems.append(f"{directory}: holds {names}")
        files += [os.path.join(directory, n) for n in names]
        for vol_id in vols:
            check_volume(directory, vol_id, sd_id, block_size, alignment,
                         problems)
        check_image_shape(directory, problems)
    for d in dirs:
        check_owner_mode(d, DIR_MODE, owner, group, problems)
    for f in files:
        if os.path.isfile(f):
            check_owner_mode(f, FILE_MODE, owner, group, problems)
    return problems


def assert_domain(path: str, *, owner: int | None = None,
                  group: int | None = None) -> dict[str, str]:
    """Assert the domain at ``path`` keeps every rule; return its
    metadata."""
    problems = check_domain(path, owner=owner, group=group)
    assert not problems, "oVirt would not take this domain:\n" + "\n".join(
        problems)
    return read_metadata(os.path.join(path, "dom_md", "metadata"), [])
