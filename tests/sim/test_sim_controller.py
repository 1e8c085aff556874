"""Contract tests of the LMCache controller simulator against
/work/shared/facts/lmcache-controller.md (0.5.6, plus the 0.3.0 and Pixiu-mock variants)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from sim.chunks import chunk_hashes
from sim.controller import TOKENS_MISMATCH

# One client for the module: a new httpx client per call costs ~30 ms of TLS setup.
http = httpx.Client(timeout=10)


LOC = "LocalCPUBackend"
PROMPT = list(range(1000, 1800))  # 800 tokens: 3 full chunks
HASHES = chunk_hashes(PROMPT)


def register(ctl: str, iid: str, port: int = 8001) -> None:
    r = http.post(
        f"{ctl}/sim/register",
        json={"instance_id": iid, "worker_id": 0, "url": f"http://127.0.0.1:{port}"},
    )
    r.raise_for_status()


def kv(ctl: str, iid: str, admitted: Sequence[int] = (), evicted: Sequence[int] = ()) -> None:
    r = http.post(
        f"{ctl}/sim/kv_events",
        json={
            "instance_id": iid,
            "location": LOC,
            "admitted": list(admitted),
            "evicted": list(evicted),
        },
    )
    r.raise_for_status()


def faults(ctl: str, **kw: Any) -> None:
    http.post(f"{ctl}/sim/faults", json=kw).raise_for_status()


def post(ctl: str, path: str, body: Any, **kw: Any) -> httpx.Response:
    return http.post(ctl + path, json=body, **kw)


def assert_500(r: httpx.Response, detail: str | None = None) -> None:
    assert r.status_code == 500
    body = r.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str)
    if detail is not None:
        assert body["detail"] == detail


@pytest.fixture
def two(controller: str) -> str:
    """inst-1 holds 2 chunks and inst-2 all 3 chunks of PROMPT (the facts' observation)."""
    register(controller, "inst-1", 8001)
    register(controller, "inst-2", 8002)
    kv(controller, "inst-1", HASHES[:2])
    kv(controller, "inst-2", HASHES)
    return controller


# --- lookup --------------------------------------------------------------------------------


def test_lookup_empty(controller: str) -> None:
    r = post(controller, "/lookup", {"tokens": list(range(5000, 5600))})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"event_id", "layout_info"}
    assert body["event_id"].startswith("Lookup") and len(body["event_id"]) == 6 + 36
    assert body["layout_info"] == {}


def test_lookup_reports_every_holder_as_arrays(two: str) -> None:
    body = post(two, "/lookup", {"tokens": PROMPT}).json()
    assert body["layout_info"] == {"inst-1": [LOC, 512], "inst-2": [LOC, 768]}
    kv(two, "inst-1", evicted=HASHES[:2])
    assert post(two, "/lookup", {"tokens": PROMPT}).json()["layout_info"] == {"inst-2": [LOC, 768]}


def test_lookup_stops_at_first_missing_chunk(controller: str) -> None:
    register(controller, "inst-1")
    kv(controller, "inst-1", [HASHES[0], HASHES[2]])
    assert post(controller, "/lookup", {"tokens": PROMPT}).json()["layout_info"] == {
        "inst-1": [LOC, 256]
    }
    kv(controller, "inst-1", evicted=[HASHES[0]])
    assert post(controller, "/lookup", {"tokens": PROMPT}).json()["layout_info"] == {}


def test_lookup_short_prompt_never_matches(two: str) -> None:
    assert post(two, "/lookup", {"tokens": PROMPT[:255]}).json()["layout_info"] == {}
    assert post(two, "/lookup", {"tokens": PROMPT[:256]}).json()["layout_info"] == {
        "inst-1": [LOC, 256],
        "inst-2": [LOC, 256],
    }


def test_layout_object_variant(two: str) -> None:
    faults(two, layout="object")
    info = post(two, "/lookup", {"tokens": PROMPT}).json()["layout_info"]
    assert info == {"inst-1": {"0": LOC, "1": 512}, "inst-2": {"0": LOC, "1": 768}}
    faults(two, layout="array")
    assert post(two, "/lookup", {"tokens": PROMPT}).json()["layout_info"]["inst-1"] == [LOC, 512]


