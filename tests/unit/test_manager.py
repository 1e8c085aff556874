"""The background job: tokenization, the strategy's signals and its controller calls, with
retries and breakers. The controller and engine are httpx mock transports that answer in
the real contracts' shapes (LMCache 0.5.6: no /evict; vLLM /tokenize and /metrics)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from addon.background import Job
from addon.config import CacheStrategyConfig
from addon.lmcache import LMCache
from addon.manager import CacheManager, ManagerSettings
from addon.request import LLMRequest
from addon.resilience import CircuitBreaker, RateLimitedLog, RetryPolicy
from addon.tokens import TokenCache
from addon.vllm import Engine

TOKENS = list(range(600))
METRICS = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="m"}} {running}
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} {usage}
"""


class Clock:
    def __init__(self) -> None:
        self.t = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


class Controller:
    """LMCache 0.5.6 as the addon sees it, with switchable faults."""

    def __init__(self, holder: str | None = "e1", has_evict: bool = False) -> None:
        self.holder = holder
        self.has_evict = has_evict
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail_with: list[int] = []  # statuses to answer before succeeding

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content or b"{}")
        path = request.url.path
        self.calls.append((path, body))
        if self.fail_with:
            return httpx.Response(self.fail_with.pop(0), json={"detail": "injected"})
        if path == "/lookup":
            layout = {self.holder: ["LocalCPUBackend", 512]} if self.holder else {}
            return httpx.Response(200, json={"event_id": "Lookup1", "layout_info": layout})
        if path in ("/pin", "/compress", "/clear"):
            return httpx.Response(200, json={"event_id": "e", "num_tokens": 512})
        if path == "/evict":
            if not self.has_evict:
                return httpx.Response(404, json={"detail": "Not Found"})
            if "instance_id" not in body:
                return httpx.Response(422, json={"detail": [{"type": "missing"}]})
            return httpx.Response(200, json={"event_id": "e", "num_tokens": 512})
        return httpx.Response(404, json={"detail": "Not Found"})

    def paths(self) -> list[str]:
        return [p for p, _ in self.calls]


class Vllm:
    def __init__(self, running: int = 0, waiting: int = 0, usage: float = 0.1) -> None:
        self.running, self.waiting, self.usage = running, waiting, usage
        self.tokenize_calls = 0
        self.down = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("refused", request=request)
        if request.url.path == "/tokenize":
            self.tokenize_calls += 1
            return httpx.Response(200, json={"count": len(TOKENS), "max_model_len": 4096,
                                             "tokens": TOKENS, "token_strs": None})
        if request.url.path == "/metrics":
            return httpx.Response(200, text=METRICS.format(
                running=self.running, waiting=self.waiting, usage=self.usage))
        return httpx.Response(404)


def make(controller: Controller, vllm: Vllm, clock: Clock, **strategy: Any) -> CacheManager:
    params = CacheStrategyConfig(**{"hot_content_threshold": 3, "engine_max_requests": 10,
                                    **strategy})
    return CacheManager(
        settings=ManagerSettings(strategy=params, retry=RetryPolicy(3, 0.1, 1.0),
                                 hot_window=300, request_timeout=2.0),
        tokenizer_url="http://e1:1", endpoint_urls={"e1": "http://e1:1", "e2": "http://e2:1"},
        engine=Engine(transport=httpx.MockTransport(vllm)),
        lmcache=LMCache("http://lmcache:9000", transport=httpx.MockTransport(controller)),
        token_cache=TokenCache(100, 60, clock=clock),
        tokenizer_breaker=CircuitBreaker(2, 10, 1, clock=clock),
        controller_breaker=CircuitBreaker(3, 10, 1, clock=clock),
        failure_log=RateLimitedLog(clock=clock), clock=clock, sleep=clock.sleep,
        cpu_ratio=lambda: 0.95,
    )


def req(key: str = "k") -> LLMRequest:
    return LLMRequest("/v1/completions", "m", "p", key, "completion",
                      tokenize_body={"model": "m", "prompt": "p"})


def job(clock: Clock, key: str = "k", timeout: float = 2.0) -> Job:
    return Job(key, clock() + timeout)


def test_tokens_are_stored_for_later_requests() -> None:
    clock, vllm = Clock(), Vllm()
    m = make(Controller(), vllm, clock)
    m.run(req(), job(clock))
    assert m.token_cache is not None and m.token_cache.get("k") == tuple(TOKENS)
    m.run(req(), job(clock))
    assert vllm.tokenize_calls == 1  # known tokens are not fetched again


def test_nothing_to_decide_means_no_controller_calls() -> None:
    clock, ctl = Clock(), Controller()
    make(ctl, Vllm(), clock).run(req(), job(clock), hot_count=1)
    assert ctl.calls == []


def test_hot_prefix_is_pinned_on_its_holder_once_per_window() -> None:
    clock, ctl = Clock(), Controller(holder="e2")
    m = make(ctl, Vllm(), clock)
    for hot in (3, 4, 5):
        m.run(req(), job(clock), hot_count=hot)
    pins = [b for p, b in ctl.calls if p == "/pin"]
    assert len(pins) == 1 and pins[0]["instance_id"] == "e2" and pins[0]["tokens"] == TOKENS
    clock.t += 301
    m.run(req(), job(clock), hot_count=6)
    assert len([p for p in ctl.paths() if p == "/pin"]) == 2
    assert m.stats.actions["pin:ok"] == 2


