"""Real peer routers from PyPI (`sglang-router`, `vllm-router`), for the real-peers tier.

    python3 scripts/real/peers_real.py install   # both routers into their own venv (once)
    python3 scripts/real/peers_real.py info      # the venv's python and the routers' versions
    python3 scripts/real/peers_real.py run KIND POLICY URL...  # one router in the foreground

KIND is ``sglang`` or ``vllm``; POLICY e.g. ``cache_aware`` or ``round_robin``. Everything
lives under ``$KVCACHE_REAL_HOME`` (default ``~/.cache/mitmproxy-kvcache``): ``peers-venv/``
(installed on first use, reused while its stamp names the same pins). Standard library
only, so any Python 3.11 runs it; ``bench/real_peers.py`` and the test tier import it by
path and use `router()`.

What is real: both routers are the PyPI releases (Rust binaries wrapped by Python
launchers), run with the command lines their projects document, each in front of the
worker URLs given (real vLLM servers in the tier). Nothing is patched or simulated.

Environment: ``KVCACHE_PEERS_PIP_ARGS`` adds pip arguments to the install.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# The vLLM launcher beside this file holds the real tiers' shared helpers (the cache
# directory, the setup error, running a setup command); standard library only, like this.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_real import Log, SetupError, free_port, free_ports, home, pip_install_venv  # noqa: E402

SPECS = ("sglang-router==0.3.2", "vllm-router==0.1.17")
KINDS = ("sglang", "vllm")
INSTALL_STAMP = ".kvcache-peers-installed"


def _log(msg: str) -> None:
    print(f"[peers-real] {msg}", file=sys.stderr, flush=True)


def venv_dir() -> Path:
    return home() / "peers-venv"


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def _stamp() -> str:
    return " ".join(SPECS)


def is_installed() -> bool:
    stamp = venv_dir() / INSTALL_STAMP
    return venv_python().exists() and stamp.exists() and stamp.read_text().strip() == _stamp()


def install(log: Log = _log) -> None:
    """pip install both routers into their own venv (reused when already there)."""
    if is_installed():
        log(f"{_stamp()} already installed in {venv_dir()}")
        return

    def has_launcher(pip: list[str]) -> None:
        if not (venv_dir() / "bin" / "vllm-router").exists():
            raise SetupError(f"no vllm-router executable in {venv_dir() / 'bin'}")

    extra = shlex.split(os.environ.get("KVCACHE_PEERS_PIP_ARGS", ""))
    pip_install_venv(venv_dir(), SPECS, extra, "import sglang_router, vllm_router",
                     INSTALL_STAMP, _stamp(), log, after=has_launcher)


def router_command(kind: str, policy: str, workers: Sequence[str], port: int,
                   metrics_port: int) -> list[str]:
    """The command line each project documents, on loopback, metrics on a port of our own
    (both default to 29000, and sglang-router binds it on every interface)."""
    common = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers,
              "--policy", policy,
              "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
              # Both poll unready workers every 30 s by default; ours are up already.
              "--worker-startup-check-interval", "1", "--log-level", "warning"]
    if kind == "vllm":
        return [str(venv_dir() / "bin" / "vllm-router"), *common]
    if kind == "sglang":
        # Its --log-level spells warning "warn".
        common[-1] = "warn"
        return [str(venv_python()), "-m", "sglang_router.launch_router", *common]
    raise ValueError(f"unknown router kind {kind!r} (one of {', '.join(KINDS)})")


@dataclass
class Router:
    kind: str
    policy: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    started_s: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.kind}-router {self.policy}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _pdeathsig() -> None:
    # Linux: SIGTERM the router if the process that started it dies without cleaning up.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _ready(url: str, n_workers: int) -> bool:
    # Both answer /readiness with the count of healthy workers once they have registered
    # them (sglang-router's /health says OK before that, and it then answers 503).
    try:
        with urllib.request.urlopen(f"{url}/readiness", timeout=2) as r:
            body = json.loads(r.read() or b"{}")
            return bool(r.status == 200 and body.get("healthy_workers") == n_workers)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def launch(kind: str, policy: str, workers: Sequence[str], log_path: Path) -> Router:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    port, metrics_port = free_ports(2)
    cmd = router_command(kind, policy, workers, port, metrics_port)
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    with log_path.open("wb") as fh:
        fh.write((shlex.join(cmd) + "\n").encode())
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                preexec_fn=_pdeathsig)
    return Router(kind, policy, f"http://127.0.0.1:{port}", proc, log_path)


def wait_ready(r: Router, n_workers: int, timeout: float = 60.0, log: Log = _log) -> None:
    t0 = time.monotonic()
    while not _ready(r.url, n_workers):
        if r.proc.poll() is not None:
            raise SetupError(f"{r.name} exited with {r.proc.returncode} while starting; "
                             f"log tail:\n{r.log_tail()}")
        if time.monotonic() - t0 > timeout:
            raise SetupError(f"{r.name} not ready after {timeout:.0f} s; log tail:\n"
                             + r.log_tail())
        time.sleep(0.2)
    r.started_s = time.monotonic() - t0
    log(f"{r.name} ready at {r.url} after {r.started_s:.1f} s")


def stop(r: Router, timeout: float = 10.0) -> None:
    """SIGTERM the router's process group, then SIGKILL it if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(r.proc.pid, signal.SIGTERM)
    try:
        r.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(r.proc.pid, signal.SIGKILL)
        r.proc.wait(5)


@contextlib.contextmanager
def router(kind: str, policy: str, workers: Sequence[str], log_dir: Path | None = None,
           timeout: float = 60.0, log: Log = _log) -> Iterator[Router]:
    """Install if needed, start one router in front of ``workers``; stop it on exit."""
    install(log)
    log_dir = log_dir or home() / "peers-logs"
    r = launch(kind, policy, workers, log_dir / f"{kind}-{policy}-{free_port()}.log")
    try:
        wait_ready(r, len(workers), timeout, log)
        yield r
    finally:
        stop(r)


def versions() -> dict[str, str]:
    """The installed routers' versions, as pip reports them."""
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) "
            "for p in ('sglang-router', 'vllm-router')}))")
    out = subprocess.run([str(venv_python()), "-c", code], capture_output=True, text=True,
                         check=True).stdout
    data: dict[str, str] = json.loads(out)
    return data


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else ""
    try:
        if cmd == "install":
            install()
        elif cmd == "info":
            if not is_installed():
                print("not installed", file=sys.stderr)
                return 1
            print(f"PYTHON={venv_python()}")
            for name, version in versions().items():
                print(f"{name}={version}")
        elif cmd == "run" and len(argv) >= 4 and argv[1] in KINDS:
            with router(argv[1], argv[2], argv[3:]) as r:
                print(r.url, flush=True)
                # Foreground until Ctrl-C; the context manager stops the router.
                with contextlib.suppress(KeyboardInterrupt):
                    r.proc.wait()
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except SetupError as e:
        _log(str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
