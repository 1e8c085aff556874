"""Parse an OpenAI-style LLM request body into what routing needs (pure, no I/O).

The body is parsed once here; the caller forwards the original bytes untouched.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from orjson import loads  # ~3x json's speed on a 100 KB body


@dataclass(frozen=True)
class LLMRequest:
    path: str
    model: str
    prompt: str  # the seed's prompt text: strings joined by "\n", roles ignored
    key: str  # SHA-256 of model + "\x00" + prompt, as in the seed
    form: str  # "chat" or "completion"
    # Conversation prefixes, longest first: the keys of messages[:k] for k = n-1 .. 1, so the
    # next turn of a chat finds the tokens of the turn before it.
    prefix_keys: tuple[str, ...] = ()
    token_ids: tuple[int, ...] | None = None  # the client sent token ids
    tokenize_body: dict[str, Any] = field(default_factory=dict)  # vLLM /tokenize request
    stream: bool = False  # the client asked for a streamed (SSE) answer
    # The most tokens the answer may have (max_tokens, or max_completion_tokens in the
    # chat form); None when the client did not say.
    max_tokens: int | None = None


# A lone surrogate ("\\ud800" in JSON, or raw ED A0 80, which json.loads lets through) is
# not encodable as UTF-8: it is hashed as its surrogatepass bytes rather than failing.
_ENC = "surrogatepass"

# Conversation prefix keys kept per request: the next turn of a chat extends the previous one
# by a few messages, so the longest few prefixes find it; hashing every prefix of a 100k-message
# conversation (and looking each up) would cost the event loop tenths of a second.
MAX_PREFIX_KEYS = 16


def prompt_key(model: str, prompt: str) -> str:
    return hashlib.sha256(f"{model}\x00{prompt}".encode("utf-8", _ENC)).hexdigest()


def _content_text(content: Any) -> str | None:
    """Text of a message's content: a string, or the text parts of a parts list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
        return "\n".join(texts)
    return None


def _is_token_ids(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in v
    )


# Chat-form fields that change the tokens the engine sees; copied into /tokenize so the
# tokens we route on are the engine's own.
_CHAT_TEMPLATE_FIELDS = (
    "chat_template", "chat_template_kwargs", "tools", "add_generation_prompt",
    "continue_final_message",
)


def _prefix_keys(model: str, texts: Sequence[str]) -> tuple[str, ...]:
    # Incremental hashing: one pass over the conversation instead of one per prefix.
    h = hashlib.sha256(f"{model}\x00".encode("utf-8", _ENC))
    keys: list[str] = []
    first_kept = len(texts) - 1 - MAX_PREFIX_KEYS
    for i, text in enumerate(texts[:-1]):
        h.update(("\n" if i else "").encode() + text.encode("utf-8", _ENC))
        if i >= first_kept:
            keys.append(h.copy().hexdigest())
    return tuple(reversed(keys))


def parse_llm_request(
    method: str,
    path: str,
    content_type: str,
    body: bytes | None,
    llm_paths: Iterable[str],
    default_model: str = "",
) -> LLMRequest | None:
    """The request's routing facts, or None when it is not an LLM request we understand."""
    route_path = path.split("?", 1)[0]
    if method.upper() != "POST" or route_path not in llm_paths or not body:
        return None
    if content_type and "json" not in content_type.lower():
        return None
    try:
        data = loads(body)
    except ValueError:
        try:  # orjson refuses what json accepts: lone surrogates, nesting past 1024
            data = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: deeply nested arrays/objects
            return None
    if not isinstance(data, dict):
        return None
    model = data.get("model")
    if not isinstance(model, str) or not model:
        model = default_model
    if not model:
        return None

    messages = data.get("messages")
    prompt = data.get("prompt")
    stream = data.get("stream") is True
    # A client may send the newer name as null beside the older one (SDKs that fill every
    # field): the first one that is set counts.
    limit = next((v for v in (data.get("max_completion_tokens"), data.get("max_tokens"))
                  if v is not None), None)
    max_tokens = (limit if isinstance(limit, int) and not isinstance(limit, bool)
                  and limit >= 0 else None)
    if isinstance(messages, list) and messages:
        texts: list[str] = []
        for m in messages:
            if not isinstance(m, dict):
                return None
            text = _content_text(m.get("content"))
            if text is not None:
                texts.append(text)
        if not texts:
            return None
        joined = "\n".join(texts)
        tok: dict[str, Any] = {"model": model, "messages": messages}
        tok.update({k: data[k] for k in _CHAT_TEMPLATE_FIELDS if k in data})
        tok.setdefault("add_generation_prompt", True)
        return LLMRequest(
            path=route_path, model=model, prompt=joined, key=prompt_key(model, joined),
            stream=stream, max_tokens=max_tokens, form="chat",
            prefix_keys=_prefix_keys(model, texts), tokenize_body=tok,
        )

    if isinstance(prompt, str) and prompt:
        return LLMRequest(
            path=route_path, model=model, prompt=prompt, key=prompt_key(model, prompt),
            stream=stream, max_tokens=max_tokens, form="completion",
            tokenize_body={"model": model, "prompt": prompt},
        )
    if _is_token_ids(prompt):
        text = " ".join(map(str, prompt))
        return LLMRequest(
            path=route_path, model=model, prompt=text, key=prompt_key(model, text),
            stream=stream, max_tokens=max_tokens, form="completion", token_ids=tuple(prompt),
        )
    if isinstance(prompt, list) and prompt:
        # A batch: route on its first prompt (one upstream serves the whole request).
        if all(isinstance(p, str) for p in prompt):
            joined = "\n".join(prompt)
            return LLMRequest(
                path=route_path, model=model, prompt=joined, key=prompt_key(model, joined),
                stream=stream, max_tokens=max_tokens, form="completion",
                tokenize_body={"model": model, "prompt": prompt[0]},
            )
        if all(_is_token_ids(p) for p in prompt):
            text = " ".join(map(str, prompt[0]))
            return LLMRequest(
                path=route_path, model=model, prompt=text, key=prompt_key(model, text),
                stream=stream, max_tokens=max_tokens, form="completion", token_ids=tuple(prompt[0]),
            )
    return None
