"""Tests for addon.strategy: each rule with the signals that trigger or block it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from addon.config import CacheStrategyConfig
from addon.strategy import (
    Action,
    HotWindowPins,
    Signals,
    decide,
    validate_compress_method,
)

NOW = 10_000.0

# Signals under which no rule fires and nothing is unknown.
QUIET = Signals(
    holder="inst-1",
    matched_tokens=512,
    prompt_tokens=800,
    load=0.0,
    memory=0.0,
    hot_count=0,
    already_pinned_this_window=False,
    controller_has_evict=True,
    now=NOW,
    last_clear_at=None,
)



def strategy(**changes: object) -> CacheStrategyConfig:
    """Every rule on (the config's defaults leave compression and eviction off)."""
    return CacheStrategyConfig(**{"enable_compression": True, "enable_eviction": True,
                                  **changes})


P = strategy()


def kinds(actions: list[Action]) -> list[str]:
    return [a.kind for a in actions]


def test_quiet_signals_give_no_actions_and_no_reasons() -> None:
    assert decide(P, QUIET) == ([], [])


# --- compress ----------------------------------------------------------------------


def test_compress_at_load_threshold_targets_holder() -> None:
    actions, reasons = decide(P, replace(QUIET, load=0.7))
    assert actions == [Action("compress", "inst-1", "LocalCPUBackend", method="cachegen")]
    assert reasons == []


def test_no_compress_below_load_threshold() -> None:
    actions, reasons = decide(P, replace(QUIET, load=0.69))
    assert actions == []
    assert reasons == []


def test_unknown_load_skips_compress_with_reason() -> None:
    actions, reasons = decide(P, replace(QUIET, load=None))
    assert actions == []
    assert reasons == ["compress skipped: load unknown"]


def test_compress_uses_configured_instance_location_and_method() -> None:
    params = strategy(compress_instance_id="inst-9", compress_location="LocalDiskBackend")
    actions, _ = decide(params, replace(QUIET, load=0.9))
    assert actions == [Action("compress", "inst-9", "LocalDiskBackend", method="cachegen")]


def test_compress_without_holder_or_configured_instance_is_skipped() -> None:
    actions, reasons = decide(P, replace(QUIET, load=0.9, holder=None, matched_tokens=0))
    assert actions == []
    assert len(reasons) == 1
    assert reasons[0].startswith("compress skipped: no instance holds")


def test_disabled_compression_is_silent() -> None:
    params = strategy(enable_compression=False)
    assert decide(params, replace(QUIET, load=1.0)) == ([], [])
    assert decide(params, replace(QUIET, load=None)) == ([], [])


# --- pin ---------------------------------------------------------------------------


def test_pin_at_hot_threshold_targets_holder() -> None:
    actions, reasons = decide(P, replace(QUIET, hot_count=10))
    assert actions == [Action("pin", "inst-1", "LocalCPUBackend")]
    assert reasons == []


def test_no_pin_below_hot_threshold() -> None:
    assert decide(P, replace(QUIET, hot_count=9)) == ([], [])


def test_no_pin_when_already_pinned_this_window() -> None:
    signals = replace(QUIET, hot_count=50, already_pinned_this_window=True)
    assert decide(P, signals) == ([], [])


def test_pin_needs_a_holder_with_matched_tokens() -> None:
    for signals in (
        replace(QUIET, hot_count=10, holder=None, matched_tokens=0),
        replace(QUIET, hot_count=10, holder="inst-1", matched_tokens=0),
    ):
        actions, reasons = decide(P, signals)
        assert actions == []
        assert len(reasons) == 1
        assert reasons[0].startswith("pin skipped: no instance holds")


def test_configured_pin_instance_overrides_holder_even_without_match() -> None:
    params = strategy(pin_instance_id="inst-7", pin_location="LocalDiskBackend")
    for signals in (
        replace(QUIET, hot_count=10),
        replace(QUIET, hot_count=10, holder=None, matched_tokens=0),
    ):
        actions, reasons = decide(params, signals)
        assert actions == [Action("pin", "inst-7", "LocalDiskBackend")]
        assert reasons == []


def test_pin_once_per_hot_window() -> None:
    pins = HotWindowPins()
    window = 300.0
    pinned_at: list[float] = []
    for t in range(0, 700, 10):
        now = NOW + t
        already = not pins.should_pin("demo\x00prompt", now, window)
        actions, _ = decide(
            P, replace(QUIET, hot_count=20, already_pinned_this_window=already, now=now)
        )
        if "pin" in kinds(actions):
            pinned_at.append(now)
    assert pinned_at == [NOW, NOW + 300, NOW + 600]


def test_disabled_pinning_is_silent() -> None:
    params = strategy(enable_pinning=False)
    assert decide(params, replace(QUIET, hot_count=100, holder=None)) == ([], [])


# --- evict / clear -----------------------------------------------------------------


def test_evict_when_controller_has_evict() -> None:
    actions, reasons = decide(P, replace(QUIET, memory=0.85))
    assert actions == [Action("evict", "inst-1", "LocalCPUBackend")]
    assert reasons == []


def test_no_evict_below_memory_threshold() -> None:
    assert decide(P, replace(QUIET, memory=0.84)) == ([], [])


def test_unknown_memory_skips_evict_with_reason() -> None:
    actions, reasons = decide(P, replace(QUIET, memory=None))
    assert actions == []
    assert reasons == ["evict skipped: engine memory usage unknown"]


def test_no_evict_and_fallback_off_skips_with_reason() -> None:
    actions, reasons = decide(P, replace(QUIET, memory=0.9, controller_has_evict=False))
    assert actions == []
    assert reasons == ["evict skipped: controller has no /evict and eviction_clear_fallback is off"]


def test_clear_fallback_when_controller_lacks_evict() -> None:
    params = strategy(eviction_clear_fallback=True, evict_location="LocalDiskBackend")
    actions, reasons = decide(params, replace(QUIET, memory=0.9, controller_has_evict=False))
    assert actions == [Action("clear", "inst-1", "LocalDiskBackend")]
    assert reasons == []


def test_clear_respects_cooldown() -> None:
    params = strategy(eviction_clear_fallback=True, clear_cooldown=300.0)
    base = replace(QUIET, memory=0.9, controller_has_evict=False)

    actions, reasons = decide(params, replace(base, last_clear_at=NOW - 299.0))
    assert actions == []
    assert len(reasons) == 1
    assert "cooldown" in reasons[0]

    actions, reasons = decide(params, replace(base, last_clear_at=NOW - 300.0))
    assert kinds(actions) == ["clear"]
    assert reasons == []


def test_unknown_evict_support_never_clears() -> None:
    params = strategy(eviction_clear_fallback=True)
    actions, reasons = decide(params, replace(QUIET, memory=0.9, controller_has_evict=None))
    assert actions == []
    assert reasons == ["evict skipped: controller /evict support not yet known"]


def test_evict_instance_override_beats_holder() -> None:
    params = strategy(evict_instance_id="inst-3")
    actions, _ = decide(params, replace(QUIET, memory=0.9))
    assert actions == [Action("evict", "inst-3", "LocalCPUBackend")]

    params = strategy(evict_instance_id="inst-3", eviction_clear_fallback=True)
    actions, _ = decide(params, replace(QUIET, memory=0.9, controller_has_evict=False))
    assert actions == [Action("clear", "inst-3", "LocalCPUBackend")]


def test_evict_without_holder_or_configured_instance_is_skipped() -> None:
    actions, reasons = decide(P, replace(QUIET, memory=0.9, holder=None, matched_tokens=0))
    assert actions == []
    assert len(reasons) == 1
    assert reasons[0].startswith("evict skipped: no instance holds")


def test_disabled_eviction_is_silent() -> None:
    params = strategy(enable_eviction=False)
    assert decide(params, replace(QUIET, memory=1.0, controller_has_evict=False)) == ([], [])


# --- together ----------------------------------------------------------------------


def test_actions_come_in_order_compress_pin_evict() -> None:
    actions, reasons = decide(P, replace(QUIET, load=0.9, hot_count=99, memory=0.99))
    assert kinds(actions) == ["compress", "pin", "evict"]
    assert {a.instance_id for a in actions} == {"inst-1"}
    assert reasons == []


def test_configured_instances_override_holder_per_action() -> None:
    params = strategy(compress_instance_id="c", pin_instance_id="p", evict_instance_id="e")
    actions, _ = decide(params, replace(QUIET, load=0.9, hot_count=99, memory=0.99))
    assert [(a.kind, a.instance_id) for a in actions] == [
        ("compress", "c"),
        ("pin", "p"),
        ("evict", "e"),
    ]


def test_no_holder_skips_everything_with_reasons() -> None:
    signals = replace(QUIET, holder=None, matched_tokens=0, load=0.9, hot_count=99, memory=0.99)
    actions, reasons = decide(P, signals)
    assert actions == []
    assert [r.split(":")[0] for r in reasons] == [
        "compress skipped",
        "pin skipped",
        "evict skipped",
    ]


# --- params and helpers ------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"load_threshold": 1.5},
        {"load_threshold": -0.1},
        {"memory_threshold": 2.0},
        {"hot_content_threshold": 0},
        {"clear_cooldown": -1.0},
    ],
)
def test_params_reject_out_of_range_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        strategy(**kwargs)


