"""Domain metadata codec against literal oVirt V5 and V4 files."""

from __future__ import annotations

import hashlib

import pytest

from ovirt_cinder.storage import constants as sc
from ovirt_cinder.storage import errors
from ovirt_cinder.storage import sdmeta
from ovirt_cinder.storage.sdmeta import DomainMetadata

SD_ID = "c3b2a1f0-5e6d-4c7b-8a9f-0e1d2c3b4a59"
POOL_ID = "6f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"

# dom_md/metadata of a V5 NFS master domain as oVirt 4.5 leaves it,
# including the pool keys the engine keeps on the master domain.
V5_BODY = (
    b"ALIGNMENT=1048576\n"
    b"BLOCK_SIZE=512\n"
    b"CLASS=Data\n"
    b"DESCRIPTION=nfs-data\n"
    b"IOOPTIMEOUTSEC=10\n"
    b"LEASERETRIES=3\n"
    b"LEASETIMESEC=60\n"
    b"LOCKPOLICY=\n"
    b"LOCKRENEWALINTERVALSEC=5\n"
    b"MASTER_VERSION=1\n"
    b"POOL_DESCRIPTION=Default\n"
    b"POOL_DOMAINS=c3b2a1f0-5e6d-4c7b-8a9f-0e1d2c3b4a59:Active\n"
    b"POOL_SPM_ID=-1\n"
    b"POOL_SPM_LVER=-1\n"
    b"POOL_UUID=6f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0\n"
    b"REMOTE_PATH=nfs.example.com:/exports/data\n"
    b"ROLE=Master\n"
    b"SDUUID=c3b2a1f0-5e6d-4c7b-8a9f-0e1d2c3b4a59\n"
    b"TYPE=NFS\n"
    b"VERSION=5\n"
)
V5_CKSUM = b"fd4b6fe993042e71231cdbcbb8ece03f1d528a58"
V5_FILE = V5_BODY + b"_SHA_CKSUM=" + V5_CKSUM + b"\n"

V5_EXTRA = {
    "MASTER_VERSION": "1",
    "POOL_DESCRIPTION": "Default",
    "POOL_DOMAINS": f"{SD_ID}:Active",
    "POOL_SPM_ID": "-1",
    "POOL_SPM_LVER": "-1",
}
V5 = DomainMetadata(
    sd_id=SD_ID, pool_id=POOL_ID, version=5, type=sc.DomainType.NFS,
    cls=sc.DomainClass.DATA, role=sc.DomainRole.MASTER,
    description="nfs-data", block_size=512, alignment=sc.MiB,
    lock_policy="", lock_renewal_interval_sec=5, lease_time_sec=60,
    io_op_timeout_sec=10, lease_retries=3,
    remote_path="nfs.example.com:/exports/data", extra=V5_EXTRA)

# A detached V4 domain: no BLOCK_SIZE/ALIGNMENT, empty POOL_UUID.
V4_BODY = (
    b"CLASS=Data\n"
    b"DESCRIPTION=old-nfs\n"
    b"IOOPTIMEOUTSEC=10\n"
    b"LEASERETRIES=3\n"
    b"LEASETIMESEC=60\n"
    b"LOCKPOLICY=\n"
    b"LOCKRENEWALINTERVALSEC=5\n"
    b"POOL_UUID=\n"
    b"REMOTE_PATH=nfs.example.com:/exports/old\n"
    b"ROLE=Regular\n"
    b"SDUUID=c3b2a1f0-5e6d-4c7b-8a9f-0e1d2c3b4a59\n"
    b"TYPE=NFS\n"
    b"VERSION=4\n"
)
V4_FILE = (V4_BODY +
           b"_SHA_CKSUM=2dcd943770157474548adf9af89f00813a7631d1\n")

