"""Clients for LMCache's MP coordinator (``python -m lmcache.v1.mp_coordinator``, 0.5.6), the
second control plane next to the legacy controller (addon/lmcache.py).

Contract (checked on a live coordinator; the wire models are
``lmcache/v1/mp_coordinator/schemas.py``):

- ``POST /directory/lookup {token_ids, model_name, world_size, cache_salt}`` answers
  ``{"chunks": n, "results": [{"key": {chunk_hash_hex, model_name, kv_rank,
  object_group_id, cache_salt}, "placements": [{instance_id, incarnation, tier, backend,
  size_bytes, shared}], "token_ids": [...], "access_count"}]}``: one result per (chunk,
  rank[, other object group]), chunk-major, in prefix order. Chunk hashes are prefix-chained,
  so the whole sequence goes in every time; an incomplete last chunk is ignored. EVERY
  holder of a chunk is listed (the legacy controller names only one). An unknown model
  is no error: the placements are just empty. Over 1,000,000 token ids is a 400; an empty
  ``token_ids`` is a 422 (the body must name exactly one of keys/token_ids).
- ``POST /cache/delete {instance_id, model_name, world_size, token_ids, cache_salt, tier,
  force}`` -> ``{instance_id, requested (chunks), affected (keys removed), skipped,
  status: deleted|noop}``; 404 for an instance that never registered (``POST /instances``),
  502 when that MP server is unreachable. The coordinator forwards it to the server's
  ``DELETE /cache/objects``; the directory changes only when the server's delete events
  come back on ``/events``.
- ``POST /cache/pins`` (fleet-wide L2 eviction protection, by tokens), ``GET /instances``,
  ``GET /healthz`` -> ``{"status": "healthy"}``, ``GET /directory/stats``,
  ``GET /directory/keys``. There is no compress or clear route.

A lookup answer becomes the same ``LookupResult`` the legacy client returns, so the router
needs no change: per instance, the tokens of the LEADING run of chunks it holds.
"""

from __future__ import annotations

import asyncio
import logging
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from addon.http1 import HttpxJSON, JSONClient
from addon.lmcache import LookupResult, _answer, _json
from addon.resilience import UnparsableResponse

logger = logging.getLogger(__name__)

CHUNK_SIZE = 256  # the coordinator's --chunk-size default; the answer overrides it when it can
# Evictions delete from L1 only: L2 may be a pool shared by the fleet (an S3 bucket, a CXL
# pool), and deleting there would take the prefix away from every other instance too.
DELETE_TIER = "l1"

View = Literal["controller", "coordinator"]


class Unsupported(NotImplementedError):
    """The coordinator has no route for this cache action (compress, clear)."""


@dataclass(frozen=True)
class _Chunk:
    hash: str
    holders: frozenset[str]
    locations: dict[str, str]  # instance -> "<tier>/<backend>"
    tokens: int  # token ids the directory knows for this chunk (0 = unknown)


def _placements(result: dict[str, Any]) -> dict[str, str]:
    """instance id -> "<tier>/<backend>" for one key; L1 wins over L2 when both are held,
    since that is where a hit is served from."""
    raw = result.get("placements")
    if not isinstance(raw, list):
        raise UnparsableResponse("directory lookup result has no placements list")
    best: dict[str, tuple[str, str]] = {}
    for p in raw:
        if not isinstance(p, dict):
            raise UnparsableResponse(f"directory placement is not an object: {p!r:.80}")
        inst, tier, backend = p.get("instance_id"), p.get("tier"), p.get("backend")
        if not (isinstance(inst, str) and isinstance(tier, str) and isinstance(backend, str)):
            raise UnparsableResponse(f"directory placement of unknown shape: {p!r:.120}")
        if inst not in best or tier < best[inst][0]:  # "l1" < "l2"
            best[inst] = (tier, backend)
    return {inst: f"{tier}/{backend}" for inst, (tier, backend) in best.items()}


def _chunks(results: list[Any]) -> list[_Chunk]:
    """Group the per-key results into chunks, in prefix order.

    One chunk has one key per rank (world_size > 1) and maybe copies in other object
    groups; results of one chunk are adjacent. An instance holds the chunk only if it holds
    every rank's key of the lowest object group (the keys the tokens resolve to), since a
    partial set of ranks is no hit.
    """
    groups: list[tuple[str, list[dict[str, Any]]]] = []
    for r in results:
        if not isinstance(r, dict) or not isinstance(r.get("key"), dict):
            raise UnparsableResponse(f"directory lookup result of unknown shape: {r!r:.120}")
        h = r["key"].get("chunk_hash_hex")
        if not isinstance(h, str):
            raise UnparsableResponse("directory lookup key has no chunk_hash_hex")
        if groups and groups[-1][0] == h:
            groups[-1][1].append(r)
        else:
            groups.append((h, [r]))
    chunks = []
    for h, rs in groups:
        group_of = [r["key"].get("object_group_id", 0) for r in rs]
        if not all(isinstance(g, int) for g in group_of):
            raise UnparsableResponse("directory lookup key has a non-integer object_group_id")
        low = min(group_of)
        per_key = [_placements(r) for r, g in zip(rs, group_of, strict=True) if g == low]
        holders = frozenset.intersection(*(frozenset(p) for p in per_key))
        token_ids = rs[0].get("token_ids", [])
        if not isinstance(token_ids, list):
            raise UnparsableResponse("directory lookup token_ids is not a list")
        chunks.append(_Chunk(h, holders, {i: per_key[0][i] for i in holders}, len(token_ids)))
    return chunks


