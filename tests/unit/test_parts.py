"""The object graph built from a config (addon/parts.py): which cache view routing asks, what
the cache strategy can still do with it, and what a KV-events reset does to the router."""

from __future__ import annotations

import asyncio
import socket

from addon.config import load_config
from addon.coordinator import AsyncCoordinator
from addon.kv_events import KVEventsView, KVUpdate, Stored
from addon.lmcache import AsyncLMCache
from addon.parts import Parts, build
from addon.prefix_index import chunk_hashes
from addon.router import Decision

EPS = [{"id": "e1", "url": "http://127.0.0.1:8001", "kv_events_endpoint": "tcp://127.0.0.1:5557"},
       {"id": "e2", "url": "http://127.0.0.1:8002", "kv_events_endpoint": "tcp://127.0.0.1:5558"}]


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def parts_for(**kw: object) -> Parts:
    return build(load_config({"endpoints": EPS, **kw}))


def close(p: Parts) -> None:
    tasks: set[asyncio.Task[None]] = set()
    p.close(tasks)


def test_the_controller_is_the_default_view() -> None:
    p = parts_for()
    try:
        assert p.view == "controller" and isinstance(p.router.lmcache, AsyncLMCache)
        assert p.manager.settings.strategy.enable_pinning  # the default strategy, untouched
        assert p.kv_subscriber is None
    finally:
        close(p)


def test_the_coordinator_view_deletes_but_neither_pins_nor_compresses() -> None:
    p = parts_for(cache_view="coordinator", cache_model="m",
                  cache_strategy={"enable_compression": True, "enable_eviction": True})
    try:
        assert p.view == "coordinator" and isinstance(p.router.lmcache, AsyncCoordinator)
        s = p.manager.settings.strategy
        assert (s.enable_pinning, s.enable_compression, s.enable_eviction) == (
            False, False, True)
    finally:
        close(p)


def test_the_kv_events_view_needs_no_controller_and_takes_no_actions() -> None:
    p = parts_for(cache_view="kv_events", cache_strategy={"enable_eviction": True})
    try:
        assert p.view == "kv_events" and isinstance(p.router.lmcache, KVEventsView)
        assert p.kv_subscriber is not None and set(p.kv_subscriber.sources) == {"e1", "e2"}
        s = p.manager.settings.strategy
        assert not (s.enable_pinning or s.enable_compression or s.enable_eviction)
    finally:
        close(p)


def test_auto_falls_back_to_the_controller_when_nothing_answers() -> None:
    p = parts_for(cache_view="auto", lmcache_endpoint=dead_url())
    try:
        assert p.view == "controller"
    finally:
        close(p)


async def test_a_restarted_engine_is_forgotten_by_the_view_and_the_router() -> None:
    p = parts_for(cache_view="kv_events", kv_events_stale_after="5s",
                  engine_metrics_interval="0s")
    loop = asyncio.get_running_loop()
    delivered: list[KVUpdate] = []
    assert p.kv_subscriber is not None and p.kv_index is not None
    try:
        p.start_threads(loop)  # connects to nothing: no publisher there
        deliver = p.kv_subscriber.deliver
        tokens = list(range(512))
        stored = Stored([11, 12], None, tokens, 256, "GPU")
        deliver(KVUpdate("e1", 0, (stored,), fresh=True))  # e1's server just started
        await asyncio.sleep(0.05)
        # The router also remembers a request it routed to e1 and saw finish.
        p.router.started("f1", Decision("e1", "cache-hit", chunks=chunk_hashes(tokens),
                                        prompt_tokens=512))
        p.router.finished("f1", "e1")
        await asyncio.sleep(0.05)
        assert p.kv_index.match(tokens)["e1"][0] == 512
        assert p.router.index.local_matches(chunk_hashes(tokens), recent=True) == {"e1": 512}
        delivered.append(KVUpdate("e1", None, reset="disconnected", connected=False))
        deliver(delivered[-1])
        await asyncio.sleep(0.05)
        assert "e1" not in p.kv_index.match(tokens)
        assert p.router.index.local_matches(chunk_hashes(tokens), recent=True) == {}
    finally:
        close(p)

