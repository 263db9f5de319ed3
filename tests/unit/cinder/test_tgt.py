"""Parsing tgtd's target listing (the output of tgt 1.0.85)."""

from ovirt_cinder.cinder import tgt

SHOW = """\
Target 1: iqn.2010-10.org.openstack:volume-a
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 9
            Initiator: iqn.2004-10.org.example:nova1 alias: none
            Connection: 0
                IP Address: 127.0.0.1
        I_T nexus: 12
            Initiator: iqn.2004-10.org.example:nova2 alias: none
            Connection: 0
                IP Address: 127.0.0.2
    LUN information:
        LUN: 0
            Type: controller
        LUN: 1
            Type: disk
            Backing store path: /run/ovirt-cinder/attached/x/view
    Account information:
        abc
    ACL information:
        ALL
Target 2: iqn.2010-10.org.openstack:volume-b
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
"""


def test_sessions_per_target():
    assert tgt.parse_sessions(SHOW) == {
        "iqn.2010-10.org.openstack:volume-a": 2,
        "iqn.2010-10.org.openstack:volume-b": 0}


def test_no_targets():
    assert tgt.parse_sessions("") == {}