def parse_directory_lookup(
    data: Any, n_tokens: int, chunk_size: int = CHUNK_SIZE
) -> LookupResult:
    """Read a ``/directory/lookup`` answer: per instance, the tokens covered by the leading
    run of chunks it holds (a gap ends its run: later chunks cannot be used without the
    earlier ones), and where its deepest matched chunk sits. Instance ids are passed
    through as they are; the router decides what an unknown one means."""
    if not isinstance(data, dict):
        raise UnparsableResponse("directory lookup answer is not an object")
    n_chunks, results = data.get("chunks"), data.get("results")
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 0:
        raise UnparsableResponse("directory lookup answer has no chunks count")
    if not isinstance(results, list):
        raise UnparsableResponse("directory lookup answer has no results list")
    chunks = _chunks(results)
    if len(chunks) > n_chunks:
        raise UnparsableResponse(
            f"directory lookup answer lists {len(chunks)} chunks but says chunks={n_chunks}")
    # The chunk's own token ids say the coordinator's chunk size when the directory knows
    # them; otherwise trust the configured one (the doctor checks they agree).
    size = next((c.tokens for c in chunks if c.tokens), chunk_size)
    run: dict[str, int] = {}
    locations: dict[str, str] = {}
    for i, chunk in enumerate(chunks):
        for inst in chunk.holders:
            if run.get(inst, 0) == i:  # held every chunk before this one
                run[inst] = i + 1
                locations[inst] = chunk.locations[inst]
    matches = {inst: min(n * size, n_tokens) for inst, n in run.items()}
    # Every coordinator placement is an LMCache tier (L1 host memory, L2 remote): the
    # engine must load it before use, so each match is a lower-tier one for the policy.
    return LookupResult(matches, locations, None, lower_tier=frozenset(matches))


@dataclass(frozen=True)
class _Namespace:
    """What, besides the tokens, the coordinator hashes into every key."""

    model: str
    world_size: int = 1
    cache_salt: str = ""

    def body(self, ids: Sequence[int]) -> dict[str, Any]:
        return {"token_ids": ids, "model_name": self.model, "world_size": self.world_size,
                "cache_salt": self.cache_salt}


