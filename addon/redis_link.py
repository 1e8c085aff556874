"""Carries the replicas' events (addon/replicas.py) over Redis pub/sub (thin I/O layer).

Why pub/sub and a local mirror rather than reading Redis on the request path: a read is a
network round trip per request (about 0.1 ms at rest and 1-4 ms with 16 in flight here:
docs/replica-throughput.md), and a slow or dead Redis would then sit on every request's
routing budget. With a mirror the request path reads only memory; what Redis adds is
staleness (publish -> Redis -> every subscriber), measured on every batch from this
replica's own echo (`staleness_ms`).

Everything runs on the event loop, as one background task, with no threads: a first version
published from a writer thread and read from a reader thread, and the two threads' fight
with the event loop for the GIL cost 0.9 ms of CPU per proxied request and most of a second
replica's throughput (measured: docs/replica-throughput.md). Events queued during one pass
of the loop go out as one PUBLISH at the end of it, pipelined (the reply is read by the
same task later), so batching is free and nothing waits on Redis.

The Redis protocol (RESP) is spoken here by hand, for the few commands needed (AUTH,
SUBSCRIBE, PUBLISH, and reading pushed messages): redis-py's asyncio client awaits each
PUBLISH's reply and costs about ten times the event-loop CPU per batch published, and three
times per batch received, of the pipelined code below (`python -m bench.replica_throughput`
measures both, docs/replica-throughput.md); the event loop is the proxy's one core.

Redis down, slow, restarted (empty) or cut off: the task notices (an error, a write buffer
Redis does not drain, or not even its own heartbeat coming back within `peer_timeout`), the
loop drops what peers said (`ReplicaSync.link_lost`: this replica routes from its own view),
it is logged once and counted, and the task reconnects with backoff; once subscribed again,
the replica republishes its state and asks the others for theirs (`ReplicaSync.joined`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import msgpack

from addon.replicas import Event, ReplicaSync
from addon.resilience import RateLimitedLog

logger = logging.getLogger(__name__)

# Bytes Redis may leave unread on the publishing connection before the link counts as down
# (a Redis that stopped reading must not grow this process's memory).
MAX_UNSENT = 4 << 20
# Staleness samples kept (this replica's own echoes) for the stats' percentiles.
SAMPLES = 2048
# Reported percentiles (the routing benchmark samples staleness from them).
QUANTILES = (10, 25, 50, 75, 90, 99)


@dataclass
class LinkStats:
    connected: bool = False
    batches_published: int = 0
    events_published: int = 0
    publish_failures: int = 0
    events_dropped: int = 0  # queued while the link was down or Redis did not drain them
    connects: int = 0
    disconnects: int = 0


class LinkDown(Exception):
    pass


def _command(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%b\r\n" % (len(a), a))
    return b"".join(out)


async def _reply(reader: asyncio.StreamReader) -> object:
    """One RESP2 reply (a pushed pub/sub message is an array)."""
    line = await reader.readuntil(b"\r\n")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b":":
        return int(rest)
    if kind == b"-":
        raise LinkDown(f"Redis error: {rest.decode(errors='replace')}")
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        return (await reader.readexactly(n + 2))[:-2]
    if kind == b"*":
        n = int(rest)
        return [await _reply(reader) for _ in range(max(n, 0))]
    raise LinkDown(f"not a Redis reply: {line[:40]!r}")


class RedisLink:
    def __init__(
        self,
        url: str,
        channel: str,
        replica_id: str,
        *,
        heartbeat: float = 0.5,
        peer_timeout: float = 3.0,
        timeout: float = 0.5,
        failure_log: RateLimitedLog | None = None,
    ) -> None:
        self.url = url
        self.channel = channel.encode()
        self.replica_id = replica_id
        self.heartbeat = heartbeat
        self.peer_timeout = peer_timeout
        self.timeout = timeout
        self.failure_log = failure_log or RateLimitedLog()
        self.stats = LinkStats()
        self.staleness: deque[float] = deque(maxlen=SAMPLES)  # seconds, own echoes
        self._pending: list[Event] = []
        self._pending_since = 0.0
        self._flush_at_end_of_pass = False
        self._pub: asyncio.StreamWriter | None = None
        self._broken: asyncio.Event | None = None
        self._last_publish = 0.0
        self._heard = 0.0  # when this replica's own batch last came back
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sync: ReplicaSync | None = None
        self._task: asyncio.Task[None] | None = None
        self._head = _command(b"PUBLISH", self.channel, b"")[: -len(b"$0\r\n\r\n")]

    # -- the router's side (on the event loop) ---------------------------------------------

    def send(self, events: list[Event]) -> None:
        """Queue events; they go out at the end of this pass of the loop. Never blocks."""
        if self._pub is None:
            return  # peers get a snapshot when the link is back (ReplicaSync.joined)
        if not self._pending:
            self._pending_since = time.time()
        self._pending.extend(events)
        if not self._flush_at_end_of_pass and self._loop is not None:
            self._flush_at_end_of_pass = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_at_end_of_pass = False
        pub = self._pub
        events, self._pending = self._pending, []
        if pub is None:
            self.stats.events_dropped += len(events)
            return
        now = time.time()
        payload = msgpack.packb(
            (self.replica_id, self._seq, self._pending_since if events else now, events),
            use_bin_type=True)
        # Numbered whether or not it gets through: a lost batch leaves a gap the peers see
        # (and answer by asking for a snapshot).
        self._seq += 1
        if pub.transport.get_write_buffer_size() > MAX_UNSENT:
            self.stats.publish_failures += 1
            self.stats.events_dropped += len(events)
            if self._broken is not None:
                self._broken.set()
            return
        pub.write(self._head + b"$%d\r\n" % len(payload) + payload + b"\r\n")
        self.stats.batches_published += 1
        self.stats.events_published += len(events)
        self._last_publish = time.monotonic()

    def start(self, loop: asyncio.AbstractEventLoop, sync: ReplicaSync) -> None:
        self._loop, self._sync = loop, sync
        self._task = loop.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._pub is not None:
            self._pub.close()
            self._pub = None

    def staleness_ms(self) -> dict[str, float]:
        """Percentiles of the delay from queueing an event to reading it back from Redis."""
        xs = sorted(self.staleness)
        if not xs:
            return {}

        def pct(q: float) -> float:
            return round(xs[min(int(q * len(xs)), len(xs) - 1)] * 1000, 2)

        return {**{f"p{q}": pct(q / 100) for q in QUANTILES},
                "max": round(xs[-1] * 1000, 2), "samples": len(xs)}

    # -- the background task -------------------------------------------------------------

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        u = urlsplit(self.url)
        if u.scheme == "unix":
            opened = asyncio.open_unix_connection(u.path)
        else:
            ctx = ssl.create_default_context() if u.scheme == "rediss" else None
            opened = asyncio.open_connection(u.hostname or "127.0.0.1", u.port or 6379,
                                             ssl=ctx)
        reader, writer = await asyncio.wait_for(opened, self.timeout)
        if u.password is not None or u.username:
            creds = ([unquote(u.username).encode()] if u.username else []) + [
                unquote(u.password or "").encode()]
            writer.write(_command(b"AUTH", *creds))
            await asyncio.wait_for(_reply(reader), self.timeout)
        return reader, writer

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            writers: list[asyncio.StreamWriter] = []
            try:
                sub_r, sub_w = await self._connect()
                writers.append(sub_w)
                sub_w.write(_command(b"SUBSCRIBE", self.channel))
                await asyncio.wait_for(_reply(sub_r), self.timeout)
                pub_r, pub_w = await self._connect()
                writers.append(pub_w)
                self._up(pub_w)
                backoff = 0.2
                jobs = [asyncio.ensure_future(c) for c in (
                    self._listen(sub_r), self._drain(pub_r), self._beat())]
                try:
                    done, _ = await asyncio.wait(jobs, return_when=asyncio.FIRST_COMPLETED)
                    for j in done:
                        j.result()  # raises what ended it
                finally:
                    for j in jobs:
                        j.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._log(e)
            finally:
                self._down()
                for w in writers:
                    w.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _up(self, pub: asyncio.StreamWriter) -> None:
        self._pub = pub
        self._broken = asyncio.Event()
        self._heard = time.monotonic()
        self.stats.connected = True
        self.stats.connects += 1
        if self.stats.connects > 1:
            logger.info(f"[kvcache] shared state: Redis at {self.url} is back; rejoined the "
                        "other replicas")
        if self._sync is not None:
            self._sync.joined()

    def _down(self) -> None:
        self._pub = None
        self.stats.events_dropped += len(self._pending)
        self._pending = []
        if self.stats.connected:
            self.stats.connected = False
            self.stats.disconnects += 1
            if self._sync is not None:
                self._sync.link_lost()

    async def _listen(self, reader: asyncio.StreamReader) -> None:
        sync = self._sync
        while True:
            msg = await _reply(reader)
            if not (isinstance(msg, list) and len(msg) == 3 and msg[0] == b"message"):
                continue
            try:
                sender, seq, t0, events = msgpack.unpackb(msg[2], raw=False)
            except Exception:
                self.failure_log.should_log("redis:bad-message")
                continue
            if sender == self.replica_id:
                self._heard = time.monotonic()
                if events:
                    self.staleness.append(max(time.time() - t0, 0.0))
            elif sync is not None:
                sync.receive(sender, seq, events)

    async def _drain(self, reader: asyncio.StreamReader) -> None:
        """Read the PUBLISH replies (pipelined: nobody waits for them)."""
        while True:
            await _reply(reader)

    async def _beat(self) -> None:
        """Publish an empty batch when idle for `heartbeat`; check that this replica's own
        batches come back; drop the peers that went silent."""
        assert self._broken is not None
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._broken.wait(), self.heartbeat / 2)
            if self._broken.is_set():
                raise LinkDown("Redis does not read what this replica publishes")
            now = time.monotonic()
            if now - self._heard > self.peer_timeout:
                raise LinkDown(f"nothing came back from Redis for {self.peer_timeout:g} s")
            if now - self._last_publish >= self.heartbeat and not self._flush_at_end_of_pass:
                self._flush()
            if self._sync is not None:
                self._sync.expire()

    def _log(self, e: BaseException) -> None:
        log_now, n = self.failure_log.should_log("redis:link")
        if log_now:
            more = f" ({n} more since the last report)" if n else ""
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            logger.warning(
                f"[kvcache] shared state: Redis at {self.url} failed ({why}); routing from "
                f"this replica's own view until it is back{more}")
