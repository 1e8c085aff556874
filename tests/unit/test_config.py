"""Config validation: every bad value stops start-up with one line naming key and value."""

from pathlib import Path

import pytest

from addon.config import (
    ConfigError,
    load_config,
    load_config_file,
    parse_duration,
    policy_params,
)
from addon.policy import PolicyParams

EP = [{"id": "vllm-instance-1", "url": "http://127.0.0.1:8001"}]


def test_repo_config_yaml_loads_with_documented_defaults() -> None:
    cfg = load_config_file(Path(__file__).parents[2] / "config.yaml")
    assert [e.id for e in cfg.endpoints] == ["vllm-instance-1", "vllm-instance-2"]
    assert cfg.lookup_routing_timeout == pytest.approx(0.05)
    assert cfg.token_cache.enabled is True
    assert cfg.vllm_endpoint == "http://127.0.0.1:8001"  # first endpoint when empty
    assert cfg.routing_hot_half_life == pytest.approx(10.0)  # "10s"


def test_minimal_config_has_first_run_defaults() -> None:
    cfg = load_config({"endpoints": EP})
    assert cfg.token_cache.enabled  # the seed had it off, which disables routing
    assert cfg.load_balancing == "least_inflight"
    assert cfg.cache_strategy.compress_method == "cachegen"
    assert cfg.llm_paths == ["/v1/chat/completions", "/v1/completions"]


def test_kvcache_top_level_key_is_accepted() -> None:
    cfg = load_config({"kvcache": {"endpoints": EP, "hot_window": "1m"}})
    assert cfg.hot_window == 60.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("50ms", 0.05), ("2s", 2.0), ("5m", 300.0), ("1h", 3600.0), ("1m30s", 90.0),
     ("1.5s", 1.5), (3, 3.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"endpoints": EP, "bogus": 1}, "unknown key 'bogus'"),
        ({"endpoints": EP, "token_cache": {"max_size": -5}}, "token_cache.max_size = -5"),
        ({"endpoints": EP, "cache_strategy": {"load_threshold": 1.5}},
         "cache_strategy.load_threshold = 1.5"),
        ({"endpoints": EP, "cache_strategy": {"memory_threshold": -0.1}},
         "cache_strategy.memory_threshold = -0.1"),
        ({"endpoints": EP, "request_timeout": "2 seconds"}, "request_timeout = '2 seconds'"),
        ({"endpoints": EP, "hot_window": "-5m"}, "hot_window = '-5m'"),
        ({"endpoints": EP + EP}, "duplicate endpoint id 'vllm-instance-1'"),
        ({"endpoints": [{"id": "a", "url": "ftp://h:1"}]}, "endpoints.0.url = 'ftp://h:1'"),
        ({"endpoints": [{"id": "a", "url": "http://h:1/v1"}]}, "without a path"),
        ({"endpoints": []}, "at least one endpoint"),
        ({}, "missing key 'endpoints'"),
        ({"endpoints": EP, "load_balancing": "random"}, "load_balancing = 'random'"),
        ({"endpoints": EP, "retry": {"max_attempts": 0}}, "retry.max_attempts = 0"),
        ({"endpoints": EP, "cache_strategy": {"zstd": True}}, "cache_strategy.zstd"),
        ({"endpoints": EP, "lmcache_endpoint": "localhost:9000"}, "lmcache_endpoint"),
        ({"endpoints": EP, "routing_hot_half_life": "-1s"}, "routing_hot_half_life = '-1s'"),
        ({"endpoints": EP, "routing_hot_headroom": -0.5}, "routing_hot_headroom = -0.5"),
        ({"endpoints": EP, "routing_hot_copy_credit": 1.5}, "routing_hot_copy_credit = 1.5"),
        ({"endpoints": EP, "routing_congestion_tokens": -1}, "routing_congestion_tokens = -1"),
        ({"endpoints": EP, "state": {"backend": "etcd"}}, "state.backend = 'etcd'"),
        ({"endpoints": EP, "state": {"backend": "redis", "url": "http://r:6379"}},
         "state.url = 'http://r:6379'"),
        ({"endpoints": EP, "state": {"heartbeat": "0s"}}, "state.heartbeat = '0s'"),
        ({"endpoints": EP, "state": {"heartbeat": "2s", "peer_timeout": "1s"}},
         "peer_timeout (1s) must exceed heartbeat (2s)"),
        ({"endpoints": EP, "state": {"channel": ""}}, "state.channel = ''"),
        ({"endpoints": EP, "state": {"redis": "x"}}, "unknown key 'state.redis'"),
        ({"endpoints": EP, "cache_view": "gossip"}, "cache_view = 'gossip'"),
        ({"endpoints": EP, "cache_view": "kv_events"},
         "needs endpoints.0.kv_events_endpoint (endpoint 'vllm-instance-1' has none)"),
        ({"endpoints": [{**EP[0], "kv_events_endpoint": "http://h:5557"}]},
         "endpoints.0.kv_events_endpoint = 'http://h:5557'"),
        ({"endpoints": EP, "cache_view": "coordinator"}, "needs cache_model"),
        ({"endpoints": EP, "routing_lower_tier_cost": 1.5}, "routing_lower_tier_cost = 1.5"),
    ],
)
def test_bad_values_name_key_and_value(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(data)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unreadable_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("endpoints: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(bad)


def test_every_routing_knob_comes_from_its_config_key() -> None:
    assert policy_params(load_config({"endpoints": EP})) == PolicyParams()  # same defaults
    cfg = load_config({
        "endpoints": EP, "routing_policy": "longest_match", "routing_load_weight": 7,
        "routing_load_unit": "requests", "routing_prefill_share": 0.25,
        "routing_request_tokens": 9, "routing_track_inflight": False,
        "routing_recent_tokens": 11, "routing_hot_half_life": "3s",
        "routing_hot_headroom": 0.25, "routing_hot_copy_credit": 0.75,
        "routing_congestion_tokens": 13})
    assert policy_params(cfg) == PolicyParams(
        kind="longest_match", load_weight_tokens=7, load_unit="requests", prefill_share=0.25,
        request_tokens=9, track_inflight=False, recent_tokens=11, hot_half_life=3.0,
        hot_headroom=0.25, hot_copy_credit=0.75, congestion_tokens=13)


def test_state_defaults_to_one_process_and_takes_redis_settings() -> None:
    assert load_config({"endpoints": EP}).state.backend == "memory"
    st = load_config({"endpoints": EP, "state": {
        "backend": "redis", "url": "redis://cache:6380/2", "heartbeat": "200ms",
        "peer_timeout": "1s"}}).state
    assert (st.backend, st.url, st.heartbeat, st.peer_timeout, st.channel) == (
        "redis", "redis://cache:6380/2", 0.2, 1.0, "kvcache")
