"""bench/proxy_ab.py: another commit's addon is unpacked to run beside this checkout's."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.proxy import ROOT
from bench.proxy_ab import ref_addon


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_a_commits_addon_is_unpacked(tmp_path: Path) -> None:
    script = ref_addon("HEAD", tmp_path)
    assert script.name == "kvcache.py" and script.read_text().startswith('"""')
    assert (script.parent / "router.py").exists()
