"""The main job (./scripts/demo): a simulated cluster, a real mitmdump with the addon, routing
off vs on. Small workloads so it runs in seconds."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from sim.demo import Workload, main, run_once
from sim.proxy import ROOT


def test_routing_on_beats_routing_off_on_hit_ratio(tmp_path: Path) -> None:
    w = Workload(users=6, rounds=3, context_words=600, question_words=100, answer_tokens=16,
                 think_s=0.3)
    # Room for every history (a handful of users cannot fill 75% of a cache and still
    # leave each engine a whole conversation): the test isolates where requests land.
    args = argparse.Namespace(engines=3, time_scale=1.0, capacity_tokens=20_000)
    off = run_once(args, w, tmp_path, routing=False)
    on = run_once(args, w, tmp_path, routing=True)
    assert off.errors == on.errors == 0 and off.requests == on.requests == 18
    # Off, a user's next turn finds its history on the engine it lands on about one time in
    # three; on, nearly always.
    assert on.hit_ratio > off.hit_ratio + 0.1, (on.hit_ratio, off.hit_ratio)
    assert on.reasons["cache-hit"] >= 10  # the second and third rounds of each user
    # The addon's own Prometheus counters tell the same story as the route headers.
    from collections import Counter
    by_reason: Counter[str] = Counter()
    for label, n in on.reasons.items():
        by_reason[label.split(" (")[0]] += n
    assert on.counted == by_reason and sum(on.counted.values()) == 18


def test_report_and_chart_are_written(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["--engines", "2", "--users", "3", "--rounds", "2", "--time-scale", "0.5",
                 "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.txt").read_text()
    for needle in ("prefix-cache hit ratio", "TTFT p95", "throughput", "share vllm-instance-2"):
        assert needle in text
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert text in capsys.readouterr().out


def test_ctrl_c_leaves_no_process_behind(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sim.demo", "--engines", "2", "--users", "4", "--rounds", "50",
         "--out", str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    me = psutil.Process(proc.pid)
    end = time.monotonic() + 60
    seen: list[psutil.Process] = []
    while time.monotonic() < end and len(seen) < 4:  # controller, 2 engines, mitmdump
        seen = me.children(recursive=True)
        time.sleep(0.2)
    assert len(seen) >= 4, seen
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    gone, alive = psutil.wait_procs(seen, timeout=10)
    assert not alive, alive
