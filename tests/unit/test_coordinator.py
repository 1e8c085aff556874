"""The MP-coordinator clients against answers in the real coordinator's shapes.

The bodies below are copied from what LMCache 0.5.6's coordinator answered (schemas.py:
DirectoryLookupResponse, DeleteResponse, PinResponse; /instances, /healthz,
/directory/stats as served), with token lists cut to keep the file readable.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from addon.coordinator import (
    AsyncCoordinator,
    Coordinator,
    Unsupported,
    parse_directory_lookup,
    probe_view,
)
from addon.resilience import StatusError, UnparsableResponse

MODEL = "m1"
C = 256
WS1_RANK = 16777472  # kv_rank of a world_size=1 key, as the real coordinator encodes it


def placement(inst: str, tier: str = "l1", backend: str = "dram") -> dict[str, Any]:
    return {"instance_id": inst, "incarnation": 0, "tier": tier, "backend": backend,
            "size_bytes": 262144, "shared": False}


def result(i: int, *holders: str | dict[str, Any], rank: int = WS1_RANK, group: int = 0,
           token_ids: list[int] | None = None) -> dict[str, Any]:
    return {
        "key": {"chunk_hash_hex": f"{i:064x}", "model_name": MODEL, "kv_rank": rank,
                "object_group_id": group, "cache_salt": ""},
        "placements": [h if isinstance(h, dict) else placement(h) for h in holders],
        "token_ids": list(range(i * C, (i + 1) * C)) if token_ids is None else token_ids,
        "access_count": 0,
    }


def answer(*results: dict[str, Any], chunks: int | None = None) -> dict[str, Any]:
    n = len({r["key"]["chunk_hash_hex"] for r in results})
    return {"chunks": n if chunks is None else chunks, "results": list(results)}


# --- parsing ---------------------------------------------------------------------------------


def test_one_holder() -> None:
    r = parse_directory_lookup(answer(result(0, "a"), result(1, "a")), 600)
    assert r.matches == {"a": 512} and r.locations == {"a": "l1/dram"} and r.event_id is None


def test_two_holders_with_different_prefixes() -> None:
    # What the real coordinator answered after a stored 512 tokens and b 256.
    r = parse_directory_lookup(answer(result(0, "a", "b"), result(1, "a")), 600)
    assert r.matches == {"a": 512, "b": 256}
    assert max(r.matches, key=r.matches.__getitem__) == "a"
    # LMCache's tiers all sit below the engine's GPU: every match must be loaded first.
    assert r.lower_tier == {"a", "b"}


def test_a_gap_ends_the_run() -> None:
    # a holds chunks 0 and 2 but not 1: chunk 2 cannot be used without chunk 1.
    r = parse_directory_lookup(answer(result(0, "a", "b"), result(1, "b"), result(2, "a")), 800)
    assert r.matches == {"a": 256, "b": 512}


def test_an_instance_missing_chunk_zero_matches_nothing() -> None:
    r = parse_directory_lookup(answer(result(0, "a"), result(1, "a", "b")), 600)
    assert r.matches == {"a": 512}


def test_no_holders_and_sub_chunk_answers() -> None:
    assert parse_directory_lookup(answer(result(0), result(1)), 600).matches == {}
    assert parse_directory_lookup({"chunks": 0, "results": []}, 100).matches == {}


def test_unknown_instance_ids_pass_through() -> None:
    r = parse_directory_lookup(answer(result(0, "mp-0f3c9a")), 300)
    assert r.matches == {"mp-0f3c9a": 256}


def test_deepest_location_and_l1_preferred() -> None:
    r = parse_directory_lookup(answer(
        result(0, placement("a", "l2", "fs"), placement("a", "l1", "dram")),
        result(1, placement("a", "l2", "fs"))), 600)
    assert r.locations == {"a": "l2/fs"} and r.matches == {"a": 512}


def test_chunk_size_is_read_from_the_token_ids() -> None:
    r = parse_directory_lookup(answer(result(0, "a", token_ids=list(range(64))),
                                      result(1, "a", token_ids=list(range(64)))), 200, C)
    assert r.matches == {"a": 128}


def test_chunk_size_falls_back_to_the_configured_one() -> None:
    r = parse_directory_lookup(answer(result(0, "a", token_ids=[])), 300, 128)
    assert r.matches == {"a": 128}


def test_matches_never_exceed_the_prompt() -> None:
    # A coordinator with a smaller chunk than the token_ids claim: never more than was sent.
    r = parse_directory_lookup(answer(result(0, "a")), 200)
    assert r.matches == {"a": 200}


def test_world_size_two_needs_every_rank() -> None:
    r = parse_directory_lookup(answer(
        result(0, "a", "b", rank=33554944), result(0, "a", rank=33620481),
        result(1, "a", "b", rank=33554944), result(1, "a", "b", rank=33620481)), 600)
    assert r.matches == {"a": 512}  # b lacks rank 1 of chunk 0: no usable prefix


def test_other_object_groups_do_not_decide_holding() -> None:
    r = parse_directory_lookup(answer(
        result(0, "a"), result(0, "b", group=1), result(1, "a")), 600)
    assert r.matches == {"a": 512}


@pytest.mark.parametrize("body", [
    None, [], "x", {}, {"results": []}, {"chunks": "2", "results": []},
    {"chunks": True, "results": []}, {"chunks": -1, "results": []},
    {"chunks": 1, "results": {}}, {"chunks": 1, "results": ["x"]},
    {"chunks": 1, "results": [{"placements": []}]},
    {"chunks": 1, "results": [{"key": {"chunk_hash_hex": 1}, "placements": []}]},
    {"chunks": 1, "results": [{"key": {"chunk_hash_hex": "00"}}]},
    {"chunks": 1, "results": [{"key": {"chunk_hash_hex": "00"}, "placements": ["a"]}]},
    {"chunks": 1, "results": [{"key": {"chunk_hash_hex": "00"},
                               "placements": [{"instance_id": "a"}]}]},
    {"chunks": 1, "results": [{"key": {"chunk_hash_hex": "00", "object_group_id": "0"},
                               "placements": []}]},
    {"chunks": 1, "results": [{"key": {"chunk_hash_hex": "00"}, "placements": [],
                               "token_ids": "x"}]},
    # the legacy controller's answer sent to the wrong client
    {"event_id": "Lookup1", "layout_info": {"a": ["LocalCPUBackend", 256]}},
])
def test_wrong_shapes_are_unparsable(body: object) -> None:
    with pytest.raises(UnparsableResponse):
        parse_directory_lookup(body, 600)


def test_more_chunks_than_announced_is_unparsable() -> None:
    with pytest.raises(UnparsableResponse, match="chunks=1"):
        parse_directory_lookup(answer(result(0, "a"), result(1, "a"), chunks=1), 600)


# --- the async client -----------------------------------------------------------------------


Handler = Callable[[httpx.Request], httpx.Response]


def recorder(respond: Handler) -> tuple[list[httpx.Request], Handler]:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return respond(req)
    return seen, handler


async def test_async_lookup_sends_the_whole_sequence() -> None:
    seen, h = recorder(lambda r: httpx.Response(200, json=answer(result(0, "a", "b"),
                                                                 result(1, "a"))))
    c = AsyncCoordinator("http://coord", MODEL, world_size=2, cache_salt="t1",
                         transport=httpx.MockTransport(h))
    try:
        res = await c.lookup(list(range(600)), 1.0)
    finally:
        await c.aclose()
    assert res.matches == {"a": 512, "b": 256}
    assert seen[0].method == "POST" and seen[0].url.path == "/directory/lookup"
    assert json.loads(seen[0].content) == {"token_ids": list(range(600)), "model_name": MODEL,
                                           "world_size": 2, "cache_salt": "t1"}


async def test_async_empty_prompt_sends_nothing() -> None:
    seen, h = recorder(lambda r: httpx.Response(500))
    c = AsyncCoordinator("http://coord", MODEL, transport=httpx.MockTransport(h))
    assert (await c.lookup([], 1.0)).matches == {}
    assert seen == []
    await c.aclose()


@pytest.mark.parametrize("status,body", [
    (400, {"detail": "too many token_ids in a single request (limit=1000000, got=1000001)"}),
    (500, {"detail": "Internal Server Error"}),
    (503, None),
])
async def test_async_error_statuses_raise_status_error(status: int, body: Any) -> None:
    c = AsyncCoordinator("http://coord", MODEL, transport=httpx.MockTransport(
        lambda r: httpx.Response(status, json=body) if body else httpx.Response(status)))
    with pytest.raises(StatusError) as e:
        await c.lookup([1] * 300, 1.0)
    assert e.value.status == status
    if status == 400:
        assert "too many token_ids" in str(e.value)
    await c.aclose()


async def test_async_non_json_is_unparsable() -> None:
    c = AsyncCoordinator("http://coord", MODEL, transport=httpx.MockTransport(
        lambda r: httpx.Response(200, text="<html>")))
    with pytest.raises(UnparsableResponse):
        await c.lookup([1] * 300, 1.0)
    await c.aclose()


# --- the sync client --------------------------------------------------------------------------


def sync(respond: Handler, **kw: Any) -> tuple[list[httpx.Request], Coordinator]:
    seen, h = recorder(respond)
    return seen, Coordinator("http://coord", MODEL, transport=httpx.MockTransport(h), **kw)


def test_delete_body_and_count() -> None:
    seen, c = sync(lambda r: httpx.Response(200, json={
        "instance_id": "a", "requested": 2, "affected": 2, "skipped": 0, "status": "deleted"}))
    assert c.delete("a", list(range(600)), 1.0) == 2
    assert c.evict("a", list(range(600)), 1.0) == 2
    assert seen[0].url.path == "/cache/delete"
    assert json.loads(seen[0].content) == {
        "instance_id": "a", "model_name": MODEL, "world_size": 1, "cache_salt": "",
        "token_ids": list(range(600)), "tier": "l1", "force": False}


def test_delete_of_an_unregistered_instance_is_a_404() -> None:
    _, c = sync(lambda r: httpx.Response(
        404, json={"detail": "no MP server registered with instance_id='x'"}))
    with pytest.raises(StatusError) as e:
        c.delete("x", [1] * 300, 1.0)
    assert e.value.status == 404 and "no MP server registered" in str(e.value)


def test_delete_answer_without_a_count_is_unparsable() -> None:
    _, c = sync(lambda r: httpx.Response(200, json={"status": "deleted"}))
    with pytest.raises(UnparsableResponse):
        c.delete("a", [1] * 300, 1.0)


def test_sync_lookup_parses_like_the_async_one() -> None:
    _, c = sync(lambda r: httpx.Response(200, json=answer(result(0, "a"), result(1, "b"))))
    assert c.lookup(list(range(600)), 1.0).matches == {"a": 256}


def test_instances_health_and_stats() -> None:
    stats = {"num_keys": 2, "num_placements": 3, "l1_keys_by_instance": {"a": 2, "b": 1},
             "blend": {"num_contents": 0, "num_chunks": 0, "num_claims": 0,
                       "num_namespaces": 0, "table_size": 1024},
             "l1_count": 3, "l1_size_bytes": 786432, "l2_count": 0, "l2_size_bytes": 0}
    bodies = {
        "/instances": {"instances": [
            {"instance_id": "a", "ip": "127.0.0.1", "http_port": 39765,
             "registration_time": 1.0, "metadata": {}, "p2p_advertised_url": "",
             "mq_port": 0}]},
        "/healthz": {"status": "healthy"},
        "/directory/stats": stats,
    }
    _, c = sync(lambda r: httpx.Response(200, json=bodies[r.url.path]))
    assert c.instances(1.0) == ["a"]
    assert c.healthz(1.0) is True
    assert c.stats(1.0)["l1_keys_by_instance"] == {"a": 2, "b": 1}


@pytest.mark.parametrize("body", [{}, {"instances": {}}, {"instances": [{"ip": "x"}]}])
def test_instances_wrong_shape(body: Any) -> None:
    _, c = sync(lambda r: httpx.Response(200, json=body))
    with pytest.raises(UnparsableResponse):
        c.instances(1.0)


def test_pin_maps_to_the_fleet_pin_route() -> None:
    seen, c = sync(lambda r: httpx.Response(
        200, json={"requested": 2, "affected": 2, "status": "pinned"}))
    assert c.pin("a", "l1/dram", list(range(600)), 1.0) == 2
    assert seen[0].url.path == "/cache/pins"
    assert json.loads(seen[0].content)["model_name"] == MODEL


def test_pin_without_the_eviction_controller_is_unsupported() -> None:
    _, c = sync(lambda r: httpx.Response(404, json={"detail": "Not Found"}))
    with pytest.raises(Unsupported, match="/cache/pins"):
        c.pin("a", "l1/dram", [1] * 300, 1.0)


def test_compress_and_clear_are_unsupported_and_evict_is_there() -> None:
    seen, c = sync(lambda r: httpx.Response(500))
    with pytest.raises(NotImplementedError, match="compress"):
        c.compress("a", "l1/dram", "cachegen", [1], 1.0)
    with pytest.raises(Unsupported, match="clear"):
        c.clear("a", "l1/dram", 1.0)
    assert c.has_evict(1.0) is True and seen == []


# --- probe_view -------------------------------------------------------------------------------


def test_probe_says_coordinator() -> None:
    def h(r: httpx.Request) -> httpx.Response:
        if r.url.path == "/healthz":
            return httpx.Response(200, json={"status": "healthy"})
        if r.url.path == "/directory/stats":
            return httpx.Response(200, json={"num_keys": 0, "num_placements": 0})
        return httpx.Response(404, json={"detail": "Not Found"})
    assert probe_view("http://x", 1.0, transport=httpx.MockTransport(h)) == "coordinator"


def test_probe_says_controller() -> None:
    def h(r: httpx.Request) -> httpx.Response:
        if r.url.path == "/lookup" and r.method == "POST":
            return httpx.Response(200, json={"event_id": "Lookup1", "layout_info": {}})
        return httpx.Response(404, json={"detail": "Not Found"})
    assert probe_view("http://x", 1.0, transport=httpx.MockTransport(h)) == "controller"


def test_probe_says_none_for_something_else_or_nothing() -> None:
    assert probe_view("http://x", 1.0, transport=httpx.MockTransport(
        lambda r: httpx.Response(200, text="hello"))) is None

    def refuse(r: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=r)
    assert probe_view("http://x", 1.0, transport=httpx.MockTransport(refuse)) is None


def test_probe_needs_the_directory_not_just_healthz() -> None:
    # vLLM and many services answer /healthz; only the coordinator has /directory/stats.
    def h(r: httpx.Request) -> httpx.Response:
        if r.url.path == "/healthz":
            return httpx.Response(200, json={"status": "healthy"})
        return httpx.Response(404)
    assert probe_view("http://x", 1.0, transport=httpx.MockTransport(h)) is None


async def test_a_wrong_shape_answer_fails_open_through_the_router(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What the request hook sees: the coordinator answers something else (a legacy
    # controller's layout, say); the request is load-balanced, the reason and a log say why.
    import logging

    from addon.policy import EndpointState, LoadBalancer
    from addon.request import LLMRequest
    from addon.resilience import CircuitBreaker, RateLimitedLog
    from addon.router import Router

    h = lambda r: httpx.Response(200, json={"layout_info": {"a": ["cpu", 512]}})  # noqa: E731
    r = Router(budget=1.0, state=EndpointState(["a", "b"], 10),
               balancer=LoadBalancer("least_inflight"), token_cache=None,
               lmcache=AsyncCoordinator("http://coord", MODEL, transport=httpx.MockTransport(h)),
               tokenizer=None, controller_breaker=CircuitBreaker(3, 10, 1),
               tokenizer_breaker=CircuitBreaker(3, 10, 1), failure_log=RateLimitedLog())
    with caplog.at_level(logging.WARNING, logger="addon.router"):
        d = await r.route(LLMRequest("/v1/completions", MODEL, "", "k", "completion",
                                     token_ids=tuple(range(600))))
    assert (d.reason, d.why) == ("least_inflight", "lookup-bad-answer")
    assert any("LMCache lookup failed (bad-answer)" in rec.getMessage()
               for rec in caplog.records)
