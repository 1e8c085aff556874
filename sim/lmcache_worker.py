"""A stand-in for the LMCache workers of vLLM servers, driving a REAL ``lmcache_controller``.

A real controller learns what each vLLM server caches only from its LMCache workers over
ZMQ; no CPU-only vLLM can feed it (lmcache 0.5.6 has no CPU connector). This shim speaks
that protocol with lmcache's own classes, so what a test sees is the controller's own
behaviour: ``RegisterMsg`` on the controller's reply (ROUTER) socket, ``BatchedKVOperationMsg``
admit/evict batches on its pull socket, chunk hashes from lmcache's ``ChunkedTokenDatabase``,
and answers to the ``Pin/Clear/Compress/Decompress/HealthWorkerMsg`` the controller sends to
each worker's own REP socket.

Two halves in one file:

* the shim itself (``main``), which runs INSIDE the lmcache virtual environment::

      <lmcache-venv>/bin/python sim/lmcache_worker.py --pull 127.0.0.1:P --reply 127.0.0.1:R

  and reads one JSON request per line on stdin, answering one JSON line on stdout
  (``{"id", "ok": true, ...}`` or ``{"id", "ok": false, "error"}``). Operations:
  ``register {instance_id, worker_id=0, hash_seed=0}``, ``admit``/``evict {instance_id,
  tokens, chunks=all, location}``, ``evict_keys {instance_id, keys}``, ``hashes {tokens,
  hash_seed=0}``, ``silence {instance_id}`` (stop answering the controller: a hung
  worker), ``deregister {instance_id}``, ``log`` (control messages received), ``held
  {instance_id}``, ``quit``.
* ``WorkerShim``, the client the proxy-venv tests and the doctor's tests use: it starts
  the shim as a subprocess and calls those operations. It needs no lmcache import.

``hash_seed`` changes the start of the hash chain the way vLLM's ``init_none_hash`` does
under a different ``PYTHONHASHSEED``: a worker with another seed is registered and
reports chunks, but no lookup ever matches them (the silent 0% hit rate).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

CHUNK_SIZE = 256
DEFAULT_LOCATION = "LocalCPUBackend"


# --- client side (proxy venv) --------------------------------------------------------------


class ShimError(RuntimeError):
    """The shim answered ``ok: false`` or went away."""


class JsonLineChild:
    """A long-lived child process (here: one running inside the lmcache venv) that answers
    one JSON line on stdout per JSON-line request on stdin, and first says ``{"ready":
    true}``. Calls are serialised (one request in flight) and each waits at most
    ``timeout`` s for its answer, so a wedged child fails a test instead of hanging it."""

    error: type[RuntimeError] = RuntimeError
    what = "child"

    def __init__(self, argv: Sequence[str], env: dict[str, str], *, timeout: float,
                 stderr_path: str | Path | None) -> None:
        self._stderr = open(stderr_path, "ab") if stderr_path else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            env=env, text=True, bufsize=1,
        )
        self._timeout = timeout
        self._lock = threading.Lock()
        self._next_id = 0
        ready = self._read(timeout=120.0)  # importing lmcache (torch) takes seconds
        if not ready.get("ready"):
            raise self.error(f"{self.what} did not start: {ready}")

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self._proc.stdout is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self._proc.stdout.readline()))  # type: ignore[union-attr]
        reader.daemon = True
        reader.start()
        reader.join(timeout)
        if not box:
            raise self.error(f"{self.what} gave no answer within {timeout} s")
        if not box[0]:
            raise self.error(f"{self.what} exited (status {self._proc.poll()})")
        return json.loads(box[0])

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        with self._lock:
            self._next_id += 1
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(json.dumps({"id": self._next_id, "op": op, **args}) + "\n")
                self._proc.stdin.flush()
            except (BrokenPipeError, ValueError) as e:
                raise self.error(f"{self.what} is gone: {e}") from None
            answer = self._read(self._timeout)
        if not answer.get("ok"):
            raise self.error(f"{op}: {answer.get('error')}")
        return answer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("quit")
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)
        for stream in (self._proc.stdin, self._proc.stdout):
            with contextlib.suppress(Exception):
                stream.close()  # type: ignore[union-attr]
        if self._stderr is not subprocess.DEVNULL:
            self._stderr.close()  # type: ignore[union-attr]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WorkerShim(JsonLineChild):
    """Runs ``sim/lmcache_worker.py`` under the lmcache venv's python and talks to it."""

    error = ShimError
    what = "shim"

    def __init__(
        self,
        python: str | Path,
        pull: str,
        reply: str,
        *,
        hashseed: str = "0",
        timeout: float = 30.0,
        stderr_path: str | Path | None = None,
    ) -> None:
        env = dict(os.environ)
        # The shim and the controller must hash alike; see the module docstring.
        env["PYTHONHASHSEED"] = hashseed
        env.pop("PYTHONPATH", None)  # the proxy's packages must not shadow the lmcache venv's
        super().__init__(
            [str(python), str(Path(__file__).resolve()), "--pull", pull, "--reply", reply],
            env, timeout=timeout, stderr_path=stderr_path)

    def register(self, instance_id: str, worker_id: int = 0, hash_seed: int = 0) -> int:
        """Register a worker; returns the port of its REP socket."""
        ans = self.call("register", instance_id=instance_id, worker_id=worker_id,
                        hash_seed=hash_seed)
        return int(ans["port"])

    def admit(
        self, instance_id: str, tokens: Sequence[int], chunks: int | None = None,
        location: str = DEFAULT_LOCATION,
    ) -> list[int]:
        """Report the first ``chunks`` full chunks of ``tokens`` (all by default) as held."""
        return self.call("admit", instance_id=instance_id, tokens=list(tokens), chunks=chunks,
                         location=location)["keys"]

    def evict(
        self, instance_id: str, tokens: Sequence[int], chunks: int | None = None,
        location: str = DEFAULT_LOCATION,
    ) -> list[int]:
        return self.call("evict", instance_id=instance_id, tokens=list(tokens), chunks=chunks,
                         location=location)["keys"]

    def hashes(self, tokens: Sequence[int], hash_seed: int = 0) -> list[int]:
        return self.call("hashes", tokens=list(tokens), hash_seed=hash_seed)["keys"]

    def silence(self, instance_id: str) -> None:
        self.call("silence", instance_id=instance_id)

    def deregister(self, instance_id: str) -> None:
        self.call("deregister", instance_id=instance_id)

    def log(self) -> list[dict[str, Any]]:
        return self.call("log")["messages"]

    def held(self, instance_id: str) -> dict[str, list[int]]:
        return self.call("held", instance_id=instance_id)["held"]

