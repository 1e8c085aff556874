"""Small helpers to run an ASGI app under uvicorn on a pre-bound socket.

Binding the socket ourselves means port 0 works and the real URL is known before the app is
built, which engines need because they register their own URL with the controller.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable
from pathlib import Path

import uvicorn

ASGIApp = Callable[..., object]

# Shutdown gives in-flight requests (a hung controller call, a long stream) this long
# before uvicorn cancels them, so stopping a simulator never waits on a stuck client.
GRACEFUL_SHUTDOWN_S = 1


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    # proto must say TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose
    # proto is IPPROTO_TCP, and without it every response stalls ~40 ms on delayed ACKs.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Listening now lets clients connect (and wait in the backlog) before uvicorn is up.
    sock.listen(2048)
    return sock


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"


def begin_shutdown(app: ASGIApp) -> None:
    """Tell an app that its server is stopping, if it exposes ``app.state.begin_shutdown``.

    uvicorn only tells apps about shutdown (lifespan) after in-flight requests are done, so
    a deliberately hung or slow request would otherwise be cancelled mid-flight after the
    graceful timeout, with a traceback in the log.
    """
    hook = getattr(getattr(app, "state", None), "begin_shutdown", None)
    if callable(hook):
        hook()


class SimServer(uvicorn.Server):
    def handle_exit(self, sig: int, frame: object) -> None:
        # Runs on SIGINT/SIGTERM in the CLI; thread mode calls begin_shutdown directly.
        begin_shutdown(self.config.app)
        super().handle_exit(sig, frame)  # type: ignore[arg-type]


def make_server(app: ASGIApp, log_level: str = "warning") -> SimServer:
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        ws="none",
    )
    return SimServer(config)


def add_server_args(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port, help="0 picks a free port")
    parser.add_argument(
        "--port-file",
        type=Path,
        default=None,
        help="write the server's base URL to this file once the port is bound",
    )
    parser.add_argument("--log-level", default="warning")


def write_port_file(path: Path | None, url: str) -> None:
    """Tell a polling parent the URL; an atomic rename so it never reads half of it."""
    if path is not None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(url)
        tmp.replace(path)


def serve_cli(factory: Callable[[str], ASGIApp], args: argparse.Namespace) -> None:
    """Bind, build the app with its base URL, announce the URL and serve until signalled."""
    sock = bind_socket(args.host, args.port)
    url = socket_url(sock)
    app = factory(url)
    write_port_file(args.port_file, url)
    print(f"serving on {url}", flush=True)
    try:
        make_server(app, args.log_level).run(sockets=[sock])
    finally:
        sock.close()
