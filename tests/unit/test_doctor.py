"""scripts/doctor (addon.doctor) against the simulators, including their wrong-shape switches."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI

from addon import doctor
from sim.cluster import Cluster, serve_app, start_cluster, start_controller, start_engine
from sim.controller import ControllerConfig
from sim.engine_server import EngineConfig
from tests.vllm_stand_in import doctor_vllm_app

MODEL = "sim-model"


def _dead_url() -> str:
    # A port that was free a moment ago; nothing listens there.
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def _config(tmp_path: Path, controller: str, endpoints: dict[str, str], **extra: Any) -> str:
    path = tmp_path / "config.yaml"
    data = {
        "lmcache_endpoint": controller,
        "default_model": MODEL,
        "endpoints": [{"id": i, "url": u} for i, u in endpoints.items()],
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = doctor.main(["--settle", "2", *argv])
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with start_cluster(2, time_scale=0.02) as c:
        yield c


def _cluster_with(**controller: Any) -> Any:
    return start_cluster(2, time_scale=0.02, controller=ControllerConfig(**controller))


def test_healthy_setup(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(capsys, "--config", _config(tmp_path, cluster.controller_url,
                                                cluster.engine_urls))
    assert code == 0, out
    assert "[FAIL]" not in out
    assert "Every endpoint id is a controller instance id" in out
    assert "matches vllm-instance-" in out
    assert out.rstrip().endswith("Routing by cache can work.")


def test_endpoint_ids_differ_from_instance_ids(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    eps = {f"gpu-{n}": url for n, url in enumerate(cluster.urls)}
    code, out = run(capsys, "--config", _config(tmp_path, cluster.controller_url, eps))
    assert code != 0
    assert "[FAIL] Endpoint ids do not match the controller's instance ids" in out
    assert "knows vllm-instance-1, vllm-instance-2" in out
    assert "endpoints are gpu-0, gpu-1" in out
    assert "no request is ever routed by cache" in out
    assert "Routing by cache cannot work" in out


def test_one_endpoint_id_wrong_is_a_warning(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    eps = {"vllm-instance-1": cluster.urls[0], "typo-2": cluster.urls[1]}
    code, out = run(capsys, "--config", _config(tmp_path, cluster.controller_url, eps))
    assert code == 0
    assert "[WARN] Endpoint(s) typo-2 are not known to the controller" in out
    assert "The controller also knows vllm-instance-2" in out


def test_flags_override_the_config(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, _dead_url(), {"x": _dead_url()})
    eps = [f"--endpoint={i}={u}" for i, u in cluster.engine_urls.items()]
    code, out = run(capsys, "--config", cfg, "--controller", cluster.controller_url, *eps)
    assert code == 0, out


def test_json_output(cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eps = {f"gpu-{n}": url for n, url in enumerate(cluster.urls)}
    code, out = run(capsys, "--json", "--config", _config(tmp_path, cluster.controller_url, eps))
    data = json.loads(out)
    assert code == 1 and data["ok"] is False
    by_name = {c["name"]: c for c in data["checks"]}
    assert by_name["instance_ids"]["status"] == "fail"
    assert by_name["instance_ids"]["data"]["known"] == ["vllm-instance-1", "vllm-instance-2"]
    assert by_name["instance_ids"]["data"]["configured"] == ["gpu-0", "gpu-1"]


def test_pixiu_object_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with _cluster_with(layout="object") as c:
        code, out = run(capsys, "--config", _config(tmp_path, c.controller_url, c.engine_urls))
    assert code == 0
    assert "[WARN] layout_info values are objects" in out and "Pixiu" in out


def test_lmcache_030_bodies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with _cluster_with(api="0.3.0") as c:
        code, out = run(capsys, "--config", _config(tmp_path, c.controller_url, c.engine_urls))
    assert code == 0
    assert "LMCache 0.3.0 bodies (no event_id)" in out
    # 0.3.0 has no /query_worker_info: ids come from /health {"alive"} instead.
    assert "Every endpoint id is a controller instance id" in out


def test_chunk_hash_seed_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with _cluster_with(hash_seed=7) as c:
        code, out = run(capsys, "--config", _config(tmp_path, c.controller_url, c.engine_urls))
    assert code == 1
    assert "chunk-hash seed mismatch" in out and "PYTHONHASHSEED" in out


def test_controller_answers_garbage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with _cluster_with(garbage=True) as c:
        code, out = run(capsys, "--config", _config(tmp_path, c.controller_url, c.engine_urls))
    assert code == 1
    assert "not JSON" in out


def test_controller_shape_the_addon_cannot_read(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = FastAPI()

    @app.post("/lookup")
    async def lookup() -> dict[str, Any]:
        return {"event_id": "x", "layout_info": {"vllm-instance-1": "LocalCPUBackend:512"}}

    with serve_app(app) as url:
        code, out = run(capsys, "--config", _config(tmp_path, url, cluster.engine_urls))
    assert code == 1
    assert "a shape the addon cannot read" in out


def test_controller_unreachable(cluster: Cluster, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--config", _config(tmp_path, _dead_url(), cluster.engine_urls))
    assert code == 1
    assert "[FAIL] Cannot reach the LMCache controller" in out
    assert "--monitor-ports" in out


def test_no_worker_registered(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with start_controller() as ctl, start_engine(
        EngineConfig(instance_id="vllm-instance-1", model=MODEL, time_scale=0.02)
    ) as eng:
        code, out = run(capsys, "--config", _config(tmp_path, ctl, {"vllm-instance-1": eng}))
    assert code == 1
    assert "No LMCache worker is registered" in out


def test_model_unknown(cluster: Cluster, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, cluster.controller_url, cluster.engine_urls)
    code, out = run(capsys, "--config", cfg, "--model", "llama-nope")
    assert code == 1
    assert "does not know the model 'llama-nope'" in out
    assert "sim-model" in out  # the fix lists what is served


def test_tokenize_unreachable(cluster: Cluster, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, cluster.controller_url, cluster.engine_urls)
    code, out = run(capsys, "--config", cfg, "--tokenizer", _dead_url())
    assert code == 1
    assert "/tokenize" in out and "[FAIL] Cannot reach" in out


def test_short_prompt(cluster: Cluster, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, cluster.controller_url, cluster.engine_urls)
    code, out = run(capsys, "--config", cfg, "--prompt", "What is the capital of France?")
    assert code == 0
    assert "Your prompt is" in out and "shorter than 256 tokens never match" in out


def test_no_warmup_leaves_hashes_untested(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with _cluster_with() as c:
        cfg = _config(tmp_path, c.controller_url, c.engine_urls)
        code, out = run(capsys, "--config", cfg, "--no-warmup")
    assert code == 0
    assert "it was not sent: --no-warmup" in out


def test_eviction_on_without_evict(cluster: Cluster, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, cluster.controller_url, cluster.engine_urls,
                  cache_strategy={"enable_eviction": True})
    code, out = run(capsys, "--config", cfg)
    assert code == 0
    assert "[WARN] enable_eviction is on, but the controller has no /evict" in out


def test_controller_with_evict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with _cluster_with(evict=True) as c:
        cfg = _config(tmp_path, c.controller_url, c.engine_urls,
                      cache_strategy={"enable_eviction": True})
        code, out = run(capsys, "--config", cfg)
    assert code == 0
    assert "[ok]   The controller serves /evict" in out


def test_compress_method_other_than_cachegen(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, cluster.controller_url, cluster.engine_urls,
                  cache_strategy={"enable_compression": True, "compress_method": "zstd"})
    code, out = run(capsys, "--config", cfg)
    assert code == 0
    assert "[WARN] compress_method is 'zstd'" in out


def test_invalid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("endpoints: []\n")
    code, out = run(capsys, "--config", str(bad))
    assert code == 1
    assert "[FAIL] The config cannot be loaded" in out and "endpoint" in out


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        doctor.main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        doctor.main(["--controller", "http://x", "--endpoint", "no-url"])
    assert e.value.code == 2


# --- the MP coordinator (--cache-view coordinator / auto) -----------------------------------


class FakeCoordinator:
    """The coordinator's routes the doctor reads, in its answer shapes (see
    tests/unit/test_coordinator.py), over a tiny directory: instance -> (model, tokens)."""

    def __init__(self, chunk: int = 256, pins: bool = True) -> None:
        self.chunk = chunk
        self.registered: list[str] = []
        self.stored: dict[str, tuple[str, list[int]]] = {}
        self.app = FastAPI()
        app = self.app

        @app.get("/healthz")
        def healthz() -> dict[str, Any]:
            return {"status": "healthy"}

        @app.get("/instances")
        def instances() -> dict[str, Any]:
            return {"instances": [{"instance_id": i, "ip": "127.0.0.1", "http_port": 1,
                                   "registration_time": 0.0, "metadata": {},
                                   "p2p_advertised_url": "", "mq_port": 0}
                                  for i in self.registered]}

        @app.get("/directory/stats")
        def stats() -> dict[str, Any]:
            return {"num_keys": 0, "num_placements": 0, "l1_keys_by_instance": {
                i: len(t) // self.chunk for i, (_, t) in self.stored.items()}}

        @app.get("/directory/keys")
        def keys() -> dict[str, Any]:
            rows = [{"key": self._key(m, k, t), "placements": [self._placement(i)],
                     "num_tokens": self.chunk, "access_count": 0}
                    for i, (m, t) in self.stored.items() for k in range(len(t) // self.chunk)]
            return {"total": len(rows), "keys": rows}

        @app.post("/directory/lookup")
        def lookup(body: dict[str, Any]) -> dict[str, Any]:
            toks, model, c = body["token_ids"], body["model_name"], self.chunk
            results = []
            for k in range(len(toks) // c):
                end = (k + 1) * c
                holders = [i for i, (m, t) in self.stored.items()
                           if m == model and t[:end] == toks[:end]]
                results.append({
                    "key": self._key(model, k, toks),
                    "placements": [self._placement(i) for i in holders],
                    "token_ids": toks[k * c:end], "access_count": 0})
            return {"chunks": len(toks) // c, "results": results}

        if pins:
            @app.post("/cache/pins")
            def pin(body: dict[str, Any]) -> dict[str, Any]:
                return {"requested": 0, "affected": 0, "status": "pinned"}

    @staticmethod
    def _placement(inst: str) -> dict[str, Any]:
        return {"instance_id": inst, "incarnation": 0, "tier": "l1", "backend": "dram",
                "size_bytes": 1, "shared": False}

    @staticmethod
    def _key(model: str, k: int, toks: list[int]) -> dict[str, Any]:
        # Like the real one: the chunk hash depends on the tokens only, never the model.
        return {"chunk_hash_hex": f"{hash((k, tuple(toks[:(k + 1) * 256]))) & 0xffffff:064x}",
                "model_name": model, "kv_rank": 16777472, "object_group_id": 0,
                "cache_salt": ""}


def _fake_vllm(coord: FakeCoordinator, instance_id: str, stores_as: str = MODEL) -> FastAPI:
    """/v1/completions has the server's MP server report the prompt under ``instance_id``
    and model name ``stores_as``."""

    def stored(toks: list[int]) -> None:
        coord.stored[instance_id] = (stores_as, toks)

    return doctor_vllm_app(MODEL, stored)


def _coord_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], coord: FakeCoordinator,
    endpoint_ids: list[str], instance_id: str, *argv: str, stores_as: str = MODEL,
    **config: Any,
) -> tuple[int, str]:
    import contextlib

    config.setdefault("cache_view", "auto")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(serve_app(coord.app))
        eps = {i: stack.enter_context(serve_app(_fake_vllm(coord, instance_id, stores_as)))
               for i in endpoint_ids}
        return run(capsys, "--config", _config(tmp_path, url, eps, **config), *argv)


def test_coordinator_healthy_found_by_the_probe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coord = FakeCoordinator()
    coord.registered = ["inst-1"]
    code, out = _coord_run(tmp_path, capsys, coord, ["inst-1"], "inst-1")
    assert code == 0, out
    assert "  coordinator http://127.0.0.1:" in out  # auto: probed, not told
    assert "[ok]   The MP coordinator at" in out
    assert "Every endpoint id is a coordinator instance (inst-1)" in out
    assert "cuts prompts into 256-token chunks" in out
    assert "matches inst-1: 256 tokens (l1/dram)" in out
    assert "holds keys under model 'sim-model'" in out
    assert "fleet-wide" in out  # enable_pinning is on by default: pins are L2, fleet-wide


def test_config_naming_the_other_view_is_one_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coord = FakeCoordinator()
    coord.registered = ["inst-1"]
    code, out = _coord_run(tmp_path, capsys, coord, ["inst-1"], "inst-1",
                           cache_view="controller")
    assert code == 1
    assert out.count("[FAIL]") == 1, out
    assert "serves LMCache's MP coordinator, but the config says cache_view: controller" in out
    assert "fix: Set cache_view: coordinator (or auto)." in out
    assert "matches inst-1: 256 tokens" in out  # the coordinator's checks still ran


def test_config_saying_coordinator_for_a_legacy_controller(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(capsys, "--config", _config(tmp_path, cluster.controller_url,
                                                cluster.engine_urls, cache_view="coordinator"))
    assert code == 1
    assert "serves LMCache's legacy controller, but the config says cache_view: " \
           "coordinator" in out
    assert "Every endpoint id is a controller instance id" in out


def test_cache_model_from_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coord = FakeCoordinator()
    coord.registered = ["inst-1"]
    code, out = _coord_run(tmp_path, capsys, coord, ["inst-1"], "inst-1",
                           stores_as="/models/llama-3-8b", cache_model="/models/llama-3-8b")
    assert code == 0, out
    assert "(model '/models/llama-3-8b') matches inst-1: 256 tokens" in out


def test_coordinator_instance_ids_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coord = FakeCoordinator()
    coord.registered = ["mp-a", "mp-b"]
    code, out = _coord_run(tmp_path, capsys, coord, ["gpu-0"], "mp-a", "--cache-view",
                           "coordinator")
    assert code == 1
    line = next(x for x in out.splitlines() if "Endpoint ids do not match" in x)
    assert line.startswith("[FAIL]")
    assert "missing (configured, unknown to the coordinator): gpu-0" in line
    assert "extra (known, no endpoint): mp-a, mp-b" in line
    assert "--instance-id" in out  # the fix


def test_coordinator_one_missing_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coord = FakeCoordinator()
    coord.registered = ["inst-1", "mp-x"]
    code, out = _coord_run(tmp_path, capsys, coord, ["inst-1", "typo-2"], "inst-1")
    assert code == 0, out
    assert ("[WARN] Endpoint ids and coordinator instances differ: missing (configured, "
            "unknown to the coordinator): typo-2; extra (known, no endpoint): mp-x.") in out


def test_coordinator_nobody_known(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _coord_run(tmp_path, capsys, FakeCoordinator(), ["inst-1"], "inst-1")
    assert code == 1
    assert "[FAIL] No MP server has registered with the coordinator" in out
    assert "--coordinator-event-reporting" in out


def test_coordinator_model_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coord = FakeCoordinator()
    coord.registered = ["inst-1"]
    code, out = _coord_run(tmp_path, capsys, coord, ["inst-1"], "inst-1",
                           stores_as="/models/llama-3-8b")
    assert code == 1
    assert "yet the coordinator's directory has no placement for it" in out
    assert ("[FAIL] The probe prompt's chunks are in the directory under model "
            "'/models/llama-3-8b' (held by inst-1), not 'sim-model'") in out
    assert "fix: Set the addon's coordinator model (--cache-model) to '/models/llama-3-8b'" in out


def test_coordinator_directory_under_another_model_without_warmup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coord = FakeCoordinator()
    coord.registered = ["inst-1"]
    coord.stored["inst-1"] = ("/models/llama-3-8b", list(range(600)))
    code, out = _coord_run(tmp_path, capsys, coord, ["inst-1"], "inst-1", "--no-warmup")
    assert code == 1
    assert ("[FAIL] The directory holds keys only under '/models/llama-3-8b' (2 keys), none "
            "under 'sim-model'") in out


def test_coordinator_cache_model_flag_fixes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coord = FakeCoordinator()
    coord.registered = ["inst-1"]
    code, out = _coord_run(tmp_path, capsys, coord, ["inst-1"], "inst-1", "--cache-model",
                           "/models/llama-3-8b", stores_as="/models/llama-3-8b")
    assert code == 0, out
    assert "matches inst-1: 256 tokens" in out


def test_coordinator_chunk_size_mismatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coord = FakeCoordinator(chunk=128)
    coord.registered = ["inst-1"]
    code, out = _coord_run(tmp_path, capsys, coord, ["inst-1"], "inst-1")
    assert code == 0, out
    assert "[WARN] The coordinator cut 1152 tokens into 9 chunks: its --chunk-size is about " \
           "128, not 256" in out
    assert "[WARN] Stored chunks hold [128] tokens, not 256" in out


def test_coordinator_reporting_but_unregistered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coord = FakeCoordinator()
    coord.stored["inst-1"] = ("sim-model", list(range(300)))  # events, no registration
    code, out = _coord_run(tmp_path, capsys, coord, ["inst-1"], "inst-1")
    assert code == 0, out
    assert "[WARN] Reporting cache events but not registered: inst-1." in out
    assert "answers 404" in out


def test_coordinator_actions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coord = FakeCoordinator(pins=False)
    coord.registered = ["inst-1"]
    code, out = _coord_run(tmp_path, capsys, coord, ["inst-1"], "inst-1", cache_strategy={
        "enable_eviction": True, "enable_compression": True})
    assert code == 0, out
    assert "[ok]   Eviction uses the coordinator's targeted /cache/delete" in out
    assert "[WARN] enable_compression is on, but the MP coordinator has no compress route" in out
    assert "[WARN] enable_pinning is on, but this coordinator runs no eviction controller" in out
    assert "/evict" not in out  # the legacy controller's checks are not run


def test_coordinator_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serve_app(_fake_vllm(FakeCoordinator(), "inst-1")) as eng:
        code, out = run(capsys, "--cache-view", "coordinator", "--config",
                        _config(tmp_path, _dead_url(), {"inst-1": eng}))
    assert code == 1
    assert "[FAIL] Cannot reach the MP coordinator at" in out
    assert "mp_coordinator" in out


def test_coordinator_json_names_the_view(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coord = FakeCoordinator()
    coord.registered = ["inst-1"]
    code, out = _coord_run(tmp_path, capsys, coord, ["inst-1"], "inst-1", "--json")
    data = json.loads(out)
    assert code == 0 and data["target"]["view"] == "coordinator"
    ids = next(c for c in data["checks"] if c["name"] == "instance_ids")
    assert ids["data"]["registered"] == ["inst-1"] and ids["data"]["configured"] == ["inst-1"]
