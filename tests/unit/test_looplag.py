"""The loop-lag monitor and the deadline that lets an answer already in hand through."""

from __future__ import annotations

import asyncio
import time

import pytest

from addon.looplag import LoopLag, deadline


async def answer_due_with_the_timer(ctx: object) -> str:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()
    async with ctx:  # type: ignore[attr-defined]
        # The answer is ready just before the deadline, but the loop is busy (as a saturated
        # proxy is) until after both are due: they are handled in the same loop pass.
        loop.call_later(0.04, fut.set_result, "answer")
        loop.call_soon(time.sleep, 0.1)
        return await fut


async def test_an_answer_in_the_same_pass_as_the_deadline_wins() -> None:
    with pytest.raises(TimeoutError):  # what a plain asyncio.timeout does: answer lost
        await answer_due_with_the_timer(asyncio.timeout(0.05))
    d = deadline(0.05)
    assert await answer_due_with_the_timer(d) == "answer"
    assert not d.expired


async def test_no_answer_times_out_and_reports_lateness() -> None:
    d = deadline(0.02)
    with pytest.raises(TimeoutError):
        async with d:
            asyncio.get_running_loop().call_soon(time.sleep, 0.06)
            await asyncio.sleep(10)
    assert d.expired and d.late >= 0.03


async def test_an_outer_cancel_is_not_turned_into_a_timeout() -> None:
    async def body() -> None:
        async with deadline(10):
            await asyncio.sleep(10)

    task = asyncio.ensure_future(body())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_loop_lag_sees_a_blocked_loop() -> None:
    lag = LoopLag(interval=0.01, window=5)
    task = asyncio.ensure_future(lag.run())
    await asyncio.sleep(0.03)
    before = lag()
    time.sleep(0.2)  # the loop is blocked
    await asyncio.sleep(0.03)
    assert lag() >= 0.15 and lag.worst >= 0.15 and lag() > before
    task.cancel()


async def test_busy_is_the_process_cpu_share() -> None:
    cpu = [0.0]
    lag = LoopLag(interval=0.01, cpu=lambda: cpu[0])
    task = asyncio.ensure_future(lag.run())
    for _ in range(40):  # ~0.4 s in which the "process" used 0.9 CPU-s per second
        await asyncio.sleep(0.01)
        cpu[0] += 0.009
    assert 0.6 < lag.busy < 1.2
    task.cancel()
