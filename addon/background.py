"""The background pool: a fixed number of threads, a bounded queue, deadlines, cancellation
and de-duplication of identical jobs.

`concurrent.futures.ThreadPoolExecutor` queues without bound and cannot de-duplicate, so it
is wrapped: the bound and the in-flight keys are counted here, the threads are its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class PoolStats:
    submitted: int = 0
    dropped_full: int = 0
    deduplicated: int = 0
    cancelled: int = 0
    expired: int = 0
    completed: int = 0
    failed: int = 0


@dataclass
class Job:
    key: str
    deadline: float  # absolute, on the pool's clock
    future: Future[None] | None = None
    started: bool = False
    cancelled: bool = False
    waiters: int = field(default=1)


class BackgroundPool:
    def __init__(
        self,
        workers: int,
        queue_size: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="kvcache-bg")
        self._limit = workers + queue_size  # running + waiting
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self.stats = PoolStats()
        self._closed = False

    def submit(self, key: str, fn: Callable[[Job], None], timeout: float) -> Job | None:
        """Queue `fn(job)` unless an identical job is pending or the queue is full.

        Returns the job (new or the pending one it joined), or None when dropped. Never waits.
        """
        with self._lock:
            if self._closed:
                return None
            pending = self._jobs.get(key)
            if pending is not None and not pending.cancelled:
                pending.waiters += 1
                self.stats.deduplicated += 1
                return pending
            if len(self._jobs) >= self._limit:
                self.stats.dropped_full += 1
                return None
            job = Job(key, self._clock() + timeout)
            self._jobs[key] = job
            self.stats.submitted += 1
        job.future = self._executor.submit(self._run, job, fn)
        return job

    def _run(self, job: Job, fn: Callable[[Job], None]) -> None:
        with self._lock:
            if job.cancelled:
                self._forget(job)
                return
            if self._clock() >= job.deadline:
                self.stats.expired += 1
                self._forget(job)
                return
            job.started = True
        try:
            fn(job)
            ok = True
        except Exception:
            logger.debug("[kvcache] background job failed", exc_info=True)
            ok = False
        with self._lock:
            self._forget(job)
            if ok:
                self.stats.completed += 1
            else:
                self.stats.failed += 1

    def _forget(self, job: Job) -> None:
        # A newer job may hold the key by now; only drop this one.
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]

    def cancel(self, job: Job) -> bool:
        """Drop one interest in a job; the job is cancelled when nobody waits for it and it
        has not started. Returns whether it was cancelled."""
        with self._lock:
            job.waiters -= 1
            if job.started or job.cancelled or job.waiters > 0:
                return False
            job.cancelled = True
            self._forget(job)
            self.stats.cancelled += 1
        return True

    def pending(self) -> int:
        with self._lock:
            return len(self._jobs)

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            for job in self._jobs.values():
                if not job.started:
                    job.cancelled = True
        self._executor.shutdown(wait=False, cancel_futures=True)
