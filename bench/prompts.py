"""Token sequences with their chained hashes, computed once per workload.

Every run of a workload (one per policy and load level) sees the same prompts, so hashing them
once (with ``sim.chunks.chained_hashes``, the engine model's and controller's own hash)
instead of in every engine lookup keeps a full benchmark under a minute: hashing a long
prompt costs several times more than looking up and inserting its already hashed blocks.

A prompt that extends another one (a chat round, a question after a shared context) reuses its
parent's hashes: a chained hash over fixed-size groups only depends on the previous hash and
the group's tokens, so continuing the chain from the parent's last full group gives exactly
``chained_hashes(parent + new)`` at the cost of hashing the new tokens only.
"""

from __future__ import annotations

import random
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from sim.chunks import CHUNK_SIZE, chained_hashes

# production-stack's prefixaware router hashes 128-character chunks; with token ids in place
# of characters it becomes 128-token chunks.
PREFIXAWARE_CHUNK = 128
# Granularity of the approximate radix trees (SGLang's is per character): fine enough that a
# match rate lands on the right side of a 0.3 or 0.5 threshold, whatever the engine's block.
TREE_BLOCK = 16


@dataclass(frozen=True, eq=False)
class Prompt:
    """One prompt's tokens and chained hashes at the granularities the benchmark needs."""

    tokens: tuple[int, ...]
    block_size: int
    blocks: tuple[int, ...]  # engine prefix-cache blocks (``block_size`` tokens)
    chunks: tuple[int, ...]  # LMCache controller chunks (256 tokens)
    pa_chunks: tuple[int, ...]  # production-stack prefixaware chunks (128 tokens)
    tree_blocks: tuple[int, ...]  # router-side radix tree nodes (16 tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def truncate(self, n: int) -> Prompt:
        """The first ``n`` tokens: the hashes of a prefix are a prefix of the hashes."""
        if n >= len(self.tokens):
            return self
        return Prompt(
            tokens=self.tokens[:n],
            block_size=self.block_size,
            blocks=self.blocks[: n // self.block_size],
            chunks=self.chunks[: n // CHUNK_SIZE],
            pa_chunks=self.pa_chunks[: n // PREFIXAWARE_CHUNK],
            tree_blocks=self.tree_blocks[: n // TREE_BLOCK],
        )


def _extend_hashes(
    parent_tokens: Sequence[int], parent_hashes: Sequence[int], new: Sequence[int], size: int
) -> tuple[int, ...]:
    full = len(parent_tokens) // size
    base = tuple(parent_hashes[:full])
    seed = base[-1] if full else 0
    rest = list(parent_tokens[full * size :]) + list(new)
    return base + tuple(chained_hashes(rest, size, seed))


class PromptFactory:
    """Builds ``Prompt`` objects for one engine block size."""

    def __init__(self, block_size: int) -> None:
        if block_size <= 0 or CHUNK_SIZE % block_size:
            raise ValueError(f"block_size must divide {CHUNK_SIZE}")
        self.block_size = block_size

    def make(self, tokens: Sequence[int]) -> Prompt:
        toks = tuple(tokens)
        return Prompt(
            tokens=toks,
            block_size=self.block_size,
            blocks=tuple(chained_hashes(toks, self.block_size)),
            chunks=tuple(chained_hashes(toks, CHUNK_SIZE)),
            pa_chunks=tuple(chained_hashes(toks, PREFIXAWARE_CHUNK)),
            tree_blocks=tuple(chained_hashes(toks, TREE_BLOCK)),
        )

    def extend(self, parent: Prompt, new: Sequence[int]) -> Prompt:
        """``make(parent.tokens + new)``, hashing only what the parent did not cover."""
        if parent.block_size != self.block_size:
            raise ValueError("parent prompt was built for another block size")
        pt = parent.tokens
        return Prompt(
            tokens=pt + tuple(new),
            block_size=self.block_size,
            blocks=_extend_hashes(pt, parent.blocks, new, self.block_size),
            chunks=_extend_hashes(pt, parent.chunks, new, CHUNK_SIZE),
            pa_chunks=_extend_hashes(pt, parent.pa_chunks, new, PREFIXAWARE_CHUNK),
            tree_blocks=_extend_hashes(pt, parent.tree_blocks, new, TREE_BLOCK),
        )


def random_tokens(rng: random.Random, n: int) -> list[int]:
    """``n`` token ids in [0, 65536) from ``rng``; bytes -> uint16 is ~50x faster than
    ``randrange`` per token and just as deterministic."""
    if n <= 0:
        return []
    a = array("H")
    a.frombytes(rng.randbytes(2 * n))
    if sys.byteorder == "big":
        # Same numbers on every machine for the same seed.
        a.byteswap()
    return a.tolist()