def test_validate_compress_method() -> None:
    assert validate_compress_method("cachegen") is None
    warning = validate_compress_method("zstd")
    assert warning is not None
    assert "zstd" in warning
    assert "cachegen" in warning


def test_hot_window_pins_once_per_window_per_key() -> None:
    pins = HotWindowPins()
    assert pins.should_pin("a", 0.0, 60.0)
    assert not pins.should_pin("a", 59.9, 60.0)
    assert pins.should_pin("b", 10.0, 60.0)
    assert pins.should_pin("a", 60.0, 60.0)
    assert not pins.should_pin("a", 100.0, 60.0)


def test_hot_window_is_pinned_does_not_mark() -> None:
    pins = HotWindowPins()
    assert not pins.is_pinned("a", 0.0, 60.0)
    assert pins.should_pin("a", 0.0, 60.0)
    assert pins.is_pinned("a", 30.0, 60.0)
    assert not pins.is_pinned("a", 60.0, 60.0)


def test_hot_window_forget_allows_repin() -> None:
    pins = HotWindowPins()
    assert pins.should_pin("a", 0.0, 60.0)
    pins.forget("a")
    assert pins.should_pin("a", 1.0, 60.0)


def test_hot_window_memory_is_bounded() -> None:
    pins = HotWindowPins(max_size=100)
    for i in range(1000):
        pins.should_pin(f"k{i}", 0.0, 60.0)
    assert len(pins) == 100
    # The most recent keys are the ones kept.
    assert pins.is_pinned("k999", 1.0, 60.0)
    assert not pins.is_pinned("k0", 1.0, 60.0)
