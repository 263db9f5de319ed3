"""The counters record: what is written parses back; nothing else does."""

import hashlib

import pytest

from ovirt_cinder.storage import counters
from ovirt_cinder.storage import errors

SD = "8b3c3c5e-1f6a-4c55-9d6e-0f2c1a3b4d5e"
OTHER = "0f2c1a3b-4d5e-4c55-9d6e-8b3c3c5e1f6a"
VALUES = counters.Counters(images=50000, volumes=123456,
                           provisioned=5 * 1024 ** 5)


def test_round_trip():
    data = counters.format_record(SD, VALUES, 7)
    assert counters.parse(data, SD) == counters.Record(VALUES, seq=7)


def test_format():
    data = counters.format_record(SD, counters.Counters(1, 2, 3), 4)
    body = (f"FORMAT=1\nSDUUID={SD}\nIMAGES=1\nVOLUMES=2\n"
            "PROVISIONED=3\nSEQ=4\n").encode()
    assert data == body + b"SHA256=" + \
        hashlib.sha256(body).hexdigest().encode() + b"\n"


def test_arithmetic():
    a, b = counters.Counters(3, 5, 100), counters.Counters(1, 2, 40)
    assert a - b == counters.Counters(2, 3, 60)
    assert a + b - b == a
    assert not counters.Counters() and a
    assert (b - a).negative and not (a - b).negative
    assert counters.Counters.total([a, b, b]) == counters.Counters(5, 9, 180)


def test_every_torn_prefix_is_refused():
    data = counters.format_record(SD, VALUES, 7)
    for n in range(len(data) - 1):
        with pytest.raises(errors.BadCounters):
            counters.parse(data[:n], SD)


@pytest.mark.parametrize("damage", [
    lambda d: b"\0" * len(d),                       # written out as zeros
    lambda d: d.replace(b"IMAGES=50000", b"IMAGES=50001"),
    lambda d: d.replace(b"SEQ=7", b"SEQ=8"),
    lambda d: d[:10] + bytes([d[10] ^ 1]) + d[11:],
    lambda d: d + b"EXTRA=1\n",
    lambda d: b"",
])
def test_damage_is_refused(damage):
    data = counters.format_record(SD, VALUES, 7)
    with pytest.raises(errors.BadCounters):
        counters.parse(damage(data), SD)


def resign(body: bytes) -> bytes:
    return body + b"SHA256=" + hashlib.sha256(body).hexdigest().encode() \
        + b"\n"


@pytest.mark.parametrize("body, reason", [
    (f"FORMAT=2\nSDUUID={SD}\nIMAGES=1\nVOLUMES=1\nPROVISIONED=1\nSEQ=1\n",
     "format"),
    (f"FORMAT=1\nSDUUID={OTHER}\nIMAGES=1\nVOLUMES=1\nPROVISIONED=1\n"
     "SEQ=1\n", "a record of domain"),
    (f"FORMAT=1\nSDUUID={SD}\nIMAGES=-1\nVOLUMES=1\nPROVISIONED=1\n"
     "SEQ=1\n", "not a count"),
    (f"FORMAT=1\nSDUUID={SD}\nVOLUMES=1\nIMAGES=1\nPROVISIONED=1\n"
     "SEQ=1\n", "keys"),
    (f"FORMAT=1\nSDUUID={SD}\nIMAGES=1\nIMAGES=1\nVOLUMES=1\n"
     "PROVISIONED=1\nSEQ=1\n", "keys"),
    (f"FORMAT=1\nSDUUID={SD}\nIMAGES\nVOLUMES=1\nPROVISIONED=1\nSEQ=1\n",
     "KEY=value"),
])
def test_well_signed_nonsense_is_refused(body, reason):
    with pytest.raises(errors.BadCounters) as e:
        counters.parse(resign(body.encode()), SD, "/sd/dom_md/x")
    assert reason in e.value.reason
    assert e.value.sd_id == SD and e.value.path == "/sd/dom_md/x"
