#!/usr/bin/env bash
# A real LMCache 0.5.6 controller on loopback, in a virtual environment of its own
# (its dependencies - torch, cupy, transformers - would clash with the proxy's).
#
#   scripts/real/lmcache.sh install     create/reuse the venv (minutes the first time)
#   scripts/real/lmcache.sh start       start a controller on free loopback ports;
#                                       prints KEY=VALUE lines (URL, PULL_PORT, ...)
#   scripts/real/lmcache.sh stop        stop the controller started by `start`
#   scripts/real/lmcache.sh coordinator-start   start an MP coordinator (the second control
#                                       plane) on a free loopback port; prints URL=, PORT=, ...
#   scripts/real/lmcache.sh coordinator-stop    stop the coordinator started above
#   scripts/real/lmcache.sh python ...  run the venv's python (for sim/lmcache_worker.py)
#   scripts/real/lmcache.sh info        venv path, lmcache version, size on disk
#
# Environment: KVCACHE_REAL_HOME (shared with scripts/real/vllm.sh; default
# ~/.cache/mitmproxy-kvcache; the venv is $KVCACHE_REAL_HOME/lmcache-venv),
# KVCACHE_REAL_STATE (pid/log/ports dir; default $KVCACHE_REAL_HOME/lmcache-venv/run),
# KVCACHE_REAL_HASHSEED (PYTHONHASHSEED shared by controller and workers; default 0).
set -euo pipefail

LMCACHE_VERSION="0.5.6"
# torch is unpinned by lmcache; left alone pip takes a multi-GB CUDA build. This machine
# carries a CPU wheel that an exact pin picks up (see README); elsewhere override it.
TORCH_SPEC="${KVCACHE_REAL_TORCH:-torch==2.13.0}"
VENV="${KVCACHE_REAL_HOME:-$HOME/.cache/mitmproxy-kvcache}/lmcache-venv"
STATE="${KVCACHE_REAL_STATE:-$VENV/run}"
HASHSEED="${KVCACHE_REAL_HASHSEED:-0}"
PY="$VENV/bin/python"
STAMP="$VENV/.kvcache-lmcache-installed"

log() { echo "[lmcache] $*" >&2; }

free_port() {
  # Asks the kernel for an unused port; a tiny race remains until the controller binds.
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

free_ports() {
  # N distinct unused ports: all held bound until the last is chosen (separate free_port
  # calls can get the same port back, and the controller then fails to bind its second
  # socket: seen once in CI).
  python3 -c 'import socket, sys
ss = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in ss: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))' "$1"
}

