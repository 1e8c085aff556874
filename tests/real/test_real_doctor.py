"""scripts/doctor against a REAL lmcache 0.5.6 controller (KVCACHE_REAL=1).

The vLLM side is a small stand-in: /tokenize and /v1/models from the sim tokenizer, and a
/v1/completions that, like a vLLM server with the LMCache connector, has its worker (the
shim) report the prompt's chunks to the real controller under its own instance id.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from addon import doctor
from addon.doctor import DEFAULT_PROMPT
from sim.cluster import serve_app
from sim.lmcache_worker import WorkerShim
from tests.real.conftest import RealController, RealCoordinator, unique
from tests.vllm_stand_in import doctor_vllm_app

pytestmark = pytest.mark.real_lmcache
MODEL = "sim-model"


@contextlib.contextmanager
def fake_vllm(shim: WorkerShim, instance_id: str) -> Iterator[str]:
    with serve_app(doctor_vllm_app(
            MODEL, lambda toks: shim.admit(instance_id, toks))) as url:
        yield url

def _prompt() -> list[str]:
    # Chunk hashes chain from the start: a unique first word keeps earlier tests' cached
    # copies of the probe from matching (the controller reports the first-registered holder).
    return ["--prompt", f"{unique('probe')} {DEFAULT_PROMPT}"]


def _config(tmp_path: Path, controller: str, endpoints: dict[str, str]) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "lmcache_endpoint": controller, "default_model": MODEL,
        "endpoints": [{"id": i, "url": u} for i, u in endpoints.items()],
    }))
    return str(path)


def test_doctor_healthy(controller: RealController, shim: WorkerShim, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    inst = unique("doc-ok")
    shim.register(inst)
    with fake_vllm(shim, inst) as eng:
        code = doctor.main([*_prompt(), "--config",
                            _config(tmp_path, controller.url, {inst: eng})])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"matches {inst}: 256 tokens" in out, out
    assert "layout_info values are [location, tokens] arrays" in out


def test_doctor_names_an_endpoint_id_mismatch(
    controller: RealController, shim: WorkerShim, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    inst = unique("doc-real")
    shim.register(inst)
    with fake_vllm(shim, inst) as eng:
        code = doctor.main([*_prompt(), "--config",
                            _config(tmp_path, controller.url, {"gpu-0": eng})])
    out = capsys.readouterr().out
    print(out)  # shown with -s: the text pasted into the README
    assert code == 1
    assert "[FAIL] Endpoint ids do not match the controller's instance ids" in out
    assert "gpu-0" in out  # the controller's full list is cached, so inst may lag
    assert f"{inst} is no configured endpoint" in out  # the warm-up landed under its real id


def test_doctor_finds_a_hash_seed_mismatch(
    controller: RealController, shim: WorkerShim, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    inst = unique("doc-seed")
    shim.register(inst, hash_seed=99)  # as a vLLM started under another PYTHONHASHSEED
    with fake_vllm(shim, inst) as eng:
        code = doctor.main([*_prompt(), "--settle", "2", "--config",
                            _config(tmp_path, controller.url, {inst: eng})])
    out = capsys.readouterr().out
    assert code == 1
    assert "chunk-hash seed mismatch" in out


def test_doctor_with_a_stalled_worker_does_not_hang(
    controller: RealController, shim: WorkerShim, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    inst = unique("doc-stall")
    shim.register(inst)
    shim.silence(inst)
    with fake_vllm(shim, inst) as eng:
        # The controller lists the worker (registry read), so /health is not needed; the
        # run must finish on its own timeouts either way.
        code = doctor.main([*_prompt(), "--timeout", "2", "--settle", "1", "--config",
                            _config(tmp_path, controller.url, {inst: eng})])
    out = capsys.readouterr().out
    assert code == 0, out


# --- against a REAL MP coordinator, fed by scripts/real/coordinator_feed.py ------------------


@contextlib.contextmanager
def fake_vllm_mp(feeder: Any, instance_id: str, stores_as: str = MODEL) -> Iterator[str]:
    """A vLLM stand-in whose LMCache MP server reports served prompts to the coordinator
    under ``instance_id`` and the model name ``stores_as``."""
    with serve_app(doctor_vllm_app(
            MODEL, lambda toks: feeder.store(instance_id, toks, stores_as))) as url:
        yield url


def test_doctor_on_a_real_coordinator(
    coordinator: RealCoordinator, feeder: Any, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    inst = unique("doc-mp")
    feeder.register(inst)
    with fake_vllm_mp(feeder, inst) as eng:
        code = doctor.main([*_prompt(), "--config",
                            _coord_config(tmp_path, coordinator.url, {inst: eng})])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"  coordinator {coordinator.url}" in out  # found by the probe
    assert "The coordinator cuts prompts into 256-token chunks, as configured." in out
    assert f"matches {inst}: 256 tokens (l1/dram)" in out, out
    assert "holds keys under model 'sim-model'" in out


def test_doctor_names_the_model_the_coordinator_holds(
    coordinator: RealCoordinator, feeder: Any, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    inst, other = unique("doc-model"), f"/models/{unique('llama')}"
    feeder.register(inst)
    with fake_vllm_mp(feeder, inst, stores_as=other) as eng:
        code = doctor.main([*_prompt(), "--settle", "1", "--cache-view", "coordinator",
                            "--config", _coord_config(tmp_path, coordinator.url,
                                                      {"gpu-0": eng})])
    out = capsys.readouterr().out
    print(out)
    assert code == 1
    assert "[FAIL] Endpoint ids do not match the coordinator's instance ids" in out
    assert "missing (configured, unknown to the coordinator): gpu-0" in out
    # The prompt's chunk hashes do not depend on the model: found under the other one.
    assert (f"[FAIL] The probe prompt's chunks are in the directory under model {other!r} "
            f"(held by {inst}), not 'sim-model'") in out
    assert f"fix: Set the addon's coordinator model (--cache-model) to {other!r}" in out


def _coord_config(tmp_path: Path, url: str, endpoints: dict[str, str]) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "lmcache_endpoint": url, "default_model": MODEL, "cache_view": "auto",
        "endpoints": [{"id": i, "url": u} for i, u in endpoints.items()],
    }))
    return str(path)
