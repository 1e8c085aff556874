"""Pure model of one vLLM engine: prefix cache + cost model + vLLM's cache counters.

No I/O, no sleeps, no clock: a discrete-event simulation can drive it in virtual time and
the HTTP simulator (``sim.engine_server``) drives it in (scaled) wall-clock time.

Queueing is the caller's job. The model only answers "how long would this request's
prefill and decode take, and what did it do to the cache". The contract both callers
follow (and a discrete-event benchmark should follow too) is:

1. A request waits for one of ``CostModel.max_batch`` slots (counted as *waiting*;
   holding a slot counts as *running*).
2. With ``CostModel.serial_prefill`` it then waits for the engine's single prefill unit
   (prefill is compute-bound: two prefills on one GPU take about as long as both in a row).
3. ``plan = engine.begin(prompt, n_out, running)`` (cache lookup + insert + counters), then
   ``plan.prefill_s`` elapses; the first output token is produced at its end, so
   TTFT = queueing + prefill. The prefill unit is released; ``plan.admitted_chunks`` /
   ``plan.evicted_chunks`` are what an LMCache worker would report to the controller now;
   ``plan.stored_blocks`` / ``plan.evicted_blocks`` (over ``plan.block_hashes``) are what
   vLLM's KV cache events report (BlockStored / BlockRemoved; ``sim.kv_events``).
4. The remaining ``n_out - 1`` tokens come one per ``plan.decode_step_s``
   (``plan.decode_s`` in all), then the slot is released.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from sim.chunks import CHUNK_SIZE, chained_hashes, chunk_hashes

# 200k tokens of KV per engine. A Llama-3.1-8B token costs 128 KiB of KV in bf16
# (32 layers x 8 KV heads x 128 dims x K+V x 2 bytes), so an H100 left with ~56 GB after
# weights holds ~430k tokens; half of that makes eviction show up with demo-sized working
# sets (a few dozen long conversations per engine) instead of never.
DEFAULT_CAPACITY_TOKENS = 200_000
DEFAULT_BLOCK_SIZE = 16


@dataclass
class CostModel:
    """Service times of an 8B model on one H100.

    Defaults, and where they come from (``/work/shared/calibration``, ``facts/vllm.md``):

    - ``step_overhead_s`` 5.75 ms: the per-step constant of the published BLIS fit for
      llama-3.1-8b on vLLM/H100 (with CUDA graphs, so no eager-mode launch floor).
    - ``prefill_per_token_s`` 33 us per uncached prompt token: the calibration run measured
      31-37 us/token at 8k-16k tokens (265 ms for 8k, 606 ms for 16k, uncached); the model
      gives 276 ms and 546 ms. Attention over a long *cached* context is not charged, so
      heavily cached long prompts come out cheaper than measured (16k with 90% cached:
      ~60 ms modelled vs 122 ms measured in eager mode, of which ~30-40 ms is eager floor).
    - ``decode_step_s`` 12 ms per output token: the middle of llm-d's 10-15 ms per output
      token for this model/card.
    - ``decode_per_extra_seq_s`` 0: the calibration decode rows are flat from batch 1 to 64
      (decode is weight-bandwidth bound), so batch size does not slow a step here.
    - ``max_batch`` 8 requests holding a slot at once, the rest wait. vLLM would allow 256,
      but a small batch keeps queueing (the thing cache-aware routing trades against cache
      hits) visible in a demo with a handful of clients; the flat decode rows say a larger
      value would only raise throughput, never slow steps.
    - ``serial_prefill``: prefills of concurrent requests run one after another.
    """

    step_overhead_s: float = 0.00575
    prefill_per_token_s: float = 33e-6
    decode_step_s: float = 0.012
    decode_per_extra_seq_s: float = 0.0
    max_batch: int = 8
    serial_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")

    def prefill_seconds(self, uncached_tokens: int) -> float:
        """Time of the prefill step(s) that compute ``uncached_tokens`` tokens' KV and sample
        the first output token. Even a fully cached prompt pays one step."""
        return self.step_overhead_s + self.prefill_per_token_s * max(uncached_tokens, 0)

    def decode_step_seconds(self, running: int = 1) -> float:
        """Time between two output tokens with ``running`` requests in the batch."""
        return self.decode_step_s + self.decode_per_extra_seq_s * max(running - 1, 0)

    def decode_seconds(self, output_tokens: int, running: int = 1) -> float:
        """Time from the first to the last of ``output_tokens`` output tokens: the first one
        is sampled by the prefill step (as in vLLM), each later one costs a decode step."""
        return max(output_tokens - 1, 0) * self.decode_step_seconds(running)


class PrefixCache:
    """vLLM-style prefix cache over blocks of ``block_size`` tokens.

    Blocks are identified by chained hashes, so a block stands for its whole prefix. Eviction
    is LRU over blocks; a lookup walks the chain and stops at the first missing block, so
    evicting an early block makes the later ones unreachable (they then age out).

    Recency follows vLLM's free-block queue: a request's blocks are freed tail first, so
    within one prompt the *last* blocks are evicted first and shared prefixes survive.
    Blocks in use by running requests are not modelled (everything is evictable).

    The cache also tracks which 256-token LMCache chunks it holds in full, so a caller can
    report admitted/evicted chunks to the controller like an LMCache worker would; and,
    after each insert, which blocks it stored (``last_stored``: indices into the inserted
    blocks) and evicted (``last_evicted``: block hashes), what vLLM's KV cache events say.
    """

    def __init__(self, capacity_tokens: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if block_size <= 0 or CHUNK_SIZE % block_size:
            raise ValueError(f"block_size must divide {CHUNK_SIZE}")
        if capacity_tokens < 0:
            raise ValueError("capacity_tokens must be >= 0")
        self.block_size = block_size
        self.capacity_tokens = capacity_tokens
        self.capacity_blocks = capacity_tokens // block_size
        self._blocks_per_chunk = CHUNK_SIZE // block_size
        # Insertion order is recency order: first item = least recently used.
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._held: dict[int, tuple[int, ...]] = {}
        self._block_chunks: dict[int, set[int]] = {}
        self.last_stored: list[int] = []
        self.last_evicted: list[int] = []

    def block_hashes(self, tokens: Sequence[int]) -> list[int]:
        return chained_hashes(tokens, self.block_size)

    def match_hashes(self, hashes: Sequence[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self._lru:
                break
            n += 1
        return n * self.block_size

    def match(self, tokens: Sequence[int]) -> int:
        """Leading tokens of ``tokens`` in the cache (a multiple of block_size); read-only."""
        return self.match_hashes(self.block_hashes(tokens))

    def insert(self, tokens: Sequence[int]) -> tuple[list[int], list[int]]:
        """Touch/add every full block of ``tokens``, evicting LRU blocks beyond capacity.

        Returns ``(admitted, evicted)``: hashes (``sim.chunks.chunk_hashes``) of the 256-token
        chunks that became fully held and of those that stopped being fully held.
        """
        return self.insert_hashes(self.block_hashes(tokens), chunk_hashes(tokens))

    def insert_hashes(
        self, blocks: Sequence[int], chunks: Sequence[int]
    ) -> tuple[list[int], list[int]]:
        # A prompt longer than the cache keeps only its head, like a real engine would
        # keep the prefix blocks and lose the tail ones first.
        blocks = blocks[: self.capacity_blocks]
        lru = self._lru
        stored: list[int] = []
        for i in range(len(blocks) - 1, -1, -1):
            b = blocks[i]
            if b in lru:
                lru.move_to_end(b)
            else:
                lru[b] = None
                stored.append(i)
        stored.reverse()
        self.last_stored = stored
        evicted: list[int] = []
        self.last_evicted = evicted_blocks = []
        while len(lru) > self.capacity_blocks:
            b, _ = lru.popitem(last=False)
            evicted_blocks.append(b)
            for c in self._block_chunks.pop(b, ()):
                evicted.append(c)
                self._forget_chunk(c, b)
        admitted: list[int] = []
        per = self._blocks_per_chunk
        for j, c in enumerate(chunks):
            chunk_blocks = tuple(blocks[j * per : (j + 1) * per])
            if len(chunk_blocks) < per:
                break
            if c in self._held:
                continue
            self._held[c] = chunk_blocks
            for b in chunk_blocks:
                self._block_chunks.setdefault(b, set()).add(c)
            admitted.append(c)
        return admitted, evicted

    def _forget_chunk(self, chunk: int, gone_block: int) -> None:
        for b in self._held.pop(chunk, ()):
            if b == gone_block:
                continue
            owners = self._block_chunks.get(b)
            if owners is not None:
                owners.discard(chunk)
                if not owners:
                    del self._block_chunks[b]

    def usage(self) -> float:
        """Fraction of block capacity in use, in [0, 1]."""
        if self.capacity_blocks == 0:
            return 0.0
        return len(self._lru) / self.capacity_blocks

    def clear(self) -> list[int]:
        """Drop everything; returns the chunk hashes that stopped being held."""
        dropped = list(self._held)
        self.last_stored, self.last_evicted = [], []
        self._lru.clear()
        self._held.clear()
        self._block_chunks.clear()
        return dropped

    @property
    def num_blocks(self) -> int:
        return len(self._lru)

    def held_chunks(self) -> set[int]:
        return set(self._held)


@dataclass(frozen=True)
class RequestPlan:
    """What one request costs and did to the cache (see the module docstring for timing)."""

    prompt_tokens: int
    cached_tokens: int
    uncached_tokens: int
    output_tokens: int
    prefill_s: float
    decode_step_s: float
    decode_s: float
    admitted_chunks: list[int] = field(default_factory=list)
    evicted_chunks: list[int] = field(default_factory=list)
    # Block level (vLLM's KV cache events): the prompt's full blocks' hashes (capped at the
    # cache's capacity), the indices into them of the blocks this request stored (the
    # others were cached already), and the hashes of the blocks it evicted. block_hashes is
    # whatever sequence the caller passed (a list or the benchmark's tuple): not compared.
    block_hashes: Sequence[int] = field(default=(), compare=False, repr=False)
    stored_blocks: list[int] = field(default_factory=list)
    evicted_blocks: list[int] = field(default_factory=list)

    @property
    def service_s(self) -> float:
        """Prefill + decode, i.e. time holding a slot when there is no prefill contention."""
        return self.prefill_s + self.decode_s


class EngineModel:
    """Prefix cache + cost model + the counters vLLM exports, for one engine instance."""

    def __init__(
        self,
        instance_id: str,
        capacity_tokens: int = DEFAULT_CAPACITY_TOKENS,
        cost: CostModel | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        self.instance_id = instance_id
        self.cost = cost if cost is not None else CostModel()
        self.cache = PrefixCache(capacity_tokens, block_size)
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.requests = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def _usable_hit(self, n_prompt: int, matched: int) -> int:
        # vLLM always recomputes at least the last prompt token (it needs its logits), so a
        # fully cached prompt hits at most the blocks before the last token.
        bs = self.cache.block_size
        cap = ((n_prompt - 1) // bs) * bs if n_prompt > 0 else 0
        return min(matched, cap)

    def cached_tokens(self, prompt_tokens: Sequence[int]) -> int:
        """Tokens ``begin`` would find cached right now; changes nothing."""
        return self._usable_hit(len(prompt_tokens), self.cache.match(prompt_tokens))

    def begin(
        self, prompt_tokens: Sequence[int], output_tokens: int, running: int = 1
    ) -> RequestPlan:
        """Start prefill of a request now: look up and then insert its prompt, count it, and
        return its service times. ``running`` is the batch size including this request."""
        return self.begin_hashed(
            len(prompt_tokens), self.cache.block_hashes(prompt_tokens),
            chunk_hashes(prompt_tokens), output_tokens, running)

    def begin_hashed(
        self, n: int, blocks: Sequence[int], chunks: Sequence[int], output_tokens: int,
        running: int = 1,
    ) -> RequestPlan:
        """``begin`` for an ``n``-token prompt whose block and 256-token chunk hashes the
        caller computed once (the benchmark replays the same prompts many times)."""
        if output_tokens < 0:
            raise ValueError("output_tokens must be >= 0")
        cached = self._usable_hit(n, self.cache.match_hashes(blocks))
        admitted, evicted = self.cache.insert_hashes(blocks, chunks)
        # Counted exactly like vLLM's PrefixCacheStats: queries in prompt tokens, hits in
        # cached tokens.
        self.prefix_cache_queries += n
        self.prefix_cache_hits += cached
        self.requests += 1
        self.prompt_tokens_total += n
        self.generation_tokens_total += output_tokens
        uncached = n - cached
        return RequestPlan(
            prompt_tokens=n,
            cached_tokens=cached,
            uncached_tokens=uncached,
            output_tokens=output_tokens,
            prefill_s=self.cost.prefill_seconds(uncached),
            decode_step_s=self.cost.decode_step_seconds(running),
            decode_s=self.cost.decode_seconds(output_tokens, running),
            admitted_chunks=admitted,
            evicted_chunks=evicted,
            block_hashes=blocks if len(blocks) <= (cap := self.cache.capacity_blocks)
            else blocks[:cap],
            stored_blocks=self.cache.last_stored,
            evicted_blocks=self.cache.last_evicted,
        )

    def usage(self) -> float:
        return self.cache.usage()

    def clear(self) -> list[int]:
        """Empty the cache; returns the chunk hashes to report as evicted."""
        return self.cache.clear()
