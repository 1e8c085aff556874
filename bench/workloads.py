"""The standard cache-aware routing workloads (peers.md, "Standard workloads"), scaled to the
simulated cluster, plus a JSONL trace loader.

Tokens are ints from seeded ``random.Random`` streams, so a workload is the same on every
run. The reuse workloads are sized from the cluster's cache: their working set (the prefixes
that are worth keeping) is ~75% of all engines' capacity together, as in llm-d's benchmark, so
a router that scatters a prefix over every engine runs out of cache while one that keeps it in
one place does not.

Outputs are short (100-300 tokens): with the engine model's flat decode step and a bounded
batch, 1000-token answers make decode slots, not prefill, the bottleneck at every load, and
routing for the cache then changes little; short answers keep the benchmark in the regime the
routers compete in (prefill-bound).

Trace files (``load_trace``), one JSON object per line, either

- ``{"t": arrival_s, "tokens": [int, ...], "output_length": m?, "session": "..."?}``, or
- Mooncake style ``{"t": arrival_s, "hash_ids": [int, ...], "input_length": n,
  "output_length": m}`` (``"timestamp"`` in milliseconds is accepted in place of ``"t"``, as
  in the published Mooncake traces). Each hash id stands for one block of 512 tokens whose
  content is a function of the id alone (``random.Random(0x5EED_B10C + id)``); Mooncake's ids
  are prefix-chained, so equal ids at equal positions mean equal prefixes, as with real
  tokens. The prompt is the concatenation of its blocks cut to ``input_length`` tokens (padded
  with request-unique tokens if ``input_length`` exceeds 512 x ids).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.des import SimConfig, SimRequest
from bench.prompts import Prompt, PromptFactory, random_tokens

MOONCAKE_BLOCK_TOKENS = 512
_MOONCAKE_SEED = 0x5EED_B10C
DEFAULT_TRACE = Path(__file__).with_name("traces") / "synthetic-toolagent.jsonl"
# Share of the cluster's cache the reuse workloads' working set is sized to.
WORKING_SET_SHARE = 0.75


@dataclass
class Workload:
    name: str
    title: str
    description: str
    requests: list[SimRequest]
    # Load levels as multiples of the cluster's capacity with nothing cached (see
    # ``cold_capacity``), chosen to run from light load to just past round robin's saturation.
    load_factors: tuple[float, ...]
    working_set_tokens: int = 0
    # Trace replay: the trace's own arrival times, rescaled for each load level.
    native_times: list[float] | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def cold_capacity(self, cfg: SimConfig) -> float:
        """Requests/s the cluster sustains if nothing is ever cached: each engine is bounded by
        its serial prefill unit and by its batch slots."""
        cost = cfg.cost_model()
        reqs = self.requests
        prefill = sum(cost.prefill_seconds(len(r.prompt)) for r in reqs) / len(reqs)
        decode = sum(cost.decode_seconds(r.output_tokens) for r in reqs) / len(reqs)
        per_engine = cost.max_batch / (prefill + decode)
        if cost.serial_prefill:
            per_engine = min(per_engine, 1.0 / prefill)
        return cfg.n_engines * per_engine

    def qps_levels(self, cfg: SimConfig) -> list[float]:
        cap = self.cold_capacity(cfg)
        return [_round2(f * cap) for f in self.load_factors]

    def times(self, qps: float, seed: int) -> list[float]:
        """Issue times at ``qps`` requests/s: Poisson, or the trace's own times rescaled."""
        if self.native_times is not None:
            t = self.native_times
            span = t[-1] - t[0]
            native_qps = (len(t) - 1) / span if span > 0 else qps
            k = native_qps / qps
            return [(x - t[0]) * k for x in t]
        rng = random.Random(seed_of(seed, "arrivals", self.name, f"{qps:.6g}"))
        now, out = 0.0, []
        for _ in self.requests:
            now += rng.expovariate(qps)
            out.append(now)
        return out


def _round2(x: float) -> float:
    """Two significant digits, for readable load levels."""
    if x <= 0:
        return x
    return round(x, 1 - int(math.floor(math.log10(x))))


