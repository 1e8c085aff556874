"""A lean HTTP/1.1 JSON client for the request path: POSTs over pooled keep-alive connections.

Why not httpx (used everywhere else in the addon) or aiohttp here: the request path makes one
small POST per routed request inside a 50 ms budget on the same event loop as the proxy, so
the client's own CPU is the proxy's throughput. `python -m bench.http_clients` (report in
docs/http-clients.md) posts a 1k-token /lookup body to a microsecond stand-in: this client
costs ~0.05 ms of CPU per request, aiohttp's ClientSession ~4-6x that and httpx's
AsyncClient ~20-30x (request and response objects, transport layers, anyio). aiohttp would
be the library to pick if this grew; the subset the controller and vLLM need is small: a
JSON POST, a status line, headers, and a Content-Length or chunked body.

Not thread-safe; one instance per event loop. Timeouts are the caller's (asyncio.timeout).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

try:  # orjson encodes a 16k-token array ~10x faster than json; optional.
    import orjson

    def dumps(obj: Any) -> bytes:
        try:
            return orjson.dumps(obj)
        except TypeError:  # e.g. a lone surrogate in a prompt: json escapes it instead
            return json.dumps(obj).encode()

    def loads(data: bytes) -> Any:
        return orjson.loads(data)

except ImportError:  # pragma: no cover - orjson is a declared dependency

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    def loads(data: bytes) -> Any:
        return json.loads(data)


MAX_BODY = 64 * 1024 * 1024  # a controller or tokenizer answer is never this large
_MAX_IDLE = 64


class HTTPError(ConnectionError):
    """The exchange failed (closed mid-answer, not HTTP/1.x we can read): a transport failure,
    so `is_retryable` and the breakers see it as one."""


class Connect(HTTPError):
    """Could not connect (refused, unreachable)."""


class Response:
    __slots__ = ("status", "body")

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body

    def json(self) -> Any:
        return loads(self.body)


# (method, url, request body, status or None, response body, start time, error or None)
Tap = Callable[[str, str, bytes, "int | None", bytes, float, "BaseException | None"], None]


class JSONClient:
    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        host_header = parts.netloc.rsplit("@", 1)[-1]
        self._head = f"Host: {host_header}\r\nContent-Type: application/json\r\n"
        self._idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = deque()
        # Sees every exchange's exact bytes when set (kvcache_show_calls); None: no cost.
        self.tap: Tap | None = None

    async def post(self, path: str, payload: Any) -> Response:
        body = dumps(payload)
        head = (f"POST {self.prefix}{path} HTTP/1.1\r\n{self._head}"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        if self.tap is None:
            return await self._post(head, body)
        t0 = time.time()
        url = f"{'https' if self.tls else 'http'}://{self.host}:{self.port}{self.prefix}{path}"
        try:
            resp = await self._post(head, body)
        except BaseException as e:
            self.tap("POST", url, body, None, b"", t0, e)
            raise
        self.tap("POST", url, body, resp.status, resp.body, t0, None)
        return resp

    async def _post(self, head: bytes, body: bytes) -> Response:
        # A pooled connection the server closed while idle fails before any answer byte;
        # that request is safe to send again once, on a fresh connection.
        while self._idle:
            conn = self._idle.pop()
            if conn[1].is_closing():
                continue
            try:
                return await self._exchange(conn, head, body)
            except _Stale:
                continue
        try:
            conn = await asyncio.open_connection(self.host, self.port, ssl=self.tls or None)
        except OSError as e:
            raise Connect(str(e) or type(e).__name__) from None
        try:
            return await self._exchange(conn, head, body)
        except _Stale:
            raise HTTPError("connection closed before an answer") from None

    async def _exchange(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], head: bytes, body: bytes
    ) -> Response:
        reader, writer = conn
        keep = False
        try:
            writer.write(head + body if len(body) < 16384 else head)
            if len(body) >= 16384:
                writer.write(body)
            try:
                raw_head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as e:
                if not e.partial:
                    raise _Stale from None
                raise HTTPError("connection closed mid-answer") from None
            except (ConnectionResetError, BrokenPipeError):
                raise _Stale from None
            status, length, chunked, close = _parse_head(raw_head)
            if chunked:
                data = await _read_chunked(reader)
            elif length is not None:
                if length > MAX_BODY:
                    raise HTTPError("answer too large")
                data = await reader.readexactly(length)
            else:  # no length: the body runs to the end of the connection
                data = await reader.read(MAX_BODY)
                close = True
            keep = not close
            return Response(status, data)
        except asyncio.IncompleteReadError:
            raise HTTPError("connection closed mid-answer") from None
        except HTTPError:
            raise
        except (OSError, asyncio.LimitOverrunError, ValueError) as e:
            raise HTTPError(str(e) or type(e).__name__) from None
        finally:
            # A cancelled or failed exchange leaves the connection in an unknown state.
            if keep and len(self._idle) < _MAX_IDLE:
                self._idle.append(conn)
            else:
                writer.close()

    async def aclose(self) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()


class _Stale(Exception):
    pass


def _parse_head(raw: bytes) -> tuple[int, int | None, bool, bool]:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise HTTPError(f"not an HTTP/1.x answer: {lines[0][:60]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise HTTPError(f"bad status line: {lines[0][:60]!r}") from None
    length: int | None = None
    chunked = False
    close = parts[0] == "HTTP/1.0"
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            try:
                length = int(value.strip())
            except ValueError:
                raise HTTPError("bad Content-Length") from None
        elif name == "transfer-encoding":
            chunked = "chunked" in value.lower()
        elif name == "connection":
            v = value.strip().lower()
            close = v == "close" or (close and v != "keep-alive")
    if status in (204, 304) or 100 <= status < 200:
        length = 0
    return status, length, chunked, close


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise HTTPError("bad chunk size") from None
        if size == 0:
            # trailers, then the blank line
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return bytes(out)
        if len(out) + size > MAX_BODY:
            raise HTTPError("answer too large")
        out += await reader.readexactly(size)
        await reader.readexactly(2)


class HttpxJSON:
    """The same `post` over an httpx transport: the seam unit tests use to stand in a mock
    transport for the controller or tokenizer (production uses JSONClient)."""

    def __init__(self, base_url: str, transport: Any) -> None:
        import httpx

        self._client = httpx.AsyncClient(base_url=base_url, transport=transport)
        self.tap: Tap | None = None

    async def post(self, path: str, payload: Any) -> Response:
        body = dumps(payload)
        t0 = time.time()
        resp = await self._client.post(
            path, content=body, headers={"content-type": "application/json"})
        if self.tap is not None:
            self.tap("POST", str(resp.request.url), body, resp.status_code, resp.content, t0,
                     None)
        return Response(resp.status_code, resp.content)

    async def aclose(self) -> None:
        await self._client.aclose()
