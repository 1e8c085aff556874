"""Retries, circuit breaking and rate-limited failure logging for outbound calls.

Pure: no I/O and no imports of HTTP clients. Clocks are injectable (default
``time.monotonic``) and ``call_with_retry`` takes its clock and sleep as arguments,
so every behaviour can be tested without waiting.

Why hand-written rather than a library (checked: pybreaker, circuitbreaker,
tenacity, backoff):
- pybreaker and circuitbreaker read the wall clock themselves (no injectable
  clock) and have no cap on the calls let through while half-open (pybreaker
  lets "the next call" through as a trial; concurrent threads are not counted).
- tenacity could do the retry loop (injectable ``sleep``, and ``stop_before_delay``
  refuses a sleep that would overrun), but it measures elapsed time from its own
  ``time.monotonic()`` start, not against an absolute deadline on our clock, and
  the breaker bookkeeping (4xx counts as healthy, half-open slots) would still be
  ours; the wrapper would be as long as the loop and add a dependency.
- backoff is decorator-based and its max_time is likewise on its own clock.
The whole module is a few dozen lines of logic; owning it keeps the semantics
(deadline, breaker accounting of 4xx, half-open limit) exactly as documented here.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = [
    "BreakerOpen",
    "CircuitBreaker",
    "RateLimitedLog",
    "RetryPolicy",
    "StatusError",
    "UnparsableResponse",
    "backoff_delay",
    "call_with_retry",
    "is_retryable",
]

T = TypeVar("T")

# Past this exponent base * 2**n exceeds any sane max_backoff anyway; the clamp only
# keeps a huge attempt number from overflowing the float.
_MAX_EXPONENT = 62


class StatusError(Exception):
    """An HTTP response with an error status; raised by callers inside ``fn``."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message or f"HTTP {status}")
        self.status = status


class UnparsableResponse(Exception):
    """The service answered but its body could not be parsed.

    Never retried: the same request would get the same body, and a service that
    answers is not unhealthy in the breaker's sense.
    """


class BreakerOpen(Exception):
    """The circuit breaker refused the call; ``fn`` was not run."""

    def __init__(self, name: str = "") -> None:
        super().__init__(f"circuit breaker {name!r} is open" if name else "circuit breaker is open")
        self.name = name


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry. Times are in seconds.

    ``max_attempts`` counts every call, the first one included.
    """

    max_attempts: int = 3
    base_backoff: float = 0.1
    max_backoff: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_backoff < 0 or self.max_backoff < 0:
            raise ValueError("base_backoff and max_backoff must be >= 0")


def backoff_delay(
    policy: RetryPolicy, attempt: int, rand: Callable[[], float] = random.random
) -> float:
    """Delay before retry number ``attempt`` (1 = the first retry), with equal jitter.

    ``cap = min(max_backoff, base_backoff * 2**(attempt-1))`` and the delay is
    uniform in ``[cap/2, cap]``. Equal rather than full jitter: full jitter can
    draw ~0 and retry a refusing server at once, while the fixed half keeps every
    retry a real back-off; the random half still spreads the worker threads that
    failed together so they do not retry in lockstep.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    exponent = min(attempt - 1, _MAX_EXPONENT)
    cap = min(policy.max_backoff, policy.base_backoff * math.ldexp(1.0, exponent))
    # Clamp so a misbehaving rand cannot push the delay outside [cap/2, cap].
    r = min(max(rand(), 0.0), 1.0)
    return cap / 2 + r * cap / 2


def _class_names(exc: BaseException) -> list[str]:
    return [cls.__name__ for cls in type(exc).__mro__]


