"""What proxy replicas tell each other so that N of them route as one (pure: no I/O).

Each replica routes from its own `Router`. Behind an L4 load balancer a replica sees only its
share of the requests, so its prefix index would know only its share of what is in flight
and recently finished. Replicas therefore publish, per request they route, what the index
needs (`Router.share` events), and apply every other replica's events to their own index
under a key naming that replica: a local mirror of the cluster's proxy-side state, read on
the request path with no I/O at all. What carries the events (Redis pub/sub,
`addon/redis_link.py`; the routing benchmark's virtual-time delay) is not this module's
business.

Shared: the in-flight prefixes and the queued prefill they carry (the load estimate), the
recently finished prompts (the index remembers a peer's request when it ends), and the
endpoint that served each prompt (a chat's next turn). Not shared: hot-prefix counts, the
token cache, breakers and health (each replica measures those itself).

Events (plain tuples, so any codec carries them):

- ``("a", rid, endpoint, hashes, uncached, watched, key, prompt_tokens, weight)``: routed
  (``weight``, its per-request load in requests, may be missing: a replica of an older
  version; it then counts once);
- ``("p", rid)``: its prefill is over (a streamed answer's first byte);
- ``("r", rid)``: it ended;
- ``("s",)``: the sender (re)joined: every receiver drops what it had of the sender and
  answers with a snapshot of its own in-flight requests;
- ``("?", replica)``: `replica` is asked for a snapshot (a receiver missed some of its
  batches);
- ``("S", entries)``: the sender's in-flight requests, replacing what the receiver had of
  it (entries are ``(rid, endpoint, hashes, pending, watched[, weight])``).

Batches carry a per-sender sequence number: a gap (a batch lost, or the sender dropped
events while its link was down) makes the receiver drop that sender's entries and ask it for
a snapshot. A sender not heard from for `peer_timeout` (it died, or the link did) is dropped
too: a dead replica's in-flight load must not haunt the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

Event = tuple[Any, ...]


@dataclass
class ReplicaStats:
    batches_received: int = 0
    events_received: int = 0
    events_sent: int = 0
    gaps: int = 0  # batches missed from a peer (its entries dropped, a snapshot asked for)
    peers_expired: int = 0  # peers dropped for silence
    snapshots_sent: int = 0
    snapshots_applied: int = 0
    link_losses: int = 0  # times the link went down (every peer's entries dropped)


class _Peer:
    __slots__ = ("last_seen", "seq", "rids")

    def __init__(self, now: float) -> None:
        self.last_seen = now
        self.seq = -1
        self.rids: set[Hashable] = set()


class ReplicaSync:
    """Applies other replicas' events to one replica's `Router` and says what to send.

    `send(events)` is called with the events to publish (the router's own, snapshots and
    sync requests); the carrier batches them and numbers the batches. All methods run on
    the router's thread (the event loop).
    """

    def __init__(
        self,
        router: Any,
        replica_id: str,
        send: Callable[[list[Event]], None],
        *,
        peer_timeout: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if peer_timeout <= 0:
            raise ValueError("peer_timeout must be positive")
        self.router = router
        self.replica_id = replica_id
        self._send = send
        self.peer_timeout = peer_timeout
        self.clock = clock
        self.peers: dict[str, _Peer] = {}
        self.stats = ReplicaStats()
        router.share = self._share

    # -- this replica's own requests -------------------------------------------------------

    def _share(self, event: Event) -> None:
        self.stats.events_sent += 1
        self._send([event])

    def snapshot(self) -> Event:
        """This replica's own in-flight requests, as one event."""
        entries = [list(e) for e in self.router.index.entries() if not _remote(e[0])]
        self.stats.snapshots_sent += 1
        return ("S", entries)

    def joined(self) -> None:
        """The link is (back) up: ask every peer for its state and publish ours."""
        self._send([("s",), self.snapshot()])

    def link_lost(self) -> None:
        """The link is down: what peers told us goes stale from now on, so it is dropped
        (each replica routes from its own view until the link is back)."""
        self.stats.link_losses += 1
        for name in list(self.peers):
            self._drop(name)

    # -- other replicas' events ------------------------------------------------------------

    def receive(self, sender: str, seq: int, events: Sequence[Event]) -> None:
        """A batch `seq` from replica `sender` (our own batches come back too: ignored)."""
        if sender == self.replica_id:
            return
        now = self.clock()
        peer = self.peers.get(sender)
        rejoined = any(ev[0] == "s" for ev in events)
        if peer is None:
            peer = self.peers[sender] = _Peer(now)
            if seq != 0 and not rejoined:
                # Heard mid-stream (we started, or our link came back, after it joined):
                # what it has in flight is not in our index yet.
                self._send([("?", sender)])
        elif seq != peer.seq + 1 and not rejoined:
            self.stats.gaps += 1
            self._drop(sender, forget=False)
            self._send([("?", sender)])
        peer.last_seen = now
        peer.seq = seq
        self.stats.batches_received += 1
        for ev in events:
            self.stats.events_received += 1
            self._apply(sender, peer, ev)

    def _apply(self, sender: str, peer: _Peer, ev: Event) -> None:
        kind = ev[0]
        index = self.router.index
        if kind == "a":
            _, rid, endpoint, hashes, uncached, watched, key, prompt_tokens = ev[:8]
            weight = float(ev[8]) if len(ev) > 8 else 1.0
            r = ("@", sender, rid)
            index.add(r, endpoint, tuple(hashes), uncached, watched=watched, weight=weight)
            peer.rids.add(r)
            if len(peer.rids) > index.max_tracked:
                # The index dropped some at its bound: forget those here too.
                peer.rids = {x for x in peer.rids if index.tracks(x)}
            if key and prompt_tokens:
                self.router.remember_served(key, endpoint, prompt_tokens)
        elif kind == "p":
            index.prefill_done(("@", sender, ev[1]))
        elif kind == "r":
            r = ("@", sender, ev[1])
            peer.rids.discard(r)
            index.remove(r)
        elif kind == "s":
            # It (re)joined: whatever we had of it is stale; it wants our state.
            self._drop(sender, forget=False)
            self._send([self.snapshot()])
        elif kind == "?":
            if ev[1] == self.replica_id:
                self._send([self.snapshot()])
        elif kind == "S":
            self._drop(sender, forget=False)
            self.stats.snapshots_applied += 1
            for rid, endpoint, hashes, pending, watched, *rest in ev[1]:
                r = ("@", sender, rid)
                index.add(r, endpoint, tuple(hashes), pending, watched=watched,
                          weight=float(rest[0]) if rest else 1.0)
                peer.rids.add(r)

    def expire(self) -> list[str]:
        """Drop the peers not heard from for `peer_timeout`; their names."""
        now = self.clock()
        gone = [n for n, p in self.peers.items() if now - p.last_seen > self.peer_timeout]
        for name in gone:
            self.stats.peers_expired += 1
            self._drop(name)
        return gone

    def _drop(self, name: str, forget: bool = True) -> None:
        peer = self.peers.get(name)
        if peer is None:
            return
        index = self.router.index
        for r in peer.rids:
            # Not remembered as recently finished: nothing says it finished there.
            index.remove(r, remember=False)
        peer.rids.clear()
        if forget:
            del self.peers[name]

    def remote_inflight(self) -> int:
        return sum(len(p.rids) for p in self.peers.values())


def _remote(rid: Hashable) -> bool:
    return isinstance(rid, tuple) and len(rid) == 3 and rid[0] == "@"
