"""A flapping LMCache controller for the soak (``bench/soak.py``), in its own process.

    python -m bench.fault_controller --port 0 --port-file URL_FILE

One process, three listeners on 127.0.0.1:

- the controller simulator (``sim.controller``) at ``--port``: the engines register and report
  their chunks there, and it is never faulted. ``POST /sim/soak/mode {"mode": M}`` switches
  the front's mode; ``GET /sim/soak/state`` gives the front's URL and its counters.
- the front: the address the proxy is given as its ``lmcache_endpoint``. A small HTTP/1.1
  server that, per mode, forwards to the simulator (``ok``) or misbehaves: ``error`` (500
  ``{"detail"}``), ``hang`` (3 s, then the real answer), ``garbage`` (bodies that are not
  JSON), ``shapes`` (a dozen wrong JSON shapes, in turn), ``hosts`` (instance ids that are
  hosts: ``http://evil:1``, ``127.0.0.1:9``, the engines' own URLs, the trap) and
  ``killed`` (the listening socket is closed and open connections are dropped: connections
  are refused until the mode changes, then it listens again on the same port).
- a trap: a port named as an instance id in ``hosts`` mode. Nothing may ever connect to it;
  ``trap_connections`` in the state counts who did.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from sim.controller import ControllerConfig, create_app
from sim.serving import (
    add_server_args,
    bind_socket,
    make_server,
    socket_url,
    write_port_file,
)

MODES = ("ok", "error", "hang", "garbage", "shapes", "hosts", "killed")
HANG_S = 3.0

GARBAGE: tuple[bytes, ...] = (
    b"<html>upstream garbage</html>",
    b'{"event_id": "e", "layout_',  # cut short
    b"\x00\xff\xfe\x80 not json",
    b"",  # an empty 200
    b"null",
    b"NaN",
)


@functools.lru_cache(maxsize=8)
def wrong_shapes(iid: str) -> list[bytes]:
    """A dozen /lookup answers of the wrong shape (also given to every other path)."""
    loc = "LocalCPUBackend"
    shapes: list[Any] = [
        {"event_id": "e", "layout_info": [[iid, [loc, 512]]]},  # layout_info a list
        {"event_id": "e", "layout_info": {iid: loc}},  # a value that is a string
        {"event_id": "e", "layout_info": {iid: [loc, -512]}},  # a negative count
        {"event_id": "e", "layout_info": {iid: [[loc], {"n": 512}]}},  # nested wrong types
        {"layout_info": {iid: [loc, 512]}},  # no event_id
        {"event_id": "e", "layout_info": None},
        [],  # not an object at all
        {"event_id": "e", "layout_info": {iid: [loc, "512"]}},  # a count that is a string
        {"event_id": 7, "layout_info": {iid: []}},  # an empty value, event_id a number
        {"event_id": "e", "layout_info": {iid: [loc, True]}},  # a count that is a bool
        {"event_id": "e", "layout_info": {f"x{i}": [loc, 256] for i in range(5000)}},
        {"event_id": "e", "layout_info": {"": {"0": loc, "1": 512}}, "num_tokens": "x"},
    ]
    out = [json.dumps(s).encode() for s in shapes]
    out.append(b'{"event_id": "e", "layout_info": {"%s": ["%s", 1e999]}}' % (iid.encode(),
                                                                             loc.encode()))
    out.append(b'{"event_id": "e", "layout_info": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}")
    return out


class Front:
    """The faulty face of the controller: forwards to the simulator app, or not."""

    def __init__(self, app: Any, host: str) -> None:
        self.app_client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://controller")
        self.app = app
        self.host = host
        self.mode = "ok"
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.counts: Counter[str] = Counter()
        self.turn = 0
        self.trap_url = ""
        self.trap_connections = 0

    async def start(self) -> None:
        sock = bind_socket(self.host, 0)
        self.port = sock.getsockname()[1]
        self.server = await asyncio.start_server(self.handle, sock=sock, limit=1 << 20)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        was, self.mode = self.mode, mode
        if mode == "killed" and was != "killed" and self.server is not None:
            self.server.close()
            for w in list(self.writers):
                w.transport.abort()
            self.server = None
        elif mode != "killed" and self.server is None:
            self.server = await asyncio.start_server(
                self.handle, self.host, self.port, reuse_address=True, limit=1 << 20)
        self.counts[f"mode:{mode}"] += 1

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                length = 0
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    if k.strip().lower() == "content-length":
                        length = int(v)
                body = await reader.readexactly(length) if length else b""
                status, payload = await self.answer(method, path, body)
                writer.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n" % (status, len(payload)) + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ValueError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def forward(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        r = await self.app_client.request(
            method, path, content=body, headers={"content-type": "application/json"})
        return r.status_code, r.content

    async def answer(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        mode = self.mode
        self.counts[mode] += 1
        self.turn += 1
        if mode == "error":
            return 500, b'{"detail": "soak: injected controller failure"}'
        if mode == "hang":
            await asyncio.sleep(HANG_S)
            return await self.forward(method, path, body)
        if mode == "garbage":
            return 200, GARBAGE[self.turn % len(GARBAGE)]
        if mode == "shapes":
            shapes = wrong_shapes(self.first_instance())
            return 200, shapes[self.turn % len(shapes)]
        if mode == "hosts" and path.startswith("/lookup"):
            status, payload = await self.forward(method, path, body)
            return status, self.host_named(payload)
        return await self.forward(method, path, body)

    def first_instance(self) -> str:
        insts = self.app.state.controller.instances
        return next(iter(insts), "vllm-instance-1")

    def host_named(self, payload: bytes) -> bytes:
        """The real answer with its instance ids replaced by, or joined by, host names."""
        try:
            data = json.loads(payload)
            layout = dict(data["layout_info"])
        except (ValueError, KeyError, TypeError):
            return payload
        insts = self.app.state.controller.instances
        most = max((v[1] for v in layout.values()), default=256) + 1024
        loc = "LocalCPUBackend"
        if self.turn % 2:
            # The controller names instances by their URL, as if ids were hosts.
            renamed = {insts[k].url if k in insts else k: v for k, v in layout.items()}
            trap_host = self.trap_url.removeprefix("http://")
            renamed.update({self.trap_url: [loc, most], trap_host: [loc, most]})
            data["layout_info"] = renamed
        else:
            layout.update({"http://evil:1": [loc, most], "127.0.0.1:9": [loc, most],
                           self.trap_url: [loc, most]})
            data["layout_info"] = layout
        return json.dumps(data).encode()

    async def start_trap(self) -> None:
        sock = bind_socket(self.host, 0)
        self.trap_url = socket_url(sock)

        async def caught(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.trap_connections += 1
            w.close()

        await asyncio.start_server(caught, sock=sock)

    def state(self) -> dict[str, Any]:
        return {"front": self.url, "mode": self.mode, "counts": dict(self.counts),
                "trap": self.trap_url, "trap_connections": self.trap_connections}


async def serve(args: argparse.Namespace) -> None:
    app = create_app(ControllerConfig(host=args.host, port=args.port))
    front = Front(app, args.host)
    await front.start()
    await front.start_trap()

    @app.post("/sim/soak/mode")
    async def soak_mode(body: dict[str, Any]) -> dict[str, Any]:
        await front.set_mode(str(body.get("mode")))
        return front.state()

    @app.get("/sim/soak/state")
    async def soak_state() -> dict[str, Any]:
        return front.state()

    sock: socket.socket = bind_socket(args.host, args.port)
    url = socket_url(sock)
    write_port_file(args.port_file, url)
    print(f"controller on {url}, front on {front.url}", flush=True)
    try:
        await make_server(app, args.log_level).serve(sockets=[sock])
    finally:
        sock.close()
        with contextlib.suppress(Exception):
            await front.app_client.aclose()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fault_controller",
                                description=__doc__.split("\n")[0])
    add_server_args(p, default_port=0)
    args = p.parse_args(argv)
    if args.port_file is not None:
        args.port_file = Path(args.port_file)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
