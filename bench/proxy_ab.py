"""``python -m bench.proxy_ab --ref REF``: the proxy's cost of this checkout's addon against
another commit's, in the same run.

bench.proxy measures one addon against bare mitmdump; two of its runs made at different
times compare machines as much as code. Here both addons run side by side: bare mitmdump,
and for each addon (this checkout's, and `git archive REF addon/`) the addon loaded but
disabled and the addon routing repeated 1k-token prompts, in front of bench.proxy's
stand-ins, at 16 clients; rounds interleaved, every ratio taken against bare mitmdump in
the same round, then the median over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import psutil

from bench.proxy import (
    ENDPOINT_IDS,
    HOST,
    ROOT,
    Env,
    Prompts,
    _cell,
    _proxy_command,
    _standin,
    _start_proxy,
    _Stats,
    _wait_listening,
    snapshot_addon,
)

CONFIGS = {"off": {"enabled": False}, "on": {}}


def ref_addon(ref: str, tmp: Path) -> Path:
    """`REF`'s addon/ unpacked under `tmp`; its kvcache.py."""
    data = subprocess.run(["git", "archive", "--format=tar", ref, "addon"], cwd=ROOT,
                          capture_output=True, check=True).stdout
    dst = tmp / "ref"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dst, filter="data")
    return dst / "addon" / "kvcache.py"


async def _rounds(env: Env, names: list[str], rounds: int, seconds: float,
                  clients: int) -> dict[str, list[float]]:
    env.stats = {"upstream": _Stats(env.upstream_ports[0]),
                 "controller": _Stats(env.controller_port), "slow": _Stats(env.slow_port)}
    ratios: dict[str, list[float]] = {n: [] for n in names if n != "bare"}
    try:
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            rps = {}
            for name in order:
                m = await _cell(env, env.proxy_ports[name], "/v1/completions",
                                Prompts(1024, True, "warm-1024"), clients, 0.5, seconds, name)
                rps[name] = m.rps
                print(f"round {r + 1}/{rounds} {name}: {m.rps:,.0f} req/s", file=sys.stderr)
            for n in ratios:
                ratios[n].append(rps[n] / rps["bare"])
    finally:
        for st in env.stats.values():
            st.close()
    return ratios


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.proxy_ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="the commit to compare with")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="write proxy-ab.md there")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as d, ExitStack() as stack:
        tmp = Path(d)
        scripts = {"this": snapshot_addon(tmp)[0], args.ref: ref_addon(args.ref, tmp)}
        up, up_ports = _standin(stack, "upstream", "--ports", str(len(ENDPOINT_IDS)))
        ids = ",".join(ENDPOINT_IDS)
        ctl, (ctl_port,) = _standin(stack, "controller", "--ids", ids)
        slow, (slow_port,) = _standin(stack, "controller", "--ids", ids, "--delay-ms", "50")
        engines = {e: f"http://{HOST}:{p}" for e, p in zip(ENDPOINT_IDS, up_ports, strict=True)}
        ctl_url = f"http://{HOST}:{ctl_port}"
        procs: dict[str, psutil.Process] = {"upstream": up, "controller": ctl, "slow": slow}
        ports: dict[str, int] = {}
        bare = _start_proxy(stack, "bare", _proxy_command(
            "bare", tmp, engines, ctl_url, None, scripts["this"]), tmp)
        ports["bare"] = _wait_listening("bare", bare, tmp, 60)
        procs["bare"] = psutil.Process(bare.pid)
        names = ["bare"]
        for label, script in scripts.items():
            for cfg, extra in CONFIGS.items():
                name = f"{cfg} @{label}"
                safe = name.replace(" @", "-").replace("/", "_")
                p = _start_proxy(stack, safe, _proxy_command(safe, tmp, engines, ctl_url,
                                                             extra, script), tmp)
                ports[name] = _wait_listening(safe, p, tmp, 60)
                procs[name] = psutil.Process(p.pid)
                names.append(name)
        env = Env(up_ports, ctl_port, slow_port, ports, procs)
        ratios = asyncio.run(_rounds(env, names, args.rounds, args.seconds, args.clients))
    cmd = "python -m bench.proxy_ab " + shlex.join(argv)
    lines = [f"# The proxy's cost: this checkout's addon against {args.ref}, same run", "",
             f"Command: `{cmd}`", "", __doc__.split("\n\n", 1)[1].strip(), "",
             "| configuration | req/s vs bare @16 (median) | per round |", "|---|---|---|"]
    for n, xs in ratios.items():
        lines.append(f"| {n} | {statistics.median(xs):.2f}x | "
                     + " ".join(f"{x:.2f}" for x in xs) + " |")
    lines += ["", f"Wall time: {(time.perf_counter() - t0) / 60:.1f} min.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "proxy-ab.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
