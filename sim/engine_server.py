"""HTTP simulator of one vLLM OpenAI-compatible server, built on ``EngineModel``.

Shapes follow ``/work/shared/facts/vllm.md`` (vLLM 0.32): ``/v1/completions``,
``/v1/chat/completions`` (SSE with ``"stream": true``), ``/tokenize`` (completion and chat
forms), ``/detokenize``, ``/v1/models``, ``/health``, ``/metrics``; errors as
``{"error": {"message", "type", "param", "code"}}``, invalid bodies 400 (not FastAPI's 422).

Timing follows the contract in ``sim.engine_model`` (slots, serial prefill, decode steps),
with every modelled duration multiplied by ``time_scale`` and spent in ``asyncio.sleep``.
Like an LMCache worker, the engine registers with the controller simulator and reports the
256-token chunks it admits/evicts; those calls go through one ordered background queue so
they never delay a response and the controller sees them in order.

Simulator-only endpoints live under ``/sim/``: ``GET /sim/state``, ``POST /sim/faults``
(``{"dead": bool}``: ``/health`` answers 503 and generation 500) and ``POST /sim/clear``;
``POST /reset_prefix_cache`` is vLLM's own (dev-mode) route, the same clear.

With ``kv_events_port`` (``--kv-events PORT``, 0 picks a free port) the engine also publishes
vLLM's KV cache events on a ZMQ PUB socket bound on ``tcp://{host}:PORT`` (``sim.kv_events``;
the bound endpoint is printed, and in ``GET /sim/state`` under ``kv_events.endpoint``): one
batch per request when its blocks are allocated (BlockRemoved for the evicted blocks,
BlockStored for the stored ones), AllBlocksCleared on a clear.
With ``echo_body_sha256`` (``--echo-body-sha256``) every response carries
``x-body-sha256``: the SHA-256 of the request body exactly as received (a soak checks with
it that the proxy forwarded the client's bytes unchanged).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict

from sim import tokenizer
from sim.engine_model import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CAPACITY_TOKENS,
    CostModel,
    EngineModel,
    RequestPlan,
)
from sim.kv_events import DEFAULT_TOPIC, KVEventsPublisher, all_blocks_cleared, plan_events
from sim.serving import add_server_args, serve_cli

log = logging.getLogger("sim.engine_server")

LOCATION = "LocalCPUBackend"
# vLLM's own TTFT buckets, so dashboards built for vLLM read these unchanged.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip


@dataclass
class EngineConfig:
    """Configuration of one simulated vLLM server.

    ``base_url`` is the URL registered with the controller; by default
    ``http://{host}:{port}`` (``sim.cluster`` fills in the real one when the port is 0).
    """

    instance_id: str = "vllm-instance-1"
    model: str = "sim-model"
    controller_url: str | None = None
    capacity_tokens: int = DEFAULT_CAPACITY_TOKENS
    time_scale: float = 1.0
    host: str = "127.0.0.1"
    port: int = 8000
    base_url: str | None = None
    cost: CostModel = field(default_factory=CostModel)
    block_size: int = DEFAULT_BLOCK_SIZE
    max_model_len: int = 32768
    default_max_tokens: int = 16
    worker_id: int = 0
    location: str = LOCATION
    enable_prompt_tokens_details: bool = False
    engine_label: str = "0"
    report_timeout_s: float = 2.0
    register_timeout_s: float = 30.0
    echo_body_sha256: bool = False
    # Publish vLLM's KV cache events on tcp://{host}:{kv_events_port} (0: a free port);
    # None: no publisher.
    kv_events_port: int | None = None
    kv_events_topic: str = DEFAULT_TOPIC

    def __post_init__(self) -> None:
        if self.time_scale < 0:
            raise ValueError("time_scale must be >= 0")

    @property
    def own_url(self) -> str:
        return self.base_url or f"http://{self.host}:{self.port}"


# --- request bodies ------------------------------------------------------------------------


class _Body(BaseModel):
    # vLLM accepts (and mostly ignores) many sampling fields; unknown keys must not fail.
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class CompletionRequest(_Body):
    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    add_special_tokens: bool = True


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class TokenizeCompletionRequest(_Body):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class EngineFaults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dead: bool | None = None


# --- errors --------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, err_type: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.message = message
        self.param = param


def error_response(
    status: int, err_type: str, message: str, param: str | None = None
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": err_type, "param": param, "code": status}},
    )


# --- controller reporting ------------------------------------------------------------------


class KVReporter:
    """Ordered, fire-and-forget calls to the controller simulator.

    A single consumer task keeps register -> admit -> evict in order; a failed call is
    counted and dropped (the engine, like an LMCache worker, never waits on the controller).
    """

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.enabled = cfg.controller_url is not None
        self.registered = False
        self.sent = 0
        self.failures = 0
        self._queue: asyncio.Queue[tuple[str, dict[str, Any]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None

    @property
    def base(self) -> str:
        return (self.cfg.controller_url or "").rstrip("/")

    async def start(self) -> None:
        if not self.enabled:
            return
        self._client = httpx.AsyncClient(timeout=self.cfg.report_timeout_s)
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())
        self._queue.put_nowait(
            (
                "register",
                {
                    "instance_id": self.cfg.instance_id,
                    "worker_id": self.cfg.worker_id,
                    "url": self.cfg.own_url,
                },
            )
        )

    def report(self, admitted: list[int], evicted: list[int]) -> None:
        if self._queue is None or not (admitted or evicted):
            return
        self._queue.put_nowait(
            (
                "kv_events",
                {
                    "instance_id": self.cfg.instance_id,
                    "worker_id": self.cfg.worker_id,
                    "location": self.cfg.location,
                    "admitted": admitted,
                    "evicted": evicted,
                },
            )
        )

    async def stop(self) -> None:
        if self._queue is None or self._task is None or self._client is None:
            return
        self._queue.put_nowait(
            ("deregister", {"instance_id": self.cfg.instance_id, "worker_id": self.cfg.worker_id})
        )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout=1.0)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._client.aclose()
        self._queue = None

    async def _post(self, path: str, payload: dict[str, Any]) -> bool:
        assert self._client is not None
        try:
            r = await self._client.post(f"{self.base}/sim/{path}", json=payload)
            ok = r.status_code < 300
        except httpx.HTTPError:
            ok = False
        if ok:
            self.sent += 1
        else:
            self.failures += 1
        return ok

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            kind, payload = await self._queue.get()
            try:
                if kind == "register":
                    await self._register(payload)
                else:
                    await self._post(kind, payload)
            finally:
                self._queue.task_done()

    async def _register(self, payload: dict[str, Any]) -> None:
        # The controller may start after the engine (separate processes in a demo).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.register_timeout_s
        while not await self._post("register", payload):
            if loop.time() > deadline:
                log.warning("could not register %s with %s", self.cfg.instance_id, self.base)
                return
            await asyncio.sleep(0.2)
        self.registered = True


# --- metrics -------------------------------------------------------------------------------


class EngineMetrics:
    def __init__(self, rt: EngineRuntime) -> None:
        self.registry = CollectorRegistry()
        names = ["model_name", "engine"]
        lv = (rt.cfg.model, rt.cfg.engine_label)
        reg = self.registry

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, names, registry=reg).labels(*lv)

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, names, registry=reg).labels(*lv)

        self.queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        )
        self.hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        gauge("vllm:num_requests_running", "Number of requests in model execution batches.") \
            .set_function(lambda: rt.running)  # fmt: skip
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.") \
            .set_function(lambda: rt.waiting)  # fmt: skip
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.") \
            .set_function(rt.model.usage)  # fmt: skip
        # As vLLM: every ended request, by why it ended (the stand-in always generates
        # max_tokens, so "length"; "abort" when the client left first).
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          [*names, "finished_reason"], registry=reg)
        self.finished_length = success.labels(*lv, "length")
        self.finished_abort = success.labels(*lv, "abort")
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            names,
            buckets=TTFT_BUCKETS,
            registry=reg,
        ).labels(*lv)


# --- the engine ----------------------------------------------------------------------------


class EngineRuntime:
    """State shared by the handlers of one app."""

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.model = EngineModel(cfg.instance_id, cfg.capacity_tokens, cfg.cost, cfg.block_size)
        self.running = 0
        self.waiting = 0
        self.dead = False
        # Set when the server is stopping: in-flight requests then finish without waiting.
        self.closing = False
        self.reporter = KVReporter(cfg)
        self.metrics = EngineMetrics(self)
        self.created = int(time.time())
        self.kv_events = (None if cfg.kv_events_port is None else
                          KVEventsPublisher(cfg.host, cfg.kv_events_port, cfg.kv_events_topic))
        self._slots: asyncio.Semaphore | None = None
        self._prefill: asyncio.Lock | None = None

    def reset_primitives(self) -> None:
        # asyncio primitives bind to the loop that first uses them; a new lifespan may run
        # on a new loop (e.g. a second TestClient), so make fresh ones there.
        self._slots = asyncio.Semaphore(self.cfg.cost.max_batch)
        self._prefill = asyncio.Lock()

    def _primitives(self) -> tuple[asyncio.Semaphore, asyncio.Lock]:
        if self._slots is None or self._prefill is None:
            self.reset_primitives()
        assert self._slots is not None and self._prefill is not None
        return self._slots, self._prefill

    async def _sleep(self, model_seconds: float) -> None:
        if model_seconds > 0 and self.cfg.time_scale > 0 and not self.closing:
            await asyncio.sleep(model_seconds * self.cfg.time_scale)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.cfg.model:
            raise APIError(404, "NotFoundError", f"The model `{model}` does not exist.", "model")

    def check_tokens(self, tokens: list[int]) -> None:
        if not tokens:
            raise APIError(400, "BadRequestError", "The decoder prompt cannot be empty")
        for t in tokens:
            if not 0 <= t < tokenizer.TOTAL_VOCAB:
                raise APIError(400, "BadRequestError", f"Token id {t} is out of vocabulary")

    def check_len(self, n_prompt: int, max_tokens: int) -> None:
        if max_tokens < 1:
            raise APIError(
                400, "BadRequestError", f"max_tokens must be at least 1, got {max_tokens}."
            )
        limit = self.cfg.max_model_len
        if n_prompt + max_tokens > limit:
            raise APIError(
                400,
                "BadRequestError",
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages "
                "or completion.",
            )

    async def run(self, tokens: list[int], n_out: int) -> AsyncIterator[tuple[RequestPlan, int]]:
        """Yield ``(plan, i)`` as output token ``i`` is produced, timed by the cost model."""
        slots, prefill = self._primitives()
        loop = asyncio.get_running_loop()
        arrival = loop.time()
        # As vLLM counts them: waiting until the prefill starts (vLLM schedules a request
        # when its first prefill chunk runs), running from then on.
        self.waiting += 1
        started = False
        completed = False
        try:
            await slots.acquire()
        except BaseException:
            self.waiting -= 1
            raise
        try:
            lock = prefill if self.cfg.cost.serial_prefill else contextlib.nullcontext()
            async with lock:
                self.waiting -= 1
                self.running += 1
                started = True
                queued = loop.time() - arrival
                plan = self.model.begin(tokens, n_out, self.running)
                if self.kv_events is not None:
                    # At allocation, in the order the cache changed (vLLM's batch comes at
                    # the end of the step that allocated; one step here is the request's
                    # whole prefill, so publishing after it could reorder two requests).
                    self.kv_events.publish(plan_events(plan, tokens, self.cfg.block_size))
                # Evictions happen when the new blocks are allocated, admissions once the
                # KV exists (after prefill), as an LMCache worker would report them.
                self.reporter.report([], plan.evicted_chunks)
                self.metrics.queries.inc(plan.prompt_tokens)
                self.metrics.hits.inc(plan.cached_tokens)
                self.metrics.prompt_tokens.inc(plan.prompt_tokens)
                await self._sleep(plan.prefill_s)
            self.reporter.report(plan.admitted_chunks, [])
            first = loop.time()
            ts = self.cfg.time_scale
            # Reported in model (unscaled) seconds so a sped-up demo still shows H100-like
            # numbers; the prefill part is taken from the plan rather than the clock because
            # dividing event-loop jitter by a small time_scale would blow it up.
            self.metrics.ttft.observe((queued / ts if ts > 0 else 0.0) + plan.prefill_s)
            step = plan.decode_step_s * ts
            for i in range(n_out):
                if i:
                    # Deadlines, not fixed sleeps, so scheduling jitter does not accumulate.
                    delay = first + i * step - loop.time()
                    if delay > 0 and not self.closing:
                        await asyncio.sleep(delay)
                self.metrics.generation_tokens.inc()
                yield plan, i
            completed = True
        finally:
            (self.metrics.finished_length if completed else self.metrics.finished_abort).inc()
            if started:
                self.running -= 1
            else:
                self.waiting -= 1
            slots.release()

    def clear(self) -> int:
        dropped = self.model.clear()
        self.reporter.report([], dropped)
        if self.kv_events is not None:
            self.kv_events.publish([all_blocks_cleared()])
        return len(dropped)

    def state(self) -> dict[str, Any]:
        m = self.model
        return {
            "instance_id": self.cfg.instance_id,
            "model": self.cfg.model,
            "running": self.running,
            "waiting": self.waiting,
            "dead": self.dead,
            "kv_cache_usage": m.usage(),
            "cached_blocks": m.cache.num_blocks,
            "held_chunks": len(m.cache.held_chunks()),
            "prefix_cache_queries": m.prefix_cache_queries,
            "prefix_cache_hits": m.prefix_cache_hits,
            "requests": m.requests,
            "controller": {
                "url": self.cfg.controller_url,
                "registered": self.reporter.registered,
                "sent": self.reporter.sent,
                "failures": self.reporter.failures,
            },
            "kv_events": None if self.kv_events is None else self.kv_events.state(),
        }


def validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    parts = [
        f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors
    ]
    return f"{len(errors)} validation error(s): " + "; ".join(parts)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _usage(rt: EngineRuntime, plan: RequestPlan | None, n_prompt: int, n_out: int) -> dict:
    details = None
    if rt.cfg.enable_prompt_tokens_details:
        details = {"cached_tokens": plan.cached_tokens if plan else 0}
    return {
        "prompt_tokens": n_prompt,
        "total_tokens": n_prompt + n_out,
        "completion_tokens": n_out,
        "prompt_tokens_details": details,
    }


def _completion_prompt_tokens(req: CompletionRequest) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, req.add_special_tokens)
    if not prompt:
        return []  # rejected as an empty prompt by check_tokens, as vLLM does
    if all(isinstance(p, int) for p in prompt):
        return list(prompt)  # type: ignore[arg-type]
    if len(prompt) != 1:
        raise APIError(
            400, "BadRequestError", "The simulator serves exactly one prompt per request."
        )
    single = prompt[0]
    if isinstance(single, str):
        return tokenizer.encode(single, req.add_special_tokens)
    return list(single)  # type: ignore[arg-type]


class BodySha256:
    """ASGI middleware: read the whole request body, then answer with its SHA-256 in the
    ``x-body-sha256`` response header (the app gets the same body replayed)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        digest = hashlib.sha256(body).hexdigest().encode()
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def send_with_digest(msg: Any) -> None:
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-body-sha256", digest)]}
            await send(msg)

        await self.app(scope, replay, send_with_digest)


