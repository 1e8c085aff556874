"""The replica-throughput benchmark (bench/replica_throughput.py): its parsing of the addon's
exit line, and a quick run end to end (real mitmdump replicas, a real redis-server, about
20 s): every configuration served requests without errors, and the two replicas sharing
through Redis logged their staleness and heard each other."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from bench import replica_throughput as B
from sim.redis_server import binary

LINE = ("[06:12:01.123] [kvcache] shared state: 25 batches published, 22 events received from "
        '1 peers, staleness {"p50": 2.04, "p99": 6.69, "max": 6.69, "samples": 23}, '
        "0 disconnects, 0 events dropped")


def test_parse_exit_line() -> None:
    got = B.parse_exit("a", "noise\n" + LINE + "\nmore noise\n", 0)
    assert got["exit_line"] and got["returncode"] == 0 and not got["trouble"]
    assert (got["batches"], got["events"], got["peers"]) == (25, 22, 1)
    assert got["staleness"] == {"p50": 2.04, "p99": 6.69, "max": 6.69, "samples": 23}
    assert (got["disconnects"], got["dropped"]) == (0, 0)
    missing = B.parse_exit("b", "[kvcache] shared state: Redis at redis://x failed to "
                                "publish (ConnectionError: boom)\n", -9)
    assert not missing["exit_line"] and missing["returncode"] == -9
    assert len(missing["trouble"]) == 1 and "staleness" not in missing


@pytest.mark.skipif(binary() is None, reason="no redis-server binary")
def test_quick_run(tmp_path: Path) -> None:
    argv = ["--quick", "--out", str(tmp_path)]
    assert B.main(argv) == 0
    text = (tmp_path / B.REPORT).read_text()
    assert text.splitlines()[2] == f"Command: `python -m bench.replica_throughput " \
                                   f"{shlex.join(argv)}`"
    data = json.loads((tmp_path / B.REPORT.replace(".md", ".json")).read_text())
    configs = data["summary"]["configs"]
    assert set(configs) == set(B.CONFIGS)
    for name, c in configs.items():
        assert f"| {name} |" in text
        assert c["rps"] > 0 and c["requests"] > 0 and c["errors"] == 0, (name, c)
        assert c["proxy_cpu_ms"] > 0
    assert configs["one"]["ratio_vs_one"] == 1.0
    for p in data["summary"]["probes"].values():
        assert p["rps"] > 0 and p["errors"] == 0

    # Both two-redis replicas logged their exit line, measured staleness, and heard the
    # other one (their state was shared), without losing the link.
    (exits,) = data["exits"]
    assert len(exits) == 2
    for e in exits:
        assert e["exit_line"], e
        assert e["returncode"] == 0 and not e["trouble"], e
        assert e["peers"] == 1 and e["events"] > 0 and e["batches"] > 0, e
        assert e["staleness"]["samples"] > 0 and e["staleness"]["p50"] > 0, e
        assert e["disconnects"] == 0 and e["dropped"] == 0, e
    st = data["summary"]["staleness"]
    assert st["exit_lines"] == 2 and st["p50_ms"] > 0 and st["max_ms"] >= st["p99_ms"]

    rtt = data["redis_round_trip"]
    for label in ("redis-py sync PUBLISH", "redis-py sync PING", "redis.asyncio GET"):
        assert rtt[label]["calls"] == 500 and 0 < rtt[label]["p50_us"] <= rtt[label]["p99_us"]
        assert rtt[label]["cpu_us_per_call"] > 0
    assert "## What this shows" in text
