"""Property: whatever bytes, JSON tree or Unicode a client sends, the request hook routes it
to a configured endpoint with a reason, forwards the body untouched, and never raises.

Runs the real hook (mitmproxy.test's taddons) with the controller and tokenizer as httpx mock
transports in the real contracts' shapes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy.test import taddons, tflow, tutils

from addon import kvcache
from addon.lmcache import AsyncLMCache
from addon.vllm import AsyncTokenizer

CONFIG = """
lmcache_endpoint: http://controller.test:9000
lookup_routing_timeout: 200ms
background: {workers: 1, queue_size: 4}
endpoints:
  - {id: e1, url: "http://127.0.0.1:8001"}
  - {id: e2, url: "http://127.0.0.1:8002"}
"""
PORTS = {8001, 8002}


def tokenize(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    text = json.dumps(body.get("prompt", body.get("messages")))
    return httpx.Response(200, json={"count": 1, "max_model_len": 4096,
                                     "tokens": [len(w) for w in text.split()] * 3})


def lookup(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"event_id": "l", "layout_info": {
        "e2": ["LocalCPUBackend", 256], "http://evil:1": ["LocalCPUBackend", 9999]}})


@pytest.fixture(scope="module")
def hook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[kvcache.KVCache, object]]:
    path = Path(tmp_path_factory.mktemp("cfg")) / "c.yaml"
    path.write_text(CONFIG)
    loop = asyncio.new_event_loop()
    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, kvcache_config=str(path))
        a.running()
        assert a.router is not None
        a.router.lmcache = AsyncLMCache("http://c", transport=httpx.MockTransport(lookup))
        a.router.tokenizer = AsyncTokenizer("http://t", transport=httpx.MockTransport(tokenize))
        yield a, loop
        a.done()
    loop.close()


def check(hook: tuple[kvcache.KVCache, object], body: bytes, path: bytes,
          ctype: bytes = b"application/json") -> None:
    a, loop = hook
    f = tflow.tflow()
    f.request = tutils.treq(method=b"POST", path=path, content=b"",
                            headers=((b"content-type", ctype),))
    f.request.raw_content = body
    loop.run_until_complete(a.request(f))  # type: ignore[attr-defined]
    meta = f.metadata["kvcache"]
    assert meta["endpoint_id"] in ("e1", "e2") and meta["reason"]
    # Handled by design, not by the hook's last-resort catch (why=error-<exception>).
    assert not str(meta.get("why", "")).startswith("error-"), meta
    assert f.request.port in PORTS and f.request.host == "127.0.0.1"
    assert f.request.raw_content == body
    a._finish(f)  # as the response hook would: keep the in-flight counts honest


json_trees = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(alphabet=st.characters(codec=None, categories=None)),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.sampled_from(["model", "prompt", "messages", "role", "content",
                                       "type", "text", "x"]) | st.text(max_size=5),
                      children, max_size=5),
    max_leaves=30,
)
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FAST
@given(body=st.binary(max_size=2000))
def test_any_bytes(hook: tuple[kvcache.KVCache, object], body: bytes) -> None:
    check(hook, body, b"/v1/completions")


@FAST
@given(tree=json_trees)
def test_any_json_tree(hook: tuple[kvcache.KVCache, object], tree: object) -> None:
    body = json.dumps(tree).encode()
    check(hook, body, b"/v1/chat/completions")
    check(hook, body, b"/v1/completions", b"text/plain")


@FAST
@given(prompt=st.text(alphabet=st.characters(codec=None, categories=None), max_size=500),
       model=st.text(max_size=20), chat=st.booleans(), raw_surrogate=st.booleans())
def test_any_unicode_prompt(hook: tuple[kvcache.KVCache, object], prompt: str, model: str,
                            chat: bool, raw_surrogate: bool) -> None:
    # Long enough to be tokenized and looked up: the whole routing path runs.
    prompt = (prompt + " ") * 40
    doc = ({"model": model, "messages": [{"role": "user", "content": prompt}]} if chat
           else {"model": model, "prompt": prompt})
    body = json.dumps(doc).encode()
    if raw_surrogate:  # the bytes of a lone surrogate, which json.loads lets through
        field = b'"content": "' if chat else b'"prompt": "'
        body = body.replace(field, field + b"\xed\xa0\x80", 1)
    check(hook, body, b"/v1/chat/completions" if chat else b"/v1/completions")
