#!/usr/bin/env bash
# Measures docker-flow-proxy against the real Consul and HAProxy on 127.0.0.1 and prints one table
# (Markdown): reconfigure latency with 10 to 10,000 services routed, start-up and memory of a new
# replica, requests per second proxied and direct, failed requests while reconfiguring.
# Installs what is missing first (scripts/setup.sh; wrk from Debian's package).
# Usage: scripts/bench.sh [dfp-bench flags]     e.g. scripts/bench.sh -smoke
#        scripts/bench.sh -sizes 10,100 -start-sizes 1000 -churn-duration 10s
# Takes some 5 minutes with the default sizes on 2 cores (and 2 to 3 with -sizes 10000 -start-sizes 10000
# -load-at 10000), once Consul is built; progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(scripts/setup.sh --print-env)"
export DFP_HAPROXY_BIN DFP_CONSUL_BIN

if ! command -v wrk >/dev/null 2>&1; then
  echo "[bench] apt-get install wrk" >&2
  if [ "$(id -u)" -eq 0 ]; then as_root=(); else as_root=(sudo); fi
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends wrk >&2 \
    || { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive timeout 600 apt-get update -qq >&2 &&
         "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends wrk >&2; } \
    || echo "[bench] wrk could not be installed: the Go load generator measures item 3" >&2
fi

# HAProxy holds one file descriptor per connection and per server of 30,000: raise the limit
# where allowed (the server raises its own soft limit to the hard one).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

go build -o "${TMPDIR:-/tmp}/dfp-bench" ./bench/cmd/dfp-bench
exec "${TMPDIR:-/tmp}/dfp-bench" "$@"
