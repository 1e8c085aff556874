"""Both layout_info shapes seen in the wild, and everything else rejected."""

import pytest

from addon.lmcache import parse_lookup
from addon.resilience import UnparsableResponse


def test_real_controller_array_shape_with_many_holders() -> None:
    r = parse_lookup({"event_id": "Lookup1", "layout_info": {
        "inst-1": ["LocalCPUBackend", 512], "inst-2": ["LocalCPUBackend", 768]}})
    assert r.matches == {"inst-1": 512, "inst-2": 768}
    assert r.locations["inst-2"] == "LocalCPUBackend" and r.event_id == "Lookup1"


def test_pixiu_mock_object_shape() -> None:
    r = parse_lookup({"layout_info": {"vllm-instance-1": {"0": "LocalCPUBackend", "1": 256}}})
    assert r.matches == {"vllm-instance-1": 256}


def test_empty_layout_is_no_match() -> None:
    assert parse_lookup({"event_id": "x", "layout_info": {}}).matches == {}


@pytest.mark.parametrize("body", [
    None, [], "x", {"event_id": "x"}, {"layout_info": []},
    {"layout_info": {"a": "LocalCPUBackend"}}, {"layout_info": {"a": ["L", "512"]}},
    {"layout_info": {"a": ["L", -1]}}, {"layout_info": {"a": {"0": "L"}}},
])
def test_other_shapes_are_unparsable(body: object) -> None:
    with pytest.raises(UnparsableResponse):
        parse_lookup(body)
