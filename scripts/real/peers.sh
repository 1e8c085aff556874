#!/usr/bin/env bash
# Real peer routers from PyPI for the real-peers tier and by hand:
#   scripts/real/peers.sh install                     sglang-router==0.3.2 and vllm-router==0.1.17
#                                                     into their own venv (seconds, once)
#   scripts/real/peers.sh info                        the venv's python and the versions
#   scripts/real/peers.sh run sglang|vllm POLICY URL...   one router in the foreground
# Everything lives under ${KVCACHE_REAL_HOME:-~/.cache/mitmproxy-kvcache}/peers-venv.
# KVCACHE_PEERS_PIP_ARGS adds pip arguments to the install.
set -euo pipefail
exec python3 "$(dirname "$0")/peers_real.py" "$@"
