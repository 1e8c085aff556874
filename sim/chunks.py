"""Chained token hashes, shaped like LMCache's ``ChunkedTokenDatabase``.

The hash of chunk ``i`` covers the hash of chunk ``i - 1`` and chunk ``i``'s tokens, so a
chunk hash identifies the whole prefix up to the end of that chunk. Only full chunks are
hashed: LMCache never stores (and the controller never matches) a partial last chunk.

blake2b is used rather than Python's ``hash()`` because the engine and controller simulators
run in different processes and must agree; with ``hash()`` they would silently disagree
under hash randomisation (the real-world ``PYTHONHASHSEED`` pitfall).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from hashlib import blake2b

CHUNK_SIZE = 256


def _token_bytes(tokens: Sequence[int]) -> bytes:
    try:
        return array("q", tokens).tobytes()
    except OverflowError:
        # Token ids never exceed int64 in practice; this keeps odd inputs hashable.
        return ",".join(str(t) for t in tokens).encode()


def chained_hashes(tokens: Sequence[int], size: int, seed: int = 0) -> list[int]:
    """Chained 64-bit hashes of the full ``size``-token groups of ``tokens``."""
    if size <= 0:
        raise ValueError("size must be positive")
    n_full = len(tokens) // size
    if n_full == 0:
        return []
    try:
        # One conversion for the whole prompt; slicing bytes is much cheaper per group.
        buf = array("q", tokens[: n_full * size]).tobytes()
        stride = size * 8
        pieces = [buf[i * stride : (i + 1) * stride] for i in range(n_full)]
    except OverflowError:
        pieces = [_token_bytes(tokens[i * size : (i + 1) * size]) for i in range(n_full)]
    out: list[int] = []
    # Chain on the previous 8-byte digest directly; converting to int and back per group
    # would cost as much as the hashing.
    prev = (seed & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
    for piece in pieces:
        prev = blake2b(prev + piece, digest_size=8).digest()
        out.append(int.from_bytes(prev, "little"))
    return out


def chunk_hashes(tokens: Sequence[int], seed: int = 0) -> list[int]:
    """Hashes of the full 256-token chunks of ``tokens`` (empty below 256 tokens).

    ``seed`` exists only to simulate a controller/worker hash-seed mismatch; every party
    that should agree must use the same seed (the default).
    """
    return chained_hashes(tokens, CHUNK_SIZE, seed)


def tokens_hash(tokens: Sequence[int]) -> int:
    """Stable 64-bit hash of a whole token sequence (used to seed generated text)."""
    h = blake2b(_token_bytes(tokens), digest_size=8)
    return int.from_bytes(h.digest(), "little")
