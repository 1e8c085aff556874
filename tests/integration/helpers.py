from __future__ import annotations

import httpx

SYSTEM = " ".join(f"policy{i % 97} clause{i}" for i in range(400))  # ~800+ tokens


def chat_body(messages: list[dict[str, str]], model: str = "sim-model", **extra: object) -> dict:
    return {"model": model, "messages": messages, "max_tokens": 8, **extra}


def route(resp: httpx.Response) -> dict[str, str]:
    """The x-kvcache-route header as a dict (endpoint under "endpoint")."""
    head, *rest = resp.headers["x-kvcache-route"].split("; ")
    out = {"endpoint": head}
    for part in rest:
        k, _, v = part.partition("=")
        out[k] = v
    return out
