"""The addon's routing step (`addon.router.Router`) asking a REAL LMCache 0.5.6 MP coordinator
(`cache_view: coordinator`), fed with LMCache's own cache events (KVCACHE_REAL=1)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest

from addon.coordinator import AsyncCoordinator, Coordinator
from addon.policy import EndpointState, LoadBalancer, PolicyParams
from addon.request import LLMRequest
from addon.resilience import CircuitBreaker, RateLimitedLog
from addon.router import Router
from tests.real.conftest import RealCoordinator, fresh_tokens, wait_until

pytestmark = pytest.mark.real_lmcache

MODEL = "kvcache-routing-model"


def router(url: str, ids: list[str], chunk: int) -> Router:
    # No proxy-side memory: every decision below is the coordinator's answer alone.
    return Router(
        budget=2.0, state=EndpointState(ids, 10), balancer=LoadBalancer("least_inflight"),
        token_cache=None, lmcache=AsyncCoordinator(url, MODEL, chunk_size=chunk),
        tokenizer=None, controller_breaker=CircuitBreaker(3, 10, 1),
        tokenizer_breaker=CircuitBreaker(3, 10, 1), failure_log=RateLimitedLog(),
        policy=PolicyParams(track_inflight=False, recent_tokens=0))


def req(tokens: list[int]) -> LLMRequest:
    return LLMRequest("/v1/completions", MODEL, "", uuid.uuid4().hex, "completion",
                      token_ids=tuple(tokens))


async def test_routes_to_the_longest_holder_and_after_a_delete_to_the_other(
    coordinator: RealCoordinator, feeder: Any
) -> None:
    a, b = f"ep-a-{uuid.uuid4().hex[:6]}", f"ep-b-{uuid.uuid4().hex[:6]}"
    feeder.register(a)
    feeder.register(b)
    r = router(coordinator.url, [a, b], coordinator.chunk_size)
    one = fresh_tokens(900)
    feeder.store(b, one, MODEL)  # one holder
    d = await r.route(req(one))
    assert (d.endpoint_id, d.reason, d.matched_tokens) == (b, "cache-hit", 768)
    two = fresh_tokens(900)
    feeder.store(a, two, MODEL, chunks=1)
    feeder.store(b, two, MODEL)  # two holders, b's prefix longer
    d = await r.route(req(two))
    assert (d.endpoint_id, d.matched_tokens) == (b, 768)
    # Every match on the coordinator is an LMCache tier below the GPU.
    assert d.reason == "cache-hit"
    # The eviction the background manager makes: a targeted delete on b only.
    bg = Coordinator(coordinator.url, MODEL, chunk_size=coordinator.chunk_size)
    try:
        assert bg.evict(b, two, 5.0) == 3
        wait_until(lambda: bg.lookup(two, 5.0).matches == {a: 256}, what="b's copy gone")
    finally:
        bg.close()
    d = await r.route(req(two))
    assert (d.endpoint_id, d.matched_tokens) == (a, 256)
    await r.lmcache.aclose()  # type: ignore[attr-defined]


async def test_an_instance_that_is_no_endpoint_fails_open_with_a_log_line(
    coordinator: RealCoordinator, feeder: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ids = ["ep-1", "ep-2"]
    stranger = f"not-an-endpoint-{uuid.uuid4().hex[:6]}"
    feeder.register(stranger)
    toks = fresh_tokens(600)
    feeder.store(stranger, toks, MODEL)
    r = router(coordinator.url, ids, coordinator.chunk_size)
    with caplog.at_level(logging.WARNING, logger="addon.router"):
        d = await r.route(req(toks))
    assert d.endpoint_id in ids and d.why == "unknown-instance" and d.unknown_instances == 1
    assert any("instance-not-an-endpoint" in rec.getMessage() for rec in caplog.records)
    await r.lmcache.aclose()  # type: ignore[attr-defined]
