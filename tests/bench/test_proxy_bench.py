"""The proxy-overhead benchmark (bench/proxy.py): its classification of the addon's
`x-kvcache-route` header, its stand-ins' answers, and a quick run end to end (real mitmdump
processes, about 25 s)."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest

from bench import proxy as B


@pytest.mark.parametrize(
    ("header", "answered", "label"),
    [
        ("vllm-instance-2; reason=cache-hit; matched=512/800; tokens=prefix; route_ms=4.1",
         True, "cache-hit"),
        ("vllm-0; reason=cache-spill; why=holder-busy; matched=0/800; route_ms=1.0",
         True, "cache-spill/holder-busy"),
        ("vllm-0; reason=least_inflight; why=no-match; matched=0/800; route_ms=0.9",
         True, "least_inflight/no-match"),
        ("vllm-1; reason=round_robin; why=unknown-instance; route_ms=0.9",
         True, "round_robin/unknown-instance"),
        ("vllm-0; reason=least_inflight; why=lookup-timeout; tokens=exact; route_ms=50.2",
         False, "least_inflight/lookup-timeout"),
        ("vllm-0; reason=local-hit; why=controller-slow; matched=256/800; route_ms=0.3",
         False, "local-hit/controller-slow"),
        ("vllm-0; reason=least_inflight; why=controller-breaker-open; route_ms=0.3",
         False, "least_inflight/controller-breaker-open"),
        ("vllm-0; reason=least_inflight; why=proxy-saturated; route_ms=0.1",
         False, "least_inflight/proxy-saturated"),
        ("vllm-0; reason=least_inflight; why=disabled; route_ms=0.05",
         False, "least_inflight/disabled"),
        (b"vllm-0; reason=cache-hit; matched=1024/1024; tokens=exact; route_ms=0.4",
         True, "cache-hit"),
        ("vllm-0; reason=cache-hit; matched=512/800; answer=recent-answer; route_ms=0.2",
         True, "cache-hit [recent-answer]"),
        (None, False, "(no header)"),
        ("", False, "(no header)"),
    ],
)
def test_classify(header: str | bytes | None, answered: bool, label: str) -> None:
    assert B.classify(header) == (answered, label)


def test_upstream_tokenize_is_one_id_per_word_and_stable() -> None:
    up = B.Upstream()
    status, _, body = up(b"POST", "/tokenize", b'{"model":"m","prompt":"w5 w70 hello w5"}')
    data = json.loads(body)
    assert status == 200 and data["count"] == 4 and data["max_model_len"] == 32768
    assert data["tokens"][:2] == [5, 70] and data["tokens"][3] == 5
    assert 0 <= data["tokens"][2] < B.VOCAB
    chat = {"model": "m", "messages": [{"role": "user", "content": "w5 w70 hello w5"}]}
    assert json.loads(up(b"POST", "/tokenize", json.dumps(chat).encode())[2]) == data
    # The fast path and the general one agree on `w<n>` words (leading zeros included).
    assert up.tokenize("w7 w08 w9") == up.tokenize("w7  w08\nw9") == (3, b"7,8,9")
    assert up(b"POST", "/v1/completions", b"{}")[0] == 200
    assert b"vllm:kv_cache_usage_perc" in up(b"GET", "/metrics", b"")[2]


def test_controller_answers_in_lmcache_056_shape() -> None:
    from addon.lmcache import parse_lookup

    ctl = B.Controller(["e0", "e1"])
    tokens = list(range(600))
    status, _, body = ctl(b"POST", "/lookup", json.dumps({"tokens": tokens}).encode())
    result = parse_lookup(json.loads(body))
    assert status == 200 and list(result.matches.values()) == [512]
    assert set(result.matches) <= {"e0", "e1"} and result.locations
    # Same first chunk, whatever the separators: the same instance.
    compact = json.dumps({"tokens": tokens[:256] + [9] * 300}, separators=(",", ":"))
    again = parse_lookup(json.loads(ctl(b"POST", "/lookup", compact.encode())[2]))
    assert again.matches == result.matches
    short = json.loads(ctl(b"POST", "/lookup", b'{"tokens":[1,2,3]}')[2])
    assert short["layout_info"] == {}
    assert json.loads(ctl(b"POST", "/pin", b"{}")[2])["num_tokens"] == 0
    assert ctl(b"POST", "/evict", b"{}")[0] == 404


def _table(text: str, section: str) -> dict[str, list[str]]:
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_quick_run_writes_a_complete_report(tmp_path: Path) -> None:
    argv = ["--quick", "--out", str(tmp_path)]
    assert B.main(argv) == 0
    text = (tmp_path / B.REPORT).read_text()
    head = text.splitlines()[:4]
    assert f"Command: `python -m bench.proxy {shlex.join(argv)}`" in head

    results = _table(text, "Results")
    for row in B.ROWS:
        cells = results[row.name]
        p50, added, p99, rps, ratio, cpu, share = cells
        assert math.isfinite(float(p50)) and float(p50) > 0
        assert float(rps.replace(",", "")) > 0
        r = float(ratio.rstrip("x"))
        assert math.isfinite(r) and r > 0
        if row.proxy in (None, "bare"):
            assert share == "—"
        else:
            assert 0.0 <= float(share.rstrip("%")) <= 100.0
        if row.proxy is not None:
            assert float(cpu) > 0
    assert results["bare 1k"][4] == "1.00x" and results["bare 16k"][4] == "1.00x"

    decided = _table(text, "What the addon decided")
    assert set(decided) >= {r.name for r in B.ROWS if r.proxy not in (None, "bare")}
    assert "least_inflight/disabled 100.0%" in decided["addon off 1k"][2]

    goals = _table(text, "Goals")
    verdicts = [cells[-1] for name, cells in goals.items() if name != "goal"]
    assert len(verdicts) == 10 and all(v in ("PASS", "**FAIL**") for v in verdicts)
    standins = _table(text, "Stand-ins measured directly")
    assert len(standins) == 1 + len(B.DIRECT_SERVES) + len(B.PROBES)
