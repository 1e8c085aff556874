"""How far behind the proxy's own event loop runs, and a deadline that does not blame the
controller for it.

Under load, mitmproxy's event loop is the bottleneck: a lookup the controller answers in
microseconds waits in the loop's queue until the loop comes back to it, and with a plain
`asyncio.timeout` the deadline's timer (due in the same loop pass) cancels it first. The
routing budget is meant for the controller, not for the proxy's own queue, so:

- `LoopLag` samples the loop's lag (how late a short sleep wakes up) in a background task;
- `deadline(budget)` is `asyncio.timeout` that cancels one loop pass after its timer fires,
  so an answer that already arrived is read rather than thrown away. A lookup that still has
  no answer had the budget and the loop's lag on top: that is the controller's slowness.
  What the proxy's lag does cost is budget spent before the lookup was sent (waiting for the
  loop, tokenizing); the router reports that as `why=proxy-saturated`, never as a slow
  controller, and while the loop is behind it reuses recent answers instead of asking.

`asyncio.timeout` has no hook for this; the class is a few lines on `call_at`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType


class LoopLag:
    """Recent lag of the event loop, in seconds (the worst of the last `window` samples), and
    how busy the process is (CPU seconds per second over the last quarter second): a proxy
    whose CPU is the bottleneck is busy near 1.0 even while each loop pass stays short."""

    def __init__(self, interval: float = 0.02, window: int = 10,
                 cpu: Callable[[], float] = time.process_time) -> None:
        self.interval = interval
        self._samples: deque[float] = deque([0.0], maxlen=window)
        self.worst = 0.0
        self.busy = 0.0
        self._cpu = cpu

    def add(self, lag: float) -> None:
        lag = max(lag, 0.0)
        self._samples.append(lag)
        self.worst = max(self.worst, lag)

    def __call__(self) -> float:
        return max(self._samples)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        wall0, cpu0 = loop.time(), self._cpu()
        while True:
            t = loop.time()
            await asyncio.sleep(self.interval)
            now = loop.time()
            self.add(now - t - self.interval)
            if now - wall0 >= 0.25:
                cpu = self._cpu()
                self.busy = (cpu - cpu0) / (now - wall0)
                wall0, cpu0 = now, cpu


class deadline:  # noqa: N801 - used like asyncio.timeout
    """`async with deadline(budget):` raises TimeoutError like asyncio.timeout, but cancels
    one loop pass after the timer fires: when the loop is behind, the timer and the answer's
    socket event are handled in the same pass, and the answer must win. `late` is how late
    the timer itself ran (the loop's lag at that moment)."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.late = 0.0
        self.expired = False
        self._task: asyncio.Task[object] | None = None
        self._handle: asyncio.Handle | None = None
        self._due_at = 0.0
        self._cancelling = 0

    async def __aenter__(self) -> deadline:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        assert self._task is not None
        self._cancelling = self._task.cancelling()
        self._due_at = loop.time() + self.budget
        self._handle = loop.call_at(self._due_at, self._due)
        return self

    def _due(self) -> None:
        loop = asyncio.get_running_loop()
        self.late = max(loop.time() - self._due_at, 0.0)
        # A task step made ready in this pass (its answer arrived) runs before this.
        self._handle = loop.call_soon(self._cancel)

    def _cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self.expired = True
            self._task.cancel()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self.expired:
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc
        return None