def seed_of(*parts: object) -> int:
    # Python's hash() of a str changes between processes; a text seed for Random does not.
    r = random.Random("/".join(str(p) for p in parts))
    return r.getrandbits(63)


def _cluster_tokens(cfg: SimConfig) -> int:
    return cfg.n_engines * cfg.capacity_tokens


# --- 1. shared-prefix groups ----------------------------------------------------------------


def shared_prefix(
    cfg: SimConfig,
    seed: int = 0,
    n_requests: int = 800,
    context: int = 6000,
    question: int = 1200,
    output: int = 200,
    users_per_group: int = 5,
) -> Workload:
    factory = PromptFactory(cfg.block_size)
    groups = max(1, round(WORKING_SET_SHARE * _cluster_tokens(cfg) / context))
    rng = random.Random(seed_of(seed, "shared-prefix"))
    contexts = [factory.make(random_tokens(rng, context)) for _ in range(groups)]
    reqs = []
    for i in range(n_requests):
        g = rng.randrange(groups)
        u = rng.randrange(users_per_group)
        prompt = factory.extend(contexts[g], random_tokens(rng, question))
        reqs.append(SimRequest(i, prompt, output, session=f"g{g}-u{u}"))
    return Workload(
        name="shared-prefix",
        title="Shared-prefix groups (llm-d style)",
        description=(
            f"{groups} groups x {users_per_group} users, {context}-token shared context per "
            f"group, {question}-token question, {output}-token answer; each of "
            f"{n_requests} requests picks a group and a user uniformly; Poisson arrivals."
        ),
        requests=reqs,
        load_factors=(0.5, 1.0, 1.5, 2.0, 3.0),
        working_set_tokens=groups * context,
        params={"groups": groups, "users_per_group": users_per_group, "context": context,
                "question": question, "output": output, "requests": n_requests},
    )


# --- 2. multi-round chat --------------------------------------------------------------------


def multi_round_chat(
    cfg: SimConfig,
    seed: int = 0,
    rounds: int = 8,
    system: int = 1000,
    user_context: int = 2000,
    question: int = 200,
    answer: int = 100,
    users: int | None = None,
) -> Workload:
    """Each user's round r prompt = round r-1 prompt + its answer + a new question; the first
    round is the shared system prompt + the user's own context + a question. Rounds are
    issued interleaved across users (all users' round 0, then round 1, ...), and a round is
    never issued before the previous one has finished."""
    factory = PromptFactory(cfg.block_size)
    final = system + user_context + rounds * question + (rounds - 1) * answer
    if users is None:
        users = max(
            1, round((WORKING_SET_SHARE * _cluster_tokens(cfg) - system) / (final - system))
        )
    rng = random.Random(seed_of(seed, "chat"))
    sys_prompt = factory.make(random_tokens(rng, system))
    last: list[Prompt] = [
        factory.extend(sys_prompt, random_tokens(rng, user_context)) for _ in range(users)
    ]
    last_idx: list[int | None] = [None] * users
    reqs: list[SimRequest] = []
    for r in range(rounds):
        order = list(range(users))
        rng.shuffle(order)
        for u in order:
            new = random_tokens(rng, question)
            if r > 0:
                # The previous answer (as the engine generated it) goes into the history.
                new = random_tokens(rng, answer) + new
            prompt = factory.extend(last[u], new)
            idx = len(reqs)
            reqs.append(SimRequest(idx, prompt, answer, session=f"user-{u}", after=last_idx[u]))
            last[u], last_idx[u] = prompt, idx
    return Workload(
        name="chat",
        title="Multi-round chat (LMCache multi-round QA style)",
        description=(
            f"{users} users x {rounds} rounds, {system}-token shared system prompt, "
            f"{user_context}-token per-user context, {question}-token questions, "
            f"{answer}-token answers; round r's prompt = round r-1's prompt + answer + new "
            f"question (up to {final} tokens). Rounds interleaved across users, Poisson "
            "arrivals, a round waits for the previous one's answer."
        ),
        requests=reqs,
        load_factors=(0.5, 1.0, 1.5, 2.0, 3.0),
        working_set_tokens=system + users * (final - system),
        params={"users": users, "rounds": rounds, "system": system,
                "user_context": user_context, "question": question, "answer": answer},
    )


