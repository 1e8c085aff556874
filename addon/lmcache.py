"""Thin client for the LMCache controller's HTTP API, and the parsing of its answers.

Contract (lmcache 0.5.6, checked on a live controller): every call is a JSON POST; errors
are HTTP 500 `{"detail": ...}` or 422 for a malformed body; `/lookup` answers
`{"event_id", "layout_info": {instance_id: [location, matched_tokens]}}`. Pixiu's mock sends
`{"0": location, "1": matched_tokens}` objects instead; both are read. There is no `/evict`
in released versions; some builds and Pixiu's mock have one.
"""

from __future__ import annotations

import asyncio
import logging
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

try:
    # httpx imports its async backend on the first request, blocking the event loop ~70 ms;
    # importing it at load time keeps the first routed request within its budget.
    import anyio._backends._asyncio  # noqa: F401
except ImportError:  # a different anyio layout only costs that first request
    pass

from addon.http1 import HttpxJSON, JSONClient, loads
from addon.resilience import StatusError, UnparsableResponse

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LookupResult:
    matches: dict[str, int] = field(default_factory=dict)  # instance id -> matched tokens
    locations: dict[str, str] = field(default_factory=dict)
    event_id: str | None = None
    # Instances whose match sits on a tier below the engine's GPU, for views that can tell
    # (KV events' medium, the MP coordinator's tiers): loading it still costs something.
    lower_tier: frozenset[str] = frozenset()


def _layout_value(value: Any) -> tuple[str, int] | None:
    if isinstance(value, (list, tuple)) and len(value) >= 2:
        loc, n = value[0], value[1]
    elif isinstance(value, dict) and "1" in value:
        loc, n = value.get("0", ""), value["1"]
    else:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, float)) or n < 0:
        return None
    return str(loc), int(n)


def parse_lookup(data: Any) -> LookupResult:
    """Read a /lookup answer in any shape seen in the wild; raise on anything else."""
    if not isinstance(data, dict) or not isinstance(data.get("layout_info"), dict):
        raise UnparsableResponse("lookup answer has no layout_info mapping")
    matches: dict[str, int] = {}
    locations: dict[str, str] = {}
    for inst, value in data["layout_info"].items():
        parsed = _layout_value(value)
        if parsed is None:
            raise UnparsableResponse(f"lookup layout_info value of unknown shape: {value!r:.80}")
        locations[str(inst)], matches[str(inst)] = parsed
    event_id = data.get("event_id")
    return LookupResult(matches, locations, event_id if isinstance(event_id, str) else None)


def _json(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        detail = ""
        try:
            body = resp.json()
            detail = str(body.get("detail", "")) if isinstance(body, dict) else ""
        except ValueError:
            pass
        raise StatusError(resp.status_code, detail[:200])
    try:
        return resp.json()
    except ValueError:
        raise UnparsableResponse(f"{resp.request.url.path}: answer is not JSON") from None


def _answer(status: int, body: bytes, what: str) -> Any:
    """The JSON of a controller answer; StatusError or UnparsableResponse otherwise."""
    if status >= 400:
        detail = ""
        try:
            data = loads(body)
            detail = str(data.get("detail", "")) if isinstance(data, dict) else ""
        except ValueError:
            pass
        raise StatusError(status, detail[:200])
    try:
        return loads(body)
    except ValueError:
        raise UnparsableResponse(f"{what}: answer is not JSON") from None


class AsyncLMCache:
    """The request path's client: one lookup with the routing budget as its timeout, over
    the lean keep-alive client (addon/http1.py)."""

    def __init__(self, base_url: str, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._client: JSONClient | HttpxJSON = (
            JSONClient(base_url) if transport is None else HttpxJSON(base_url, transport))

    async def lookup(self, tokens: Sequence[int], timeout: float) -> LookupResult:
        ids = tokens.tolist() if isinstance(tokens, array) else tokens  # orjson: no arrays
        async with asyncio.timeout(timeout):
            resp = await self._client.post("/lookup", {"tokens": ids})
        return parse_lookup(_answer(resp.status, resp.body, "/lookup"))

    async def aclose(self) -> None:
        await self._client.aclose()


class LMCache:
    """The background pool's client (blocking calls, from worker threads only)."""

    def __init__(self, base_url: str, transport: httpx.BaseTransport | None = None) -> None:
        self._client = httpx.Client(base_url=base_url, transport=transport)

    def _post(self, path: str, body: dict[str, Any], timeout: float) -> Any:
        return _json(self._client.post(path, json=body, timeout=timeout))

    def lookup(self, tokens: Sequence[int], timeout: float) -> LookupResult:
        return parse_lookup(self._post("/lookup", {"tokens": list(tokens)}, timeout))

    def _num_tokens(self, data: Any) -> int:
        if isinstance(data, dict):
            n = data.get("num_tokens")
            if isinstance(n, int):
                return n
            if data.get("success") is True:  # LMCache 0.3.0 bodies
                return 0
        raise UnparsableResponse("answer has no num_tokens")

    def pin(self, instance_id: str, location: str, tokens: Sequence[int], timeout: float) -> int:
        body = {"instance_id": instance_id, "location": location, "tokens": list(tokens)}
        return self._num_tokens(self._post("/pin", body, timeout))

    def compress(
        self, instance_id: str, location: str, method: str, tokens: Sequence[int], timeout: float
    ) -> int:
        body = {
            "instance_id": instance_id, "location": location, "method": method,
            "tokens": list(tokens),
        }
        return self._num_tokens(self._post("/compress", body, timeout))

    def evict(self, instance_id: str, tokens: Sequence[int], timeout: float) -> int:
        body = {"instance_id": instance_id, "tokens": list(tokens)}
        return self._num_tokens(self._post("/evict", body, timeout))

    def clear(self, instance_id: str, location: str, timeout: float) -> int:
        body = {"instance_id": instance_id, "location": location}
        return self._num_tokens(self._post("/clear", body, timeout))

    def has_evict(self, timeout: float) -> bool:
        """Whether the controller serves /evict: probed with a body it must reject.

        A 404/405 means the route does not exist (LMCache 0.5.x); a 422 or any answer from
        the route itself means it does. The probe names no instance, so it evicts nothing.
        """
        resp = self._client.post("/evict", json={}, timeout=timeout)
        if resp.status_code in (404, 405):
            return False
        if resp.status_code in (502, 503, 504):  # a proxy in front answered, not the route
            raise StatusError(resp.status_code, "evict probe")
        return True

    def close(self) -> None:
        self._client.close()
