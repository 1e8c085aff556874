"""The addon's controller client against a REAL lmcache 0.5.6 controller (KVCACHE_REAL=1).

Workers are sim/lmcache_worker.py (lmcache's own message classes and ChunkedTokenDatabase),
so lookups, chunk hashing and errors are the controller's own. The last tests run the same
calls against sim.controller and compare what comes back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from addon.lmcache import AsyncLMCache, LMCache, parse_lookup
from addon.resilience import StatusError
from sim.chunks import chunk_hashes
from sim.cluster import start_controller
from sim.lmcache_worker import WorkerShim
from tests.real.conftest import (
    LOCATION,
    RealController,
    fresh_tokens,
    settle,
    unique,
    wait_until,
)

pytestmark = pytest.mark.real_lmcache

T = 5.0  # generous per-call timeout; the stall test uses its own short one


@pytest.fixture
def client(controller: RealController) -> Iterator[LMCache]:
    c = LMCache(controller.url)
    yield c
    c.close()


def _lookup(c: LMCache, tokens: list[int]) -> dict[str, int]:
    return c.lookup(tokens, T).matches


# --- lookup --------------------------------------------------------------------------------


def test_lookup_when_empty(controller: RealController, client: LMCache) -> None:
    raw = httpx.post(f"{controller.url}/lookup", json={"tokens": fresh_tokens(800)}, timeout=T)
    assert raw.status_code == 200
    body = raw.json()
    assert set(body) == {"event_id", "layout_info"}
    assert body["layout_info"] == {}
    assert body["event_id"].startswith("Lookup")
    res = parse_lookup(body)
    assert res.matches == {} and res.event_id == body["event_id"]


def test_lookup_one_holder(controller: RealController, shim: WorkerShim, client: LMCache) -> None:
    inst, toks = unique("one"), fresh_tokens(800)
    shim.register(inst)
    shim.admit(inst, toks)  # 3 full chunks; the last 32 tokens are no chunk
    settle(controller.url, shim, inst)
    raw = httpx.post(f"{controller.url}/lookup", json={"tokens": toks}, timeout=T).json()
    assert raw["layout_info"] == {inst: [LOCATION, 768]}  # a JSON array, not an object
    res = client.lookup(toks, T)
    assert res.matches == {inst: 768} and res.locations == {inst: LOCATION}


async def test_async_client_reads_the_real_answer(
    controller: RealController, shim: WorkerShim
) -> None:
    inst, toks = unique("async"), fresh_tokens(600)
    shim.register(inst)
    shim.admit(inst, toks)
    settle(controller.url, shim, inst)
    c = AsyncLMCache(controller.url)
    try:
        assert (await c.lookup(toks, T)).matches == {inst: 512}
    finally:
        await c.aclose()


def test_two_holders_of_different_lengths_are_both_reported(
    controller: RealController, shim: WorkerShim, client: LMCache
) -> None:
    short, long_, toks = unique("short"), unique("long"), fresh_tokens(800)
    # Registration order matters (next test): the shorter holder registers first here.
    shim.register(short)
    shim.register(long_)
    shim.admit(short, toks, chunks=2)
    shim.admit(long_, toks, chunks=3)
    settle(controller.url, shim, short)
    settle(controller.url, shim, long_)
    m = _lookup(client, toks)
    assert m == {short: 512, long_: 768}
    assert all(v % 256 == 0 for v in m.values())


def test_holder_registered_later_is_hidden_behind_an_earlier_one(
    controller: RealController, shim: WorkerShim, client: LMCache
) -> None:
    """The controller walks the chunks and, for each, takes the FIRST registered instance
    holding it (registry.find_kv); an instance is reported with the end of the last chunk
    it was picked for. So a shorter holder registered after a longer one is not reported."""
    long_, short, toks = unique("long"), unique("short"), fresh_tokens(800)
    shim.register(long_)
    shim.register(short)
    shim.admit(long_, toks, chunks=3)
    shim.admit(short, toks, chunks=2)
    settle(controller.url, shim, long_)
    settle(controller.url, shim, short)
    assert _lookup(client, toks) == {long_: 768}


def test_lookup_after_eviction(
    controller: RealController, shim: WorkerShim, client: LMCache
) -> None:
    a, b, toks = unique("ev-a"), unique("ev-b"), fresh_tokens(800)
    shim.register(a)
    shim.register(b)
    shim.admit(a, toks, chunks=2)
    shim.admit(b, toks, chunks=3)
    settle(controller.url, shim, a)
    settle(controller.url, shim, b)
    assert _lookup(client, toks) == {a: 512, b: 768}
    shim.evict(a, toks)
    settle(controller.url, shim, a)
    assert _lookup(client, toks) == {b: 768}
    # Evicting a middle chunk cuts the prefix there, though chunk 3 is still held.
    shim.call("evict_keys", instance_id=b, keys=shim.hashes(toks)[1:2])  # chunk 2 only
    settle(controller.url, shim, b)
    assert _lookup(client, toks) == {b: 256}


def test_prompt_shorter_than_one_chunk_never_matches(
    controller: RealController, shim: WorkerShim, client: LMCache
) -> None:
    inst, toks = unique("tiny"), fresh_tokens(700)
    shim.register(inst)
    shim.admit(inst, toks)
    settle(controller.url, shim, inst)
    assert _lookup(client, toks[:255]) == {}
    assert _lookup(client, toks[:256]) == {inst: 256}
    assert _lookup(client, toks[:511]) == {inst: 256}


def test_hash_seed_mismatch_means_nothing_ever_matches(
    controller: RealController, shim: WorkerShim, client: LMCache
) -> None:
    inst, toks = unique("seed"), fresh_tokens(800)
    shim.register(inst, hash_seed=424242)
    shim.admit(inst, toks)
    settle(controller.url, shim, inst)
    assert shim.held(inst)[LOCATION]  # the worker does hold 3 chunks ...
    assert _lookup(client, toks) == {}  # ... but under hashes the controller never makes


# --- pin / compress / clear ----------------------------------------------------------------


def test_pin_known_and_unknown(
    controller: RealController, shim: WorkerShim, client: LMCache
) -> None:
    inst, toks = unique("pin"), fresh_tokens(800)
    shim.register(inst)
    shim.admit(inst, toks, chunks=2)
    settle(controller.url, shim, inst)
    assert client.pin(inst, LOCATION, toks, T) == 512
    with pytest.raises(StatusError) as e:
        client.pin(unique("nobody"), LOCATION, toks, T)
    assert e.value.status == 500
    assert "should be the same across all workers" in str(e.value)
    sent = [m for m in shim.log() if m["instance_id"] == inst]
    assert sent[-1]["type"] == "PinWorkerMsg" and sent[-1]["tokens"] == 800


def test_compress_cachegen_other_method_and_unknown(
    controller: RealController, shim: WorkerShim, client: LMCache
) -> None:
    inst, toks = unique("cmp"), fresh_tokens(800)
    shim.register(inst)
    shim.admit(inst, toks)
    settle(controller.url, shim, inst)
    assert client.compress(inst, LOCATION, "cachegen", toks, T) == 768
    assert client.compress(inst, LOCATION, "zstd", toks, T) == 0
    with pytest.raises(StatusError) as e:
        client.compress(unique("nobody"), LOCATION, "cachegen", toks, T)
    assert e.value.status == 500


def test_clear_known_and_unknown(
    controller: RealController, shim: WorkerShim, client: LMCache
) -> None:
    inst, toks = unique("clr"), fresh_tokens(800)
    shim.register(inst)
    shim.admit(inst, toks)
    settle(controller.url, shim, inst)
    assert client.clear(inst, LOCATION, T) == 768
    settle(controller.url, shim, inst)  # the worker reports the cleared chunks as evicted
    assert _lookup(client, toks) == {}
    with pytest.raises(StatusError) as e:
        client.clear(unique("nobody"), LOCATION, T)
    assert e.value.status == 500


@pytest.mark.parametrize(
    "path,body",
    [
        ("/pin", {"instance_id": "x"}),
        ("/lookup", {"tokens": "not a list"}),
        ("/clear", {}),
        ("/compress", {"instance_id": "x", "location": LOCATION}),
    ],
)
def test_malformed_body_is_422(controller: RealController, path: str, body: dict[str, Any]) -> None:
    r = httpx.post(controller.url + path, json=body, timeout=T)
    assert r.status_code == 422
    assert isinstance(r.json()["detail"], list)


def test_there_is_no_evict(client: LMCache) -> None:
    assert client.has_evict(T) is False
    with pytest.raises(StatusError) as e:
        client.evict("x", [1, 2, 3], T)
    assert e.value.status == 404


def test_health_and_worker_info(
    controller: RealController, shim: WorkerShim
) -> None:
    inst = unique("hl")
    shim.register(inst)
    ok = httpx.post(f"{controller.url}/health", json={"instance_id": inst}, timeout=T).json()
    assert set(ok) == {"event_id", "error_codes"} and ok["error_codes"] == {"0": 0}
    none = httpx.post(f"{controller.url}/health", json={"instance_id": "nobody"}, timeout=T)
    assert none.status_code == 200 and none.json()["error_codes"] == {}

    def listed() -> bool:
        r = httpx.post(f"{controller.url}/query_worker_info",
                       json={"instance_id": "all", "worker_ids": None}, timeout=T).json()
        return inst in {w["instance_id"] for w in r["worker_infos"]}

    # "all" is served from a cache refreshed about every 30 s.
    wait_until(listed, timeout=40.0, what="instance listed by query_worker_info")
    one = httpx.post(f"{controller.url}/query_worker_info",
                     json={"instance_id": inst, "worker_ids": None}, timeout=T).json()
    assert [w["instance_id"] for w in one["worker_infos"]] == [inst]
    assert set(one["worker_infos"][0]) == {
        "instance_id", "worker_id", "ip", "port", "peer_init_url", "registration_time",
        "last_heartbeat_time",
    }


def test_stalled_worker_client_times_out_instead_of_hanging(
    controller: RealController, shim: WorkerShim, client: LMCache
) -> None:
    inst, toks = unique("stall"), fresh_tokens(800)
    shim.register(inst)
    shim.admit(inst, toks)
    settle(controller.url, shim, inst)
    shim.silence(inst)
    t0 = time.monotonic()
    with pytest.raises(httpx.TimeoutException):
        client.pin(inst, LOCATION, toks, timeout=1.0)
    assert time.monotonic() - t0 < 3.0
    # The controller's REQ socket to that worker is now stuck mid-request: every later
    # call that needs the worker fails at once (ZMQ EFSM) until it registers anew ...
    with pytest.raises(StatusError) as e:
        client.pin(inst, LOCATION, toks, timeout=2.0)
    assert e.value.status == 500 and "current state" in str(e.value)
    # ... while lookups, which need no worker, go on answering.
    assert _lookup(client, toks) == {inst: 768}


# --- fidelity of sim.controller ------------------------------------------------------------


class _RealSide:
    def __init__(self, controller: RealController, shim: WorkerShim) -> None:
        self.url, self.shim = controller.url, shim

    def register(self, inst: str) -> None:
        self.shim.register(inst)

    def admit(self, inst: str, toks: list[int], chunks: int | None = None) -> None:
        self.shim.admit(inst, toks, chunks)
        settle(self.url, self.shim, inst)

    def evict(self, inst: str, toks: list[int], chunks: int | None = None) -> None:
        self.shim.evict(inst, toks, chunks)
        settle(self.url, self.shim, inst)


class _SimSide:
    def __init__(self, url: str) -> None:
        self.url = url

    def register(self, inst: str) -> None:
        httpx.post(f"{self.url}/sim/register",
                   json={"instance_id": inst, "url": "http://127.0.0.1:9"}).raise_for_status()

    def _events(self, inst: str, toks: list[int], chunks: int | None, kind: str) -> None:
        keys = chunk_hashes(toks)[:chunks]
        httpx.post(f"{self.url}/sim/kv_events",
                   json={"instance_id": inst, "location": LOCATION, kind: keys}
                   ).raise_for_status()

    def admit(self, inst: str, toks: list[int], chunks: int | None = None) -> None:
        self._events(inst, toks, chunks, "admitted")

    def evict(self, inst: str, toks: list[int], chunks: int | None = None) -> None:
        self._events(inst, toks, chunks, "evicted")


def _shape(v: Any) -> Any:
    """Keys and JSON types, plus the numbers that carry meaning (token counts)."""
    if isinstance(v, dict):
        # A worker's port is wherever it happened to bind: only its type means anything.
        return {k: "int" if k == "port" else _shape(x) for k, x in sorted(v.items())}
    if isinstance(v, list):
        return [_shape(x) for x in v]
    if isinstance(v, str):
        return "str"
    if isinstance(v, float):
        return "float"
    return v  # ints (token counts, error codes), bools, None


def _scenario(side: Any, url: str) -> list[tuple[str, int, Any]]:
    """The same calls on either controller; instance ids are fixed so answers compare."""
    a, b, toks = "fid-a", "fid-b", list(range(7_000_000, 7_000_800))
    out: list[tuple[str, int, Any]] = []

    def call(label: str, path: str, body: dict[str, Any]) -> None:
        r = httpx.post(url + path, json=body, timeout=T)
        data = r.json()
        if r.status_code >= 400:
            # Keep the shape of an error (detail: str or list), not its wording.
            detail = data.get("detail")
            data = {"detail": "str" if isinstance(detail, str) else "list"}
        else:
            data = _shape(data)
            data.pop("event_id", None)
        out.append((label, r.status_code, data))

    lookup: Callable[[str], None] = lambda label: call(label, "/lookup", {"tokens": toks})  # noqa: E731
    lookup("lookup empty")
    side.register(a)
    side.register(b)
    side.admit(a, toks, 2)
    lookup("lookup one holder")
    side.admit(b, toks, 3)
    lookup("lookup two holders")
    call("lookup short prompt", "/lookup", {"tokens": toks[:255]})
    call("pin known", "/pin", {"instance_id": b, "location": LOCATION, "tokens": toks})
    call("pin unknown", "/pin", {"instance_id": "nobody", "location": LOCATION, "tokens": toks})
    call("compress cachegen", "/compress",
         {"instance_id": b, "location": LOCATION, "method": "cachegen", "tokens": toks})
    call("compress zstd", "/compress",
         {"instance_id": b, "location": LOCATION, "method": "zstd", "tokens": toks})
    call("compress unknown", "/compress",
         {"instance_id": "nobody", "location": LOCATION, "method": "cachegen"})
    call("health known", "/health", {"instance_id": a})
    call("health unknown", "/health", {"instance_id": "nobody"})
    call("worker info one", "/query_worker_info", {"instance_id": a, "worker_ids": None})
    call("check_finish", "/check_finish", {"event_id": "x"})
    call("pin malformed", "/pin", {"instance_id": "x"})
    call("evict probe", "/evict", {})
    side.evict(a, toks)
    lookup("lookup after evict")
    call("clear known", "/clear", {"instance_id": b, "location": LOCATION})
    call("clear unknown", "/clear", {"instance_id": "nobody", "location": LOCATION})
    return out


def test_simulator_answers_like_the_real_controller(
    lmcache_python: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.real.conftest import HASHSEED, real_controller

    with real_controller(tmp_path_factory.mktemp("fidelity")) as rc, WorkerShim(
        lmcache_python, rc.pull, rc.reply, hashseed=HASHSEED
    ) as s:
        real = _scenario(_RealSide(rc, s), rc.url)
    with start_controller() as sim_url:
        sim = _scenario(_SimSide(sim_url), sim_url)
    diffs = [(r, m) for r, m in zip(real, sim, strict=True) if r != m]
    assert not diffs, "sim.controller differs from lmcache 0.5.6:\n" + "\n".join(
        f"  {r[0]}: real {r[1:]!r} / sim {m[1:]!r}" for r, m in diffs
    )


def test_simulator_hides_later_registered_holders_like_the_real_controller() -> None:
    # The simulator's default reports every holder (the facts file); its
    # `holders="first-registered"` switch is the live controller's behaviour (test above).
    from sim.controller import ControllerConfig

    with start_controller(ControllerConfig(holders="first-registered")) as url:
        side = _SimSide(url)
        toks = list(range(8_000_000, 8_000_800))
        side.register("long")
        side.register("short")
        side.admit("long", toks, 3)
        side.admit("short", toks, 2)
        got = httpx.post(f"{url}/lookup", json={"tokens": toks}).json()["layout_info"]
        assert got == {"long": [LOCATION, 768]}
