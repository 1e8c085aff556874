"""A stand-in for LMCache MP servers, feeding a REAL LMCache MP coordinator.

The coordinator's key directory is built only from the cache events MP servers send to
``POST /events``, and its targeted delete (``POST /cache/delete``) is proxied to the owning
MP server's ``DELETE /cache/objects``. No CPU-only vLLM runs an MP server, so this feeder
plays those servers with LMCache's own classes: keys from ``TokenHasher`` +
``resolve_object_keys``, batches as ``CacheEventBatch``/``CacheEventEntry`` published by
``HttpCacheEventSink``. What a test sees is therefore the coordinator's own behaviour.

Two halves in one file (like ``sim/lmcache_worker.py``):

* the feeder (``main``), which runs INSIDE the lmcache virtual environment::

      <lmcache-venv>/bin/python scripts/real/coordinator_feed.py --coordinator URL

  and reads one JSON request per line on stdin, answering one JSON line on stdout
  (``{"id", "ok": true, ...}`` or ``{"id", "ok": false, "error"}``). Operations:
  ``register {instance_id}`` (POST /instances pointing at a per-instance HTTP stub that
  serves DELETE /cache/objects, then heartbeats), ``store``/``delete {instance_id,
  tokens, model, chunks=all, only=None, tier=l1, backend=dram}`` (publish one event batch),
  ``keys {tokens, model}``, ``deletes {instance_id}`` (the DELETE /cache/objects bodies
  the coordinator proxied to that instance), ``deregister {instance_id}``, ``quit``.
  LMCache's import takes seconds, which is why this is one long-lived process.
* ``CoordinatorFeeder``, the client the proxy-venv tests use: it starts the feeder as a
  subprocess and calls those operations. It needs no lmcache import.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The client half reuses the worker shim's JSON-line child; the feeder half runs in the
# lmcache venv, where this checkout is not installed (sim.lmcache_worker imports only the
# standard library).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sim.lmcache_worker import JsonLineChild  # noqa: E402

CHUNK_SIZE = 256


# --- client side (proxy venv) --------------------------------------------------------------


class FeederError(RuntimeError):
    """The feeder answered ``ok: false`` or went away."""


class CoordinatorFeeder(JsonLineChild):
    """Runs this file under the lmcache venv's python and talks to it, one call at a time;
    each call waits at most ``timeout`` s, so a wedged feeder fails a test, never hangs it."""

    error = FeederError
    what = "feeder"

    def __init__(
        self,
        python: str | Path,
        coordinator_url: str,
        *,
        chunk_size: int = CHUNK_SIZE,
        timeout: float = 30.0,
        stderr_path: str | Path | None = None,
    ) -> None:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the proxy's packages must not shadow the lmcache venv's
        super().__init__(
            [str(python), str(Path(__file__).resolve()), "--coordinator", coordinator_url,
             "--chunk-size", str(chunk_size)],
            env, timeout=timeout, stderr_path=stderr_path)

    def register(self, instance_id: str) -> int:
        """Register an MP server with the coordinator; returns its stub's HTTP port."""
        return int(self.call("register", instance_id=instance_id)["port"])

    def store(
        self, instance_id: str, tokens: Sequence[int], model: str, *, chunks: int | None = None,
        only: Sequence[int] | None = None, tier: str = "l1", backend: str = "dram",
    ) -> list[str]:
        """Report the first ``chunks`` full chunks (all by default), or the chunks at the
        indices in ``only``, as stored; returns the chunk hashes (hex) published."""
        return self.call("store", instance_id=instance_id, tokens=list(tokens), model=model,
                         chunks=chunks, only=only, tier=tier, backend=backend)["keys"]

    def delete(
        self, instance_id: str, tokens: Sequence[int], model: str, *, chunks: int | None = None,
        only: Sequence[int] | None = None, tier: str = "l1", backend: str = "dram",
    ) -> list[str]:
        """Report chunks as deleted (what an MP server sends when it evicts them)."""
        return self.call("delete", instance_id=instance_id, tokens=list(tokens), model=model,
                         chunks=chunks, only=only, tier=tier, backend=backend)["keys"]

    def keys(self, tokens: Sequence[int], model: str) -> list[str]:
        return self.call("keys", tokens=list(tokens), model=model)["keys"]

    def deletes(self, instance_id: str) -> list[dict[str, Any]]:
        """The DELETE /cache/objects bodies the coordinator sent to this instance's stub."""
        return self.call("deletes", instance_id=instance_id)["deletes"]

    def deregister(self, instance_id: str) -> None:
        self.call("deregister", instance_id=instance_id)


