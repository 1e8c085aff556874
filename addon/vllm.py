"""Thin client for the vLLM endpoints the addon reads: `/tokenize` and `/metrics`.

`/tokenize` has no /v1 prefix; the chat form applies the model's chat template, so the
tokens are the ones the engine will see. Errors are `{"error": {"message", ...}}`.
"""

from __future__ import annotations

import asyncio
import json
from array import array
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from addon.http1 import HttpxJSON, JSONClient, loads
from addon.resilience import StatusError, UnparsableResponse
from addon.tokens import compact

_JSON = {"content-type": "application/json"}


def _body(body: dict[str, Any]) -> bytes:
    # ASCII-escaped like the client's own JSON: a lone surrogate in a prompt ("\\ud800") goes
    # to /tokenize as the same escape instead of failing to encode (httpx's json= does).
    return json.dumps(body).encode()


def _tokens(resp: httpx.Response) -> array[int]:
    return _tokens_of(resp.status_code, resp.content)


def _tokens_of(status: int, body: bytes) -> array[int]:
    if status >= 400:
        message = ""
        try:
            err = loads(body).get("error", {})
            message = str(err.get("message", "")) if isinstance(err, dict) else ""
        except (ValueError, AttributeError):
            pass
        raise StatusError(status, message[:200])
    try:
        tokens = loads(body)["tokens"]
    except (ValueError, KeyError, TypeError):
        raise UnparsableResponse("/tokenize answer has no tokens") from None
    if not isinstance(tokens, list):
        raise UnparsableResponse("/tokenize tokens are not a list")
    try:
        return compact(tokens)
    except TypeError:
        raise UnparsableResponse("/tokenize tokens are not integers") from None


class AsyncTokenizer:
    """The request path's tokenizer, used only inside the routing budget (lean client)."""

    def __init__(self, base_url: str, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._client: JSONClient | HttpxJSON = (
            JSONClient(base_url) if transport is None else HttpxJSON(base_url, transport))

    async def tokenize(self, body: dict[str, Any], timeout: float) -> array[int]:
        async with asyncio.timeout(timeout):
            resp = await self._client.post("/tokenize", body)
        return _tokens_of(resp.status, resp.body)

    async def aclose(self) -> None:
        await self._client.aclose()


@dataclass(frozen=True)
class EngineLoad:
    running: float
    waiting: float
    kv_cache_usage: float  # vllm:kv_cache_usage_perc, a ratio in [0,1]


def parse_metrics(text: str) -> EngineLoad:
    """Sum vLLM's gauges over their label sets (one per model/engine)."""
    wanted = {
        "vllm:num_requests_running": 0.0,
        "vllm:num_requests_waiting": 0.0,
        "vllm:kv_cache_usage_perc": 0.0,
    }
    found = set()
    for family in text_string_to_metric_families(text):
        if family.name in wanted:
            for sample in family.samples:
                wanted[sample.name] = wanted.get(sample.name, 0.0) + sample.value
                found.add(sample.name)
    if "vllm:kv_cache_usage_perc" not in found:
        raise UnparsableResponse("/metrics has no vllm:kv_cache_usage_perc")
    return EngineLoad(
        wanted["vllm:num_requests_running"],
        wanted["vllm:num_requests_waiting"],
        min(1.0, wanted["vllm:kv_cache_usage_perc"]),
    )


class Engine:
    """Blocking client for one vLLM server, used from the background pool only."""

    def __init__(self, transport: httpx.BaseTransport | None = None) -> None:
        self._client = httpx.Client(transport=transport)

    def tokenize(self, base_url: str, body: dict[str, Any], timeout: float) -> array[int]:
        return _tokens(self._client.post(
            f"{base_url}/tokenize", content=_body(body), headers=_JSON, timeout=timeout))

    def load(self, base_url: str, timeout: float) -> EngineLoad:
        resp = self._client.get(f"{base_url}/metrics", timeout=timeout)
        if resp.status_code >= 400:
            raise StatusError(resp.status_code, "/metrics")
        try:
            return parse_metrics(resp.text)
        except ValueError as e:
            raise UnparsableResponse(f"/metrics: {e}") from None

    def close(self) -> None:
        self._client.close()


class AsyncHealthCheck:
    """The optional active health check: GET a path on each endpoint (background task)."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._client = httpx.AsyncClient(transport=transport)

    async def check(self, base_url: str, path: str, timeout: float) -> str:
        """"" when healthy, else a short reason (connect-refused, http-503, timeout, ...)."""
        try:
            resp = await self._client.get(f"{base_url}{path}", timeout=timeout)
        except httpx.TimeoutException:
            return "timeout"
        except httpx.TransportError:
            return "connect-refused"
        return "" if resp.status_code < 400 else f"http-{resp.status_code}"

    async def aclose(self) -> None:
        await self._client.aclose()
