"""bench.http_clients end to end on a tiny run: every client measured against the stand-in."""

from __future__ import annotations

from pathlib import Path

from bench import http_clients


def test_tiny_run_writes_a_row_per_client_and_concurrency(tmp_path: Path) -> None:
    assert http_clients.main(["--rounds", "1", "--requests", "20", "--out", str(tmp_path)]) == 0
    text = (tmp_path / http_clients.REPORT).read_text()
    assert "Command: `python -m bench.http_clients --rounds 1" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| JSONClient") or
            ln.startswith("| httpx")]
    assert len(rows) == 4
    for row in rows:
        cpu = float(row.split("|")[3])
        assert 0 < cpu < 50  # ms of CPU per request: measured, not a placeholder
