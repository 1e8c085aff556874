"""Unit tests of sim.chunks and sim.engine_model (pure, no I/O)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from sim.chunks import CHUNK_SIZE, chained_hashes, chunk_hashes
from sim.engine_model import CostModel, EngineModel, PrefixCache

ROOT = Path(__file__).resolve().parents[2]


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


# --- chunks --------------------------------------------------------------------------------


def test_only_full_chunks_are_hashed() -> None:
    assert CHUNK_SIZE == 256
    assert chunk_hashes(toks(0, 255)) == []
    assert len(chunk_hashes(toks(0, 256))) == 1
    assert len(chunk_hashes(toks(0, 767))) == 2
    assert len(chunk_hashes(toks(0, 768))) == 3


def test_chunk_hashes_are_chained() -> None:
    base = toks(0, 768)
    h = chunk_hashes(base)
    first_changed = [7] + base[1:]
    h1 = chunk_hashes(first_changed)
    # A change in chunk 0 changes every later hash (they identify the whole prefix).
    assert all(a != b for a, b in zip(h, h1, strict=True))
    second_changed = base[:300] + [7] + base[301:]
    h2 = chunk_hashes(second_changed)
    assert h2[0] == h[0] and h2[1] != h[1] and h2[2] != h[2]
    # The partial tail does not influence full-chunk hashes.
    assert chunk_hashes(base + [1, 2, 3]) == h


def test_chunk_hashes_are_stable_across_processes() -> None:
    # Engines and the controller run in different processes: Python's hash() randomisation
    # must not leak in (the real-world PYTHONHASHSEED pitfall).
    code = "from sim.chunks import chunk_hashes; print(chunk_hashes(list(range(600))))"
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        outs.add(out)
    assert outs == {str(chunk_hashes(list(range(600))))}


def test_seed_changes_hashes() -> None:
    assert chunk_hashes(toks(0, 512), seed=1) != chunk_hashes(toks(0, 512))


# --- prefix cache --------------------------------------------------------------------------


def test_match_after_insert_is_block_aligned() -> None:
    c = PrefixCache(capacity_tokens=10_000, block_size=16)
    p = toks(0, 1000)
    assert c.match(p) == 0
    c.insert(p)
    assert c.match(p) == 992  # 62 full blocks
    assert c.match(p[:500] + [99_999] * 10) == 496
    assert c.match(toks(5, 1000)) == 0


def test_match_does_not_change_state() -> None:
    def run(with_match: bool) -> int:
        c = PrefixCache(capacity_tokens=64, block_size=16)  # 4 blocks
        a, b = toks(0, 32), toks(1000, 32)
        c.insert(a)
        c.insert(b)
        if with_match:
            c.match(a)  # must not refresh a's recency
        c.insert(toks(2000, 32))
        return c.match(a)

    assert run(False) == run(True) == 0


def test_lru_evicts_least_recently_used_prompt() -> None:
    c = PrefixCache(capacity_tokens=64, block_size=16)  # 4 blocks
    a, b, d = toks(0, 32), toks(1000, 32), toks(2000, 32)
    c.insert(a)
    c.insert(b)
    c.insert(a)  # touch a: b is now least recently used
    c.insert(d)
    assert c.match(a) == 32
    assert c.match(b) == 0
    assert c.match(d) == 32


def test_tail_blocks_evicted_first_and_chain_breaks() -> None:
    c = PrefixCache(capacity_tokens=64, block_size=16)
    a = toks(0, 64)
    c.insert(a)
    c.insert(toks(1000, 16))  # one block must go: a's tail, not its head
    assert c.match(a) == 48
    # A cache whose head block is gone matches nothing even if later blocks remain.
    c2 = PrefixCache(capacity_tokens=160, block_size=16)
    c2.insert(a)
    c2._lru.pop(c2.block_hashes(a)[0])  # simulate losing the first block only
    assert c2.match(a) == 0


def test_capacity_respected_and_usage() -> None:
    c = PrefixCache(capacity_tokens=1024, block_size=16)
    rng = random.Random(1)
    for _ in range(200):
        c.insert([rng.randrange(1000) for _ in range(rng.randrange(1, 600))])
        assert c.num_blocks <= 64
        assert 0.0 <= c.usage() <= 1.0
    assert c.usage() == 1.0
    c.clear()
    assert c.usage() == 0.0 and c.num_blocks == 0


def test_prompt_longer_than_capacity_keeps_its_head() -> None:
    c = PrefixCache(capacity_tokens=256, block_size=16)
    p = toks(0, 1000)
    admitted, evicted = c.insert(p)
    assert c.match(p) == 256
    assert admitted == chunk_hashes(p)[:1] and evicted == []


def test_chunk_admit_and_evict_reports() -> None:
    c = PrefixCache(capacity_tokens=1024, block_size=16)
    p = toks(0, 1000)
    admitted, evicted = c.insert(p)
    assert admitted == chunk_hashes(p) and len(admitted) == 3
    assert evicted == []
    assert c.insert(p) == ([], [])
    # A prompt sharing chunk 0 but not chunk 1 admits only its own chunks.
    q = p[:300] + toks(50_000, 300)
    admitted_q, evicted_q = c.insert(q)
    assert chunk_hashes(q)[0] not in admitted_q
    assert admitted_q == chunk_hashes(q)[1:]
    # Filling the cache with other prompts evicts p's chunks and reports them.
    # (q's own insert already pushed out p's tail chunks.)
    assert evicted_q and set(evicted_q) <= set(chunk_hashes(p))
    evicted_all: list[int] = list(evicted_q)
    for k in range(4):
        evicted_all += c.insert(toks(100_000 * (k + 1), 1024))[1]
    assert set(chunk_hashes(p)) <= set(evicted_all)
    assert set(chunk_hashes(p)).isdisjoint(c.held_chunks())


def test_chunk_reports_replay_to_exact_holdings() -> None:
    # Fuzz: replaying admitted/evicted reports (what the controller sees) must always equal
    # the set of chunks whose blocks are all in the cache.
    rng = random.Random(7)
    c = PrefixCache(capacity_tokens=2048, block_size=16)
    prefixes = [[rng.randrange(500) for _ in range(600)] for _ in range(4)]
    seen: dict[int, list[int]] = {}
    replay: set[int] = set()
    for _ in range(150):
        base = rng.choice(prefixes)
        p = base[: rng.randrange(100, 600)] + [
            rng.randrange(500) for _ in range(rng.randrange(400))
        ]
        admitted, evicted = c.insert(p)
        assert not set(admitted) & set(evicted)
        replay |= set(admitted)
        replay -= set(evicted)
        blocks = c.block_hashes(p)
        for j, h in enumerate(chunk_hashes(p)):
            seen[h] = blocks[j * 16 : (j + 1) * 16]
        truth = {h for h, bl in seen.items() if all(b in c._lru for b in bl)}
        assert replay == truth == c.held_chunks()


def test_block_size_must_divide_chunk() -> None:
    with pytest.raises(ValueError):
        PrefixCache(1000, block_size=48)
    assert chained_hashes(toks(0, 100), 32) == PrefixCache(1000, 32).block_hashes(toks(0, 100))


# --- cost model ----------------------------------------------------------------------------


def test_cost_grows_with_uncached_tokens() -> None:
    cost = CostModel()
    values = [cost.prefill_seconds(n) for n in (0, 256, 2048, 8192, 16384)]
    assert values == sorted(values) and len(set(values)) == len(values)
    assert cost.prefill_seconds(0) == pytest.approx(0.00575)


def test_cost_defaults_match_calibration() -> None:
    cost = CostModel()
    # h100-llama8b-prefill.json, uncached: 8k -> 265 ms, 16k -> 606 ms (eager-mode floor
    # included, which vLLM with CUDA graphs does not pay).
    assert cost.prefill_seconds(8192) == pytest.approx(0.265, rel=0.15)
    assert cost.prefill_seconds(16384) == pytest.approx(0.606, rel=0.15)
    assert 31e-6 <= cost.prefill_per_token_s <= 37e-6
    assert cost.decode_seconds(16) == pytest.approx(15 * 0.012)
    assert cost.decode_seconds(1) == 0.0
    assert cost.max_batch == 8


def test_decode_step_can_depend_on_batch() -> None:
    cost = CostModel(decode_per_extra_seq_s=0.001)
    assert cost.decode_seconds(11, running=5) == pytest.approx(10 * (0.012 + 0.004))


# --- engine model --------------------------------------------------------------------------


def test_engine_counters_and_hits() -> None:
    e = EngineModel("e1", capacity_tokens=100_000, cost=CostModel())
    p = toks(0, 1000)
    first = e.begin(p, 16, running=1)
    assert (first.cached_tokens, first.uncached_tokens) == (0, 1000)
    assert first.admitted_chunks == chunk_hashes(p)
    second = e.begin(p, 16, running=1)
    assert second.cached_tokens == 992 and second.uncached_tokens == 8
    assert second.prefill_s < first.prefill_s
    assert second.decode_s == pytest.approx(15 * 0.012)
    assert e.prefix_cache_queries == 2000
    assert e.prefix_cache_hits == 992
    assert e.requests == 2


def test_fully_cached_prompt_recomputes_last_block() -> None:
    # vLLM never serves the last prompt token from cache; a block-aligned prompt therefore
    # hits one block less than it holds.
    e = EngineModel("e1", capacity_tokens=100_000, cost=CostModel())
    p = toks(0, 512)
    e.begin(p, 1)
    assert e.cached_tokens(p) == 496
    assert e.begin(p, 1).cached_tokens == 496


def test_engine_reports_evictions_with_small_capacity() -> None:
    e = EngineModel("e1", capacity_tokens=1024, cost=CostModel())
    p = toks(0, 1000)
    e.begin(p, 1)
    plan = e.begin(toks(10_000, 1000), 1)
    assert set(chunk_hashes(p)) <= set(plan.evicted_chunks)
    assert e.cached_tokens(p) < 256