def test_hash_seed_mismatch_silently_matches_nothing(two: str) -> None:
    faults(two, hash_seed=42)
    r = post(two, "/lookup", {"tokens": PROMPT})
    assert r.status_code == 200 and r.json()["layout_info"] == {}


# --- the other 0.5.6 endpoints -------------------------------------------------------------


def test_pin(two: str) -> None:
    r = post(two, "/pin", {"instance_id": "inst-2", "location": LOC, "tokens": PROMPT})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"event_id", "num_tokens"} and body["event_id"].startswith("Pin")
    assert body["num_tokens"] == 768


@pytest.mark.parametrize(
    ("path", "body", "action"),
    [
        ("/pin", {"instance_id": "ghost", "location": LOC, "tokens": PROMPT}, "pinned"),
        ("/clear", {"instance_id": "ghost", "location": LOC}, "cleared"),
        ("/compress", {"instance_id": "ghost", "method": "cachegen", "location": LOC},
         "compressed"),
    ],
)
def test_unknown_instance_is_500(
    controller: str, path: str, body: dict[str, Any], action: str
) -> None:
    # The live 0.5.6 controller's wording, per action.
    assert_500(post(controller, path, body), TOKENS_MISMATCH.format(action))


def test_compress_only_cachegen(two: str) -> None:
    base = {"instance_id": "inst-2", "location": LOC, "tokens": PROMPT}
    r = post(two, "/compress", {**base, "method": "cachegen"})
    assert r.status_code == 200
    assert set(r.json()) == {"event_id", "num_tokens"}
    assert r.json()["event_id"].startswith("Compress") and r.json()["num_tokens"] == 768
    assert post(two, "/compress", {**base, "method": "zstd"}).json()["num_tokens"] == 0
    d = post(two, "/decompress", {**base, "method": "cachegen"})
    assert d.status_code == 200 and set(d.json()) == {"event_id", "num_tokens"}


def test_clear_drops_everything_at_location(two: str) -> None:
    r = post(two, "/clear", {"instance_id": "inst-2", "location": LOC})
    assert r.status_code == 200
    assert set(r.json()) == {"event_id", "num_tokens"} and r.json()["num_tokens"] == 768
    assert post(two, "/lookup", {"tokens": PROMPT}).json()["layout_info"] == {"inst-1": [LOC, 512]}


def test_move(two: str) -> None:
    body = {
        "old_position": ["inst-2", LOC],
        "new_position": ["inst-1", "LocalDiskBackend"],
        "tokens": PROMPT,
        "should_copy": False,
    }
    r = post(two, "/move", body)
    assert r.status_code == 200
    assert set(r.json()) == {"event_id", "num_tokens"} and r.json()["num_tokens"] == 768
    info = post(two, "/lookup", {"tokens": PROMPT}).json()["layout_info"]
    assert info == {"inst-1": [LOC, 768]}  # its first chunk still lives in LocalCPUBackend


def test_health(two: str) -> None:
    r = post(two, "/health", {"instance_id": "inst-1"})
    assert r.status_code == 200
    assert set(r.json()) == {"event_id", "error_codes"} and r.json()["error_codes"] == {"0": 0}
    ghost = post(two, "/health", {"instance_id": "ghost"})
    assert ghost.status_code == 200 and ghost.json()["error_codes"] == {}


def test_check_finish_always_500(controller: str) -> None:
    assert_500(post(controller, "/check_finish", {"event_id": "Pin123"}), "")


def test_worker_queries(two: str) -> None:
    r = post(two, "/query_worker_info", {"instance_id": "all", "worker_ids": None})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"event_id", "worker_infos"}
    ids = sorted(w["instance_id"] for w in body["worker_infos"])
    assert {"inst-1", "inst-2"} <= set(ids)
    assert set(body["worker_infos"][0]) == {
        "instance_id",
        "worker_id",
        "ip",
        "port",
        "peer_init_url",
        "registration_time",
        "last_heartbeat_time",
    }
    one = post(two, "/query_worker_info", {"instance_id": "inst-1"}).json()
    assert [w["instance_id"] for w in one["worker_infos"]] == ["inst-1"]
    q = post(two, "/query_instance", {"event_id": "x", "ip": "127.0.0.1"})
    assert q.status_code == 200 and set(q.json()) == {"event_id", "res"}
    assert q.json()["res"] in {"inst-1", "inst-2"}
    assert_500(post(two, "/query_instance", {"event_id": "x", "ip": "10.9.9.9"}))