# The keys of a V4 block domain (kept in VG tags, not in a file).
V4_BLOCK = {
    "CLASS": "Data",
    "DESCRIPTION": "iscsi-data",
    "IOOPTIMEOUTSEC": "10",
    "LEASERETRIES": "3",
    "LEASETIMESEC": "60",
    "LOCKPOLICY": "",
    "LOCKRENEWALINTERVALSEC": "5",
    "LOGBLKSIZE": "512",
    "PHYBLKSIZE": "512",
    "POOL_UUID": POOL_ID,
    "PV0": "pv:36001405abcdef,uuid:Ab1cD2-eF3g,pestart:0,pecount:77,"
           "mapoffset:0",
    "ROLE": "Regular",
    "SDUUID": SD_ID,
    "TYPE": "ISCSI",
    "VERSION": "4",
    "VGUUID": "Xy9Zab-1234-cdEF-5678-ghIJ-90kl-MNopQr",
}


def vdsm_checksum(body: bytes) -> bytes:
    """The checksum computed the way vdsm's persistent.py does."""
    text = "".join(body.decode("utf-8").splitlines())
    digest = hashlib.sha1(text.encode("ascii", "xmlcharrefreplace"),
                          usedforsecurity=False)
    return digest.hexdigest().encode()


def sealed(body: bytes) -> bytes:
    return body + b"_SHA_CKSUM=" + vdsm_checksum(body) + b"\n"


@pytest.mark.parametrize("body, cksum", [
    (V5_BODY, V5_CKSUM),
    (V4_BODY, V4_FILE.split(b"=")[-1].strip()),
])
def test_golden_checksums(body, cksum):
    assert vdsm_checksum(body) == cksum


@pytest.mark.parametrize("lines, expected", [
    # Vectors from vdsm's tests/storage/persistent_test.py.
    ([], "da39a3ee5e6b4b0d3255bfef95601890afd80709"),
    (["key 1=value 1", "key 2=value 2"],
     "ad4e8ffdd89dde809bf1ed700838b590b08a3826"),
    (["int_str=1", "str_str=2"], "fd58b7962408a4956bd694d617a1201306b363c2"),
    (["str_str=2", "int_str=1"], "fd58b7962408a4956bd694d617a1201306b363c2"),
])
def test_checksum_vectors(lines, expected):
    assert sdmeta.checksum(lines) == expected


def test_checksum_sorts_by_key_not_by_line():
    # "PV10=b" < "PV1=a" as strings, but the key PV1 < PV10.
    expected = hashlib.sha1(b"PV1=aPV10=b", usedforsecurity=False)
    assert sdmeta.checksum(["PV10=b", "PV1=a"]) == expected.hexdigest()
    assert sdmeta.dumps({"PV10": "b", "PV1": "a"}).startswith(
        b"PV1=a\nPV10=b\n")


def test_checksum_of_non_ascii():
    expected = hashlib.sha1(b"DESCRIPTION=donn&#233;es",
                            usedforsecurity=False)
    assert sdmeta.checksum(["DESCRIPTION=données"]) == expected.hexdigest()


def test_dumps_golden():
    md = sdmeta.loads(V5_FILE)
    assert sdmeta.dumps(md) == V5_FILE


def test_dumps_utf8():
    data = sdmeta.dumps({"DESCRIPTION": "données"})
    assert data == sealed("DESCRIPTION=données\n".encode())


def test_dumps_empty():
    assert sdmeta.dumps({}) == (
        b"_SHA_CKSUM=da39a3ee5e6b4b0d3255bfef95601890afd80709\n")


def test_loads_golden():
    md = sdmeta.loads(V5_FILE)
    assert md["SDUUID"] == SD_ID
    assert md["LOCKPOLICY"] == ""
    assert md["POOL_DOMAINS"] == f"{SD_ID}:Active"
    assert "_SHA_CKSUM" not in md
    assert len(md) == 20


def test_loads_keeps_value_spaces():
    md = {"DESCRIPTION": " spaced  out ", "key 1": "a=b"}
    assert sdmeta.loads(sdmeta.dumps(md)) == md


def test_loads_ignores_blank_lines_and_padding():
    data = b"\n" + V5_FILE.replace(b"ROLE=", b"\n  \nROLE=") + b"\n"
    assert sdmeta.loads(data.ljust(4096, b"\0")) == sdmeta.loads(V5_FILE)


def test_loads_crlf():
    assert sdmeta.loads(V5_FILE.replace(b"\n", b"\r\n")) == (
        sdmeta.loads(V5_FILE))


