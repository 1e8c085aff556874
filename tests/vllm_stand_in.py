"""The vLLM side of the doctor's tests: a small stand-in serving /tokenize and /v1/models
from the sim tokenizer, and a /v1/completions that hands the prompt's tokens to `stored`,
as a vLLM server with an LMCache connector has its worker (or MP server) report the
prompt's chunks. The unit tests store into a fake coordinator, the real tiers into a real
controller's worker shim or a real coordinator's feeder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from sim import tokenizer


def doctor_vllm_app(model: str, stored: Callable[[list[int]], None]) -> FastAPI:
    app = FastAPI()

    @app.post("/tokenize")
    def tokenize(body: dict[str, Any]) -> dict[str, Any]:
        toks = tokenizer.encode(body["prompt"], True)
        return {"count": len(toks), "max_model_len": 32768, "tokens": toks}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model"}]}

    @app.post("/v1/completions")
    def complete(body: dict[str, Any]) -> dict[str, Any]:
        stored(tokenizer.encode(body["prompt"], True))
        return {"object": "text_completion", "choices": [{"index": 0, "text": "x"}]}

    return app
