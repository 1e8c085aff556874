"""The "kvcache" content view (addon/decision_view.py): a routed flow's decision as a table,
from the flow's metadata, so a flow saved and loaded again shows the same."""

from __future__ import annotations

import io

from mitmproxy import contentviews
from mitmproxy.io import FlowReader, FlowWriter
from mitmproxy.test import tflow

from addon import decision_view

META = {"endpoint_id": "e2", "reason": "cache-hit", "matched_tokens": 512,
        "prompt_tokens": 600, "token_source": "prefix", "route_ms": 1.2, "lookup_ms": 0.8,
        "budget_ms": 50.0, "unknown_instances": 0,
        "candidates": [
            {"endpoint": "e1", "held_view": 0, "held_proxy": 0, "load_tokens": 0,
             "cost_tokens": 600},
            {"endpoint": "e2", "held_view": 512, "held_proxy": 256, "load_tokens": 40,
             "cost_tokens": 128}]}


def test_the_table_names_every_candidate_and_the_winner() -> None:
    lines = decision_view.render(META)
    assert lines[0] == "routed to e2: cache-hit"
    assert "matched 512 of 600" in lines[1] and "budget 50 ms" in lines[1]
    row = next(x for x in lines if x.startswith("e2"))
    assert row.split()[:5] == ["e2", "512", "256", "40", "128"] and row.endswith("<- chosen")
    assert not next(x for x in lines if x.startswith("e1")).endswith("chosen")


def test_a_saved_flow_renders_the_same_after_loading() -> None:
    decision_view.register()
    try:
        f = tflow.tflow(resp=True)
        f.metadata["kvcache"] = META
        buf = io.BytesIO()
        FlowWriter(buf).add(f)
        buf.seek(0)
        (loaded,) = list(FlowReader(buf).stream())
        desc, lines, err = contentviews.get_message_content_view(
            "kvcache", loaded.response, loaded)
        assert err is None or err == ""
        text = ["".join(part[1] for part in line) for line in lines]
        assert text == decision_view.render(META)
    finally:
        decision_view.unregister()
    assert contentviews.get("kvcache") is None


def test_a_flow_that_was_not_routed_says_so() -> None:
    assert decision_view.render(None) == [
        "not routed by kvcache (no kvcache metadata on this flow)"]


def test_it_is_the_auto_choice_only_when_asked() -> None:
    f = tflow.tflow(resp=True)
    f.metadata["kvcache"] = META
    view = decision_view.VIEW
    assert view.render_priority(b"{}", flow=f) == 0.0
    decision_view.AUTO = True
    try:
        assert view.render_priority(b"{}", flow=f) > 1.0
        assert view.render_priority(b"{}", flow=tflow.tflow(resp=True)) == 0.0  # not routed
    finally:
        decision_view.AUTO = False
