"""Contract tests of the vLLM simulator against /work/shared/facts/vllm.md."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sim import tokenizer
from sim.cluster import start_controller, start_engine, wait_registered
from sim.engine_model import CostModel
from sim.engine_server import EngineConfig

# One client for the module: a new httpx client per call costs ~30 ms of TLS setup.
http = httpx.Client(timeout=10)


MODEL = "sim-model"
CHAT = [{"role": "user", "content": "Hello there, how are you today?"}]


def assert_error(r: httpx.Response, status: int, err_type: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == err_type
    assert err["code"] == status
    assert isinstance(err["message"], str) and err["message"]
    return err


def metric(text: str, name: str) -> float:
    m = re.search(rf'^{re.escape(name)}\{{engine="0",model_name="{MODEL}"\}} (\S+)$', text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def sse_events(lines: list[str]) -> list[str]:
    """Payloads of the ``data:`` lines; asserts the SSE framing on the way."""
    payloads = []
    for line in lines:
        if line == "":
            continue
        assert line.startswith("data: "), line
        payloads.append(line[len("data: ") :])
    return payloads


# --- completions ---------------------------------------------------------------------------


def test_chat_completion_shape(engine: str) -> None:
    r = http.post(f"{engine}/v1/chat/completions", json={"model": MODEL, "messages": CHAT})
    assert r.status_code == 200
    body = r.json()
    assert {"id", "object", "created", "model", "choices", "usage"} <= set(body)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    n_prompt = http.post(f"{engine}/tokenize", json={"model": MODEL, "messages": CHAT}).json()[
        "count"
    ]
    assert body["usage"] == {
        "prompt_tokens": n_prompt,
        "completion_tokens": 16,
        "total_tokens": n_prompt + 16,
        "prompt_tokens_details": None,
    }


def test_completion_shape_and_prompt_forms(engine: str) -> None:
    r = http.post(
        f"{engine}/v1/completions", json={"model": MODEL, "prompt": "Once upon", "max_tokens": 5}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert {"index", "text", "logprobs", "finish_reason"} <= set(choice)
    ids = tokenizer.encode("Once upon", add_special_tokens=True)
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["completion_tokens"] == 5
    # Token-id prompts are used as they are.
    r2 = http.post(f"{engine}/v1/completions", json={"prompt": ids, "max_tokens": 5})
    assert r2.status_code == 200
    assert r2.json()["choices"][0]["text"] == choice["text"]


def test_generation_is_deterministic(engine: str) -> None:
    def text(max_tokens: int) -> str:
        r = http.post(
            f"{engine}/v1/chat/completions",
            json={"model": MODEL, "messages": CHAT, "max_tokens": max_tokens},
        )
        return r.json()["choices"][0]["message"]["content"]

    assert text(8) == text(8)
    assert text(12).startswith(text(8))
    assert len(tokenizer.encode(text(8))) == 8


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "nope", "messages": CHAT}),
        ("/v1/completions", {"model": "nope", "prompt": "hi"}),
        ("/tokenize", {"model": "nope", "prompt": "hi"}),
        ("/detokenize", {"model": "nope", "tokens": [1]}),
    ],
)
def test_unknown_model_is_404(engine: str, path: str, body: dict[str, Any]) -> None:
    err = assert_error(http.post(engine + path, json=body), 404, "NotFoundError")
    assert "nope" in err["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", b"{not json"),
        ("/v1/chat/completions", b"[1, 2"),
        ("/v1/completions", {"model": MODEL}),
        ("/v1/chat/completions", {"model": MODEL}),
        ("/v1/completions", {"model": MODEL, "prompt": 5}),
        ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}),
        ("/v1/completions", {"prompt": "hi", "stream": "sometimes"}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}),
        ("/v1/completions", {"prompt": [-1, 5]}),
        ("/v1/completions", {"prompt": []}),
        ("/v1/completions", {"prompt": ["one", "two"]}),
        ("/tokenize", {"model": MODEL}),
        ("/detokenize", {"tokens": "abc"}),
    ],
)
def test_invalid_body_is_400(engine: str, path: str, body: dict[str, Any] | bytes) -> None:
    if isinstance(body, bytes):
        r = http.post(engine + path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(engine + path, json=body)
    assert_error(r, 400, "BadRequestError")


def test_prompt_too_long_is_400(engine: str) -> None:
    r = http.post(f"{engine}/v1/completions", json={"prompt": [5] * 32760, "max_tokens": 16})
    err = assert_error(r, 400, "BadRequestError")
    assert "maximum context length is 32768" in err["message"]


# --- tokenize / detokenize / models / health -------------------------------------------------


def test_tokenize_completion_form(engine: str) -> None:
    r = http.post(
        f"{engine}/tokenize",
        json={"model": MODEL, "prompt": "Hello, world!", "add_special_tokens": True},
    )
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["token_strs"] is None
    assert body["max_model_len"] == 32768
    assert body["count"] == len(body["tokens"]) == 5
    assert body["tokens"][0] == tokenizer.BOS_ID
    no_bos = http.post(
        f"{engine}/tokenize", json={"prompt": "Hello, world!", "add_special_tokens": False}
    ).json()
    assert no_bos["tokens"] == body["tokens"][1:]
    with_strs = http.post(
        f"{engine}/tokenize", json={"prompt": "Hello, world!", "return_token_strs": True}
    ).json()
    assert with_strs["token_strs"] == ["<|bos|>", "Hello", ",", " world", "!"]


def test_tokenize_chat_form(engine: str) -> None:
    body = {
        "model": MODEL,
        "messages": CHAT,
        "add_generation_prompt": True,
        "continue_final_message": False,
        "add_special_tokens": False,
    }
    r = http.post(f"{engine}/tokenize", json=body)
    assert r.status_code == 200
    out = r.json()
    assert set(out) == {"count", "max_model_len", "tokens", "token_strs"}
    assert out["tokens"] == tokenizer.encode_chat(CHAT, add_generation_prompt=True)
    no_gen = http.post(f"{engine}/tokenize", json={**body, "add_generation_prompt": False})
    assert no_gen.json()["count"] == out["count"] - 1


def test_detokenize(engine: str) -> None:
    ids = http.post(
        f"{engine}/tokenize", json={"prompt": "round trip, please", "add_special_tokens": False}
    ).json()["tokens"]
    r = http.post(f"{engine}/detokenize", json={"model": MODEL, "tokens": ids})
    assert r.status_code == 200
    assert r.json() == {"prompt": "round trip, please"}


def test_models_and_health(engine: str) -> None:
    r = http.get(f"{engine}/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    (m,) = body["data"]
    assert m["id"] == MODEL and m["object"] == "model" and m["max_model_len"] == 32768
    h = http.get(f"{engine}/health")
    assert h.status_code == 200 and h.content == b""
    assert http.get(f"{engine}/nope").status_code == 404


def test_dead_engine_health_503() -> None:
    with start_engine(EngineConfig(time_scale=0.0)) as url:
        assert http.post(f"{url}/sim/faults", json={"dead": True}).status_code == 200
        assert http.get(f"{url}/health").status_code == 503
        r = http.post(f"{url}/v1/completions", json={"prompt": "x"})
        assert_error(r, 500, "InternalServerError")
        http.post(f"{url}/sim/faults", json={"dead": False})
        assert http.get(f"{url}/health").status_code == 200


# --- streaming -----------------------------------------------------------------------------


def test_chat_stream_format(engine: str) -> None:
    body = {
        "model": MODEL,
        "messages": CHAT,
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", f"{engine}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    assert all(block.startswith("data: ") for block in raw.split("\n\n") if block)
    payloads = sse_events(raw.split("\n"))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c for c in chunks if c["choices"] and "content" in c["choices"][0]["delta"]][1:]
    assert len(content) == 6
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * 5 + ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in content)
    plain = http.post(
        f"{engine}/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 6}
    ).json()["choices"][0]["message"]["content"]
    assert streamed == plain


def test_completion_stream_format(engine: str) -> None:
    body = {"model": MODEL, "prompt": "stream me", "max_tokens": 4, "stream": True}
    with http.stream("POST", f"{engine}/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_events(list(r.iter_lines()))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len(chunks) == 4
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_chunks_are_paced_by_decode_time() -> None:
    # time_scale 5: a decode step is 60 ms, so 5 tokens span >= 240 ms, and the first
    # chunk must arrive well before the last (sent as produced, not buffered).
    with start_engine(EngineConfig(time_scale=5.0)) as url:
        body = {"prompt": [7] * 20, "max_tokens": 5, "stream": True}
        arrivals: list[float] = []
        with http.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())
    assert len(arrivals) == 5
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    # One gap may shrink if this client was descheduled and read two chunks at once.
    assert sum(g > 0.03 for g in gaps) >= 3, gaps
    assert arrivals[-1] - arrivals[0] >= 0.15


# --- cost model in serving -----------------------------------------------------------------


@pytest.fixture
def slow_engine() -> Iterator[str]:
    cfg = EngineConfig(time_scale=1.0, enable_prompt_tokens_details=True)
    with start_engine(cfg) as url:
        yield url


def test_cached_prefix_is_faster_and_counted(slow_engine: str) -> None:
    prompt = list(range(300, 300 + 8000))

    def timed() -> tuple[float, dict[str, Any]]:
        t0 = time.monotonic()
        r = http.post(
            f"{slow_engine}/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=10
        )
        return time.monotonic() - t0, r.json()["usage"]

    cold, usage1 = timed()
    warm, usage2 = timed()
    assert usage1["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage2["prompt_tokens_details"] == {"cached_tokens": 7984}
    # 8000 uncached tokens: ~270 ms of prefill; 16 uncached: ~6 ms.
    assert cold >= 0.25
    assert cold - warm >= 0.15
    text = http.get(f"{slow_engine}/metrics").text
    assert metric(text, "vllm:prefix_cache_queries_total") == 16000
    assert metric(text, "vllm:prefix_cache_hits_total") == 7984
    assert 0 < metric(text, "vllm:kv_cache_usage_perc") <= 1
    count = re.search(r"^vllm:time_to_first_token_seconds_count\{[^}]*\} (\S+)$", text, re.M)
    assert count and float(count.group(1)) == 2


def test_queueing_beyond_max_batch() -> None:
    cfg = EngineConfig(time_scale=1.0, cost=CostModel(max_batch=1))
    with start_engine(cfg) as url:
        results: list[float] = []

        def send(i: int) -> None:
            t0 = time.monotonic()
            http.post(
                f"{url}/v1/completions",
                json={"prompt": [i + 1] * 3000, "max_tokens": 8},
                timeout=10,
            )
            results.append(time.monotonic() - t0)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        seen: set[tuple[float, float]] = set()
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline and (1, 2) not in seen:
            text = http.get(f"{url}/metrics").text
            seen.add(
                (
                    metric(text, "vllm:num_requests_running"),
                    metric(text, "vllm:num_requests_waiting"),
                )
            )
        for t in threads:
            t.join()
    assert (1, 2) in seen, seen
    assert max(running for running, _ in seen) == 1
    # Each request holds the only slot ~105 ms prefill + 84 ms decode: they serialize.
    results.sort()
    assert results[2] >= 2.5 * results[0] * 0.9


def test_engine_metrics_names_and_labels(engine: str) -> None:
    text = http.get(f"{engine}/metrics").text
    for name in (
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ):
        metric(text, name)
    assert "# TYPE vllm:prefix_cache_queries_total counter" in text
    assert "# TYPE vllm:kv_cache_usage_perc gauge" in text
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in text


# --- controller link -----------------------------------------------------------------------


def test_engine_registers_with_controller() -> None:
    with start_controller() as ctl:
        cfg = EngineConfig(instance_id="vllm-reg", controller_url=ctl, time_scale=0.0)
        with start_engine(cfg) as url:
            wait_registered(ctl, ["vllm-reg"])
            inst = http.get(f"{ctl}/sim/state").json()["instances"]["vllm-reg"]
            assert inst["url"] == url and inst["worker_id"] == 0
        # Shutting the engine down deregisters it, like an LMCache worker's DeRegisterMsg.
        assert "vllm-reg" not in http.get(f"{ctl}/sim/state").json()["instances"]


def test_controller_down_never_delays_responses() -> None:
    cfg = EngineConfig(controller_url="http://127.0.0.1:9", time_scale=0.0)
    with start_engine(cfg) as url:
        t0 = time.monotonic()
        r = http.post(f"{url}/v1/completions", json={"prompt": [3] * 600, "max_tokens": 2})
        assert r.status_code == 200
        assert time.monotonic() - t0 < 0.5
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            state = http.get(f"{url}/sim/state").json()["controller"]
            if state["failures"] > 0:
                break
            time.sleep(0.05)
        assert state["failures"] > 0 and not state["registered"]
