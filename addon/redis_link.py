"""Carries the replicas' events (addon/replicas.py) over Redis pub/sub (thin I/O layer).

Why pub/sub and a local mirror rather than reading Redis on the request path: a read is a
network round trip per request (measured in docs/replicas.md), on the event loop, and a slow
or dead Redis would then sit on every request's routing budget. With a mirror the request
path reads only memory; what Redis adds is staleness (publish -> Redis -> every subscriber
-> its event loop), measured here on every batch from this replica's own echo.

Two daemon threads, so the event loop never touches a socket: a writer that publishes the
events the loop queued (batched: everything queued since its last publish goes out as one
message, and an empty one every `heartbeat` so that peers know it is alive), and a reader
that subscribes and hands each burst of messages to the loop with `call_soon_threadsafe`.
Redis down, slow, restarted (empty) or cut off: the reader notices (an error, or not even
its own heartbeat came back within `peer_timeout`), the loop drops what peers said
(`ReplicaSync.link_lost`: this replica routes from its own view), it is logged once and
counted, and the reader reconnects with backoff; once subscribed again, the replica
republishes its state and asks the others for theirs (`ReplicaSync.joined`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import redis

from addon.replicas import Event, ReplicaSync
from addon.resilience import RateLimitedLog

logger = logging.getLogger(__name__)

# Events queued while the writer cannot publish, beyond which they are dropped (and the
# replica republishes a snapshot once it can): memory stays bounded whatever Redis does.
MAX_QUEUED = 50_000
# Staleness samples kept (this replica's own echoes) for the stats' percentiles.
SAMPLES = 2048


@dataclass
class LinkStats:
    connected: bool = False
    batches_published: int = 0
    publish_failures: int = 0
    events_dropped: int = 0  # queued while Redis could not take them
    connects: int = 0
    disconnects: int = 0


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
        self.channel = channel
        self.replica_id = replica_id
        self.heartbeat = heartbeat
        self.peer_timeout = peer_timeout
        self.timeout = timeout
        self.failure_log = failure_log or RateLimitedLog()
        self.stats = LinkStats()
        self.staleness: deque[float] = deque(maxlen=SAMPLES)  # seconds, own echoes
        self._queue: deque[tuple[float, list[Event]]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._broken = threading.Event()  # the writer failed: the reader reconnects
        self._up = False  # subscribed (set by the reader; the writer publishes only then)
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sync: ReplicaSync | None = None
        self._seq = 0

    # -- the event loop's side ----------------------------------------------------------

    def send(self, events: list[Event]) -> None:
        """Queue events for publishing (called on the event loop; never blocks)."""
        if not self._up:
            return  # peers get a snapshot when the link is back (ReplicaSync.joined)
        if len(self._queue) >= MAX_QUEUED:
            self._queue.clear()
            self.stats.events_dropped += MAX_QUEUED
            self._broken.set()  # reconnect, and so rejoin with a snapshot
            return
        self._queue.append((time.time(), events))
        self._wake.set()

    def start(self, loop: asyncio.AbstractEventLoop, sync: ReplicaSync) -> None:
        self._loop, self._sync = loop, sync
        for name, target in (("writer", self._write), ("reader", self._read)):
            t = threading.Thread(target=target, name=f"kvcache-redis-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=2.0)
        self._threads = []

    def staleness_ms(self) -> dict[str, float]:
        """Percentiles of the delay from queueing an event to reading it back on the loop."""
        xs = sorted(self.staleness)
        if not xs:
            return {}
        def pct(q: float) -> float:
            return round(xs[min(int(q * len(xs)), len(xs) - 1)] * 1000, 2)
        return {"p50": pct(0.5), "p99": pct(0.99), "max": round(xs[-1] * 1000, 2),
                "samples": len(xs)}

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop closed: mitmproxy is shutting down

    def _on_up(self) -> None:
        self._queue.clear()  # from before the link went down: the snapshot supersedes it
        self._up = True
        if self._sync is not None:
            self._sync.joined()

    def _on_down(self) -> None:
        self._up = False
        self._queue.clear()
        if self._sync is not None:
            self._sync.link_lost()

    def _on_batches(self, batches: list[tuple[str, int, float, list[Event]]]) -> None:
        sync = self._sync
        if sync is None:
            return
        now = time.time()
        for sender, seq, t0, events in batches:
            if sender == self.replica_id:
                if events:
                    self.staleness.append(max(now - t0, 0.0))
                continue
            sync.receive(sender, seq, events)
        sync.expire()

    # -- threads --------------------------------------------------------------------------

    def _client(self) -> redis.Redis:
        return redis.Redis.from_url(
            self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
            health_check_interval=0)

    def _write(self) -> None:
        client: redis.Redis | None = None
        last = 0.0
        while not self._stop.is_set():
            self._wake.wait(self.heartbeat / 2)
            self._wake.clear()
            if not self._up:
                continue
            events: list[Event] = []
            t0 = 0.0
            while self._queue:
                t, evs = self._queue.popleft()
                t0 = t0 or t
                events.extend(evs)
            now = time.time()
            if not events and now - last < self.heartbeat:
                continue
            payload = msgpack.packb(
                (self.replica_id, self._seq, t0 or now, events), use_bin_type=True)
            # Numbered whether or not it gets through: a lost batch leaves a gap the peers
            # see (and answer by asking for a snapshot).
            self._seq += 1
            try:
                if client is None:
                    client = self._client()
                client.publish(self.channel, payload)
                self.stats.batches_published += 1
                last = now
            except Exception as e:
                self.stats.publish_failures += 1
                self._log("publish", e)
                self._broken.set()
                if client is not None:
                    client.close()
                client = None
        if client is not None:
            client.close()

    def _read(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._client().pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                self._broken.clear()
                self.stats.connected = True
                self.stats.connects += 1
                if self.stats.connects > 1:
                    logger.info(f"[kvcache] shared state: Redis at {self.url} is back; "
                                "rejoined the other replicas")
                self._call(self._on_up)
                backoff = 0.2
                self._listen(pubsub)
            except Exception as e:
                self._log("subscribe", e)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass
            if self.stats.connected:
                self.stats.connected = False
                self.stats.disconnects += 1
                self._call(self._on_down)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _listen(self, pubsub: Any) -> None:
        heard = time.monotonic()  # this replica's own heartbeat last came back
        while not self._stop.is_set():
            if self._broken.is_set():
                raise ConnectionError("publishing failed")
            if time.monotonic() - heard > self.peer_timeout:
                raise TimeoutError(f"no message back from Redis for {self.peer_timeout:g} s")
            batches = []
            msg = pubsub.get_message(timeout=min(0.1, self.timeout / 2))
            while msg is not None and len(batches) < 256:
                if msg.get("type") == "message":
                    try:
                        sender, seq, t0, events = msgpack.unpackb(msg["data"], raw=False)
                    except Exception:
                        self.failure_log.should_log("redis:bad-message")
                    else:
                        if sender == self.replica_id:
                            heard = time.monotonic()
                        batches.append((sender, seq, t0, events))
                msg = pubsub.get_message(timeout=0)
            if batches:
                self._call(self._on_batches, batches)

    def _log(self, what: str, e: BaseException) -> None:
        log_now, n = self.failure_log.should_log(f"redis:{what}")
        if log_now:
            more = f" ({n} more since the last report)" if n else ""
            logger.warning(
                f"[kvcache] shared state: Redis at {self.url} failed to {what} "
                f"({type(e).__name__}: {e}); routing from this replica's own view until it "
                f"is back{more}")
