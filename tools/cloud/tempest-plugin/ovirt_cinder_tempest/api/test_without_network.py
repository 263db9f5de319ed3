"""Tempest's volume test classes that a cloud without Neutron skips whole.

``VolumesSnapshotTestJSON``, ``SnapshotManageAdminTest``,
``VolumesBackupsTest`` and the two ``VolumesActionsTest`` ask for a
default network (``create_default_network``) because a few of their
tests boot a server, and Tempest skips the whole class when Neutron is
not there. Those few tests declare that they need Nova
(``@utils.services('compute')``) and skip themselves; the subclasses here
run every other test of the class, unchanged, without the network.
"""

from tempest.api.volume import test_volumes_actions
from tempest.api.volume import test_volumes_backup
from tempest.api.volume import test_volumes_snapshots
from tempest.api.volume.admin import test_snapshot_manage
from tempest.api.volume.admin import test_volumes_actions as admin_actions


class VolumesSnapshotTest(test_volumes_snapshots.VolumesSnapshotTestJSON):
    create_default_network = False


class SnapshotManageAdminTest(test_snapshot_manage.SnapshotManageAdminTest):
    create_default_network = False


class VolumesActionsTest(test_volumes_actions.VolumesActionsTest):
    create_default_network = False


class VolumesActionsAdminTest(admin_actions.VolumesActionsTest):
    create_default_network = False


class VolumesBackupsTest(test_volumes_backup.VolumesBackupsTest):
    create_default_network = False
