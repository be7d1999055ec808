#!/usr/bin/env bash
# The demo: installs what is missing, then runs a local Consul dev agent, two instances of the
# books-ms demo service registered in Consul, and docker-flow-proxy in front of them; configures
# the route with one reconfigure call and shows requests balanced over both instances.
# It keeps running until Ctrl-C and then stops everything it started.
#   scripts/demo.sh          run the demo
#   scripts/demo.sh --check  run it, verify the balancing, stop (exit 0 when it works)
# Ports (all on 127.0.0.1): DEMO_CONSUL_PORT (8500, and the next three for its cluster traffic), DEMO_HTTP_PORT (8000), DEMO_API_PORT (8080),
# DEMO_BACKEND_PORTS ("9001 9002").
set -euo pipefail
cd "$(dirname "$0")/.."

CHECK_ONLY=""
[ "${1:-}" = "--check" ] && CHECK_ONLY=1
CONSUL_PORT="${DEMO_CONSUL_PORT:-8500}"
HTTP_PORT="${DEMO_HTTP_PORT:-8000}"
API_PORT="${DEMO_API_PORT:-8080}"
read -r -a BACKEND_PORTS <<< "${DEMO_BACKEND_PORTS:-9001 9002}"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
fail() { printf 'demo: %s\n' "$*" >&2; exit 1; }

eval "$(scripts/setup.sh --print-env)"
command -v curl >/dev/null || fail "curl is required"

work="$(pwd)/.tmp/demo"
rm -rf "$work" && mkdir -p "$work/bin" "$work/cfg" "$work/certs" "$work/templates"
say "building docker-flow-proxy and the books-ms demo service"
go build -o "$work/bin/docker-flow-proxy" ./cmd/docker-flow-proxy
go build -o "$work/bin/books-ms" ./demo/books-ms

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$CONSUL_PORT" $((CONSUL_PORT + 1)) $((CONSUL_PORT + 2)) $((CONSUL_PORT + 3)) "$HTTP_PORT" "$API_PORT" "${BACKEND_PORTS[@]}"; do
  port_free "$p" || fail "port $p on 127.0.0.1 is in use; set the DEMO_*_PORT variables to free ports"
done

# wait_for URL SECONDS: until the URL answers 200.
wait_for() {
  for _ in $(seq $(($2 * 10))); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  fail "$1 did not answer within $2 s (logs in $work)"
}

say "starting a Consul dev agent on 127.0.0.1:$CONSUL_PORT"
"$DFP_CONSUL_BIN" agent -dev -bind 127.0.0.1 -client 127.0.0.1 -http-port "$CONSUL_PORT" \
  -dns-port -1 -grpc-port -1 -grpc-tls-port -1 -serf-lan-port $((CONSUL_PORT + 1)) -serf-wan-port $((CONSUL_PORT + 2)) -server-port $((CONSUL_PORT + 3)) \
  -log-level warn >"$work/consul.log" 2>&1 &
pids+=($!)
consul_url="http://127.0.0.1:$CONSUL_PORT"
for _ in $(seq 600); do
  [ "$(curl -fsS "$consul_url/v1/status/leader" 2>/dev/null)" != "" ] && \
    [ "$(curl -fsS "$consul_url/v1/status/leader" 2>/dev/null)" != '""' ] && break
  sleep 0.1
done
wait_for "$consul_url/v1/catalog/nodes" 30

i=0
for port in "${BACKEND_PORTS[@]}"; do
  i=$((i + 1))
  say "starting books-ms instance $i on 127.0.0.1:$port and registering it in Consul"
  "$work/bin/books-ms" -addr "127.0.0.1:$port" -instance "books-ms-$i" >"$work/books-ms-$i.log" 2>&1 &
  pids+=($!)
  wait_for "http://127.0.0.1:$port/health" 10
  curl -fsS -X PUT "$consul_url/v1/agent/service/register" -d @- <<JSON
{"ID": "books-ms-$i", "Name": "books-ms", "Address": "127.0.0.1", "Port": $port,
 "Check": {"HTTP": "http://127.0.0.1:$port/health", "Interval": "2s", "Status": "passing"}}
JSON
done

say "starting docker-flow-proxy: HAProxy on 127.0.0.1:$HTTP_PORT, API on 127.0.0.1:$API_PORT"
CONSUL_ADDRESS="127.0.0.1:$CONSUL_PORT" "$work/bin/docker-flow-proxy" server \
  --bind-address 127.0.0.1 --http-port "$HTTP_PORT" --api-port "$API_PORT" \
  --config-dir "$work/cfg" --certs-dir "$work/certs" --templates-dir "$work/templates" \
  --haproxy-bin "$DFP_HAPROXY_BIN" >"$work/proxy.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$API_PORT/v1/docker-flow-proxy/health" 60

reconfigure="http://127.0.0.1:$API_PORT/v1/docker-flow-proxy/reconfigure?serviceName=books-ms&servicePath=/api/v1/books"
say "curl \"$reconfigure\""
answer="$(curl -sS "$reconfigure")"
echo "$answer"
case "$answer" in *'"Status":"OK"'*) ;; *) fail "reconfigure failed (log: $work/proxy.log)";; esac

say "four requests through the proxy: curl -s http://127.0.0.1:$HTTP_PORT/api/v1/books"
seen=""
for _ in 1 2 3 4; do
  body="$(curl -fsS "http://127.0.0.1:$HTTP_PORT/api/v1/books")" || fail "request through the proxy failed"
  inst="$(printf '%s' "$body" | sed -n 's/.*"instance":"\([^"]*\)".*/\1/p')"
  echo "answered by $inst"
  case " $seen " in *" $inst "*) ;; *) seen="$seen $inst";; esac
done
n="$(echo $seen | wc -w)"
[ "$n" -eq "${#BACKEND_PORTS[@]}" ] || fail "requests reached $n instance(s), expected ${#BACKEND_PORTS[@]}"
say "requests are balanced over $n instances"

if [ -n "$CHECK_ONLY" ]; then
  say "demo check passed"
  exit 0
fi

cat <<TXT

The demo runs. Try:
  curl -I http://127.0.0.1:$HTTP_PORT/api/v1/books            # 200, from either instance
  curl -s http://127.0.0.1:$HTTP_PORT/api/v1/books            # the "instance" field alternates
  curl http://127.0.0.1:$API_PORT/v1/docker-flow-proxy/config # the haproxy.cfg that serves it
  curl http://127.0.0.1:$API_PORT/v1/docker-flow-proxy/health
  curl "$consul_url/v1/kv/docker-flow/?recurse"               # the route table in Consul KV
  curl "http://127.0.0.1:$API_PORT/v1/docker-flow-proxy/remove?serviceName=books-ms"
Consul's UI: $consul_url/ui/   Logs: $work/*.log
Press Ctrl-C to stop everything.
TXT
wait
