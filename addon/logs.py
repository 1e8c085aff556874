"""Log lines from the background threads, written by the event loop's thread.

mitmproxy's terminal log prints a record as two writes (the line, then its newline) from
whatever thread logged it; a worker thread's line could then land in the middle of a flow
line that the event loop is printing. A filter on the loggers used in worker threads hands
those records to the loop instead, which writes them whole and in order.
"""

from __future__ import annotations

import asyncio
import logging
import threading

# Loggers of the modules whose code runs in the background pool's threads.
THREAD_LOGGERS = ("addon.manager", "addon.background", "addon.lmcache", "addon.vllm",
                  "addon.resilience", "addon.tokens")


class ToLoop(logging.Filter):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        if threading.get_ident() == self.thread or self.loop.is_closed():
            return True
        try:
            self.loop.call_soon_threadsafe(logging.getLogger(record.name).handle, record)
        except RuntimeError:  # the loop closed meanwhile: write it here rather than lose it
            return True
        return False


def relay_thread_logs(loop: asyncio.AbstractEventLoop) -> ToLoop:
    f = ToLoop(loop)
    for name in THREAD_LOGGERS:
        logging.getLogger(name).addFilter(f)
    return f


def stop_relay(f: ToLoop) -> None:
    for name in THREAD_LOGGERS:
        logging.getLogger(name).removeFilter(f)