def test_compress_under_engine_load_uses_cachegen_on_holder() -> None:
    clock, ctl = Clock(), Controller(holder="e1")
    m = make(ctl, Vllm(running=6, waiting=2), clock, enable_compression=True)
    m.run(req(), job(clock))
    body = next(b for p, b in ctl.calls if p == "/compress")
    assert body["method"] == "cachegen" and body["instance_id"] == "e1"
    quiet = Controller(holder="e1")
    make(quiet, Vllm(running=1), clock, enable_compression=True).run(req(), job(clock))
    assert "/compress" not in quiet.paths()


def test_eviction_without_evict_endpoint_is_skipped_unless_clear_is_opted_in() -> None:
    clock, ctl = Clock(), Controller(holder="e1", has_evict=False)
    m = make(ctl, Vllm(usage=0.95), clock, enable_eviction=True)
    m.run(req(), job(clock))
    assert "/clear" not in ctl.paths() and m.stats_dict()["controller_has_evict"] is False
    assert m.stats.actions["evict:skipped"] == 1
    ctl2 = Controller(holder="e1", has_evict=False)
    m2 = make(ctl2, Vllm(usage=0.95), clock, enable_eviction=True,
              eviction_clear_fallback=True, clear_cooldown=60)
    m2.run(req(), job(clock))
    m2.run(req(), job(clock))  # within the cooldown: no second clear
    assert ctl2.paths().count("/clear") == 1
    assert ctl2.paths().count("/evict") == 1  # probed once, not per job


def test_evict_used_where_the_controller_has_it() -> None:
    clock, ctl = Clock(), Controller(holder="e1", has_evict=True)
    make(ctl, Vllm(usage=0.9), clock, enable_eviction=True).run(req(), job(clock))
    evicts = [b for p, b in ctl.calls if p == "/evict" and b]
    assert evicts == [{"instance_id": "e1", "tokens": TOKENS}]


def test_retries_5xx_with_backoff_then_succeeds() -> None:
    clock, ctl = Clock(), Controller(holder="e1")
    ctl.fail_with = [500, 503]
    m = make(ctl, Vllm(), clock)
    m.run(req(), job(clock), hot_count=3)
    assert ctl.paths()[:3] == ["/lookup"] * 3 and "/pin" in ctl.paths()
    assert len(clock.sleeps) == 2 and clock.sleeps[1] >= clock.sleeps[0] * 0.5
    assert m.stats.retries == 2


def test_no_retry_on_4xx_and_job_deadline_bounds_retries() -> None:
    clock, ctl = Clock(), Controller(holder="e1")
    ctl.fail_with = [422]
    m = make(ctl, Vllm(), clock)
    m.run(req(), job(clock), hot_count=3)
    assert ctl.paths() == ["/lookup"] and clock.sleeps == []
    ctl2 = Controller(holder="e1")
    ctl2.fail_with = [500] * 10
    m2 = make(ctl2, Vllm(), clock)
    start = clock.t
    m2.run(req(), job(clock, timeout=0.15), hot_count=3)
    assert clock.t - start <= 0.15 and len(ctl2.calls) <= 2


def test_tokenizer_breaker_opens_and_skips() -> None:
    clock, vllm = Clock(), Vllm()
    vllm.down = True
    m = make(Controller(), vllm, clock)
    for i in range(4):
        m.run(req(f"k{i}"), job(clock, f"k{i}"))
    assert m.stats.tokenize_failures == 2 and m.stats.tokenize_skipped_breaker == 2


@pytest.mark.parametrize("source", ["cpu", "engine"])
def test_load_source(source: str) -> None:
    clock, ctl = Clock(), Controller(holder="e1")
    m = make(ctl, Vllm(running=0), clock, enable_compression=True, load_source=source)
    m.run(req(), job(clock))
    # cpu_ratio is 0.95 (busy machine), the engine is idle.
    assert ("/compress" in ctl.paths()) is (source == "cpu")


def test_compress_once_per_window_while_load_stays_high() -> None:
    clock, ctl = Clock(), Controller(holder="e1")
    m = make(ctl, Vllm(running=9), clock, enable_compression=True)
    for _ in range(4):
        m.run(req(), job(clock))
        clock.t += 2  # past the 1 s /metrics cache, still inside the 300 s window
    assert ctl.paths().count("/compress") == 1
    assert m.stats.actions["compress:already-done"] == 3
    clock.t += 300
    m.run(req(), job(clock))
    assert ctl.paths().count("/compress") == 2


def test_no_action_on_behalf_of_an_instance_that_is_no_endpoint() -> None:
    # The controller names a host as its holder: no pin is made for it, however hot.
    clock, ctl = Clock(), Controller(holder="http://evil:1")
    m = make(ctl, Vllm(), clock)
    m.run(req(), job(clock), hot_count=5)
    assert "/lookup" in ctl.paths() and "/pin" not in ctl.paths()


def test_prompts_over_the_cap_are_not_tokenized_in_the_background() -> None:
    clock, vllm = Clock(), Vllm()
    m = make(Controller(), vllm, clock)
    m.settings = ManagerSettings(strategy=m.settings.strategy, retry=m.settings.retry,
                                 hot_window=300, request_timeout=2.0, tokenize_max_chars=0)
    m.run(req(), job(clock))
    assert vllm.tokenize_calls == 0


def test_the_request_paths_answer_is_reused_not_asked_again() -> None:
    clock, ctl = Clock(), Controller(holder="e1")
    m = make(ctl, Vllm(), clock)
    m.run(req(), job(clock), hot_count=5, answer={"e2": 512})
    assert "/lookup" not in ctl.paths()
    pins = [b for p, b in ctl.calls if p == "/pin"]
    assert [p["instance_id"] for p in pins] == ["e2"] and m.stats.reused_answers == 1