def is_retryable(status: int | None, exc: BaseException | None) -> bool:
    """Whether a failed call is worth repeating.

    Retryable: connection failures and timeouts, HTTP 429 and 5xx. Transport
    errors are recognised without importing any HTTP client: ``OSError`` (which
    covers ``TimeoutError`` and ``ConnectionError``) and any exception with a class
    named like ``*Timeout*`` or ``*Connect*`` anywhere in its hierarchy (httpx's
    ``ConnectError``, ``ReadTimeout``, ``PoolTimeout``...).
    Not retryable: other 4xx (the request itself is wrong), an unparsable body
    (:class:`UnparsableResponse`), an open breaker, and any other exception (most
    likely a bug, which repeating would not fix).

    ``status`` wins over the status carried by a :class:`StatusError`.
    """
    if isinstance(exc, (UnparsableResponse, BreakerOpen)):
        return False
    if status is None and isinstance(exc, StatusError):
        status = exc.status
    if status is not None:
        return status == 429 or 500 <= status <= 599
    if exc is None:
        return False
    if isinstance(exc, OSError):
        return True
    return any("Timeout" in name or "Connect" in name for name in _class_names(exc))


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    deadline: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    rand: Callable[[], float] = random.random,
    breaker: CircuitBreaker | None = None,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """Run ``fn`` and retry retryable failures; return its value or raise.

    - At most ``policy.max_attempts`` calls; never sleeps after the last one.
    - ``deadline`` is an absolute value of ``clock``: a retry whose delay would end
      after it is not attempted and the last failure is re-raised. The first call
      is always made; bounding each call's own duration is the caller's timeout.
    - With a ``breaker``, ``breaker.allow()`` is asked before every call and
      :class:`BreakerOpen` is raised (chained to the previous failure, if any)
      without calling ``fn`` when it refuses. Only retryable failures are recorded
      as breaker failures; any other outcome, a 4xx or an unparsable body
      included, is recorded as a success, because the service did answer and a
      wrong request must not cut every other caller off. Recording an outcome
      for every admitted call also keeps half-open probe slots from leaking.
    - ``on_retry(attempt, exc, delay)`` is called before each sleep (for logs and
      counters).
    """
    last_exc: BaseException | None = None
    for attempt in range(1, policy.max_attempts + 1):
        if breaker is not None and not breaker.allow():
            raise BreakerOpen(breaker.name) from last_exc
        try:
            result = fn()
        except Exception as exc:
            retryable = is_retryable(None, exc)
            if breaker is not None:
                if retryable:
                    breaker.record_failure()
                else:
                    breaker.record_success()
            if not retryable or attempt >= policy.max_attempts:
                raise
            delay = backoff_delay(policy, attempt, rand)
            if clock() + delay > deadline:
                raise
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            sleep(delay)
            last_exc = exc
            continue
        if breaker is not None:
            breaker.record_success()
        return result
    # range() is never empty (max_attempts >= 1) and every iteration returns,
    # raises or continues; reaching here is a bug.
    raise AssertionError("unreachable")