def test_controller_workers(two: str) -> None:
    body = http.get(f"{two}/controller/workers").json()
    assert set(body) == {"workers", "total_count"}
    assert body["total_count"] == len(body["workers"]) >= 2
    w = {x["instance_id"]: x for x in body["workers"]}
    assert w["inst-2"]["key_count"] == 3
    assert http.get(f"{two}/controller/workers", params={"instance_id": "ghost"}).status_code == 404


# --- malformed bodies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/lookup", {"tokens": "abc"}),
        ("/lookup", {}),
        ("/pin", {"instance_id": "x", "tokens": [1]}),
        ("/health", {"instance": "x"}),
        ("/move", {"old_position": ["a"], "new_position": ["b", "c"]}),
        ("/lookup", b"{oops"),
    ],
)
def test_malformed_body_is_fastapi_422(controller: str, path: str, body: Any) -> None:
    if isinstance(body, bytes):
        r = http.post(controller + path, content=body, headers={"content-type": "application/json"})
    else:
        r = post(controller, path, body)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail
    assert {"type", "loc", "msg"} <= set(detail[0]) and detail[0]["loc"][0] == "body"


# --- 0.3.0 API -----------------------------------------------------------------------------


def test_api_030_shapes(two: str) -> None:
    faults(two, api="0.3.0")
    assert post(two, "/lookup", {"tokens": PROMPT}).json() == {
        "layout_info": {"inst-1": [LOC, 512], "inst-2": [LOC, 768]}
    }
    pin = post(two, "/pin", {"instance_id": "inst-1", "locations": [LOC], "tokens": PROMPT})
    assert pin.status_code == 200 and pin.json() == {"success": True}
    assert post(two, "/health", {"instance_id": "inst-1"}).json() == {"alive": True}
    assert post(two, "/check_finish", {"event_id": "e"}).json() == {"finished": True}
    assert post(two, "/query_instance", {"ip": "127.0.0.1"}).json()["res"] in {"inst-1", "inst-2"}
    clear = post(two, "/clear", {"instance_id": "inst-1", "locations": [LOC]})
    assert clear.json() == {"success": True}
    assert "inst-1" not in post(two, "/lookup", {"tokens": PROMPT}).json()["layout_info"]
    # 0.3.0 had no /decompress nor /query_worker_info.
    assert post(two, "/decompress", {}).status_code == 404
    assert post(two, "/query_worker_info", {"instance_id": "all"}).status_code == 404
    # 0.3.0's /compress answers with a response model it cannot build: always 500.
    assert_500(post(two, "/compress", {"instance_id": "inst-2", "method": "cachegen"}))
    faults(two, api="0.5.6")
    assert "event_id" in post(two, "/lookup", {"tokens": PROMPT}).json()


# --- /evict switch -------------------------------------------------------------------------


def test_evict_only_when_enabled(two: str) -> None:
    body = {"instance_id": "inst-2", "tokens": PROMPT}
    off = post(two, "/evict", body)
    assert off.status_code == 404 and off.json() == {"detail": "Not Found"}
    assert post(two, "/_evict", body).status_code == 404
    faults(two, evict=True)
    on = post(two, "/evict", body)
    assert on.status_code == 200
    assert set(on.json()) == {"event_id", "num_tokens"} and on.json()["num_tokens"] == 768
    assert post(two, "/lookup", {"tokens": PROMPT}).json()["layout_info"] == {"inst-1": [LOC, 512]}


# --- faults --------------------------------------------------------------------------------


def test_latency_fault(controller: str) -> None:
    faults(controller, latency_ms=250)
    t0 = time.monotonic()
    assert post(controller, "/lookup", {"tokens": [1]}).status_code == 200
    assert time.monotonic() - t0 >= 0.25
    t0 = time.monotonic()
    http.get(f"{controller}/sim/state").raise_for_status()  # /sim/ is exempt
    assert time.monotonic() - t0 < 0.2


