"""The simulated tokenizer and chat template: determinism and the chat prefix property."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest

from sim import tokenizer

# One client for the module: a new httpx client per call costs ~30 ms of TLS setup.
http = httpx.Client(timeout=10)

MODEL = "sim-model"

AWKWARD_TEXTS = [
    "Hello there!",
    "  leading spaces",
    "trailing spaces   ",
    "\n\nnewlines first",
    "ends with newline\n",
    "tabs\tand\u00a0nbsp",
    "unicode: héllo wörld 😀",
    "<|user|> looks special",
    "almost <|special",
    "",
    "a" * 300,
    "code:\n    def f(x):\n        return x  # done\n",
]


def conv(*contents: Any) -> list[dict[str, Any]]:
    roles = ["system", "user", "assistant", "user", "assistant", "user"]
    return [{"role": roles[i % len(roles)], "content": c} for i, c in enumerate(contents)]


def assert_strict_prefix(short: list[int], long: list[int]) -> None:
    assert len(short) < len(long)
    assert long[: len(short)] == short


@pytest.mark.parametrize("reply", AWKWARD_TEXTS)
@pytest.mark.parametrize("next_msg", ["next question?", "  spaced", "\nnl", ""])
def test_chat_prefix_property(reply: str, next_msg: str) -> None:
    history = conv("You are helpful.", "Hi!  ")
    before = tokenizer.encode_chat(history, add_generation_prompt=True)
    after = tokenizer.encode_chat(
        history + [{"role": "assistant", "content": reply}, {"role": "user", "content": next_msg}],
        add_generation_prompt=True,
    )
    assert_strict_prefix(before, after)


def test_chat_prefix_property_fuzz() -> None:
    rng = random.Random(3)
    alphabet = ["a", "b", " ", "  ", "\n", "\t", ".", ",", "<|", "|>", "user", "é", "1"]
    for _ in range(300):
        msgs = [
            {"role": rng.choice(["user", "assistant", "system"]), "content": ""}
            for _ in range(rng.randrange(1, 5))
        ]
        for m in msgs:
            m["content"] = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        reply = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        nxt = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        before = tokenizer.encode_chat(msgs, add_generation_prompt=True)
        after = tokenizer.encode_chat(
            msgs + [{"role": "assistant", "content": reply}, {"role": "user", "content": nxt}]
        )
        assert_strict_prefix(before, after)


def test_content_parts_text_joined_images_skipped() -> None:
    parts = [
        {"type": "text", "text": "look at"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "this"},
    ]
    as_parts = tokenizer.encode_chat([{"role": "user", "content": parts}])
    as_text = tokenizer.encode_chat([{"role": "user", "content": "look at\nthis"}])
    assert as_parts == as_text


def test_template_shape() -> None:
    text = tokenizer.render_chat(conv("sys", "hello"), add_generation_prompt=True)
    assert text == "<|bos|><|system|>\nsys<|end|>\n<|user|>\nhello<|end|>\n<|assistant|>\n"
    assert not tokenizer.render_chat(conv("x"), add_generation_prompt=False).endswith(
        "<|assistant|>\n"
    )


def test_tokenizer_is_deterministic_and_lossless() -> None:
    # decode() knows the first piece seen per id, process-wide: after other tests have
    # tokenized thousands of words, hash collisions make it lossy. Start from a clean slate.
    tokenizer._id_to_piece.clear()
    tokenizer.piece_id.cache_clear()
    tokenizer.special_id.cache_clear()
    for text in AWKWARD_TEXTS:
        assert "".join(tokenizer.split_text(text)) == text
        ids = tokenizer.encode(text)
        assert ids == tokenizer.encode(text)
        assert all(0 <= t < tokenizer.TOTAL_VOCAB for t in ids)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("hi", add_special_tokens=True)[0] == tokenizer.BOS_ID
    # Roughly one token per word, like a real BPE tokenizer is roughly.
    assert len(tokenizer.encode("the quick brown fox jumps over the lazy dog")) == 9


def test_generation_is_deterministic_and_retokenizes() -> None:
    prompt = tokenizer.encode("Tell me a story")
    a = tokenizer.generate(prompt, 16)
    assert a == tokenizer.generate(prompt, 16)
    assert tokenizer.generate(prompt, 4) == a[:4]
    assert tokenizer.generate(tokenizer.encode("Something else"), 16) != a
    text = "".join(p for _, p in a)
    assert tokenizer.encode(text) == [i for i, _ in a]


def test_http_tokenize_chat_prefix_property(engine: str) -> None:
    history = conv("You are helpful.", "What is 2+2?")

    def tok(messages: list[dict[str, Any]]) -> list[int]:
        r = http.post(
            f"{engine}/tokenize",
            json={"model": MODEL, "messages": messages, "add_generation_prompt": True},
        )
        r.raise_for_status()
        return r.json()["tokens"]

    answer = http.post(
        f"{engine}/v1/chat/completions", json={"model": MODEL, "messages": history}
    ).json()["choices"][0]["message"]["content"]
    before = tok(history)
    after = tok(
        history + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And?"}]
    )
    assert_strict_prefix(before, after)
    # The reply sits right after the generation prompt, token for token.
    gen_ids = [i for i, _ in tokenizer.generate(before, 16)]
    assert after[len(before) : len(before) + 16] == gen_ids
