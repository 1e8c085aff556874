"""``python -m sim.screenshot [--out docs/mitmweb-kvcache.png]``: a screenshot of mitmweb
showing a routed flow's kvcache view and the addon's own calls as flows, rendered by a real
headless Chromium (Debian's `chromium` package: `apt install chromium`).

It starts the simulated cluster (3 engines and the controller), a real mitmweb with the
addon (`kvcache_view_auto` so the flow opens on the decision table, `kvcache_show_calls`
so the /lookup and /tokenize calls are in the list), sends three turns of one chat, and
points Chromium at the last turn's flow.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from sim.cluster import start_cluster, stop_process
from sim.proxy import ROOT, command, write_config
from sim.redis_server import free_port

SYSTEM = " ".join(f"policy{i % 97} clause{i}" for i in range(400))


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which(
        "google-chrome")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.screenshot", description=__doc__)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "mitmweb-kvcache.png")
    p.add_argument("--size", default="1600,1000", help="window width,height")
    args = p.parse_args(argv)
    exe = chromium()
    if exe is None:
        print("no chromium: apt install chromium", file=sys.stderr)
        return 2
    tmp = ROOT / "out" / "screenshot"
    tmp.mkdir(parents=True, exist_ok=True)
    with start_cluster(3, 0.2) as cluster:
        cfg = write_config(tmp / "config.yaml", cluster.engine_urls, cluster.controller_url,
                           lookup_routing_timeout="200ms")
        proxy_port, web_port = free_port(), free_port()
        cmd = [*command(cfg, tmp / "conf", f"127.0.0.1:{proxy_port}", "mitmweb"),
               "--set", f"web_port={web_port}", "--set", "web_host=127.0.0.1",
               "--set", "web_open_browser=false", "--set", "kvcache_view_auto=true",
               "--set", "kvcache_show_calls=true",
               # A list option: one --set per column.
               *[a for col in ("comment", "method", "status", "size", "time")
                 for a in ("--set", f"web_columns={col}")]]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=tmp, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        out: list[str] = []
        threading.Thread(target=lambda: out.extend(proc.stdout or []), daemon=True).start()
        try:
            end = time.monotonic() + 30
            while not any(re.search(rf":{proxy_port}\b", line) for line in out):
                if proc.poll() is not None or time.monotonic() > end:
                    print("".join(out), file=sys.stderr)
                    return 1
                time.sleep(0.1)
            msgs = [{"role": "system", "content": SYSTEM}]
            with httpx.Client(base_url=f"http://127.0.0.1:{proxy_port}", timeout=30) as c:
                for turn in range(3):
                    msgs.append({"role": "user", "content": f"question {turn} " * 40})
                    r = c.post("/v1/chat/completions", json={
                        "model": "sim-model", "messages": msgs, "max_tokens": 16})
                    msgs.append({"role": "assistant",
                                 "content": r.json()["choices"][0]["message"]["content"]})
                    time.sleep(0.3)  # the controller hears of the turn before the next
            web = f"http://127.0.0.1:{web_port}"
            flows = httpx.get(f"{web}/flows", timeout=10).json()
            last = [f for f in flows if f.get("comment", "").startswith("kvcache →")][-1]
            url = f"{web}/#/flows/{last['id']}/response"
            args.out.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 f"--window-size={args.size}", "--virtual-time-budget=8000",
                 f"--screenshot={args.out}", url],
                check=True, capture_output=True, timeout=120)
        finally:
            stop_process(proc, 10)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
