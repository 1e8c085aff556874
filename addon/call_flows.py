"""The addon's own calls (LMCache lookups, /tokenize, pin, compress, evict, clear) as flows
in mitmweb's list, opt-in with `--set kvcache_show_calls=true`: someone debugging an
LMCache contract sees exactly what was asked and answered, next to the client flow it
served (its comment and `metadata["kvcache_call"]["for_flow"]` name that flow's id).

The clients hand each exchange's bytes to `CallFlows.record` (a tap: the lean request-path
client's `tap`, httpx event hooks for the background's clients); which client flow a call
served comes from a context variable the request hook sets, which the lookup task inherits
and the background job is run under. The flows are only added to the view: they never pass
through the proxy, so they are never routed or sent again. When the option is off nothing
is tapped.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
from mitmproxy import connection, http

logger = logging.getLogger(__name__)

# The id of the client flow whose routing or background job is running.
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("kvcache_caller", default="")
# Calls not worth a flow: the engines' metrics reads (every few seconds, no contract).
SKIP_PATHS = ("/metrics",)
_JSON = ((b"content-type", b"application/json"),)


class CallFlows:
    def __init__(self, loop: asyncio.AbstractEventLoop,
                 add: Callable[[list[http.HTTPFlow]], None]) -> None:
        """`add`: puts flows in the view (mitmproxy's `view.flows.add` command)."""
        self.loop = loop
        self.add = add
        self._loop_thread = threading.get_ident()
        self.recorded = 0

    def tap(self, method: str, url: str, req_body: bytes, status: int | None,
            resp_body: bytes, t0: float, error: BaseException | None) -> None:
        """One exchange, from any thread."""
        if urlsplit(url).path.endswith(SKIP_PATHS):
            return
        args = (method, url, req_body, status, resp_body, t0, time.time(), error,
                CALLER.get())
        if threading.get_ident() == self._loop_thread:
            self._add(*args)
        else:
            try:
                self.loop.call_soon_threadsafe(self._add, *args)
            except RuntimeError:
                pass  # the loop closed: shutting down

    def httpx_hook(self, response: httpx.Response) -> None:
        """An httpx (sync client) response event hook."""
        response.read()
        req = response.request
        elapsed = response.elapsed.total_seconds() if response.is_closed else 0.0
        self.tap(req.method, str(req.url), req.content, response.status_code,
                 response.content, time.time() - elapsed, None)

    def _add(self, method: str, url: str, req_body: bytes, status: int | None,
             resp_body: bytes, t0: float, t1: float, error: BaseException | None,
             caller: str) -> None:
        u = urlsplit(url)
        port = u.port or (443 if u.scheme == "https" else 80)
        client = connection.Client(peername=("127.0.0.1", 0), sockname=("127.0.0.1", 0),
                                   timestamp_start=t0)
        server = connection.Server(address=(u.hostname or "", port))
        f = http.HTTPFlow(client, server)
        f.request = http.Request.make(method, url, req_body, _JSON)
        f.request.timestamp_start, f.request.timestamp_end = t0, t0
        if status is not None:
            f.response = http.Response.make(status, resp_body, _JSON)
            f.response.timestamp_start, f.response.timestamp_end = t1, t1
        what = f"kvcache call {u.path}" + (f" for flow {caller}" if caller else "")
        if error is not None:
            what += f" (failed: {type(error).__name__})"
        f.comment = what
        f.metadata["kvcache_call"] = {"for_flow": caller, "path": u.path,
                                      "error": type(error).__name__ if error else None}
        self.recorded += 1
        try:
            self.add([f])
        except Exception:  # a view that went away: the call is still made, only not shown
            logger.debug("[kvcache] could not add a call flow", exc_info=True)