# --- the shim (lmcache venv) ---------------------------------------------------------------


@dataclass
class _Worker:
    instance_id: str
    worker_id: int
    port: int
    db: Any  # ChunkedTokenDatabase with this worker's hash seed
    rep: Any  # zmq.asyncio REP socket the controller sends control messages to
    held: dict[str, list[int]] = field(default_factory=dict)  # location -> keys, in order
    seq: dict[str, int] = field(default_factory=dict)  # location -> next sequence number
    silent: bool = False
    task: asyncio.Task[None] | None = None


class _Shim:
    def __init__(self, pull: str, reply: str) -> None:
        import zmq
        import zmq.asyncio
        from lmcache.v1.cache_controller import message as m
        from lmcache.v1.token_database import ChunkedTokenDatabase

        self.zmq = zmq
        self.m = m
        self.ctx = zmq.asyncio.Context()
        self.reply_addr = reply
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 1000)
        self.push.connect(f"tcp://{pull}")
        self.workers: dict[str, _Worker] = {}
        self.log: list[dict[str, Any]] = []

        class SeededDatabase(ChunkedTokenDatabase):  # type: ignore[misc, valid-type]
            """ChunkedTokenDatabase whose hash chain starts at ``seed`` instead of
            NONE_HASH, as a vLLM-side init_none_hash under another PYTHONHASHSEED would."""

            def __init__(self, seed: int) -> None:
                super().__init__()
                self._seed = seed

            def _get_init_hash(self) -> int:
                return self._seed if self._seed else super()._get_init_hash()

        self._db_class = SeededDatabase
        self._dbs: dict[int, Any] = {}

    def db(self, seed: int) -> Any:
        if seed not in self._dbs:
            self._dbs[seed] = self._db_class(seed)
        return self._dbs[seed]

    def keys(self, tokens: list[int], seed: int, chunks: int | None) -> list[int]:
        # Only full chunks: a worker stores no partial last chunk (save_unfull_chunk is off
        # by default), so the controller can only ever match whole 256-token chunks.
        full = len(tokens) - len(tokens) % CHUNK_SIZE
        keys = [int(k) for _, _, k in self.db(seed).process_tokens(tokens[:full],
                                                                   make_key=False)]
        return keys if chunks is None else keys[:chunks]

    # -- requests from the test side --

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "register":
            return await self.register(str(req["instance_id"]), int(req.get("worker_id", 0)),
                                       int(req.get("hash_seed", 0)))
        if op in ("admit", "evict"):
            w = self._worker(req)
            loc = str(req.get("location") or DEFAULT_LOCATION)
            keys = self.keys(list(req["tokens"]), self._seed_of(w), req.get("chunks"))
            await self.report(w, loc, keys, admit=op == "admit")
            return {"keys": keys}
        if op == "evict_keys":
            w = self._worker(req)
            await self.report(w, str(req.get("location") or DEFAULT_LOCATION),
                              [int(k) for k in req["keys"]], admit=False)
            return {}
        if op == "hashes":
            return {"keys": self.keys(list(req["tokens"]), int(req.get("hash_seed", 0)), None)}
        if op == "silence":
            self._worker(req).silent = True
            return {}
        if op == "deregister":
            w = self.workers.pop(str(req["instance_id"]))
            msg = self.m.DeRegisterMsg(instance_id=w.instance_id, worker_id=w.worker_id,
                                       ip="127.0.0.1", port=w.port)
            await self.push.send_multipart([self._encode(msg)])
            await self._close_worker(w)
            return {}
        if op == "log":
            return {"messages": list(self.log)}
        if op == "held":
            return {"held": self._worker(req).held}
        raise ValueError(f"unknown op {op!r}")

    def _worker(self, req: dict[str, Any]) -> _Worker:
        iid = str(req["instance_id"])
        if iid not in self.workers:
            raise ValueError(f"instance {iid!r} is not registered with this shim")
        return self.workers[iid]

    @staticmethod
    def _seed_of(w: _Worker) -> int:
        return int(getattr(w.db, "_seed", 0))

    def _encode(self, msg: Any) -> bytes:
        import msgspec

        return msgspec.msgpack.encode(msg)

    async def register(self, instance_id: str, worker_id: int, seed: int) -> dict[str, Any]:
        if instance_id in self.workers:
            raise ValueError(f"instance {instance_id!r} already registered")
        zmq = self.zmq
        rep = self.ctx.socket(zmq.REP)
        rep.setsockopt(zmq.LINGER, 0)
        # The controller connects to ip:port from RegisterMsg; loopback keeps it local.
        port = rep.bind_to_random_port("tcp://127.0.0.1")
        w = _Worker(instance_id, worker_id, port, self.db(seed), rep)
        w.task = asyncio.create_task(self.serve(w))
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://{self.reply_addr}")
        try:
            msg = self.m.RegisterMsg(instance_id=instance_id, worker_id=worker_id,
                                     ip="127.0.0.1", port=port, peer_init_url=None)
            # DEALER framing as lmcache's own worker uses it: [empty, payload].
            await dealer.send_multipart([b"", self._encode(msg)])
            frames = await asyncio.wait_for(dealer.recv_multipart(), timeout=10.0)
        except TimeoutError:
            await self._close_worker(w)
            raise TimeoutError(f"no RegisterRetMsg from {self.reply_addr}") from None
        finally:
            dealer.close(linger=0)
        import msgspec

        ret = msgspec.msgpack.decode(frames[-1], type=self.m.Msg)
        if not isinstance(ret, self.m.RegisterRetMsg):
            await self._close_worker(w)
            raise RuntimeError(f"unexpected answer to RegisterMsg: {ret!r}")
        self.workers[instance_id] = w
        return {"port": port}

    async def report(self, w: _Worker, loc: str, keys: list[int], admit: bool) -> None:
        m = self.m
        held = w.held.setdefault(loc, [])
        ops = []
        for k in keys:
            if admit and k in held:
                continue  # a backend that already holds a key sends no second admit
            if not admit and k not in held:
                continue
            seq = w.seq.get(loc, 0)
            w.seq[loc] = seq + 1
            ops.append(m.KVOpEvent(op_type=m.OpType.ADMIT if admit else m.OpType.EVICT,
                                   key=k, seq_num=seq))
            if admit:
                held.append(k)
            else:
                held.remove(k)
        if ops:
            msg = m.BatchedKVOperationMsg(instance_id=w.instance_id, worker_id=w.worker_id,
                                          location=loc, operations=ops)
            await self.push.send_multipart([self._encode(msg)])

    # -- control messages from the controller --

    def _prefix(self, w: _Worker, tokens: list[int] | None, loc: str) -> int:
        held = set(w.held.get(loc, ()))
        n = 0
        for k in self.keys(list(tokens or []), self._seed_of(w), None):
            if k not in held:
                break
            n += 1
        return n * CHUNK_SIZE

    async def serve(self, w: _Worker) -> None:
        import msgspec

        m = self.m
        while True:
            raw = await w.rep.recv()
            req = msgspec.msgpack.decode(raw, type=m.Msg)
            entry = {"instance_id": w.instance_id, "type": type(req).__name__,
                     **msgspec.structs.asdict(req)}
            if isinstance(entry.get("tokens"), list):
                entry["tokens"] = len(entry["tokens"])  # the count is what tests check
            self.log.append(entry)
            if w.silent:
                # A REP socket cannot take another request before it answers this one, so
                # the controller's REQ socket to this worker stays stuck, as with a hung
                # vLLM process.
                entry["answered"] = False
                await asyncio.Event().wait()
            ret: Any
            if isinstance(req, m.PinWorkerMsg):
                ret = m.PinWorkerRetMsg(num_tokens=self._prefix(w, req.tokens, req.location))
            elif isinstance(req, (m.CompressWorkerMsg, m.DecompressWorkerMsg)):
                # LMCacheEngine.compress knows only cachegen; anything else is 0 tokens.
                if req.method != "cachegen":
                    n = 0
                elif req.tokens:
                    n = self._prefix(w, req.tokens, req.location)
                else:
                    n = len(w.held.get(req.location, ())) * CHUNK_SIZE
                cls = (m.CompressWorkerRetMsg if isinstance(req, m.CompressWorkerMsg)
                       else m.DecompressWorkerRetMsg)
                ret = cls(num_tokens=n)
            elif isinstance(req, m.ClearWorkerMsg):
                keys = list(w.held.get(req.location, ()))
                # The CPU backend reports each removed chunk as an eviction, as here.
                await self.report(w, req.location, keys, admit=False)
                ret = m.ClearWorkerRetMsg(num_tokens=len(keys) * CHUNK_SIZE)
            elif isinstance(req, m.HealthWorkerMsg):
                ret = m.HealthWorkerRetMsg(error_code=0)
            else:
                ret = m.ErrorMsg(error=f"Unknown message: {req}")
            entry["answered"] = True
            await w.rep.send(self._encode(ret))

    async def _close_worker(self, w: _Worker) -> None:
        if w.task is not None:
            w.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await w.task
        w.rep.close(linger=0)

    async def close(self) -> None:
        for w in list(self.workers.values()):
            await self._close_worker(w)
        self.push.close(linger=500)
        self.ctx.term()


async def _amain(args: argparse.Namespace, out: Any) -> None:
    shim = _Shim(args.pull, args.reply)
    loop = asyncio.get_running_loop()

    def emit(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    emit({"ready": True, "pid": os.getpid()})
    try:
        while True:
            # stdin is read in a thread so control messages keep being answered meanwhile.
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            if not line.strip():
                continue
            rid: Any = None
            try:
                req = json.loads(line)
                rid = req.get("id")
                if req.get("op") == "quit":
                    emit({"id": rid, "ok": True})
                    break
                emit({"id": rid, "ok": True, **await shim.handle(req)})
            except Exception as e:  # every failure goes back to the caller, as text
                emit({"id": rid, "ok": False, "error": f"{type(e).__name__}: {e}"})
    finally:
        await shim.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pull", required=True, help="controller pull socket, host:port")
    p.add_argument("--reply", required=True, help="controller reply socket, host:port")
    args = p.parse_args(argv)
    # stdout carries the protocol, but lmcache's loggers (and anything else) may print to
    # it: keep a private copy of fd 1 for answers and point fd 1 at stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import lmcache  # noqa: F401  - fail here, loudly, outside the lmcache venv

    asyncio.run(_amain(args, out))


if __name__ == "__main__":
    main()
