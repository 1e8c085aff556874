"""The addon's MP-coordinator clients against a REAL LMCache 0.5.6 coordinator (KVCACHE_REAL=1).

The coordinator's directory is fed by scripts/real/coordinator_feed.py, which publishes
cache events with LMCache's own classes (TokenHasher keys, CacheEventBatch,
HttpCacheEventSink) and plays the MP servers the coordinator forwards deletes to. So
hashing, placements, deletes and errors are the coordinator's own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from addon.coordinator import AsyncCoordinator, Coordinator, probe_view
from addon.resilience import StatusError
from tests.real.conftest import RealController, RealCoordinator, fresh_tokens, wait_until

pytestmark = pytest.mark.real_lmcache

T = 5.0
MODEL = "kvcache-test-model"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def client(coordinator: RealCoordinator) -> Iterator[Coordinator]:
    c = Coordinator(coordinator.url, MODEL, chunk_size=coordinator.chunk_size)
    yield c
    c.close()


async def _alookup(coordinator: RealCoordinator, tokens: list[int],
                   model: str = MODEL) -> Any:
    c = AsyncCoordinator(coordinator.url, model, chunk_size=coordinator.chunk_size)
    try:
        return await c.lookup(tokens, T)
    finally:
        await c.aclose()


# --- the raw contract (what the unit tests' canned answers copy) ----------------------------


def test_raw_shapes(coordinator: RealCoordinator, feeder: Any) -> None:
    url = coordinator.url
    assert httpx.get(f"{url}/healthz", timeout=T).json() == {"status": "healthy"}
    stats = httpx.get(f"{url}/directory/stats", timeout=T).json()
    assert {"num_keys", "num_placements", "l1_keys_by_instance", "blend", "l1_count",
            "l1_size_bytes", "l2_count", "l2_size_bytes"} <= set(stats)
    inst, toks = unique("raw"), fresh_tokens(600)
    feeder.register(inst)
    feeder.store(inst, toks, MODEL)
    body = httpx.post(f"{url}/directory/lookup", timeout=T, json={
        "token_ids": toks, "model_name": MODEL, "world_size": 1, "cache_salt": ""}).json()
    assert body["chunks"] == 2 and len(body["results"]) == 2
    r0 = body["results"][0]
    assert set(r0) == {"key", "placements", "token_ids", "access_count"}
    assert set(r0["key"]) == {"chunk_hash_hex", "model_name", "kv_rank", "object_group_id",
                              "cache_salt"}
    assert r0["placements"] == [{"instance_id": inst, "incarnation": 0, "tier": "l1",
                                 "backend": "dram", "size_bytes": 262144, "shared": False}]
    assert r0["token_ids"] == toks[:256]  # the chunk size, readable from the answer
    rows = httpx.get(f"{url}/instances", timeout=T).json()["instances"]
    assert {"instance_id", "ip", "http_port", "registration_time", "metadata",
            "p2p_advertised_url", "mq_port"} <= set(rows[0])


def test_sub_chunk_and_empty_lookups(coordinator: RealCoordinator, client: Coordinator) -> None:
    r = httpx.post(f"{coordinator.url}/directory/lookup", timeout=T,
                   json={"token_ids": fresh_tokens(255), "model_name": MODEL})
    assert r.json() == {"chunks": 0, "results": []}
    # An empty token_ids is a 422 (exactly one of keys/token_ids): the client never sends it.
    r = httpx.post(f"{coordinator.url}/directory/lookup", timeout=T,
                   json={"token_ids": [], "model_name": MODEL})
    assert r.status_code == 422
    assert client.lookup([], T).matches == {}


# --- lookups ------------------------------------------------------------------------------------


async def test_async_lookup_one_holder(coordinator: RealCoordinator, feeder: Any) -> None:
    inst, toks = unique("one"), fresh_tokens(800)
    feeder.register(inst)
    feeder.store(inst, toks, MODEL)  # 3 full chunks; the last 32 tokens are no chunk
    res = await _alookup(coordinator, toks)
    assert res.matches == {inst: 768} and res.locations == {inst: "l1/dram"}


async def test_async_lookup_two_holders(coordinator: RealCoordinator, feeder: Any) -> None:
    a, b, toks = unique("a"), unique("b"), fresh_tokens(800)
    feeder.register(a)
    feeder.register(b)
    feeder.store(a, toks, MODEL)
    feeder.store(b, toks, MODEL, chunks=1)
    res = await _alookup(coordinator, toks)
    assert res.matches == {a: 768, b: 256}  # every holder listed; the longer one wins


async def test_a_gap_ends_the_run(coordinator: RealCoordinator, feeder: Any) -> None:
    inst, toks = unique("gap"), fresh_tokens(800)
    feeder.register(inst)
    feeder.store(inst, toks, MODEL, only=[0, 2])
    assert (await _alookup(coordinator, toks)).matches == {inst: 256}


async def test_events_are_visible_at_once(coordinator: RealCoordinator, feeder: Any) -> None:
    # POST /events applies the batch before it answers: no lag to wait out.
    inst, toks = unique("lag"), fresh_tokens(512)
    feeder.register(inst)
    for _ in range(5):
        feeder.store(inst, toks, MODEL)
        assert (await _alookup(coordinator, toks)).matches == {inst: 512}
        feeder.delete(inst, toks, MODEL)
        assert (await _alookup(coordinator, toks)).matches == {}


async def test_another_model_sees_nothing(coordinator: RealCoordinator, feeder: Any) -> None:
    inst, toks = unique("model"), fresh_tokens(512)
    feeder.register(inst)
    feeder.store(inst, toks, MODEL)
    res = await _alookup(coordinator, toks, model="some/other-model")
    assert res.matches == {}  # no error: a silent 0% hit rate, which the doctor names


async def test_events_without_registration_still_route(
    coordinator: RealCoordinator, feeder: Any
) -> None:
    # The directory trusts the event stream; /instances knows only registered servers.
    inst, toks = unique("unregistered"), fresh_tokens(300)
    feeder.store(inst, toks, MODEL)
    assert (await _alookup(coordinator, toks)).matches == {inst: 256}
    c = Coordinator(coordinator.url, MODEL)
    try:
        assert inst not in c.instances(T)
        assert c.stats(T)["l1_keys_by_instance"][inst] == 1
    finally:
        c.close()


def test_over_the_cap_is_a_400(client: Coordinator) -> None:
    with pytest.raises(StatusError) as e:
        client.lookup([7] * 1_000_001, 30.0)
    assert e.value.status == 400 and "too many token_ids" in str(e.value)


# --- delete, instances, pins ------------------------------------------------------------------


def test_targeted_delete_leaves_the_other_holder(
    coordinator: RealCoordinator, feeder: Any, client: Coordinator
) -> None:
    a, b, toks = unique("del-a"), unique("del-b"), fresh_tokens(600)
    feeder.register(a)
    feeder.register(b)
    feeder.store(a, toks, MODEL)
    feeder.store(b, toks, MODEL, chunks=1)
    assert client.lookup(toks, T).matches == {a: 512, b: 256}
    assert client.delete(a, toks, T) == 2
    wait_until(lambda: client.lookup(toks, T).matches == {b: 256}, what="a's prefix gone")
    # The coordinator resolved the tokens to keys and forwarded them to a's server only.
    sent = feeder.deletes(a)
    assert len(sent) == 1 and sent[0]["tier"] == "l1" and sent[0]["force"] is False
    assert [k["chunk_hash_hex"] for k in sent[0]["keys"]] == feeder.keys(toks, MODEL)
    assert feeder.deletes(b) == []
    # Nothing left to delete on a: the server reports 0, the coordinator passes it on.
    assert client.evict(a, toks, T) == 0


def test_delete_on_an_unregistered_instance_is_a_404(client: Coordinator) -> None:
    with pytest.raises(StatusError) as e:
        client.delete(unique("nobody"), fresh_tokens(300), T)
    assert e.value.status == 404 and "no MP server registered" in str(e.value)


def test_instances_lists_the_registered(feeder: Any, client: Coordinator) -> None:
    a, b = unique("list-a"), unique("list-b")
    feeder.register(a)
    feeder.register(b)
    assert {a, b} <= set(client.instances(T))
    feeder.deregister(b)
    listed = client.instances(T)
    assert a in listed and b not in listed
    assert client.healthz(T) is True


def test_pin_is_the_fleet_pin_route(client: Coordinator) -> None:
    assert client.pin("any", "l1/dram", fresh_tokens(600), T) == 2  # 2 chunks x 1 rank


# --- probe_view ---------------------------------------------------------------------------------


def test_probe_view_on_the_coordinator(coordinator: RealCoordinator) -> None:
    assert probe_view(coordinator.url, T) == "coordinator"


def test_probe_view_on_the_legacy_controller(controller: RealController) -> None:
    assert probe_view(controller.url, T) == "controller"


def test_probe_view_on_nothing() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert probe_view(f"http://127.0.0.1:{port}", 1.0) is None
