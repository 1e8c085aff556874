import threading
import time

from addon.background import BackgroundPool, Job


def wait_until(cond, timeout: float = 2.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


def test_overflow_is_dropped_and_counted_without_waiting() -> None:
    gate = threading.Event()
    pool = BackgroundPool(workers=1, queue_size=2)
    try:
        jobs = [pool.submit(f"k{i}", lambda j: gate.wait(2), 5) for i in range(5)]
        assert sum(j is not None for j in jobs) == 3
        assert pool.stats.dropped_full == 2
    finally:
        gate.set()
        pool.shutdown()


def test_identical_jobs_are_deduplicated() -> None:
    gate = threading.Event()
    runs: list[str] = []
    pool = BackgroundPool(workers=1, queue_size=10)

    def fn(job: Job) -> None:
        gate.wait(2)
        runs.append(job.key)

    try:
        a = pool.submit("same", fn, 5)
        b = pool.submit("same", fn, 5)
        assert a is b and pool.stats.deduplicated == 1
        gate.set()
        wait_until(lambda: pool.pending() == 0)
        assert runs == ["same"]
    finally:
        pool.shutdown()


def test_cancel_before_start_and_expired_deadline() -> None:
    gate = threading.Event()
    ran: list[str] = []
    pool = BackgroundPool(workers=1, queue_size=10)
    try:
        pool.submit("blocker", lambda j: gate.wait(2), 5)
        victim = pool.submit("victim", lambda j: ran.append("victim"), 5)
        pool.submit("late", lambda j: ran.append("late"), 0.0)
        assert victim is not None and pool.cancel(victim)
        gate.set()
        wait_until(lambda: pool.pending() == 0)
        assert ran == [] and pool.stats.cancelled == 1 and pool.stats.expired == 1
    finally:
        pool.shutdown()


def test_failures_are_counted_not_raised() -> None:
    pool = BackgroundPool(workers=1, queue_size=1)
    try:
        pool.submit("x", lambda j: 1 / 0, 5)
        wait_until(lambda: pool.stats.failed == 1)
    finally:
        pool.shutdown()


def test_shutdown_refuses_new_work() -> None:
    pool = BackgroundPool(workers=1, queue_size=1)
    pool.shutdown()
    assert pool.submit("x", lambda j: None, 5) is None
