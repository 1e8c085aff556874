"""HTTP simulator of the LMCache 0.5.6 controller (``lmcache_controller``).

Endpoints, bodies and error behaviour follow ``/work/shared/facts/lmcache-controller.md``.
Request bodies are pydantic models on FastAPI, like the real (FastAPI-based) controller,
so malformed bodies get FastAPI's own 422 and failures are ``500 {"detail": "..."}``.

Cache contents come from engine simulators instead of ZMQ workers:
``POST /sim/register {"instance_id", "worker_id", "url"}`` and
``POST /sim/kv_events {"instance_id", "location", "admitted": [hash], "evicted": [hash]}``.
``/lookup`` hashes its tokens with ``sim.chunks`` and reports, for every registered
instance, the prefix it holds up to its first missing chunk.

Test hooks (never subject to faults): ``POST /sim/faults`` changes ``latency_ms``,
``error_rate``, ``hang``, ``garbage``, ``layout`` ("array" | "object"), ``api``
("0.5.6" | "0.3.0"), ``evict`` and ``hash_seed`` at runtime; ``GET /sim/state``;
``POST /sim/reset`` (forget chunks, keep registrations); ``POST /sim/deregister``.

Faults apply to every other path. ``api="0.3.0"`` serves the 0.3.0 shapes (no
``event_id``; ``/pin`` and ``/clear`` take ``locations``); ``evict=True`` adds the
``POST /evict`` that Pixiu's mock has and no real release does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field

from sim.chunks import CHUNK_SIZE, chunk_hashes
from sim.serving import add_server_args, serve_cli

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Layout = Literal["array", "object"]
ApiVersion = Literal["0.5.6", "0.3.0"]
Holders = Literal["all", "first-registered"]

# The real controller's text for pin/clear/compress on an instance with no workers.
# The live controller's wording on an unknown instance, per action (seen on 0.5.6).
TOKENS_MISMATCH = "The number of tokens {} should be the same across all workers."
DEFAULT_LOCATION = "LocalCPUBackend"

_V030_PREFIX = "/_v030"
_EVICT_PATH = "/_evict"
# The real API surface; with api=0.3.0 these are routed to the 0.3.0 handlers (paths
# 0.3.0 did not have then fall through to FastAPI's 404, as on a real 0.3.0 controller).
_API_PATHS = {
    "/lookup",
    "/pin",
    "/compress",
    "/decompress",
    "/clear",
    "/move",
    "/health",
    "/check_finish",
    "/query_worker_info",
    "/query_instance",
    "/controller/workers",
}


@dataclass
class ControllerConfig:
    host: str = "127.0.0.1"
    port: int = 9000
    layout: Layout = "array"
    api: ApiVersion = "0.5.6"
    evict: bool = False
    latency_ms: float = 0.0
    error_rate: float = 0.0
    hang: bool = False
    garbage: bool = False
    hash_seed: int = 0
    seed: int = 0
    holders: Holders = "all"


@dataclass
class Faults:
    latency_ms: float = 0.0
    error_rate: float = 0.0
    hang: bool = False
    garbage: bool = False
    layout: Layout = "array"
    api: ApiVersion = "0.5.6"
    evict: bool = False
    hash_seed: int = 0
    holders: Holders = "all"


@dataclass
class Instance:
    instance_id: str
    worker_id: int
    url: str
    ip: str
    port: int
    registration_time: float
    last_heartbeat_time: float
    chunks: dict[str, set[int]] = field(default_factory=dict)

    def location_of(self, h: int) -> str | None:
        for loc, held in self.chunks.items():
            if h in held:
                return loc
        return None

    def key_count(self) -> int:
        return sum(len(s) for s in self.chunks.values())

    def worker_info(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "worker_id": self.worker_id,
            "ip": self.ip,
            "port": self.port,
            "peer_init_url": None,
            "registration_time": self.registration_time,
            "last_heartbeat_time": self.last_heartbeat_time,
        }


class ControllerState:
    def __init__(self, cfg: ControllerConfig) -> None:
        self.faults = Faults(
            latency_ms=cfg.latency_ms,
            error_rate=cfg.error_rate,
            hang=cfg.hang,
            garbage=cfg.garbage,
            layout=cfg.layout,
            api=cfg.api,
            evict=cfg.evict,
            hash_seed=cfg.hash_seed,
            holders=cfg.holders,
        )
        self.instances: dict[str, Instance] = {}
        # Set when the server is stopping, so hung requests end instead of being cancelled.
        self.closing = False
        self.rng = random.Random(cfg.seed)
        self.counters: dict[str, int] = {
            "api_calls": 0,
            "injected_errors": 0,
            "kv_events": 0,
            "dropped_kv_events": 0,
        }

    def hashes(self, tokens: list[int]) -> list[int]:
        return chunk_hashes(tokens, self.faults.hash_seed)

    def prefix(
        self, inst: Instance, hashes: list[int], location: str | None = None
    ) -> tuple[int, str | None]:
        """Chunks of ``hashes`` ``inst`` holds before its first missing one, and where the
        first of them is."""
        n = 0
        first_loc: str | None = None
        for h in hashes:
            if location is not None:
                loc = location if h in inst.chunks.get(location, ()) else None
            else:
                loc = inst.location_of(h)
            if loc is None:
                break
            first_loc = first_loc or loc
            n += 1
        return n, first_loc

    def require(self, instance_id: str, action: str = "pinned") -> Instance:
        inst = self.instances.get(instance_id)
        if inst is None:
            raise HTTPException(status_code=500, detail=TOKENS_MISMATCH.format(action))
        return inst

    def layout_info(self, tokens: list[int]) -> dict[str, Any]:
        hashes = self.hashes(tokens)
        out: dict[str, Any] = {}
        if not hashes:
            return out
        found: dict[str, tuple[str | None, int]] = {}
        if self.faults.holders == "first-registered":
            # What the live 0.5.6 controller does (seen in tests/real): walk the chunks, take
            # the FIRST registered instance holding each, and report every instance with the
            # end of the last chunk it was picked for. A shorter holder registered after a
            # longer one is then not reported at all.
            for i, h in enumerate(hashes):
                inst = next((x for x in self.instances.values() if x.location_of(h)), None)
                if inst is None:
                    break
                found[inst.instance_id] = (inst.location_of(h), (i + 1) * CHUNK_SIZE)
        else:
            # Every holder with the prefix it holds, as the facts file describes.
            for inst in self.instances.values():
                n, loc = self.prefix(inst, hashes)
                if n:
                    found[inst.instance_id] = (loc, n * CHUNK_SIZE)
        for iid, (loc, matched) in found.items():
            # The real controller returns a tuple, i.e. a JSON array; "object" imitates the
            # Pixiu mock so clients can be tested against both.
            out[iid] = (
                [loc, matched] if self.faults.layout == "array" else {"0": loc, "1": matched}
            )
        return out


def _event_id(kind: str) -> str:
    return f"{kind}{uuid.uuid4()}"


# --- request bodies (field names and types as in lmcache's api_server) ---------------------


class LookupRequest(BaseModel):
    tokens: list[int]


class PinRequest(BaseModel):
    instance_id: str
    location: str
    tokens: list[int]


class CompressRequest(BaseModel):
    instance_id: str
    method: str
    location: str
    tokens: list[int] | None = []


class ClearRequest(BaseModel):
    instance_id: str
    location: str


class MoveRequest(BaseModel):
    old_position: tuple[str, str]
    new_position: tuple[str, str]
    tokens: list[int] | None = []
    should_copy: bool | None = False


class HealthRequest(BaseModel):
    instance_id: str


class CheckFinishRequest(BaseModel):
    event_id: str


class QueryWorkerInfoRequest(BaseModel):
    instance_id: str
    worker_ids: list[int] | None = None


class QueryInstRequest(BaseModel):
    event_id: str
    ip: str


class EvictRequest(BaseModel):
    instance_id: str
    tokens: list[int]


class Clear030Request(BaseModel):
    instance_id: str
    locations: list[str] | None = []
    tokens: list[int] | None = []


class Pin030Request(BaseModel):
    instance_id: str
    locations: list[str] | None = []
    tokens: list[int] | None = []


class Compress030Request(BaseModel):
    instance_id: str
    method: str
    locations: list[str] | None = []
    tokens: list[int] | None = []


class Move030Request(BaseModel):
    old_position: tuple[str, str]
    new_position: tuple[str, str]
    tokens: list[int] | None = []


class QueryInst030Request(BaseModel):
    ip: str


class _EventIdOnly(BaseModel):
    event_id: str


class RegisterRequest(BaseModel):
    instance_id: str
    worker_id: int = 0
    url: str


class DeregisterRequest(BaseModel):
    instance_id: str
    worker_id: int = 0


class KVEventsRequest(BaseModel):
    instance_id: str
    worker_id: int = 0
    location: str = DEFAULT_LOCATION
    admitted: list[int] = []
    evicted: list[int] = []


class FaultsUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    latency_ms: float | None = Field(default=None, ge=0)
    error_rate: float | None = Field(default=None, ge=0, le=1)
    hang: bool | None = None
    garbage: bool | None = None
    layout: Layout | None = None
    api: ApiVersion | None = None
    evict: bool | None = None
    hash_seed: int | None = None
    holders: Holders | None = None


# --- fault injection -----------------------------------------------------------------------


async def _send_raw(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class FaultInjector:
    """ASGI middleware: faults and API-version routing for every non-``/sim/`` path."""

    def __init__(self, app: ASGIApp, state: ControllerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/sim/"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        f = self.state.faults
        self.state.counters["api_calls"] += 1
        if path.startswith(_V030_PREFIX) or path == _EVICT_PATH:
            # Internal routing targets must not be reachable under their own names.
            await _send_raw(send, 404, b'{"detail":"Not Found"}', b"application/json")
            return
        if f.latency_ms > 0:
            await asyncio.sleep(f.latency_ms / 1000)
        if f.hang:
            resumed = await self._hang(receive)
            if resumed is None:
                return
            if self.state.closing:
                body = json.dumps({"detail": "controller shutting down"}).encode()
                await _send_raw(send, 503, body, b"application/json")
                return
            receive = resumed
        if f.error_rate > 0 and self.state.rng.random() < f.error_rate:
            self.state.counters["injected_errors"] += 1
            body = json.dumps({"detail": "simulated controller failure"}).encode()
            await _send_raw(send, 500, body, b"application/json")
            return
        if f.garbage:
            # Claims JSON but is not: the nastiest thing a broken upstream can return.
            await _send_raw(send, 200, b"<html>upstream garbage</html>", b"application/json")
            return
        if path == "/evict" and f.evict:
            path = _EVICT_PATH
        elif f.api == "0.3.0" and path in _API_PATHS:
            path = _V030_PREFIX + path
        if path != scope["path"]:
            scope = dict(scope)
            scope["path"] = path
            scope["raw_path"] = path.encode()
        await self.app(scope, receive, send)

    async def _hang(self, receive: Receive) -> Receive | None:
        """Hold the request while ``hang`` is on. Returns a replaying ``receive`` to carry on
        with, or None if the client went away (so a hung call does not outlive its client).
        """
        body: list[Message] = []
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            body.append(msg)
            if not msg.get("more_body", False):
                break
        pending = asyncio.ensure_future(receive())
        try:
            while self.state.faults.hang and not self.state.closing:
                done, _ = await asyncio.wait({pending}, timeout=0.05)
                if done and pending.result()["type"] == "http.disconnect":
                    return None
                if done:
                    pending = asyncio.ensure_future(receive())
        finally:
            pending.cancel()

        async def replay() -> Message:
            if body:
                return body.pop(0)
            return await receive()

        return replay


# --- the app -------------------------------------------------------------------------------


def create_app(cfg: ControllerConfig | None = None) -> FastAPI:
    """The FastAPI app of a simulated LMCache controller."""
    cfg = cfg or ControllerConfig()
    st = ControllerState(cfg)
    app = FastAPI(title="LMCache controller simulator")
    app.state.controller = st
    app.state.begin_shutdown = lambda: setattr(st, "closing", True)

    # ---- 0.5.6 API ----

    @app.post("/lookup")
    async def lookup(req: LookupRequest) -> dict[str, Any]:
        return {"event_id": _event_id("Lookup"), "layout_info": st.layout_info(req.tokens)}

    @app.post("/pin")
    async def pin(req: PinRequest) -> dict[str, Any]:
        inst = st.require(req.instance_id)
        n, _ = st.prefix(inst, st.hashes(req.tokens), req.location)
        return {"event_id": _event_id("Pin"), "num_tokens": n * CHUNK_SIZE}

    def _compress(req: CompressRequest) -> int:
        inst = st.require(req.instance_id, "compressed")
        # The worker only implements cachegen; any other method compresses nothing.
        if req.method != "cachegen":
            return 0
        if req.tokens:
            n, _ = st.prefix(inst, st.hashes(req.tokens), req.location)
            return n * CHUNK_SIZE
        return len(inst.chunks.get(req.location, ())) * CHUNK_SIZE

    @app.post("/compress")
    async def compress(req: CompressRequest) -> dict[str, Any]:
        return {"event_id": _event_id("Compress"), "num_tokens": _compress(req)}

    @app.post("/decompress")
    async def decompress(req: CompressRequest) -> dict[str, Any]:
        return {"event_id": _event_id("Decompress"), "num_tokens": _compress(req)}

    @app.post("/clear")
    async def clear(req: ClearRequest) -> dict[str, Any]:
        inst = st.require(req.instance_id, "cleared")
        dropped = inst.chunks.pop(req.location, set())
        return {"event_id": _event_id("Clear"), "num_tokens": len(dropped) * CHUNK_SIZE}

    def _move(
        old: tuple[str, str], new: tuple[str, str], tokens: list[int] | None, copy: bool
    ) -> int:
        src = st.require(old[0])
        dst = st.require(new[0])
        n, _ = st.prefix(src, st.hashes(tokens or []), old[1])
        moved = st.hashes(tokens or [])[:n]
        dst.chunks.setdefault(new[1], set()).update(moved)
        if not copy:
            src.chunks.get(old[1], set()).difference_update(moved)
        return n * CHUNK_SIZE

    @app.post("/move")
    async def move(req: MoveRequest) -> dict[str, Any]:
        n = _move(req.old_position, req.new_position, req.tokens, bool(req.should_copy))
        return {"event_id": _event_id("Move"), "num_tokens": n}

    @app.post("/health")
    async def health(req: HealthRequest) -> dict[str, Any]:
        inst = st.instances.get(req.instance_id)
        codes = {} if inst is None else {inst.worker_id: 0}
        return {"event_id": _event_id("health"), "error_codes": codes}

    @app.post("/check_finish")
    async def check_finish(req: CheckFinishRequest) -> dict[str, Any]:
        # 0.5.6 has the route but no handler behind it: every call fails.
        raise HTTPException(
            status_code=500, detail=""  # the live 0.5.6 controller's detail is empty
        )

    @app.post("/query_worker_info")
    async def query_worker_info(req: QueryWorkerInfoRequest) -> dict[str, Any]:
        if req.instance_id == "all":
            insts = list(st.instances.values())
        else:
            insts = [i for i in [st.instances.get(req.instance_id)] if i is not None]
        infos = [
            i.worker_info()
            for i in insts
            if req.worker_ids is None or i.worker_id in req.worker_ids
        ]
        return {"event_id": _event_id("QueryWorkerInfo"), "worker_infos": infos}

    def _instance_by_ip(ip: str) -> str:
        for inst in st.instances.values():
            if inst.ip == ip:
                return inst.instance_id
        raise HTTPException(status_code=500, detail=f"No instance found for ip {ip}")

    @app.post("/query_instance")
    async def query_instance(req: QueryInstRequest) -> dict[str, Any]:
        return {"event_id": _event_id("QueryInst"), "res": _instance_by_ip(req.ip)}

    @app.get("/controller/workers")
    async def controller_workers(
        instance_id: str | None = Query(default=None),
        worker_id: int | None = Query(default=None),
    ) -> dict[str, Any]:
        insts = list(st.instances.values())
        if instance_id is not None:
            insts = [i for i in insts if i.instance_id == instance_id]
            if worker_id is not None:
                insts = [i for i in insts if i.worker_id == worker_id]
                if not insts:
                    raise HTTPException(
                        status_code=404, detail=f"Worker ({instance_id}, {worker_id}) not found"
                    )
                return {**insts[0].worker_info(), "key_count": insts[0].key_count()}
            if not insts:
                raise HTTPException(
                    status_code=404, detail=f"No workers found for instance {instance_id}"
                )
        workers = [{**i.worker_info(), "key_count": i.key_count()} for i in insts]
        return {"workers": workers, "total_count": len(workers)}

    # ---- /evict (Pixiu mock only; routed here by FaultInjector when enabled) ----

    @app.post(_EVICT_PATH, include_in_schema=False)
    async def evict(req: EvictRequest) -> dict[str, Any]:
        inst = st.instances.get(req.instance_id)
        if inst is None:
            raise HTTPException(status_code=500, detail=f"Instance {req.instance_id} not found")
        hashes = set(st.hashes(req.tokens))
        removed = 0
        for held in inst.chunks.values():
            removed += len(held & hashes)
            held -= hashes
        return {"event_id": _event_id("Evict"), "num_tokens": removed * CHUNK_SIZE}

    # ---- 0.3.0 API (routed here by FaultInjector when api == "0.3.0") ----

    @app.post(_V030_PREFIX + "/lookup", include_in_schema=False)
    async def lookup_030(req: LookupRequest) -> dict[str, Any]:
        return {"layout_info": st.layout_info(req.tokens)}

    @app.post(_V030_PREFIX + "/pin", include_in_schema=False)
    async def pin_030(req: Pin030Request) -> dict[str, Any]:
        st.require(req.instance_id)
        return {"success": True}

    @app.post(_V030_PREFIX + "/clear", include_in_schema=False)
    async def clear_030(req: Clear030Request) -> dict[str, Any]:
        inst = st.require(req.instance_id)
        locations = req.locations or list(inst.chunks)
        hashes = set(st.hashes(req.tokens or []))
        for loc in locations:
            if hashes:
                inst.chunks.get(loc, set()).difference_update(hashes)
            else:
                inst.chunks.pop(loc, None)
        return {"success": True}

    def _v030_response_bug(event_id: str) -> None:
        # 0.3.0 builds CompressResponse/MoveResponse(success=...) although the model's only
        # field is event_id, so these calls always fail with pydantic's error text.
        try:
            _EventIdOnly(success=event_id)  # type: ignore[call-arg]
        except Exception as e:
            raise HTTPException(status_code=500, detail=str(e)) from e

    @app.post(_V030_PREFIX + "/compress", include_in_schema=False)
    async def compress_030(req: Compress030Request) -> dict[str, Any]:
        st.require(req.instance_id)
        _v030_response_bug(_event_id("Compress"))
        return {}

    @app.post(_V030_PREFIX + "/move", include_in_schema=False)
    async def move_030(req: Move030Request) -> dict[str, Any]:
        _move(req.old_position, req.new_position, req.tokens, False)
        _v030_response_bug(_event_id("Move"))
        return {}

    @app.post(_V030_PREFIX + "/health", include_in_schema=False)
    async def health_030(req: HealthRequest) -> dict[str, Any]:
        return {"alive": req.instance_id in st.instances}

    @app.post(_V030_PREFIX + "/check_finish", include_in_schema=False)
    async def check_finish_030(req: CheckFinishRequest) -> dict[str, Any]:
        return {"finished": True}

    @app.post(_V030_PREFIX + "/query_instance", include_in_schema=False)
    async def query_instance_030(req: QueryInst030Request) -> dict[str, Any]:
        return {"res": _instance_by_ip(req.ip)}

    # ---- simulator-only ----

    @app.post("/sim/register")
    async def sim_register(req: RegisterRequest) -> dict[str, Any]:
        parts = urlsplit(req.url)
        now = time.time()
        # A (re)registering engine has just started with an empty cache.
        st.instances[req.instance_id] = Instance(
            instance_id=req.instance_id,
            worker_id=req.worker_id,
            url=req.url,
            ip=parts.hostname or "",
            port=parts.port or 0,
            registration_time=now,
            last_heartbeat_time=now,
        )
        return {"ok": True}

    @app.post("/sim/deregister")
    async def sim_deregister(req: DeregisterRequest) -> dict[str, Any]:
        return {"ok": st.instances.pop(req.instance_id, None) is not None}

    @app.post("/sim/kv_events")
    async def sim_kv_events(req: KVEventsRequest) -> dict[str, Any]:
        inst = st.instances.get(req.instance_id)
        if inst is None:
            # Like the real controller, messages from unregistered workers go nowhere.
            st.counters["dropped_kv_events"] += 1
            return {"ok": False}
        st.counters["kv_events"] += 1
        inst.last_heartbeat_time = time.time()
        held = inst.chunks.setdefault(req.location, set())
        held.update(req.admitted)
        held.difference_update(req.evicted)
        return {"ok": True}

    @app.post("/sim/faults")
    async def sim_faults(req: FaultsUpdate) -> dict[str, Any]:
        for key, value in req.model_dump(exclude_none=True).items():
            setattr(st.faults, key, value)
        return asdict(st.faults)

    @app.post("/sim/reset")
    async def sim_reset() -> dict[str, Any]:
        for inst in st.instances.values():
            inst.chunks.clear()
        return {"ok": True}

    @app.get("/sim/state")
    async def sim_state() -> dict[str, Any]:
        return {
            "faults": asdict(st.faults),
            "counters": dict(st.counters),
            "instances": {
                iid: {
                    "worker_id": inst.worker_id,
                    "url": inst.url,
                    "num_chunks": inst.key_count(),
                    "locations": {loc: sorted(h) for loc, h in inst.chunks.items()},
                }
                for iid, inst in st.instances.items()
            },
        }

    # Middleware wraps the router, so faults and version routing see every request first.
    app.add_middleware(FaultInjector, state=st)
    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sim.controller", description="Simulated LMCache 0.5.6 controller."
    )
    add_server_args(p, default_port=9000)
    p.add_argument("--layout", choices=["array", "object"], default="array")
    p.add_argument("--api", choices=["0.5.6", "0.3.0"], default="0.5.6")
    p.add_argument("--evict", action="store_true", help="serve POST /evict (Pixiu mock)")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--hang", action="store_true")
    p.add_argument("--garbage", action="store_true")
    p.add_argument("--hash-seed", type=int, default=0)
    p.add_argument("--holders", choices=["all", "first-registered"], default="all",
                   help="lookup reports every holder (facts file) or, per chunk, only the "
                        "first-registered one (the live 0.5.6 controller)")
    p.add_argument("--seed", type=int, default=0, help="seed of the error-rate draws")
    return p


def config_from_args(args: argparse.Namespace) -> ControllerConfig:
    return ControllerConfig(
        host=args.host,
        port=args.port,
        layout=args.layout,
        api=args.api,
        evict=args.evict,
        latency_ms=args.latency_ms,
        error_rate=args.error_rate,
        hang=args.hang,
        garbage=args.garbage,
        hash_seed=args.hash_seed,
        holders=args.holders,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    serve_cli(lambda _url: create_app(cfg), args)


if __name__ == "__main__":
    main()