class AsyncCoordinator:
    """The request path's client: one ``/directory/lookup`` per routed request, over the
    lean keep-alive client (addon/http1.py)."""

    def __init__(
        self, base_url: str, model: str, *, world_size: int = 1, cache_salt: str = "",
        chunk_size: int = CHUNK_SIZE, transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._ns = _Namespace(model, world_size, cache_salt)
        self.chunk_size = chunk_size
        self._client: JSONClient | HttpxJSON = (
            JSONClient(base_url) if transport is None else HttpxJSON(base_url, transport))

    async def lookup(self, tokens: Sequence[int], timeout: float) -> LookupResult:
        # orjson takes lists and tuples as they are (no copy of a long prompt); not arrays.
        ids = tokens.tolist() if isinstance(tokens, array) else tokens
        if not ids:  # the coordinator answers an empty token_ids with a 422
            return LookupResult()
        async with asyncio.timeout(timeout):
            resp = await self._client.post("/directory/lookup", self._ns.body(ids))
        data = _answer(resp.status, resp.body, "/directory/lookup")
        return parse_directory_lookup(data, len(ids), self.chunk_size)

    async def aclose(self) -> None:
        await self._client.aclose()


class Coordinator:
    """The background pool's client (blocking calls, from worker threads only). Offers the
    legacy ``LMCache`` client's action methods so the cache manager can take either."""

    def __init__(
        self, base_url: str, model: str, *, world_size: int = 1, cache_salt: str = "",
        chunk_size: int = CHUNK_SIZE, delete_tier: str = DELETE_TIER,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._ns = _Namespace(model, world_size, cache_salt)
        self.chunk_size = chunk_size
        self.delete_tier = delete_tier
        self._client = httpx.Client(base_url=base_url, transport=transport)

    def _post(self, path: str, body: dict[str, Any], timeout: float) -> Any:
        return _json(self._client.post(path, json=body, timeout=timeout))

    def _get(self, path: str, timeout: float, **params: Any) -> Any:
        return _json(self._client.get(path, params=params or None, timeout=timeout))

    def lookup(self, tokens: Sequence[int], timeout: float) -> LookupResult:
        ids = list(tokens)
        if not ids:
            return LookupResult()
        data = self._post("/directory/lookup", self._ns.body(ids), timeout)
        return parse_directory_lookup(data, len(ids), self.chunk_size)

    def delete(self, instance_id: str, tokens: Sequence[int], timeout: float) -> int:
        """Targeted delete of this prefix on one instance; returns the keys it removed (the
        coordinator's ``affected``: chunks x ranks, per tier acted on)."""
        body = {"instance_id": instance_id, **self._ns.body(list(tokens)),
                "tier": self.delete_tier, "force": False}
        data = self._post("/cache/delete", body, timeout)
        n = data.get("affected") if isinstance(data, dict) else None
        if isinstance(n, bool) or not isinstance(n, int):
            raise UnparsableResponse("/cache/delete answer has no affected count")
        return n

    def instances(self, timeout: float) -> list[str]:
        """The MP servers registered with the coordinator (``POST /instances``); an instance
        that only sends events is not listed (see ``stats()['l1_keys_by_instance']``)."""
        data = self._get("/instances", timeout)
        rows = data.get("instances") if isinstance(data, dict) else None
        if not isinstance(rows, list) or not all(
                isinstance(r, dict) and isinstance(r.get("instance_id"), str) for r in rows):
            raise UnparsableResponse("/instances answer has no instances list")
        return [r["instance_id"] for r in rows]

    def healthz(self, timeout: float) -> bool:
        data = self._get("/healthz", timeout)
        return isinstance(data, dict) and data.get("status") == "healthy"

    def stats(self, timeout: float) -> dict[str, Any]:
        data = self._get("/directory/stats", timeout)
        if not isinstance(data, dict) or not isinstance(data.get("num_keys"), int):
            raise UnparsableResponse("/directory/stats answer has no num_keys")
        return data

    def keys(self, timeout: float, limit: int = 1000) -> list[dict[str, Any]]:
        """One page of ``GET /directory/keys``: ``{key, placements, num_tokens, ...}`` rows."""
        data = self._get("/directory/keys", timeout, limit=limit)
        rows = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(rows, list) or not all(
                isinstance(r, dict) and isinstance(r.get("key"), dict) for r in rows):
            raise UnparsableResponse("/directory/keys answer has no keys list")
        return rows

    # --- the legacy client's action surface, for the cache manager ------------------------

    def evict(self, instance_id: str, tokens: Sequence[int], timeout: float) -> int:
        return self.delete(instance_id, tokens, timeout)

    def has_evict(self, timeout: float = 0.0) -> bool:
        """Always: ``/cache/delete`` is part of every coordinator (no probe needed)."""
        return True

    def pin(self, instance_id: str, location: str, tokens: Sequence[int], timeout: float) -> int:
        """``POST /cache/pins``: keeps the prefix's L2 keys out of the coordinator's eviction
        plan, fleet-wide. Not the legacy per-instance pin: instance and location are not
        part of the request. Returns the keys pinned."""
        resp = self._client.post("/cache/pins", json=self._ns.body(list(tokens)),
                                 timeout=timeout)
        if resp.status_code in (404, 405):  # a coordinator run without its eviction controller
            raise Unsupported("this coordinator serves no /cache/pins (no eviction controller)")
        data = _json(resp)
        n = data.get("affected") if isinstance(data, dict) else None
        if isinstance(n, bool) or not isinstance(n, int):
            raise UnparsableResponse("/cache/pins answer has no affected count")
        return n

    def compress(
        self, instance_id: str, location: str, method: str, tokens: Sequence[int], timeout: float
    ) -> int:
        raise Unsupported("the LMCache MP coordinator has no compress route")

    def clear(self, instance_id: str, location: str, timeout: float) -> int:
        raise Unsupported("the LMCache MP coordinator has no clear route; "
                          "eviction uses the targeted /cache/delete")

    def close(self) -> None:
        self._client.close()


def probe_view(
    url: str, timeout: float, transport: httpx.BaseTransport | None = None
) -> View | None:
    """What ``url`` serves, for ``cache_view: auto``: the MP coordinator (``/healthz`` says
    healthy and ``/directory/stats`` answers), the legacy controller (``POST /lookup``
    exists), or None (neither answered, or something else is there)."""
    with httpx.Client(base_url=url, transport=transport, timeout=timeout) as c:
        try:
            health = c.get("/healthz")
            if health.status_code == 200 and _is_obj(health, "status", "healthy"):
                stats = c.get("/directory/stats")
                if stats.status_code == 200 and _is_obj(stats, "num_keys"):
                    return "coordinator"
        except httpx.HTTPError as e:
            logger.debug(f"[kvcache] coordinator probe of {url}: {e!r}")
        try:
            # 422 is the route rejecting an odd body: still a controller (0.3.0 bodies).
            lookup = c.post("/lookup", json={"tokens": [0]})
            if lookup.status_code == 422 or (
                    lookup.status_code == 200 and _is_obj(lookup, "layout_info")):
                return "controller"
        except httpx.HTTPError as e:
            logger.debug(f"[kvcache] controller probe of {url}: {e!r}")
    return None


def _is_obj(resp: httpx.Response, key: str, value: Any = None) -> bool:
    try:
        data = resp.json()
    except ValueError:
        return False
    return isinstance(data, dict) and key in data and (value is None or data[key] == value)


__all__ = [
    "AsyncCoordinator",
    "Coordinator",
    "Unsupported",
    "parse_directory_lookup",
    "probe_view",
]