# --- 3. long-document QA --------------------------------------------------------------------


def doc_qa(
    cfg: SimConfig,
    seed: int = 0,
    doc_tokens: int = 10_000,
    questions_per_doc: int = 8,
    question: int = 100,
    output: int = 100,
    users: int = 64,
) -> Workload:
    factory = PromptFactory(cfg.block_size)
    docs = max(1, round(WORKING_SET_SHARE * _cluster_tokens(cfg) / doc_tokens))
    rng = random.Random(seed_of(seed, "docqa"))
    doc_prompts = [factory.make(random_tokens(rng, doc_tokens)) for _ in range(docs)]
    order = [d for d in range(docs) for _ in range(questions_per_doc)]
    rng.shuffle(order)
    reqs = [
        SimRequest(
            i,
            factory.extend(doc_prompts[d], random_tokens(rng, question)),
            output,
            session=f"user-{rng.randrange(users)}",
        )
        for i, d in enumerate(order)
    ]
    return Workload(
        name="docqa",
        title="Long-document QA",
        description=(
            f"{docs} documents x {doc_tokens} tokens, each asked {questions_per_doc} times "
            f"in random order ({question}-token question, {output}-token answer) by "
            f"{users} users (a user's session says nothing about the document); Poisson "
            "arrivals."
        ),
        requests=reqs,
        load_factors=(0.5, 1.0, 1.5, 2.0, 3.0),
        working_set_tokens=docs * doc_tokens,
        params={"docs": docs, "doc_tokens": doc_tokens, "questions_per_doc": questions_per_doc,
                "question": question, "output": output},
    )


# --- 4. control: no reuse -------------------------------------------------------------------


def no_reuse(
    cfg: SimConfig,
    seed: int = 0,
    n_requests: int = 400,
    min_len: int = 100,
    max_len: int = 8000,
) -> Workload:
    """Random prompts, log-uniform lengths (some under one chunk: the lookup-skipping path),
    random answer lengths: a cache-aware router must do as well as load balancing here."""
    factory = PromptFactory(cfg.block_size)
    rng = random.Random(seed_of(seed, "no-reuse"))
    reqs = []
    for i in range(n_requests):
        n = int(math.exp(rng.uniform(math.log(min_len), math.log(max_len))))
        out = rng.randint(50, 300)
        reqs.append(SimRequest(i, factory.make(random_tokens(rng, n)), out, session=f"s{i}"))
    return Workload(
        name="no-reuse",
        title="Control: no reuse",
        description=(
            f"{n_requests} random prompts, log-uniform {min_len}-{max_len} tokens, 50-300 "
            "token answers, nothing shared; Poisson arrivals."
        ),
        requests=reqs,
        load_factors=(0.25, 0.5, 0.75, 1.0, 1.5),
        params={"requests": n_requests, "min_len": min_len, "max_len": max_len},
    )


# --- 5. hot spot ----------------------------------------------------------------------------


def hot_prefix(
    cfg: SimConfig,
    seed: int = 0,
    n_requests: int = 400,
    prefix: int = 4000,
    hot_share: float = 0.8,
    output: int = 100,
    users: int = 64,
) -> Workload:
    """One very popular prefix: ``hot_share`` of the requests are it + a unique 300-1500 token
    suffix, the rest random 1000-4000 token prompts."""
    factory = PromptFactory(cfg.block_size)
    rng = random.Random(seed_of(seed, "hot-prefix"))
    hot = factory.make(random_tokens(rng, prefix))
    reqs = []
    for i in range(n_requests):
        if rng.random() < hot_share:
            prompt = factory.extend(hot, random_tokens(rng, rng.randint(300, 1500)))
        else:
            prompt = factory.make(random_tokens(rng, rng.randint(1000, 4000)))
        reqs.append(SimRequest(i, prompt, output, session=f"user-{rng.randrange(users)}"))
    return Workload(
        name="hot-prefix",
        title="Hot spot: one very popular prefix",
        description=(
            f"{hot_share:.0%} of {n_requests} requests share one {prefix}-token prefix "
            f"(+ a unique 300-1500 token suffix), the rest are random 1000-4000 token "
            f"prompts; {output}-token answers; Poisson arrivals."
        ),
        requests=reqs,
        load_factors=(1.0, 2.0, 3.0, 4.0, 5.0),
        working_set_tokens=prefix,
        params={"requests": n_requests, "prefix": prefix, "hot_share": hot_share,
                "output": output},
    )


