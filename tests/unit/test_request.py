"""Request parsing: what is an LLM request, its model, prompt, key and tokenize body."""

import json

from addon.request import parse_llm_request, prompt_key

PATHS = ["/v1/chat/completions", "/v1/completions"]


def parse(body: object, path: str = "/v1/completions", method: str = "POST",
          ctype: str = "application/json", default_model: str = ""):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_llm_request(method, path, ctype, raw, PATHS, default_model)


def test_string_prompt_key_is_seed_sha256() -> None:
    r = parse({"model": "m", "prompt": "hello"})
    assert r is not None and r.form == "completion"
    assert r.key == prompt_key("m", "hello")
    import hashlib
    assert r.key == hashlib.sha256(b"m\x00hello").hexdigest()
    assert r.tokenize_body == {"model": "m", "prompt": "hello"}


def test_default_model_used_when_missing() -> None:
    r = parse({"prompt": "x"}, default_model="dm")
    assert r is not None and r.model == "dm"
    assert parse({"prompt": "x"}) is None  # no model at all: nothing to route on


def test_array_prompts() -> None:
    r = parse({"model": "m", "prompt": ["a", "b"]})
    assert r is not None and r.prompt == "a\nb" and r.tokenize_body["prompt"] == "a"
    ids = parse({"model": "m", "prompt": [1, 2, 3]})
    assert ids is not None and ids.token_ids == (1, 2, 3) and ids.tokenize_body == {}
    batch = parse({"model": "m", "prompt": [[4, 5], [6]]})
    assert batch is not None and batch.token_ids == (4, 5)


def test_chat_messages_with_parts_and_template_fields() -> None:
    msgs = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:..."}},
            {"type": "text", "text": "here"},
        ]},
    ]
    r = parse({"model": "m", "messages": msgs, "chat_template_kwargs": {"x": 1}},
              path="/v1/chat/completions")
    assert r is not None and r.form == "chat"
    assert r.prompt == "sys\nlook\nhere"
    assert r.tokenize_body["messages"] == msgs
    assert r.tokenize_body["add_generation_prompt"] is True
    assert r.tokenize_body["chat_template_kwargs"] == {"x": 1}


def test_prefix_keys_are_keys_of_earlier_turns_longest_first() -> None:
    msgs = [{"role": "user", "content": c} for c in ["a", "b", "c", "d"]]
    r = parse({"model": "m", "messages": msgs}, path="/v1/chat/completions")
    assert r is not None
    assert r.prefix_keys == (
        prompt_key("m", "a\nb\nc"), prompt_key("m", "a\nb"), prompt_key("m", "a"))
    # The earlier turn's own key is what the next turn looks for.
    earlier = parse({"model": "m", "messages": msgs[:2]}, path="/v1/chat/completions")
    assert earlier is not None and earlier.key in r.prefix_keys


def test_not_llm_requests_are_none() -> None:
    assert parse({"model": "m", "prompt": "x"}, method="GET") is None
    assert parse({"model": "m", "prompt": "x"}, path="/v1/models") is None
    assert parse(b"") is None
    assert parse(b"{not json") is None
    assert parse(b"\xff\xfe") is None
    assert parse([1, 2]) is None
    assert parse({"model": "m", "prompt": "x"}, ctype="text/plain") is None
    assert parse({"model": "m"}) is None
    assert parse({"model": "m", "prompt": [1, "a"]}) is None
    assert parse({"model": "m", "messages": ["x"]}, path="/v1/chat/completions") is None


def test_query_string_does_not_hide_the_path() -> None:
    assert parse({"model": "m", "prompt": "x"}, path="/v1/completions?x=1") is not None


def test_stream_flag_is_read_only_when_true() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert parse({**chat, "stream": True}, "/v1/chat/completions").stream is True
    assert parse({**chat, "stream": "yes"}, "/v1/chat/completions").stream is False
    assert parse(chat, "/v1/chat/completions").stream is False
    assert parse({"model": "m", "prompt": [1, 2], "stream": True}).stream is True


def test_max_tokens_is_read_from_either_form() -> None:
    assert parse({"model": "m", "prompt": "x", "max_tokens": 16}).max_tokens == 16
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert parse({**chat, "max_completion_tokens": 40, "max_tokens": 9}).max_tokens == 40
    assert parse({**chat, "max_tokens": 9}).max_tokens == 9
    assert parse({**chat, "max_completion_tokens": None, "max_tokens": 9}).max_tokens == 9
    # Absent, or not a count: unknown.
    for bad in ({}, {"max_tokens": None}, {"max_tokens": "16"}, {"max_tokens": True},
                {"max_tokens": -1}, {"max_tokens": 1.5}):
        assert parse({**chat, **bad}).max_tokens is None
