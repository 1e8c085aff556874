"""What the proxy remembers about prompts: their tokens and how hot they are (pure state).

Shared by the event loop (reads) and the background pool (writes), hence the locks.
"""

from __future__ import annotations

import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable

from cachetools import TTLCache


def compact(tokens: Iterable[int]) -> array[int]:
    """Token ids as a 4-byte array (8-byte past 2**31); an array is kept as it is. Raises
    TypeError for anything but integers, which also makes it the check of a tokenizer's
    answer (in C: a Python loop of isinstance over 16k ids costs ~1 ms)."""
    if isinstance(tokens, array) and tokens.typecode in ("i", "q"):
        return tokens
    try:
        return array("i", tokens)
    except OverflowError:  # ids past 2**31: no tokenizer has them, but never fail on them
        return array("q", tokens)


class TokenCache:
    """Prompt key -> token ids, bounded in size and age (LRU within a TTL).

    Stored as 4-byte ints (a tuple of Python ints costs ~9x more): 4,096 prompts of 10k
    tokens stay near 160 MB instead of 1.5 GB. Readers get a fresh tuple.
    """

    def __init__(
        self, max_size: int, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._cache: TTLCache[str, array[int]] = TTLCache(max_size, ttl, timer=clock)
        # Chunk hashes of cached prompts, filled by the request path on first use (a 16k-token
        # prompt costs ~0.3 ms to hash); bounded and aged like the tokens.
        self._chunks: TTLCache[str, tuple[int, ...]] = TTLCache(max_size, ttl, timer=clock)
        self._lock = threading.Lock()
        self.hits = 0
        self.prefix_hits = 0
        self.misses = 0

    def put(self, key: str, tokens: Iterable[int]) -> None:
        with self._lock:
            self._cache[key] = compact(tokens)

    def get(self, key: str) -> tuple[int, ...] | None:
        with self._lock:
            tokens = self._cache.get(key)
        return None if tokens is None else tuple(tokens)

    def has(self, key: str) -> bool:
        with self._lock:
            return key in self._cache

    def lookup(self, key: str, prefix_keys: Iterable[str] = ()) -> tuple[tuple[int, ...], str]:
        """Tokens of the prompt, or of the longest earlier conversation it extends.

        Returns (tokens, source) with source "exact", "prefix" or "" (nothing known).
        """
        tokens, source = self.lookup_array(key, prefix_keys)
        return tuple(tokens), source

    def lookup_array(self, key: str, prefix_keys: Iterable[str] = ()) -> tuple[
            array[int] | tuple[()], str]:
        """`lookup` without the copy: the stored array itself, for the request path (a
        16k-token tuple costs ~0.1 ms to build; the array hashes and serializes directly).
        Callers must not modify it."""
        tokens, source, _ = self.lookup_entry(key, prefix_keys)
        return tokens, source

    def lookup_entry(self, key: str, prefix_keys: Iterable[str] = ()) -> tuple[
            array[int] | tuple[()], str, str]:
        """`lookup_array` and the key it was found under ("" when not found)."""
        with self._lock:
            tokens = self._cache.get(key)
            if tokens is not None:
                self.hits += 1
                return tokens, "exact", key
            for pk in prefix_keys:
                tokens = self._cache.get(pk)
                if tokens is not None:
                    self.prefix_hits += 1
                    return tokens, "prefix", pk
            self.misses += 1
            return (), "", ""

    def chunks(self, key: str) -> tuple[int, ...] | None:
        with self._lock:
            return self._chunks.get(key)

    def put_chunks(self, key: str, chunks: tuple[int, ...]) -> None:
        with self._lock:
            if key in self._cache:
                self._chunks[key] = chunks

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)


_MAX_TIMES = 10_000


class Hotness:
    """Accesses per prompt key within a sliding window, for at most `max_records` keys."""

    def __init__(
        self, window: float, max_records: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window = window
        self._clock = clock
        # The TTL drops keys not seen for a whole window; maxsize bounds memory.
        self._seen: TTLCache[str, deque[float]] = TTLCache(
            max_records, max(window, 1e-9), timer=clock
        )
        self._lock = threading.Lock()

    def record(self, key: str) -> int:
        """Count one access and return the accesses within the window, this one included."""
        now = self._clock()
        with self._lock:
            times = self._seen.get(key)
            if times is None:
                # Bounded: only counts up to the hot threshold matter.
                times = deque(maxlen=_MAX_TIMES)
            times.append(now)
            while times and times[0] <= now - self._window:
                times.popleft()
            self._seen[key] = times  # re-set to refresh the key's TTL
            return len(times)

    def count(self, key: str) -> int:
        now = self._clock()
        with self._lock:
            times = self._seen.get(key)
            if not times:
                return 0
            return sum(1 for t in times if t > now - self._window)
