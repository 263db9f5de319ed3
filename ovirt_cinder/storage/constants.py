"""Names and numbers of oVirt storage-domain format V5.

Values are the strings written on disk, so every enum is a ``StrEnum`` and
can be formatted straight into metadata.
"""

from __future__ import annotations

import enum

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

BLANK_UUID = "00000000-0000-0000-0000-000000000000"

DOMAIN_VERSION = 5
SUPPORTED_DOMAIN_VERSIONS = (3, 4, 5)

# Volume metadata is one sector (file .meta or one block-domain slot).
METADATA_SIZE = 512
DESCRIPTION_SIZE = 210
SD_DESCRIPTION_SIZE = 50
MAX_GENERATION = 999

BLOCK_SIZE_512 = 512
BLOCK_SIZE_4K = 4096
ALIGNMENT = 1 * MiB

# Sizes of the special files of a new file domain, as vdsm creates them:
# ids, leases and xleases start empty and grow by the lease writes (ids to
# 1 x ALIGNMENT, leases to 2 x, xleases to 1 x + the index); inbox and
# outbox are sparse.
IDS_SIZE = 0
LEASES_SIZE = 0
XLEASES_SIZE = 0
INBOX_SIZE = 16 * MiB
OUTBOX_SIZE = 16 * MiB
# A volume's .lease holds one resource: 1 x the domain's ALIGNMENT.
VOLUME_LEASE_SIZE = 1 * MiB
# The domain-manager ("SDM") lease is in dom_md/leases at slot 1, i.e. at
# 1 x the domain's ALIGNMENT (1, 2, 4 or 8 MiB); slot 0 stays empty.
SDM_LEASE_NAME = "SDM"
SDM_LEASE_SLOT = 1

# Modes of what a domain holds, set explicitly whatever the umask (vdsm's
# FILE_VOLUME_PERMISSIONS and METADATA_PERMISSIONS; directories 0775).
FILE_MODE = 0o660
DIR_MODE = 0o775

DOM_MD = "dom_md"
IMAGES = "images"
MASTER = "master"
METADATA = "metadata"
SPECIAL_FILES = {
    "ids": IDS_SIZE,
    "leases": LEASES_SIZE,
    "xleases": XLEASES_SIZE,
    "inbox": INBOX_SIZE,
    "outbox": OUTBOX_SIZE,
}
# Ours, not vdsm's (vdsm opens the files of dom_md by name and never lists
# it): the domain's counters, see counters.py.
COUNTERS = "ovirt-cinder-counters"
META_EXT = ".meta"
LEASE_EXT = ".lease"
NEW_EXT = ".new"
REMOVE_PREFIX = "_remove_me_"
TEMP_PREFIX = ".tmp-"


class VolumeFormat(enum.StrEnum):
    COW = "COW"
    RAW = "RAW"

    @property
    def qemu(self) -> str:
        return "qcow2" if self is VolumeFormat.COW else "raw"


class Preallocation(enum.StrEnum):
    SPARSE = "SPARSE"
    PREALLOCATED = "PREALLOCATED"


class VolumeType(enum.StrEnum):
    LEAF = "LEAF"
    INTERNAL = "INTERNAL"
    SHARED = "SHARED"


class Legality(enum.StrEnum):
    LEGAL = "LEGAL"
    ILLEGAL = "ILLEGAL"
    FAKE = "FAKE"


class DiskType(enum.StrEnum):
    DATA = "DATA"
    ISOF = "ISOF"


class DomainType(enum.StrEnum):
    LOCALFS = "LOCALFS"
    NFS = "NFS"
    POSIXFS = "POSIXFS"
    GLUSTERFS = "GLUSTERFS"
    ISCSI = "ISCSI"
    FCP = "FCP"


class DomainClass(enum.StrEnum):
    DATA = "Data"
    ISO = "Iso"
    BACKUP = "Backup"


class DomainRole(enum.StrEnum):
    MASTER = "Master"
    REGULAR = "Regular"


# Where the daemons serving attached images keep their state (host-local,
# a tmpfs: see attach.py).
DEFAULT_RUN_PATH = "/run/ovirt-cinder"