# --- 6. trace replay ------------------------------------------------------------------------


def _block_tokens(hash_id: int) -> list[int]:
    return random_tokens(random.Random(_MOONCAKE_SEED + hash_id), MOONCAKE_BLOCK_TOKENS)


def _trace_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        if "t" in row:
            t = float(row["t"])
        elif "timestamp" in row:
            t = float(row["timestamp"]) / 1000.0
        else:
            raise ValueError(f"{path}:{n}: no arrival time ('t' or 'timestamp')")
        if "tokens" not in row and "hash_ids" not in row:
            raise ValueError(f"{path}:{n}: needs 'tokens' or 'hash_ids'")
        row["_t"] = t
        row["_line"] = n
        rows.append(row)
    if len(rows) < 2:
        raise ValueError(f"{path}: a trace needs at least 2 requests")
    rows.sort(key=lambda r: (r["_t"], r["_line"]))
    return rows


def load_trace(
    path: Path,
    cfg: SimConfig,
    default_output: int = 128,
    load_factors: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0),
    name: str = "trace",
) -> Workload:
    factory = PromptFactory(cfg.block_size)
    rows = _trace_rows(path)
    # Full-block prefixes already hashed, keyed by their hash ids: Mooncake requests share
    # long block prefixes, so each request only hashes its new blocks.
    known: dict[tuple[int, ...], Prompt] = {}
    unique_blocks: set[int] = set()
    block_refs = seen_before = 0
    reqs: list[SimRequest] = []
    for i, row in enumerate(rows):
        out = int(row.get("output_length", default_output))
        session = row.get("session", row.get("session_id"))
        session = None if session is None else str(session)
        if "tokens" in row:
            prompt = factory.make([int(t) for t in row["tokens"]])
        else:
            ids = tuple(int(h) for h in row["hash_ids"])
            block_refs += len(ids)
            seen_before += sum(1 for h in ids if h in unique_blocks)
            unique_blocks.update(ids)
            n_in = int(row.get("input_length", len(ids) * MOONCAKE_BLOCK_TOKENS))
            k = len(ids)
            while k > 0 and ids[:k] not in known:
                k -= 1
            base = known.get(ids[:k])
            new: list[int] = []
            for h in ids[k:]:
                new.extend(_block_tokens(h))
            full = factory.extend(base, new) if base is not None else factory.make(new)
            if ids:
                known[ids] = full
            if n_in > len(full):
                pad = random_tokens(random.Random(seed_of("trace-pad", path.name, i)),
                                    n_in - len(full))
                full = factory.extend(full, pad)
            prompt = full.truncate(n_in)
        reqs.append(SimRequest(i, prompt, out, session=session))
    desc_src = "bench/traces/" + path.name if path == DEFAULT_TRACE else str(path)
    reuse = seen_before / block_refs if block_refs else 0.0
    return Workload(
        name=name,
        title=f"Trace replay ({path.name})",
        description=(
            f"{len(reqs)} requests replayed from `{desc_src}` with their relative arrival "
            "times, rescaled to each load level."
            + (f" {reuse:.0%} of the prompts' 512-token blocks were seen earlier in the trace."
               if block_refs else "")
            + (" The shipped trace is synthetic, Mooncake-toolagent-like (agents' system "
               "prompts with Zipf popularity, sessions growing by a tool result per call; "
               "`python -m bench.workloads` regenerates it)." if path == DEFAULT_TRACE else "")
        ),
        requests=reqs,
        load_factors=load_factors,
        working_set_tokens=len(unique_blocks) * MOONCAKE_BLOCK_TOKENS,
        native_times=[r["_t"] for r in rows],
        params={"path": desc_src, "requests": len(reqs)},
    )


