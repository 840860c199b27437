from __future__ import annotations

import pytest

from restore_flows.inventory.ranges import MAX_RANGE, RangeError, expand, is_range


def test_plain_name_is_itself() -> None:
    assert expand("dc-arl-01") == ["dc-arl-01"]
    assert not is_range("dc-arl-01")


def test_zero_padded_range_keeps_width() -> None:
    names = expand("ws-icu-arl-[001:040]")
    assert len(names) == 40
    assert names[0] == "ws-icu-arl-001"
    assert names[9] == "ws-icu-arl-010"
    assert names[-1] == "ws-icu-arl-040"


def test_unpadded_range_and_suffix() -> None:
    assert expand("node[8:11].lab") == ["node8.lab", "node9.lab", "node10.lab", "node11.lab"]


def test_single_element_range() -> None:
    assert expand("ws-[7:7]") == ["ws-7"]


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("ws-[040:001]", "after end"),
        ("ws-[01:100]", "same width"),
        ("ws-[a:b]", "expected one range"),
        ("ws-[001:040", "expected one range"),
        ("ws-001:040]", "expected one range"),
        ("ws-[1:2]-[1:2]", "expected one range"),
        ("ws-[1-2]", "expected one range"),
        (f"ws-[0:{MAX_RANGE}]", "at most"),
    ],
)
def test_malformed_ranges_are_refused(pattern: str, fragment: str) -> None:
    with pytest.raises(RangeError, match=fragment):
        expand(pattern)