def test_error_rate_fault(controller: str) -> None:
    faults(controller, error_rate=1.0)
    for _ in range(3):
        assert_500(post(controller, "/lookup", {"tokens": PROMPT}))
    assert http.get(f"{controller}/sim/state").status_code == 200
    faults(controller, error_rate=0.5)
    codes = [post(controller, "/lookup", {"tokens": [1]}).status_code for _ in range(40)]
    assert 5 <= codes.count(500) <= 35 and codes.count(200) + codes.count(500) == 40
    faults(controller, error_rate=0.0)
    assert post(controller, "/lookup", {"tokens": PROMPT}).status_code == 200


def test_hang_fault_needs_client_timeout(controller: str) -> None:
    faults(controller, hang=True)
    with pytest.raises(httpx.ReadTimeout):
        post(controller, "/lookup", {"tokens": PROMPT}, timeout=0.3)
    with pytest.raises(httpx.ReadTimeout):
        post(controller, "/health", {"instance_id": "x"}, timeout=0.3)
    assert http.get(f"{controller}/sim/state", timeout=1).status_code == 200
    faults(controller, hang=False)
    assert post(controller, "/lookup", {"tokens": PROMPT}, timeout=2).status_code == 200


def test_hang_released_mid_request(controller: str) -> None:
    faults(controller, hang=True)
    import threading

    result: list[int] = []
    t = threading.Thread(
        target=lambda: result.append(post(controller, "/lookup", {"tokens": [1]}).status_code)
    )
    t.start()
    time.sleep(0.3)
    assert not result
    faults(controller, hang=False)
    t.join(timeout=2)
    assert result == [200]


def test_garbage_fault(controller: str) -> None:
    faults(controller, garbage=True)
    r = post(controller, "/lookup", {"tokens": PROMPT})
    assert r.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.content)
    faults(controller, garbage=False)
    assert post(controller, "/lookup", {"tokens": PROMPT}).json()["layout_info"] == {}


def test_faults_endpoint_validates(controller: str) -> None:
    assert http.post(f"{controller}/sim/faults", json={"layout": "tuple"}).status_code == 422
    assert http.post(f"{controller}/sim/faults", json={"error_rate": 2}).status_code == 422
    assert http.post(f"{controller}/sim/faults", json={"bogus": 1}).status_code == 422


def test_first_registered_holders_switch_matches_the_live_controller() -> None:
    from sim.chunks import chunk_hashes
    from sim.cluster import start_controller
    from sim.controller import ControllerConfig

    toks = list(range(5_000_000, 5_000_800))
    hashes = chunk_hashes(toks)

    def lookup(url: str) -> dict[str, Any]:
        return httpx.post(f"{url}/lookup", json={"tokens": toks}).json()["layout_info"]

    for order, expected in (
        (["short", "long"], {"short": [LOC, 512], "long": [LOC, 768]}),
        (["long", "short"], {"long": [LOC, 768]}),
    ):
        with start_controller(ControllerConfig(holders="first-registered")) as url:
            for iid in order:
                httpx.post(f"{url}/sim/register", json={
                    "instance_id": iid, "worker_id": 0, "url": "http://127.0.0.1:1"})
            for iid, n in (("short", 2), ("long", 3)):
                httpx.post(f"{url}/sim/kv_events", json={
                    "instance_id": iid, "location": LOC, "admitted": hashes[:n],
                    "evicted": []})
            assert lookup(url) == expected, order
    with start_controller() as url:  # the default reports every holder
        for iid, n in (("long", 3), ("short", 2)):
            httpx.post(f"{url}/sim/register", json={
                "instance_id": iid, "worker_id": 0, "url": "http://127.0.0.1:1"})
            httpx.post(f"{url}/sim/kv_events", json={
                "instance_id": iid, "location": LOC, "admitted": hashes[:n], "evicted": []})
        assert lookup(url) == {"long": [LOC, 768], "short": [LOC, 512]}