@pytest.mark.parametrize("old, new", [
    (b"DESCRIPTION=nfs-data", b"DESCRIPTION=nfs-dbta"),
    (b"VERSION=5", b"VERSION=4"),
    (b"LOCKPOLICY=\n", b"LOCKPOLICY= \n"),
    (b"_SHA_CKSUM=fd4b", b"_SHA_CKSUM=ed4b"),
])
def test_checksum_mismatch(old, new):
    data = V5_FILE.replace(old, new)
    assert data != V5_FILE
    with pytest.raises(errors.ChecksumMismatch) as e:
        sdmeta.loads(data, path="/sd/dom_md/metadata")
    body = data[:data.index(b"_SHA_CKSUM=")]
    assert e.value.path == "/sd/dom_md/metadata"
    assert e.value.stored == data.split(b"=")[-1].strip().decode()
    assert e.value.computed == vdsm_checksum(body).decode()
    assert e.value.stored != e.value.computed


@pytest.mark.parametrize("data", [V5_BODY, b"", b"\0" * 512])
def test_missing_checksum(data):
    with pytest.raises(errors.MetadataError) as e:
        sdmeta.loads(data, path="metadata")
    assert type(e.value) is errors.MetadataError
    assert "_SHA_CKSUM" in e.value.reason


@pytest.mark.parametrize("data", [
    sealed(V5_BODY) + b"garbage\n",
    V5_FILE.replace(b"nfs-data", b"nfs-dat\xff"),
])
def test_loads_invalid(data):
    with pytest.raises(errors.MetadataError) as e:
        sdmeta.loads(data)
    assert type(e.value) is errors.MetadataError


@pytest.mark.parametrize("md", [
    {"A": "two\nlines"},
    {"A": "form\x0cfeed"},
    {"A": "line\u2028separator"},
    {"A=B": "c"},
    {"": "c"},
    {" A": "c"},
    {"A": 1},
    {"_SHA_CKSUM": "0"},
])
def test_dumps_invalid(md):
    with pytest.raises(errors.InvalidParameter):
        sdmeta.dumps(md)


def test_parse_golden():
    assert sdmeta.parse(V5_FILE) == V5


def test_format_golden():
    assert sdmeta.format_metadata(V5) == V5_FILE


def test_new_domain_format():
    md = DomainMetadata(
        sd_id=SD_ID, pool_id="", version=sc.DOMAIN_VERSION,
        type=sc.DomainType.LOCALFS, cls=sc.DomainClass.DATA,
        role=sc.DomainRole.REGULAR, description="local",
        block_size=4096, alignment=sc.ALIGNMENT,
        remote_path="/var/lib/ovirt-cinder/local")
    body = (
        b"ALIGNMENT=1048576\n"
        b"BLOCK_SIZE=4096\n"
        b"CLASS=Data\n"
        b"DESCRIPTION=local\n"
        b"IOOPTIMEOUTSEC=10\n"
        b"LEASERETRIES=3\n"
        b"LEASETIMESEC=60\n"
        b"LOCKPOLICY=\n"
        b"LOCKRENEWALINTERVALSEC=5\n"
        b"POOL_UUID=\n"
        b"REMOTE_PATH=/var/lib/ovirt-cinder/local\n"
        b"ROLE=Regular\n"
        b"SDUUID=c3b2a1f0-5e6d-4c7b-8a9f-0e1d2c3b4a59\n"
        b"TYPE=LOCALFS\n"
        b"VERSION=5\n"
    )
    assert sdmeta.format_metadata(md) == sealed(body)
    assert sdmeta.parse(sealed(body)) == md


def test_read_v4():
    md = sdmeta.parse(V4_FILE)
    assert md == DomainMetadata(
        sd_id=SD_ID, pool_id="", version=4, type=sc.DomainType.NFS,
        cls=sc.DomainClass.DATA, role=sc.DomainRole.REGULAR,
        description="old-nfs", remote_path="nfs.example.com:/exports/old")
    assert (md.block_size, md.alignment) == (512, sc.MiB)


def test_v4_round_trip_adds_no_keys():
    assert sdmeta.format_metadata(sdmeta.parse(V4_FILE)) == V4_FILE


