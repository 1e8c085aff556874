"""Fixtures for the simulator tests: real servers on 127.0.0.1 in background threads."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    # Lets a bare `pytest` (not only `python -m pytest` from the repo root) import `sim`.
    sys.path.insert(0, _ROOT)

from sim.cluster import start_controller, start_engine  # noqa: E402
from sim.controller import Faults  # noqa: E402
from sim.engine_server import EngineConfig  # noqa: E402

MODEL = "sim-model"


@pytest.fixture(scope="module")
def controller_server() -> Iterator[str]:
    with start_controller() as url:
        yield url


@pytest.fixture
def controller(controller_server: str) -> Iterator[str]:
    """A controller with default faults and no cached chunks (registrations persist)."""
    defaults = Faults().__dict__
    with httpx.Client(timeout=5) as client:
        client.post(f"{controller_server}/sim/faults", json=defaults).raise_for_status()
        client.post(f"{controller_server}/sim/reset").raise_for_status()
        yield controller_server
        # Leave no hang behind for the next test's teardown.
        client.post(f"{controller_server}/sim/faults", json=defaults).raise_for_status()


@pytest.fixture(scope="module")
def engine() -> Iterator[str]:
    """A fast engine (time_scale 0.02) with no controller, shared by a module."""
    with start_engine(EngineConfig(instance_id="vllm-test", model=MODEL, time_scale=0.02)) as url:
        yield url
