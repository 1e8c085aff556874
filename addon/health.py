"""Passive health of the endpoints: outlier ejection in the spirit of Envoy's (pure state).

What counts against an endpoint, and what does not:
- a refused (or timed-out) connect: the endpoint is down; ejected at once, whatever the
  ejection cap, because no request can reach it;
- a reset after connecting, a 5xx answer, a failed active probe: counted; after
  `consecutive_failures` in a row the endpoint is ejected, unless that would eject more than
  `max_ejected_share` of the endpoints (a 5xx storm across the cluster is load, not outliers);
- a client that hangs up: nothing (it says nothing about the upstream).
An ejection lasts `base_ejection` times the number of ejections in a row (capped at
`max_ejection`), so an endpoint that keeps failing is tried less and less often; a success
after it is back resets the count. While ejected an endpoint gets no requests unless every
endpoint is ejected, and then only the one most recently seen healthy is tried (not the least
loaded: a dead endpoint answers fastest and so always looks least loaded).

Hand-written: Envoy's outlier detection is a proxy feature, not a Python library; the pieces
(counters, timestamps) are a few lines.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Failure kinds: the first two are connect failures (no byte reached the engine).
CONNECT_KINDS = ("connect-refused", "connect-timeout")
KINDS = (*CONNECT_KINDS, "reset", "http-5xx", "probe")
TRIAL_S = 1.0


@dataclass(frozen=True)
class OutlierSettings:
    consecutive_failures: int = 5
    base_ejection: float = 10.0
    max_ejection: float = 300.0
    max_ejected_share: float = 0.5


@dataclass
class _Endpoint:
    consecutive: int = 0
    ejections: int = 0  # ejections in a row (reset by a success after the last one)
    ejected_until: float = 0.0
    last_ok: float = 0.0
    last_failure: float = float("-inf")
    failures: dict[str, int] = field(default_factory=dict)
    ejected_total: int = 0
    # After an ejection ends the endpoint is on trial until it answers: one request at a
    # time (a new one after TRIAL_S without an outcome), so a still-dead engine costs one
    # failed request per re-admission, not every request routed before the refusal is seen.
    on_trial: bool = False
    trial_at: float = float("-inf")


class Health:
    """Touched from the event loop only."""

    def __init__(
        self,
        ids: Sequence[str],
        settings: OutlierSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ids = list(ids)
        self.settings = settings or OutlierSettings()
        self._clock = clock
        now = clock()
        # Every endpoint starts as "seen healthy now", in configured order.
        self._eps = {eid: _Endpoint(last_ok=now - i * 1e-6) for i, eid in enumerate(self.ids)}
        self.ejections_skipped = 0  # ejections refused by the cap

    def ejected(self, eid: str, now: float | None = None) -> bool:
        ep = self._eps.get(eid)
        return ep is not None and ep.ejected_until > (self._clock() if now is None else now)

    def candidates(self) -> list[str]:
        """The endpoints a request may go to: the non-ejected ones, else the one most
        recently seen healthy."""
        now = self._clock()
        up = [e for e in self.ids if self._eps[e].ejected_until <= now
              and not (self._eps[e].on_trial and now - self._eps[e].trial_at < TRIAL_S)]
        if up:
            return up
        return [max(self.ids, key=self._recency)]

    def started(self, eid: str) -> None:
        """A request was sent to the endpoint (its trial, if it is on trial)."""
        ep = self._eps.get(eid)
        if ep is not None and ep.on_trial:
            ep.trial_at = self._clock()

    def _recency(self, eid: str) -> tuple[bool, float]:
        """Healthy most recently: an endpoint that answered after its last failure, the
        latest first; else the one that has been failing the longest ago. (An engine that
        just died answered until a moment ago: its last success alone would pick it.)"""
        ep = self._eps[eid]
        if ep.last_ok > ep.last_failure:
            return True, ep.last_ok
        return False, -ep.last_failure

    def success(self, eid: str) -> None:
        ep = self._eps.get(eid)
        if ep is None:
            return
        now = self._clock()
        ep.consecutive = 0
        ep.last_ok = now
        if ep.ejected_until <= now:
            ep.ejections = 0
            ep.on_trial = False

    def probe_ok(self, eid: str) -> None:
        """An active health check passed: the endpoint is back now."""
        ep = self._eps.get(eid)
        if ep is None:
            return
        ep.ejected_until = 0.0
        self.success(eid)

    def failure(self, eid: str, kind: str) -> bool:
        """Count one failure; returns whether it ejected the endpoint just now."""
        ep = self._eps.get(eid)
        if ep is None:
            return False
        now = self._clock()
        ep.last_failure = now
        ep.failures[kind] = ep.failures.get(kind, 0) + 1
        ep.consecutive += 1
        if ep.ejected_until > now:
            return False  # already out
        if kind in CONNECT_KINDS or ep.on_trial:  # a failed trial: out again at once
            return self._eject(ep, now)
        if ep.consecutive < self.settings.consecutive_failures:
            return False
        ejected_now = sum(1 for e in self._eps.values() if e.ejected_until > now)
        cap = max(1, math.floor(self.settings.max_ejected_share * len(self.ids)))
        if ejected_now >= cap:
            self.ejections_skipped += 1
            return False
        return self._eject(ep, now)

    def _eject(self, ep: _Endpoint, now: float) -> bool:
        ep.ejections += 1
        ep.ejected_total += 1
        s = self.settings
        ep.ejected_until = now + min(s.base_ejection * ep.ejections, s.max_ejection)
        ep.consecutive = 0
        ep.on_trial = True
        ep.trial_at = float("-inf")
        return True

    def ejection_seconds(self, eid: str) -> float:
        ep = self._eps.get(eid)
        return 0.0 if ep is None else max(ep.ejected_until - self._clock(), 0.0)

    def stats(self) -> dict[str, dict[str, object]]:
        now = self._clock()
        return {
            eid: {
                "ejected": ep.ejected_until > now,
                "ejected_for_s": round(max(ep.ejected_until - now, 0.0), 1),
                "ejections": ep.ejected_total,
                "consecutive_failures": ep.consecutive,
                "failures": dict(ep.failures),
            }
            for eid, ep in self._eps.items()
        }
