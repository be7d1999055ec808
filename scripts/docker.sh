#!/usr/bin/env bash
# Starts and stops the Docker engine that the integration tests need, leaving alone one that it
# did not start.
#   scripts/docker.sh start   when no daemon answers, starts dockerd in the background (default
#                             socket /var/run/docker.sock, log in .tmp/dockerd.log), waits until it
#                             answers (60 s at most) and records its pid in .tmp/dockerd.started
#   scripts/docker.sh stop    stops the dockerd recorded by start (SIGTERM, 30 s, then SIGKILL);
#                             does nothing when start found a daemon already running
#   scripts/docker.sh restart stops and starts the dockerd recorded by start; refuses any other
#   scripts/docker.sh started exits 0 when a dockerd started by this script runs
#   scripts/docker.sh status  says whether a daemon answers and whether this script started it
# Both are idempotent. dockerd needs root: as another user, sudo is used.
set -euo pipefail
cd "$(dirname "$0")/.."

SOCK=/var/run/docker.sock
# The engine belongs to the machine, not to one clone: so does the record of who started it
# (under /run, which a reboot clears). The log stays with the clone.
STATE_DIR="${DFP_STATE_DIR:-/run/docker-flow-proxy}"
STATE="$STATE_DIR/dockerd.started"
LOG="$(pwd)/.tmp/dockerd.log"
START_TIMEOUT="${DFP_DOCKERD_START_TIMEOUT:-60}"
STOP_TIMEOUT="${DFP_DOCKERD_STOP_TIMEOUT:-30}"

log() { printf '[docker] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

# answers: a daemon answers on the default socket, or where DOCKER_HOST points.
answers() {
  if [ -S "$SOCK" ] && command -v curl >/dev/null 2>&1; then
    curl -fsS --max-time 5 --unix-socket "$SOCK" http://x/_ping >/dev/null 2>&1 && return 0
    # The socket is root:docker 0660: another user may need sudo to read it.
    [ "$(id -u)" -ne 0 ] && sudo -n curl -fsS --max-time 5 --unix-socket "$SOCK" http://x/_ping >/dev/null 2>&1 && return 0
  fi
  command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1
}

# is_dockerd PID: PID is alive and is a dockerd (not a reused pid).
is_dockerd() {
  [ -n "$1" ] && [ -r "/proc/$1/comm" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = dockerd ]
}

# recorded_pid: the pid of the dockerd that this script started, if it still runs; a stale state
# file is removed.
recorded_pid() {
  [ -f "$STATE" ] || return 0
  local pid
  pid="$(head -n1 "$STATE" 2>/dev/null | tr -dc 0-9)"
  if is_dockerd "$pid"; then
    echo "$pid"
  else
    rm -f "$STATE"
  fi
}

tail_log() { [ -f "$LOG" ] && tail -n 30 "$LOG" >&2 || true; }

# kill_dockerd PID: SIGTERM, a bounded wait, then SIGKILL (and the containerd it ran).
kill_dockerd() {
  local pid="$1" containerd="" i
  containerd="$(tr -dc 0-9 2>/dev/null </var/run/docker/containerd/containerd.pid || true)"
  as_root kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
    is_dockerd "$pid" || return 0
    sleep 0.1
  done
  log "dockerd $pid still runs after ${STOP_TIMEOUT}s: SIGKILL"
  as_root kill -KILL "$pid" 2>/dev/null || true
  if [ -n "$containerd" ] && grep -qa /var/run/docker/containerd "/proc/$containerd/cmdline" 2>/dev/null; then
    as_root kill -KILL "$containerd" 2>/dev/null || true
  fi
  for ((i = 0; i < 50; i++)); do
    is_dockerd "$pid" || return 0
    sleep 0.1
  done
  log "dockerd $pid did not die"
  return 1
}

start() {
  local pid
  pid="$(recorded_pid)"
  if answers; then
    if [ -n "$pid" ]; then
      log "dockerd $pid (started by this script) answers"
    else
      log "a Docker daemon already answers: using it, not starting another"
    fi
    return 0
  fi
  if [ -n "$pid" ]; then
    log "dockerd $pid (started by this script) does not answer: restarting it"
    kill_dockerd "$pid" || exit 1
    rm -f "$STATE"
  fi
  command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || {
    log "dockerd is not installed: run scripts/setup.sh"
    exit 1
  }
  local dockerd
  dockerd="$(command -v dockerd || echo /usr/sbin/dockerd)"

  mkdir -p "$STATE_DIR" "$(dirname "$LOG")"
  log "starting dockerd (log in $LOG)"
  printf '\n== %s scripts/docker.sh start\n' "$(date -u +%FT%TZ)" >>"$LOG"
  # setsid: the daemon outlives this script and gets no signal meant for the caller's job.
  as_root setsid "$dockerd" >>"$LOG" 2>&1 </dev/null &
  local launcher=$! i
  for ((i = 0; i < START_TIMEOUT * 2; i++)); do
    pid="$(tr -dc 0-9 2>/dev/null </var/run/docker.pid || true)"
    if answers && is_dockerd "$pid"; then
      echo "$pid" >"$STATE"
      log "dockerd $pid answers on $SOCK after $((i / 2)) s"
      return 0
    fi
    if ! kill -0 "$launcher" 2>/dev/null && ! is_dockerd "$pid"; then
      log "dockerd exited while starting:"
      tail_log
      exit 1
    fi
    sleep 0.5
  done
  log "dockerd did not answer within ${START_TIMEOUT}s:"
  tail_log
  if is_dockerd "$pid"; then kill_dockerd "$pid" || true; fi
  exit 1
}

stop() {
  local pid
  pid="$(recorded_pid)"
  if [ -z "$pid" ]; then
    log "no dockerd started by this script runs: nothing to stop"
    return 0
  fi
  log "stopping dockerd $pid"
  kill_dockerd "$pid"
  rm -f "$STATE"
}

# restart: stops and starts again a dockerd that this script started (for the test of a registrar
# that must follow a restarted engine); refuses to touch any other daemon.
restart() {
  if [ -z "$(recorded_pid)" ]; then
    log "refusing to restart a Docker daemon that scripts/docker.sh did not start"
    return 1
  fi
  stop
  start
}

status() {
  local pid
  pid="$(recorded_pid)"
  if answers; then echo "a Docker daemon answers"; else echo "no Docker daemon answers"; fi
  if [ -n "$pid" ]; then echo "dockerd $pid was started by scripts/docker.sh"; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) restart ;;
  started) [ -n "$(recorded_pid)" ] ;;
  status) status ;;
  *)
    echo "usage: $0 start|stop|restart|started|status" >&2
    exit 2
    ;;
esac