def synthetic_mooncake_trace(
    seed: int = 0,
    n_requests: int = 600,
    agents: int = 16,
    sessions: int = 48,
    qps: float = 1.0,
) -> list[dict[str, Any]]:
    """A Mooncake-toolagent-like trace in Mooncake's format (``timestamp`` in ms,
    ``hash_ids`` of 512-token blocks, prefix-chained ids).

    ``agents`` system prompts of 2-5k tokens with Zipf popularity; ``sessions`` concurrent
    agent sessions, each starting as its agent's prompt + a 0.5-1.5k-token task and growing by
    a tool result (1-1.5k tokens) per call; a session ends after 3-8 calls and a new one takes
    its place. Each request is the next call of a random live session; Poisson arrivals.
    """
    rng = random.Random(seed_of(seed, "mooncake"))
    next_id = 0

    def fresh(k: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + k))
        next_id += k
        return ids

    agent_prompts = [fresh(rng.randint(4, 10)) for _ in range(agents)]
    weights = [1.0 / (a + 1) for a in range(agents)]

    def new_session() -> tuple[list[int], int]:
        a = rng.choices(range(agents), weights)[0]
        return agent_prompts[a] + fresh(rng.randint(1, 3)), rng.randint(3, 8)

    live = [new_session() for _ in range(sessions)]
    rows = []
    t = 0.0
    for _ in range(n_requests):
        t += rng.expovariate(qps)
        s = rng.randrange(len(live))
        ids, calls_left = live[s]
        rows.append({
            "timestamp": round(t * 1000),
            "input_length": len(ids) * MOONCAKE_BLOCK_TOKENS - rng.randint(0, 511),
            "output_length": rng.randint(50, 300),
            "hash_ids": ids,
        })
        if calls_left <= 1:
            live[s] = new_session()
        else:
            live[s] = (ids + fresh(rng.randint(2, 3)), calls_left - 1)
    return rows


def write_trace(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))


# --- all ------------------------------------------------------------------------------------


def standard_workloads(
    cfg: SimConfig,
    seed: int = 0,
    scale: float = 1.0,
    trace: Path | None = DEFAULT_TRACE,
    names: Sequence[str] | None = None,
) -> list[Workload]:
    """The benchmark's workloads; ``scale`` < 1 shrinks request counts (``--quick``)."""
    out: list[Workload] = []
    want = set(names) if names else None

    def n(x: int) -> int:
        return max(20, int(x * scale))

    def per_item(x: int) -> int:
        # Rounds per user / questions per document shrink less than request counts: the
        # number of users and documents already follows the (smaller) cache.
        return max(3, round(x * min(1.0, 2 * scale)))

    builders: dict[str, Any] = {
        "shared-prefix": lambda: shared_prefix(cfg, seed, n_requests=n(800)),
        "chat": lambda: multi_round_chat(cfg, seed, rounds=per_item(8)),
        "docqa": lambda: doc_qa(cfg, seed, questions_per_doc=per_item(8)),
        "no-reuse": lambda: no_reuse(cfg, seed, n_requests=n(400)),
        "hot-prefix": lambda: hot_prefix(cfg, seed, n_requests=n(400)),
    }
    if trace is not None:
        builders["trace"] = lambda: _scaled_trace(load_trace(trace, cfg), scale)
    for name, build in builders.items():
        if want is None or name in want:
            out.append(build())
    return out


def _scaled_trace(w: Workload, scale: float) -> Workload:
    if scale >= 1 or w.native_times is None:
        return w
    k = max(20, int(len(w.requests) * scale))
    w.requests = w.requests[:k]
    w.native_times = w.native_times[:k]
    return w


if __name__ == "__main__":
    # Regenerates the shipped trace: python -m bench.workloads [PATH]
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_TRACE
    write_trace(target, synthetic_mooncake_trace())
    print(f"wrote {target}")