# --- the feeder (lmcache venv) -------------------------------------------------------------


def _canon(key: dict[str, Any]) -> str:
    """One string per encoded key, so keys from our store events and from the coordinator's
    DELETE bodies compare equal whatever their field order."""
    return json.dumps(key, sort_keys=True)


class _Feeder:
    HEARTBEAT_S = 5.0  # the coordinator drops instances silent for 30 s (its default)

    def __init__(self, url: str, chunk_size: int) -> None:
        import httpx
        from lmcache.v1.mp_coordinator.cache_events import HttpCacheEventSink
        from lmcache.v1.multiprocess.token_hasher import TokenHasher

        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=10.0)
        self.sink = HttpCacheEventSink(self.url, timeout=10.0)
        self.hasher = TokenHasher(chunk_size=chunk_size)
        self.chunk_size = chunk_size
        # Publishing happens from stdin requests and from the stubs' handler threads.
        self.lock = threading.Lock()
        self.seq: dict[str, int] = {}  # instance -> last seq sent (incarnation 0)
        self.held: dict[str, dict[str, tuple[str, str]]] = {}  # inst -> canon -> (tier, backend)
        self.received: dict[str, list[dict[str, Any]]] = {}
        self.stubs: dict[str, Any] = {}
        self.stop = threading.Event()
        threading.Thread(target=self._heartbeat, daemon=True).start()

    def _heartbeat(self) -> None:
        while not self.stop.wait(self.HEARTBEAT_S):
            for inst in list(self.stubs):
                with contextlib.suppress(Exception):
                    self.http.put(f"{self.url}/instances/{inst}/heartbeat")

    def resolve(self, tokens: list[int], model: str, chunks: int | None) -> list[tuple[Any, int]]:
        """(encoded key, chunk index) of the first ``chunks`` complete chunks."""
        from lmcache.v1.multiprocess.cache_control.key_resolver import resolve_object_keys

        keys, _ = resolve_object_keys(self.hasher, model, 1, tokens, "")
        out = [(k.to_encoded_object_key(), i) for i, k in enumerate(keys)]
        return out if chunks is None else out[:chunks]

    def publish(self, inst: str, event: str, tier: str, backend: str,
                entries: list[Any]) -> None:
        from lmcache.v1.distributed.api import Tier
        from lmcache.v1.mp_coordinator.api import CacheEventBatch, CacheEventType

        with self.lock:
            seq = self.seq.get(inst, 0) + 1
            self.seq[inst] = seq
            self.sink.publish([CacheEventBatch(
                instance_id=inst, incarnation=0, seq=seq,
                event_type=CacheEventType(event), tier=Tier(tier), backend=backend,
                entries=entries)])

    def event(self, req: dict[str, Any], event: str) -> dict[str, Any]:
        from dataclasses import asdict

        from lmcache.v1.mp_coordinator.api import CacheEventEntry

        inst, tokens = req["instance_id"], list(req["tokens"])
        tier, backend = req.get("tier", "l1"), req.get("backend", "dram")
        resolved = self.resolve(tokens, req["model"], req.get("chunks"))
        if req.get("only") is not None:
            resolved = [(k, i) for k, i in resolved if i in set(req["only"])]
        c = self.chunk_size
        entries = [
            CacheEventEntry(key=k, size_bytes=c * 1024 if event == "store" else 0,
                            token_ids=tokens[i * c:(i + 1) * c] if event == "store" else [],
                            token_offset=i * c)
            for k, i in resolved
        ]
        if entries:
            self.publish(inst, event, tier, backend, entries)
        with self.lock:
            held = self.held.setdefault(inst, {})
            for k, _ in resolved:
                if event == "store":
                    held[_canon(asdict(k))] = (tier, backend)
                else:
                    held.pop(_canon(asdict(k)), None)
        return {"keys": [k.chunk_hash_hex for k, _ in resolved]}

    def objects_deleted(self, inst: str, body: dict[str, Any]) -> dict[str, Any]:
        """What an MP server does on DELETE /cache/objects: drop the keys it holds and report
        the drop on its event stream (a real server does it from its event bus, later)."""
        from lmcache.v1.distributed.api import EncodedObjectKey
        from lmcache.v1.mp_coordinator.api import CacheEventEntry

        with self.lock:
            self.received.setdefault(inst, []).append(body)
            held = self.held.setdefault(inst, {})
            gone: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for key in body.get("keys", []):
                where = held.pop(_canon(key), None)
                if where is not None:
                    gone.setdefault(where, []).append(key)
        for (tier, backend), keys in gone.items():
            self.publish(inst, "delete", tier, backend,
                         [CacheEventEntry(key=EncodedObjectKey(**k)) for k in keys])
        return {"deleted": sum(len(v) for v in gone.values()), "skipped": 0, "ok": True}

    def register(self, inst: str) -> dict[str, Any]:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        feeder = self

        class Stub(BaseHTTPRequestHandler):
            def do_DELETE(self) -> None:  # noqa: N802 - http.server's naming
                n = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                answer = json.dumps(feeder.objects_deleted(inst, body)).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        if inst not in self.stubs:
            server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.stubs[inst] = server
        port = self.stubs[inst].server_address[1]
        r = self.http.post(f"{self.url}/instances",
                           json={"instance_id": inst, "ip": "127.0.0.1", "http_port": port})
        r.raise_for_status()
        return {"port": port}

    def deregister(self, inst: str) -> dict[str, Any]:
        self.http.delete(f"{self.url}/instances/{inst}").raise_for_status()
        server = self.stubs.pop(inst, None)
        if server is not None:
            server.shutdown()
        return {}

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "register":
            return self.register(req["instance_id"])
        if op in ("store", "delete"):
            return self.event(req, op)
        if op == "keys":
            return {"keys": [k.chunk_hash_hex for k, _ in
                             self.resolve(list(req["tokens"]), req["model"], None)]}
        if op == "deletes":
            with self.lock:
                return {"deletes": list(self.received.get(req["instance_id"], []))}
        if op == "deregister":
            return self.deregister(req["instance_id"])
        raise ValueError(f"unknown op {op!r}")

    def close(self) -> None:
        self.stop.set()
        for server in self.stubs.values():
            server.shutdown()
        self.sink.close()
        self.http.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coordinator", required=True, help="coordinator base URL")
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    args = p.parse_args(argv)
    # stdout carries the protocol, but lmcache's loggers may print to it: keep a private
    # copy of fd 1 for answers and point fd 1 at stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def emit(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    feeder = _Feeder(args.coordinator, args.chunk_size)
    emit({"ready": True, "pid": os.getpid()})
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            rid: Any = None
            try:
                req = json.loads(line)
                rid = req.get("id")
                if req.get("op") == "quit":
                    emit({"id": rid, "ok": True})
                    break
                emit({"id": rid, "ok": True, **feeder.handle(req)})
            except Exception as e:  # every failure goes back to the caller, as text
                emit({"id": rid, "ok": False, "error": f"{type(e).__name__}: {e}"})
    finally:
        feeder.close()


if __name__ == "__main__":
    main()
