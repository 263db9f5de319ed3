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

# Sizes of the special files of a file domain (created sparse).
IDS_SIZE = 1 * MiB
LEASES_SIZE = 2048 * MiB
XLEASES_SIZE = 1024 * MiB
INBOX_SIZE = 16 * MiB
OUTBOX_SIZE = 16 * MiB
VOLUME_LEASE_SIZE = 1 * MiB
# The domain-manager ("SDM") lease offset in dom_md/leases.
SDM_LEASE_NAME = "SDM"
SDM_LEASE_OFFSET = 1 * ALIGNMENT

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