class CircuitBreaker:
    """Consecutive-failure circuit breaker with a bounded half-open probe count.

    closed -> open after ``failure_threshold`` consecutive failures;
    open -> half_open once ``recovery_timeout`` has passed (checked lazily on use);
    half_open lets at most ``half_open_max_calls`` calls through; the first
    success closes it, any failure re-opens it and restarts the timer.
    If the admitted probes never report back (a caller that died between
    ``allow()`` and recording), a new probe window opens after another
    ``recovery_timeout`` so the breaker cannot stay stuck half-open.

    Outcomes reported while open (calls admitted before it opened) are ignored:
    a late success must not close a breaker that later failures opened.
    Thread-safe.
    """

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    def __init__(
        self,
        failure_threshold: int = 5,
        recovery_timeout: float = 10.0,
        half_open_max_calls: int = 2,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if recovery_timeout < 0:
            raise ValueError(f"recovery_timeout must be >= 0, got {recovery_timeout}")
        if half_open_max_calls < 1:
            raise ValueError(f"half_open_max_calls must be >= 1, got {half_open_max_calls}")
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self.half_open_max_calls = half_open_max_calls
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._state = self.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._half_open_since = 0.0
        self._half_open_admitted = 0
        self.opened_count = 0
        self.half_opened_count = 0
        self.closed_count = 0
        self.rejected_count = 0

    # Callers hold self._lock for every _method below.
    def _refresh(self, now: float) -> None:
        if self._state == self.OPEN and now - self._opened_at >= self.recovery_timeout:
            self._state = self.HALF_OPEN
            self._half_open_since = now
            self._half_open_admitted = 0
            self.half_opened_count += 1

    def _open(self, now: float) -> None:
        self._state = self.OPEN
        self._opened_at = now
        self._consecutive_failures = 0
        self.opened_count += 1

    @property
    def state(self) -> str:
        """One of ``"closed"``, ``"open"``, ``"half_open"``."""
        with self._lock:
            self._refresh(self._clock())
            return self._state

    def allow(self) -> bool:
        """Whether a call may go ahead now; in half-open this takes a probe slot."""
        with self._lock:
            now = self._clock()
            self._refresh(now)
            if self._state == self.CLOSED:
                return True
            if self._state == self.HALF_OPEN:
                if self._half_open_admitted < self.half_open_max_calls:
                    self._half_open_admitted += 1
                    return True
                if now - self._half_open_since >= self.recovery_timeout:
                    # The earlier probes never reported back: start a fresh window.
                    self._half_open_since = now
                    self._half_open_admitted = 1
                    return True
            self.rejected_count += 1
            return False

    def record_success(self) -> None:
        with self._lock:
            self._refresh(self._clock())
            if self._state == self.HALF_OPEN:
                self._state = self.CLOSED
                self.closed_count += 1
            if self._state == self.CLOSED:
                self._consecutive_failures = 0

    def record_failure(self) -> None:
        with self._lock:
            now = self._clock()
            self._refresh(now)
            if self._state == self.HALF_OPEN:
                self._open(now)
            elif self._state == self.CLOSED:
                self._consecutive_failures += 1
                if self._consecutive_failures >= self.failure_threshold:
                    self._open(now)

    def is_open(self) -> bool:
        """True while open and the recovery time has not yet passed.

        Does not change state, so the request path can ask it cheaply to skip a
        lookup without taking a half-open probe slot.
        """
        with self._lock:
            return (
                self._state == self.OPEN and self._clock() - self._opened_at < self.recovery_timeout
            )

    def stats(self) -> dict[str, int | str]:
        with self._lock:
            self._refresh(self._clock())
            return {
                "state": self._state,
                "consecutive_failures": self._consecutive_failures,
                "opened": self.opened_count,
                "half_opened": self.half_opened_count,
                "closed": self.closed_count,
                "rejected": self.rejected_count,
            }


class RateLimitedLog:
    """Decides which failures to log so an outage yields a line per key per interval.

    ``should_log(key)`` returns ``(True, n)`` at most once per ``interval`` for a
    key, where ``n`` is how many occurrences were suppressed since the previous
    logged one (so the caller can write "... (n more suppressed)"); otherwise
    ``(False, n)`` with ``n`` the running suppressed count including this call.
    At most ``max_keys`` keys are remembered (the least recently logged is
    dropped), so keys built from error text cannot grow memory without bound.
    Thread-safe.
    """

    def __init__(
        self,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        if interval < 0:
            raise ValueError(f"interval must be >= 0, got {interval}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [last logged at, suppressed since]; dict order = logging order.
        self._entries: dict[str, list[float]] = {}

    def should_log(self, key: str) -> tuple[bool, int]:
        with self._lock:
            now = self._clock()
            entry = self._entries.get(key)
            if entry is not None and now - entry[0] < self.interval:
                entry[1] += 1
                return False, int(entry[1])
            suppressed = int(entry[1]) if entry is not None else 0
            # Re-insert so dict order stays "least recently logged first".
            self._entries.pop(key, None)
            while len(self._entries) >= self.max_keys:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = [now, 0]
            return True, suppressed
