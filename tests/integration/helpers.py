from __future__ import annotations

import httpx

from sim.proxy import route_info

SYSTEM = " ".join(f"policy{i % 97} clause{i}" for i in range(400))  # ~800+ tokens


def chat_body(messages: list[dict[str, str]], model: str = "sim-model", **extra: object) -> dict:
    return {"model": model, "messages": messages, "max_tokens": 8, **extra}


def route(resp: httpx.Response) -> dict[str, str]:
    """The x-kvcache-route header as a dict (endpoint under "endpoint")."""
    return route_info(resp.headers["x-kvcache-route"])
