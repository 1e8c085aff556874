"""Integration fixtures: the simulated cluster (sim/, in threads of the test process) and a
real `mitmdump` process with the addon in front of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sim.cluster import Cluster, start_cluster


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    # A fast clock (time_scale 0.05) keeps the tests short; ratios are the model's own.
    with start_cluster(2, time_scale=0.05) as c:
        yield c


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
