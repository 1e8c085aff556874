"""scripts/doctor (sim.doctor) against the simulators, including their wrong-shape switches."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI

from sim import doctor
from sim.cluster import Cluster, serve_app, start_cluster, start_controller, start_engine
from sim.controller import ControllerConfig
from sim.engine_server import EngineConfig

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