def create_app(cfg: EngineConfig) -> FastAPI:
    """The FastAPI app of one simulated vLLM server."""
    rt = EngineRuntime(cfg)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        rt.reset_primitives()
        await rt.reporter.start()
        try:
            yield
        finally:
            await rt.reporter.stop()
            if rt.kv_events is not None:
                rt.kv_events.close()

    app = FastAPI(title=f"vLLM simulator {cfg.instance_id}", lifespan=lifespan)
    app.state.runtime = rt
    app.state.begin_shutdown = lambda: setattr(rt, "closing", True)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # vLLM answers 400 for any invalid body (FastAPI's default would be 422).
        return error_response(400, "BadRequestError", validation_message(exc))

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.err_type, exc.message, exc.param)

    @app.exception_handler(UnicodeError)
    async def _unencodable(_: Request, exc: UnicodeError) -> JSONResponse:
        # A prompt the tokenizer cannot encode (a lone surrogate): vLLM answers 400.
        return error_response(400, "BadRequestError", f"The prompt cannot be encoded: {exc}")

    async def serve(
        kind: Literal["chat", "completion"],
        tokens: list[int],
        n_out: int,
        stream: bool,
        include_usage: bool,
    ) -> Response:
        if rt.dead:
            raise APIError(500, "InternalServerError", "EngineCore encountered an issue.")
        rt.check_tokens(tokens)
        rt.check_len(len(tokens), n_out)
        gen = tokenizer.generate(tokens, n_out)
        req_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        n_prompt = len(tokens)
        if not stream:
            plan: RequestPlan | None = None
            async for step_plan, _ in rt.run(tokens, n_out):
                plan = step_plan
            text = "".join(p for _, p in gen)
            usage = _usage(rt, plan, n_prompt, n_out)
            if kind == "chat":
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "tool_calls": [],
                        "reasoning_content": None,
                    },
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                }
                obj = "chat.completion"
            else:
                choice = {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                    "prompt_logprobs": None,
                }
                obj = "text_completion"
            body = {
                "id": req_id,
                "object": obj,
                "created": created,
                "model": cfg.model,
                "choices": [choice],
                "service_tier": None,
                "system_fingerprint": None,
                "usage": usage,
                "prompt_logprobs": None,
                "kv_transfer_params": None,
            }
            return JSONResponse(body)

        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(choices: list[dict[str, Any]], usage: dict | None = None) -> str:
            payload: dict[str, Any] = {
                "id": req_id,
                "object": obj,
                "created": created,
                "model": cfg.model,
                "choices": choices,
            }
            if usage is not None:
                payload["usage"] = usage
            return f"data: {_dumps(payload)}\n\n"

        async def events() -> AsyncIterator[str]:
            plan: RequestPlan | None = None
            async for step_plan, i in rt.run(tokens, n_out):
                plan = step_plan
                piece = gen[i][1]
                last = i == n_out - 1
                finish = "length" if last else None
                if kind == "chat":
                    if i == 0:
                        # vLLM sends the role with the first engine output, not before.
                        yield chunk(
                            [
                                {
                                    "index": 0,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                    c: dict[str, Any] = {
                        "index": 0,
                        "delta": {"content": piece},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                else:
                    c = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
                if last:
                    c["stop_reason"] = None
                yield chunk([c])
            if include_usage:
                yield chunk([], _usage(rt, plan, n_prompt, n_out))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Response:
        rt.check_model(req.model)
        tokens = _completion_prompt_tokens(req)
        n_out = req.max_tokens if req.max_tokens is not None else cfg.default_max_tokens
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await serve("completion", tokens, n_out, bool(req.stream), include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest) -> Response:
        rt.check_model(req.model)
        messages = [m.model_dump() for m in req.messages]
        tokens = tokenizer.encode_chat(
            messages, req.add_generation_prompt, req.continue_final_message
        )
        n_out = req.max_completion_tokens or req.max_tokens or cfg.default_max_tokens
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await serve("chat", tokens, n_out, bool(req.stream), include_usage)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeCompletionRequest | TokenizeChatRequest) -> JSONResponse:
        rt.check_model(req.model)
        if isinstance(req, TokenizeChatRequest):
            text = tokenizer.render_chat(
                [m.model_dump() for m in req.messages],
                req.add_generation_prompt,
                req.continue_final_message,
            )
            ids, pieces = tokenizer.encode_with_pieces(text, req.add_special_tokens)
        else:
            ids, pieces = tokenizer.encode_with_pieces(req.prompt, req.add_special_tokens)
        return JSONResponse(
            {
                "count": len(ids),
                "max_model_len": cfg.max_model_len,
                "tokens": ids,
                "token_strs": pieces if req.return_token_strs else None,
            }
        )

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> JSONResponse:
        rt.check_model(req.model)
        return JSONResponse({"prompt": tokenizer.decode(req.tokens)})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": cfg.model,
                        "object": "model",
                        "created": rt.created,
                        "owned_by": "vllm",
                        "root": cfg.model,
                        "parent": None,
                        "max_model_len": cfg.max_model_len,
                        "permission": [
                            {
                                "id": f"modelperm-{cfg.instance_id}",
                                "object": "model_permission",
                                "created": rt.created,
                                "allow_create_engine": False,
                                "allow_sampling": True,
                                "allow_logprobs": True,
                                "allow_search_indices": False,
                                "allow_view": True,
                                "allow_fine_tuning": False,
                                "organization": "*",
                                "group": None,
                                "is_blocking": False,
                            }
                        ],
                    }
                ],
            }
        )

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if rt.dead else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/sim/state")
    async def sim_state() -> JSONResponse:
        return JSONResponse(rt.state())

    @app.post("/sim/faults")
    async def sim_faults(f: EngineFaults) -> JSONResponse:
        if f.dead is not None:
            rt.dead = f.dead
        return JSONResponse({"dead": rt.dead})

    @app.post("/sim/clear")
    async def sim_clear() -> JSONResponse:
        return JSONResponse({"evicted_chunks": rt.clear()})

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        # vLLM's route (served with VLLM_SERVER_DEV_MODE=1): 200, empty body.
        rt.clear()
        return Response(status_code=200)

    if cfg.echo_body_sha256:
        app.add_middleware(BodySha256)
    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sim.engine_server", description="Simulated vLLM server."
    )
    add_server_args(p, default_port=8000)
    p.add_argument("--instance-id", required=True, help="LMCache instance id of this engine")
    p.add_argument("--model", "--served-model-name", dest="model", required=True)
    p.add_argument("--controller", default=None, help="controller simulator base URL")
    p.add_argument("--capacity-tokens", type=int, default=DEFAULT_CAPACITY_TOKENS)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--base-url", default=None, help="URL to register (default: bound URL)")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    p.add_argument("--max-model-len", type=int, default=32768)
    p.add_argument("--max-batch", type=int, default=CostModel.max_batch)
    p.add_argument("--enable-prompt-tokens-details", action="store_true")
    p.add_argument("--echo-body-sha256", action="store_true",
                   help="answer with x-body-sha256: the SHA-256 of the request body received")
    p.add_argument("--kv-events", dest="kv_events_port", type=int, default=None,
                   metavar="PORT",
                   help="publish vLLM's KV cache events on tcp://HOST:PORT (0: a free port; "
                        "the endpoint is printed and in /sim/state)")
    p.add_argument("--kv-events-topic", default=DEFAULT_TOPIC)
    return p


def config_from_args(args: argparse.Namespace, base_url: str) -> EngineConfig:
    return EngineConfig(
        instance_id=args.instance_id,
        model=args.model,
        controller_url=args.controller,
        capacity_tokens=args.capacity_tokens,
        time_scale=args.time_scale,
        host=args.host,
        port=args.port,
        base_url=args.base_url or base_url,
        cost=CostModel(max_batch=args.max_batch),
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        echo_body_sha256=args.echo_body_sha256,
        kv_events_port=args.kv_events_port,
        kv_events_topic=args.kv_events_topic,
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def factory(url: str) -> FastAPI:
        app = create_app(config_from_args(args, url))
        pub = app.state.runtime.kv_events
        if pub is not None:
            print(f"kv events on {pub.url} (topic {pub.topic!r})", flush=True)
        return app

    serve_cli(factory, args)


if __name__ == "__main__":
    main()