def test_v4_block_domain():
    md = DomainMetadata.from_dict(V4_BLOCK)
    assert md.type is sc.DomainType.ISCSI
    assert md.remote_path == ""
    assert set(md.extra) == {"LOGBLKSIZE", "PHYBLKSIZE", "PV0", "VGUUID"}
    assert md.to_dict() == V4_BLOCK


def test_unknown_keys_preserved():
    md = sdmeta.parse(V5_FILE).replace(role=sc.DomainRole.REGULAR)
    data = sdmeta.format_metadata(md)
    assert data == sealed(V5_BODY.replace(b"ROLE=Master", b"ROLE=Regular"))
    assert sdmeta.parse(data).extra == V5_EXTRA


def test_extra_is_a_copy():
    extra = {"MASTER_VERSION": "1"}
    md = V5.replace(extra=extra)
    extra["MASTER_VERSION"] = "2"
    assert md.extra == {"MASTER_VERSION": "1"}


def test_lenient_spelling():
    # vdsm reads TYPE case-insensitively and capitalizes ROLE.
    md = dict(sdmeta.loads(V5_FILE), TYPE="nfs", ROLE="MASTER")
    assert DomainMetadata.from_dict(md) == V5


def test_empty_lease_values_default():
    md = dict(sdmeta.loads(V5_FILE), LEASETIMESEC="", LEASERETRIES="")
    md.pop("IOOPTIMEOUTSEC")
    parsed = DomainMetadata.from_dict(md)
    assert (parsed.lease_time_sec, parsed.lease_retries,
            parsed.io_op_timeout_sec) == (60, 3, 10)


@pytest.mark.parametrize("version", ["0", "2", "6"])
def test_unsupported_version(version):
    data = sealed(V5_BODY.replace(b"VERSION=5", f"VERSION={version}".encode()))
    with pytest.raises(errors.UnsupportedVersion) as e:
        sdmeta.parse(data, path="/sd/dom_md/metadata")
    assert e.value.version == int(version)
    assert e.value.path == "/sd/dom_md/metadata"


@pytest.mark.parametrize("key", ["VERSION", "SDUUID", "TYPE", "CLASS",
                                 "ROLE"])
def test_missing_key(key):
    md = sdmeta.loads(V5_FILE)
    del md[key]
    with pytest.raises(errors.MetadataError) as e:
        DomainMetadata.from_dict(md, path="metadata")
    assert key in e.value.reason
    assert e.value.path == "metadata"


@pytest.mark.parametrize("key, value", [
    ("VERSION", "five"),
    ("SDUUID", "not-a-uuid"),
    ("POOL_UUID", "pool"),
    ("TYPE", "CIFS"),
    ("CLASS", "data"),
    ("ROLE", "Leader"),
    ("BLOCK_SIZE", "1024"),
    ("BLOCK_SIZE", "x"),
    ("ALIGNMENT", "512"),
    ("LEASETIMESEC", "abc"),
    ("LEASERETRIES", "0"),
    ("DESCRIPTION", "d" * (sc.SD_DESCRIPTION_SIZE + 1)),
])
def test_bad_value(key, value):
    md = dict(sdmeta.loads(V5_FILE), **{key: value})
    with pytest.raises(errors.MetadataError) as e:
        DomainMetadata.from_dict(md, path="metadata")
    assert key in e.value.reason


def test_v4_with_4k_blocks_is_invalid():
    md = dict(sdmeta.loads(V4_FILE), BLOCK_SIZE="4096")
    with pytest.raises(errors.MetadataError):
        DomainMetadata.from_dict(md)


def test_description_limit():
    assert V5.replace(description="d" * sc.SD_DESCRIPTION_SIZE)
    with pytest.raises(errors.InvalidParameter) as e:
        V5.replace(description="d" * (sc.SD_DESCRIPTION_SIZE + 1))
    assert e.value.name == "description"


@pytest.mark.parametrize("changes", [
    {"sd_id": "x"},
    {"pool_id": "x"},
    {"version": 6},
    {"version": "5"},
    {"type": "CIFS"},
    {"cls": "data"},
    {"role": "Leader"},
    {"block_size": 1024},
    {"alignment": 3 * sc.MiB},
    {"version": 4, "block_size": 4096},
    {"lease_retries": 0},
    {"io_op_timeout_sec": "10"},
    {"description": "a\nb"},
    {"remote_path": "a\rb"},
    {"extra": {"SDUUID": SD_ID}},
    {"extra": {"_SHA_CKSUM": "0"}},
    {"extra": {"A": "a\nb"}},
])
def test_invalid_construction(changes):
    with pytest.raises(errors.InvalidParameter):
        V5.replace(**changes)


