"""Cache-management strategy: which compress / pin / evict / clear calls to make.

Pure decision logic: the caller gathers the signals (lookup result, load, engine
KV usage, hotness) and performs the controller calls. Differences from the seed
design (Pixiu ``dgp.filter.ai.kvcache``), each deliberate:
- Targets default to the instance the lookup found holding the prefix; a fixed
  ``*_instance_id`` is only an override. The seed always used the fixed ids, so
  it pinned and compressed on an instance that may hold nothing.
- The real LMCache controller has no ``/evict``. Eviction is only emitted when
  the controller is known to have it; otherwise the opt-in fallback is ``/clear``,
  which drops *everything* the instance holds at a location, so it is off by
  default and rate-limited by a cooldown.
- Workers only implement the ``"cachegen"`` compression method; anything else
  compresses 0 tokens, hence :func:`validate_compress_method`.
- A signal that is unknown (``None``) never triggers an action: acting on a
  guess is worse than not acting.

Its parameters are the validated ``cache_strategy`` config section itself
(``addon.config.CacheStrategyConfig``, pure data): one field list, one set of defaults.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

from cachetools import LRUCache

from addon.config import CacheStrategyConfig

__all__ = [
    "SUPPORTED_COMPRESS_METHODS",
    "Action",
    "ActionKind",
    "HotWindowPins",
    "Signals",
    "decide",
    "validate_compress_method",
]

ActionKind = Literal["compress", "pin", "evict", "clear"]

# LMCache 0.5.6 workers implement only this one.
SUPPORTED_COMPRESS_METHODS = frozenset({"cachegen"})


@dataclass(frozen=True)
class Signals:
    """What the caller observed for one request.

    ``holder``: instance holding the longest cached prefix per the lookup (None if
    nobody). ``load`` and ``memory`` are ratios in [0, 1]; None = unknown.
    ``memory`` is the target engine's KV cache usage. ``controller_has_evict``:
    None until the caller has found out. ``last_clear_at``: when the target was
    last cleared, on the same clock as ``now``.
    """

    holder: str | None
    matched_tokens: int
    prompt_tokens: int
    load: float | None
    memory: float | None
    hot_count: int
    already_pinned_this_window: bool
    controller_has_evict: bool | None
    now: float
    last_clear_at: float | None


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    instance_id: str
    location: str
    method: str = ""


def validate_compress_method(method: str) -> str | None:
    """A warning text if ``method`` is one LMCache workers cannot apply, else None."""
    if method in SUPPORTED_COMPRESS_METHODS:
        return None
    return (
        f"compress_method {method!r} is not supported by LMCache workers "
        f"(only {', '.join(sorted(SUPPORTED_COMPRESS_METHODS))}); "
        "compress calls will compress 0 tokens"
    )


def _target(configured: str, holder: str | None) -> str | None:
    return configured or holder or None


def decide(params: CacheStrategyConfig, signals: Signals) -> tuple[list[Action], list[str]]:
    """Actions to take, in the order compress, pin, evict/clear, and skip reasons.

    A disabled feature is skipped silently, and so is a signal that is simply
    below its threshold: both are the normal case on most requests and would
    only flood the reasons. A reason is given when the strategy wanted to act
    (or could not tell) but something stood in the way.
    """
    actions: list[Action] = []
    reasons: list[str] = []

    if params.enable_compression:
        if signals.load is None:
            reasons.append("compress skipped: load unknown")
        elif signals.load >= params.load_threshold:
            target = _target(params.compress_instance_id, signals.holder)
            if target is None:
                reasons.append(
                    "compress skipped: no instance holds this prefix "
                    "and no compress_instance_id is configured"
                )
            else:
                actions.append(
                    Action(
                        "compress",
                        target,
                        params.compress_location,
                        method=params.compress_method,
                    )
                )

    if (
        params.enable_pinning
        and signals.hot_count >= params.hot_content_threshold
        and not signals.already_pinned_this_window
    ):
        if params.pin_instance_id:
            actions.append(Action("pin", params.pin_instance_id, params.pin_location))
        elif signals.holder is None or signals.matched_tokens <= 0:
            # Pinning a prefix nobody holds pins nothing.
            reasons.append(
                "pin skipped: no instance holds this prefix and no pin_instance_id is configured"
            )
        else:
            actions.append(Action("pin", signals.holder, params.pin_location))

    if params.enable_eviction:
        if signals.memory is None:
            reasons.append("evict skipped: engine memory usage unknown")
        elif signals.memory >= params.memory_threshold:
            target = _target(params.evict_instance_id, signals.holder)
            if target is None:
                reasons.append(
                    "evict skipped: no instance holds this prefix "
                    "and no evict_instance_id is configured"
                )
            elif signals.controller_has_evict is True:
                actions.append(Action("evict", target, params.evict_location))
            elif signals.controller_has_evict is None:
                # /clear is only a fallback for a controller known to lack /evict;
                # dropping a whole location on a guess is too costly.
                reasons.append("evict skipped: controller /evict support not yet known")
            elif not params.eviction_clear_fallback:
                reasons.append(
                    "evict skipped: controller has no /evict and eviction_clear_fallback is off"
                )
            elif (
                signals.last_clear_at is not None
                and signals.now - signals.last_clear_at < params.clear_cooldown
            ):
                remaining = params.clear_cooldown - (signals.now - signals.last_clear_at)
                reasons.append(
                    f"evict skipped: clear of {target} in cooldown ({remaining:.0f}s left)"
                )
            else:
                actions.append(Action("clear", target, params.evict_location))

    return actions, reasons


class HotWindowPins:
    """Remembers when each hot key was last pinned, so it is pinned once per window.

    ``should_pin`` is an atomic test-and-mark: of several threads handling the
    same hot prompt, one gets True. If that pin then fails, ``forget`` the key so
    a later request may try again. Memory is bounded by ``max_size`` keys (LRU);
    a key dropped early may be pinned again within its window, which only costs
    a redundant pin call.
    """

    def __init__(self, max_size: int = 4096) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self._lock = threading.Lock()
        self._window_start: LRUCache[str, float] = LRUCache(maxsize=max_size)

    def _in_window(self, key: str, now: float, window: float) -> bool:
        start = self._window_start.get(key)
        return start is not None and now - start < window

    def should_pin(self, key: str, now: float, window: float) -> bool:
        """True (and start a new window at ``now``) unless pinned within ``window``."""
        with self._lock:
            if self._in_window(key, now, window):
                return False
            self._window_start[key] = now
            return True

    def is_pinned(self, key: str, now: float, window: float) -> bool:
        """Whether ``key`` was marked within ``window`` before ``now``; marks nothing."""
        with self._lock:
            return self._in_window(key, now, window)

    def forget(self, key: str) -> None:
        with self._lock:
            self._window_start.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._window_start)
