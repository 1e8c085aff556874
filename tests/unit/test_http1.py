"""The request path's lean HTTP/1.1 client against a real asyncio server on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest

from addon.http1 import Connect, HTTPError, JSONClient, dumps

Handler = Callable[[bytes], bytes | None]


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(body)
                answer = self.handler(body)
                if answer is None:  # hang up without answering
                    break
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], asyncio.Future[Server]]]:
    servers: list[Server] = []

    async def start(handler: Handler) -> Server:
        s = Server(handler)
        s.server = await asyncio.start_server(s.serve, "127.0.0.1", 0)
        servers.append(s)
        return s

    yield start  # type: ignore[misc]
    for s in servers:
        assert s.server is not None
        s.server.close()


def ok(payload: object, extra: str = "") -> bytes:
    body = json.dumps(payload).encode()
    return (f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{extra}"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


async def test_posts_json_and_reuses_the_connection(serve) -> None:  # type: ignore[no-untyped-def]
    s = await serve(lambda body: ok({"echo": json.loads(body)}))
    c = JSONClient(s.url)
    for i in range(3):
        r = await c.post("/lookup", {"tokens": (1, 2, i)})
        assert r.status == 200 and r.json() == {"echo": {"tokens": [1, 2, i]}}
    assert s.connections == 1
    await c.aclose()


async def test_chunked_answers_and_error_statuses(serve) -> None:  # type: ignore[no-untyped-def]
    chunked = (b"HTTP/1.1 500 Internal Server Error\r\ntransfer-encoding: chunked\r\n\r\n"
               b"5\r\n{\"det\r\n8\r\nail\": 1}\r\n0\r\n\r\n")
    s = await serve(lambda body: chunked)
    c = JSONClient(s.url)
    r = await c.post("/x", {})
    assert r.status == 500 and r.json() == {"detail": 1}
    await c.aclose()


async def test_a_stale_pooled_connection_is_replaced_once(serve) -> None:  # type: ignore[no-untyped-def]
    answers = iter([ok({"n": 1}, "connection: keep-alive\r\n"), None, ok({"n": 2})])
    s = await serve(lambda body: next(answers))
    c = JSONClient(s.url)
    assert (await c.post("/a", {})).json() == {"n": 1}
    # The server hangs up on the pooled connection without answering: sent again, fresh.
    assert (await c.post("/a", {})).json() == {"n": 2}
    assert s.connections == 2
    await c.aclose()


async def test_refused_connect_and_cut_answers_raise_connection_errors() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(Connect):
        await JSONClient(f"http://127.0.0.1:{port}").post("/x", {})
    assert issubclass(HTTPError, ConnectionError)  # breakers count it as a transport failure


async def test_not_http_is_an_error(serve) -> None:  # type: ignore[no-untyped-def]
    s = await serve(lambda body: b"garbage\r\n\r\n")
    with pytest.raises(HTTPError):
        await JSONClient(s.url).post("/x", {})


async def test_a_timeout_closes_the_connection_instead_of_pooling_it(serve) -> None:  # type: ignore[no-untyped-def]
    gate = asyncio.Event()

    def slow(body: bytes) -> bytes | None:
        return ok({"late": True}) if gate.is_set() else None

    s = await serve(slow)
    c = JSONClient(s.url)
    with pytest.raises((TimeoutError, HTTPError)):
        async with asyncio.timeout(0.05):
            await c.post("/x", {})
    assert not c._idle


def test_lone_surrogates_are_escaped_not_fatal() -> None:
    assert dumps({"prompt": "a\ud800"}) == b'{"prompt": "a\\ud800"}'
    assert dumps({"tokens": (1, 2)}) == b'{"tokens":[1,2]}'