cmd_install() {
  if [ -x "$PY" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$LMCACHE_VERSION" ]; then
    log "reusing $VENV (lmcache $LMCACHE_VERSION)"
    return 0
  fi
  local t0; t0=$(date +%s)
  log "installing lmcache==$LMCACHE_VERSION into $VENV (first run only; several minutes)"
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --disable-pip-version-check --upgrade pip >&2
  # torch first, so lmcache's bare `torch` requirement is already satisfied.
  "$PY" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" >&2
  "$PY" -m pip install -q --disable-pip-version-check "lmcache==$LMCACHE_VERSION" "$TORCH_SPEC" >&2
  "$PY" -c "import lmcache.v1.cache_controller.message, lmcache.v1.token_database" >&2
  echo "$LMCACHE_VERSION" > "$STAMP"
  log "installed in $(( $(date +%s) - t0 )) s; $(du -sh "$VENV" | cut -f1) on disk"
}

is_running() {
  [ -f "$STATE/controller.pid" ] && kill -0 "$(cat "$STATE/controller.pid")" 2>/dev/null
}

cmd_start() {
  [ -x "$PY" ] && [ -f "$STAMP" ] || { log "not installed: run '$0 install' first"; exit 2; }
  mkdir -p "$STATE"
  if is_running; then
    log "already running (pid $(cat "$STATE/controller.pid"))"
    cat "$STATE/controller.env"
    return 0
  fi
  local port pull reply fresh
  read -r -a fresh <<< "$(free_ports 3)"
  port="${KVCACHE_REAL_PORT:-${fresh[0]}}"
  pull="${KVCACHE_REAL_PULL_PORT:-${fresh[1]}}"
  reply="${KVCACHE_REAL_REPLY_PORT:-${fresh[2]}}"
  # --monitor-ports, not --monitor-port: the latter is ignored since 0.3.13 and the
  # ZMQ sockets would silently land on 8300/8400.
  PYTHONHASHSEED="$HASHSEED" setsid "$VENV/bin/lmcache_controller" \
    --host 127.0.0.1 --port "$port" \
    --monitor-ports "{\"pull\": $pull, \"reply\": $reply}" \
    >"$STATE/controller.log" 2>&1 &
  echo $! > "$STATE/controller.pid"
  local url="http://127.0.0.1:$port"
  local deadline=$(( $(date +%s) + ${KVCACHE_REAL_START_TIMEOUT:-90} ))
  until curl -sf -m 2 -X POST -H 'content-type: application/json' \
      -d '{"tokens": [1, 2, 3]}' "$url/lookup" >/dev/null 2>&1; do
    if ! is_running; then
      log "controller exited; log follows"; tail -n 40 "$STATE/controller.log" >&2; exit 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "controller did not answer /lookup in time; log follows"
      tail -n 40 "$STATE/controller.log" >&2; cmd_stop; exit 1
    fi
    sleep 0.5
  done
  {
    echo "URL=$url"
    echo "PORT=$port"
    echo "PULL_PORT=$pull"
    echo "REPLY_PORT=$reply"
    echo "PYTHONHASHSEED=$HASHSEED"
    echo "PID=$(cat "$STATE/controller.pid")"
    echo "LOG=$STATE/controller.log"
  } > "$STATE/controller.env"
  cat "$STATE/controller.env"
}

cmd_stop() {
  if is_running; then
    local pid; pid="$(cat "$STATE/controller.pid")"
    # setsid made it a process-group leader: stop uvicorn and any helper it forked.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    log "stopped pid $pid"
  fi
  rm -f "$STATE/controller.pid" "$STATE/controller.env"
}

coordinator_running() {
  [ -f "$STATE/coordinator.pid" ] && kill -0 "$(cat "$STATE/coordinator.pid")" 2>/dev/null
}

cmd_coordinator_start() {
  [ -x "$PY" ] && [ -f "$STAMP" ] || { log "not installed: run '$0 install' first"; exit 2; }
  mkdir -p "$STATE"
  if coordinator_running; then
    log "coordinator already running (pid $(cat "$STATE/coordinator.pid"))"
    cat "$STATE/coordinator.env"
    return 0
  fi
  local port; port="${KVCACHE_REAL_COORDINATOR_PORT:-$(free_port)}"
  # Always --host: the coordinator binds 0.0.0.0 by default. --chunk-size is its default,
  # spelled out because the addon's keys must be hashed with the same one.
  setsid "$PY" -m lmcache.v1.mp_coordinator --host 127.0.0.1 --port "$port" \
    --chunk-size "${KVCACHE_REAL_CHUNK_SIZE:-256}" \
    >"$STATE/coordinator.log" 2>&1 &
  echo $! > "$STATE/coordinator.pid"
  local url="http://127.0.0.1:$port"
  local deadline=$(( $(date +%s) + ${KVCACHE_REAL_START_TIMEOUT:-90} ))
  until curl -sf -m 2 "$url/healthz" >/dev/null 2>&1; do
    if ! coordinator_running; then
      log "coordinator exited; log follows"; tail -n 40 "$STATE/coordinator.log" >&2; exit 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "coordinator did not answer /healthz in time; log follows"
      tail -n 40 "$STATE/coordinator.log" >&2; cmd_coordinator_stop; exit 1
    fi
    sleep 0.5
  done
  {
    echo "URL=$url"
    echo "PORT=$port"
    echo "CHUNK_SIZE=${KVCACHE_REAL_CHUNK_SIZE:-256}"
    echo "PID=$(cat "$STATE/coordinator.pid")"
    echo "LOG=$STATE/coordinator.log"
  } > "$STATE/coordinator.env"
  cat "$STATE/coordinator.env"
}

cmd_coordinator_stop() {
  if coordinator_running; then
    local pid; pid="$(cat "$STATE/coordinator.pid")"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    log "stopped coordinator pid $pid"
  fi
  rm -f "$STATE/coordinator.pid" "$STATE/coordinator.env"
}

cmd_info() {
  echo "VENV=$VENV"
  echo "PYTHON=$PY"
  echo "INSTALLED=$(cat "$STAMP" 2>/dev/null || echo no)"
  [ -d "$VENV" ] && echo "SIZE=$(du -sh "$VENV" | cut -f1)"
  return 0
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  coordinator-start) cmd_coordinator_start ;;
  coordinator-stop) cmd_coordinator_stop ;;
  info) cmd_info ;;
  python) shift; exec env PYTHONHASHSEED="$HASHSEED" "$PY" "$@" ;;
  *) echo "usage: $0 install|start|stop|coordinator-start|coordinator-stop|info|python ARGS..." >&2; exit 2 ;;
esac