def test_accepts_enum_strings():
    md = V5.replace(type="POSIXFS", cls="Backup", role="Regular")
    assert md.type is sc.DomainType.POSIXFS
    assert md.cls is sc.DomainClass.BACKUP
    assert md.role is sc.DomainRole.REGULAR


# Files vdsm wrote (tests/fixtures/ovirt, README.md there): V3 read, and
# the upgrade and attach writes byte for byte.


def _fixture_metadata(name):
    from tests import ovirt_fixtures
    entry = ovirt_fixtures.manifest()[name]
    path = f"{ovirt_fixtures.FIXTURES}/{entry['mount']}/{entry['sd_id']}" \
        "/dom_md/metadata"
    with open(path, "rb") as f:
        return f.read()


def _golden(name):
    from tests import ovirt_fixtures
    return ovirt_fixtures.golden(name)


def test_read_v3():
    data = _fixture_metadata("v3")
    md = sdmeta.parse(data)
    assert md.version == 3
    assert md.pool_id == "" and sdmeta.is_detached(md)
    assert (md.block_size, md.alignment) == (512, sc.MiB)
    assert md.extra == {}
    assert sdmeta.format_metadata(md) == data


def test_upgrade_v3_to_v4_as_vdsm():
    md = sdmeta.parse(_fixture_metadata("v3"))
    assert sdmeta.format_metadata(sdmeta.upgraded(md, 4)) == \
        _golden("v3-to-v4.metadata")


def test_upgrade_v4_to_v5_as_vdsm():
    """BLOCK_SIZE and ALIGNMENT added, LOGBLKSIZE and PHYBLKSIZE gone."""
    md = sdmeta.parse(_golden("v4-blksize.metadata"))
    assert md.extra == {"LOGBLKSIZE": "512", "PHYBLKSIZE": "512"}
    new = sdmeta.upgraded(md, 5)
    assert (new.version, new.block_size, new.alignment) == (5, 512, sc.MiB)
    assert sdmeta.format_metadata(new) == _golden("v4-to-v5.metadata")


@pytest.mark.parametrize("version,target", [(3, 5), (4, 4), (5, 6),
                                            (4, 3)])
def test_upgrade_one_version_at_a_time(version, target):
    md = sdmeta.parse(_fixture_metadata("v4")).replace(version=version)
    with pytest.raises(errors.InvalidParameter):
        sdmeta.upgraded(md, target)


def test_attach_former_master_as_vdsm():
    """attachSD + activateSD: POOL_UUID, ROLE=Regular, MASTER_VERSION=0;
    the other pool keys of the former master are kept."""
    md = sdmeta.parse(_fixture_metadata("v5-detached"))
    assert sdmeta.is_detached(md) and md.role == sc.DomainRole.REGULAR
    new = sdmeta.attached(md, "66666666-6666-4666-8666-000000000001")
    assert sdmeta.format_metadata(new) == _golden("v5-attached.metadata")
    assert new.extra["POOL_SPM_LVER"] == "7"


def test_attach_master_of_another_pool():
    md = sdmeta.parse(V5_FILE)
    assert not sdmeta.is_detached(md)
    new = sdmeta.attached(md, SD_ID.replace("c3b2", "aaaa"))
    assert new.role == sc.DomainRole.REGULAR
    assert new.extra["MASTER_VERSION"] == "0"
    assert {k: v for k, v in new.extra.items() if k != "MASTER_VERSION"} \
        == {k: v for k, v in md.extra.items() if k != "MASTER_VERSION"}


def test_attach_without_master_keys_adds_none():
    md = sdmeta.parse(_fixture_metadata("v4"))
    assert sdmeta.attached(md, POOL_ID).extra == {}


def test_blank_pool_is_detached():
    md = sdmeta.parse(_fixture_metadata("v4")).replace(
        pool_id=sc.BLANK_UUID)
    assert sdmeta.is_detached(md)
