#!/usr/bin/env bash
# The lab pipeline's steps: the original lab's three jobs, and a clean-up. jenkins/Jenkinsfile runs
# them; by hand they run the same against any Docker engine, Consul, registrar and proxy.
#   scripts/pipeline.sh deploy-without-proxy  books-ms with docker-compose; the registrar puts it in Consul
#   scripts/pipeline.sh deploy-with-proxy     the same, then reconfigure the proxy; curl -I through it: 200
#   scripts/pipeline.sh scale-with-proxy      books-ms scaled to $SCALE instances, reconfigure; every
#                                             instance answers through the proxy
#   scripts/pipeline.sh destroy               remove books-ms's route from the proxy and its containers
# Environment [default]:
#   DOCKER_HOST        the engine to deploy to, as docker and docker-compose read it [the local one]
#   PROXY              the proxy's API [http://127.0.0.1:8080]
#   PROXY_HTTP         the proxy as users reach it [http://127.0.0.1]
#   CONSUL_ADDRESS     host:port of Consul's HTTP API: wait there until every instance passes its
#                      check before reconfigure [empty: no wait, the proxy follows Consul anyway]
#   SCALE              instances after scale-with-proxy [3]
#   SERVICE_NAME       [books-ms]   SERVICE_PATH [/api/v1/books]
#   COMPOSE_PROJECT    [books-ms]   COMPOSE_DEMO_FILE [docker-compose-demo.yml of this repository]
#   DOCKER_COMPOSE     the compose command [docker-compose, else docker compose]
#   PUBLISH_IP         the address the instances' ports are published on [127.0.0.1]
#   BOOKS_MS_IMAGE     [docker-flow-proxy/books-ms:latest]: built FROM scratch when the engine lacks
#                      it, from BOOKS_MS_BIN [/usr/local/bin/books-ms], else with go build
#   WAIT_SECONDS       how long each wait may last [60]
# Exits 0 when the step did what it says; otherwise non-zero with the reason on stderr.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"

STAGE="${1:-}"
PROXY="${PROXY:-http://127.0.0.1:8080}"
PROXY_HTTP="${PROXY_HTTP:-http://127.0.0.1}"
CONSUL_ADDRESS="${CONSUL_ADDRESS:-}"
SCALE="${SCALE:-3}"
SERVICE_NAME="${SERVICE_NAME:-books-ms}"
SERVICE_PATH="${SERVICE_PATH:-/api/v1/books}"
COMPOSE_PROJECT="${COMPOSE_PROJECT:-books-ms}"
COMPOSE_DEMO_FILE="${COMPOSE_DEMO_FILE:-$repo/docker-compose-demo.yml}"
PUBLISH_IP="${PUBLISH_IP:-127.0.0.1}"
BOOKS_MS_IMAGE="${BOOKS_MS_IMAGE:-docker-flow-proxy/books-ms:latest}"
BOOKS_MS_BIN="${BOOKS_MS_BIN:-/usr/local/bin/books-ms}"
WAIT_SECONDS="${WAIT_SECONDS:-60}"
export SERVICE_NAME PUBLISH_IP BOOKS_MS_IMAGE # read by the compose file

say() { printf '==> %s\n' "$*"; }
fail() { printf 'pipeline %s: %s\n' "$STAGE" "$*" >&2; exit 1; }

usage() {
  echo "usage: $0 deploy-without-proxy|deploy-with-proxy|scale-with-proxy|destroy (see the script's header)" >&2
  exit 2
}

case "$STAGE" in
  deploy-without-proxy | deploy-with-proxy | scale-with-proxy | destroy) ;;
  *) usage ;;
esac
[[ "$SCALE" =~ ^[1-9][0-9]?$ ]] || fail "SCALE must be a number of instances from 1 to 99, not '$SCALE'"
[[ "$WAIT_SECONDS" =~ ^[1-9][0-9]{0,3}$ ]] || fail "WAIT_SECONDS must be a number of seconds, not '$WAIT_SECONDS'"
[[ "$SERVICE_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || fail "SERVICE_NAME may hold letters, digits, '_', '.' and '-' only, not '$SERVICE_NAME'"
[[ "$SERVICE_PATH" =~ ^/[A-Za-z0-9._~!\&()*+\;=:@%/-]*$ ]] || fail "SERVICE_PATH must be a URL path starting with /, not '$SERVICE_PATH'"
[[ "$PUBLISH_IP" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || fail "PUBLISH_IP must be an IPv4 address, not '$PUBLISH_IP'"
[ -f "$COMPOSE_DEMO_FILE" ] || fail "COMPOSE_DEMO_FILE: no file $COMPOSE_DEMO_FILE"
command -v docker >/dev/null || fail "the docker client is required"
command -v curl >/dev/null || fail "curl is required"

if [ -n "${DOCKER_COMPOSE:-}" ]; then
  read -r -a compose_cmd <<<"$DOCKER_COMPOSE"
elif command -v docker-compose >/dev/null; then
  compose_cmd=(docker-compose)
else
  compose_cmd=(docker compose)
fi
consul="${CONSUL_ADDRESS%%,*}" # the first agent of a comma list, as the proxy takes it
[ -z "$consul" ] || [[ "$consul" == http* ]] || consul="http://$consul"

compose() {
  timeout 300 "${compose_cmd[@]}" -p "$COMPOSE_PROJECT" -f "$COMPOSE_DEMO_FILE" "$@"
}

# ensure_image: the engine has BOOKS_MS_IMAGE, or it is built FROM scratch (nothing is pulled).
ensure_image() {
  if docker image inspect "$BOOKS_MS_IMAGE" >/dev/null 2>&1; then
    return
  fi
  local ctx
  ctx="$(mktemp -d)"
  if [ -x "$BOOKS_MS_BIN" ]; then
    cp "$BOOKS_MS_BIN" "$ctx/books-ms"
  elif command -v go >/dev/null; then
    say "building books-ms (CGO_ENABLED=0 go build ./demo/books-ms)"
    (cd "$repo" && CGO_ENABLED=0 timeout 600 go build -trimpath -ldflags='-s -w' -o "$ctx/books-ms" ./demo/books-ms) ||
      { rm -rf "$ctx"; fail "go build ./demo/books-ms failed"; }
  else
    rm -rf "$ctx"
    fail "image $BOOKS_MS_IMAGE is missing and there is neither $BOOKS_MS_BIN nor go to build it (scripts/lab-setup.sh builds the binary)"
  fi
  cp "$repo/demo/books-ms/Dockerfile" "$ctx/Dockerfile"
  say "building image $BOOKS_MS_IMAGE FROM scratch"
  if ! timeout 300 docker build -q -t "$BOOKS_MS_IMAGE" "$ctx" >/dev/null; then
    rm -rf "$ctx"
    fail "docker build of $BOOKS_MS_IMAGE failed"
  fi
  rm -rf "$ctx"
}

# running: how many instances of the app service run now.
running() {
  local n=0 id
  for id in $(compose ps -q app); do
    if [ "$(docker inspect -f '{{.State.Running}}' "$id" 2>/dev/null)" = true ]; then
      n=$((n + 1))
    fi
  done
  echo "$n"
}

# passing: how many instances of SERVICE_NAME pass their checks in Consul.
passing() {
  local body
  body="$(curl -fsS --max-time 5 "$consul/v1/health/service/$SERVICE_NAME?passing" 2>/dev/null)" || body=""
  # One entry per instance, each with a "Service" object (compact or indented JSON).
  grep -oE '"Service": ?[{]' <<<"$body" | wc -l || true
}

# wait_registered N: until Consul lists exactly N passing instances (when CONSUL_ADDRESS is set).
wait_registered() {
  [ -n "$consul" ] || return 0
  local want="$1" got=0 deadline=$((SECONDS + WAIT_SECONDS))
  while [ "$SECONDS" -lt "$deadline" ]; do
    got="$(passing)"
    if [ "$got" -eq "$want" ]; then
      say "Consul lists $got passing instance(s) of $SERVICE_NAME"
      return 0
    fi
    sleep 0.5
  done
  fail "Consul at $consul lists $got passing instance(s) of $SERVICE_NAME after ${WAIT_SECONDS}s, want $want"
}

deploy() {
  ensure_image
  say "${compose_cmd[*]} -p $COMPOSE_PROJECT -f $(basename "$COMPOSE_DEMO_FILE") up -d"
  compose up -d
  wait_registered "$(running)"
  if [ -n "$consul" ]; then
    say "curl $consul/v1/catalog/service/$SERVICE_NAME"
    curl -fsS --max-time 5 "$consul/v1/catalog/service/$SERVICE_NAME"
    echo
  fi
}

scale() {
  ensure_image
  say "${compose_cmd[*]} -p $COMPOSE_PROJECT -f $(basename "$COMPOSE_DEMO_FILE") up -d --no-recreate --scale app=$SCALE"
  compose up -d --no-recreate --scale "app=$SCALE"
  local n
  n="$(running)"
  [ "$n" -eq "$SCALE" ] || fail "$n instance(s) of books-ms run, want $SCALE"
  wait_registered "$SCALE"
}

reconfigure() {
  say "curl \"$PROXY/v1/docker-flow-proxy/reconfigure?serviceName=$SERVICE_NAME&servicePath=$SERVICE_PATH\""
  local out code body
  out="$(curl -sS --max-time 60 -G -w '\n%{http_code}' "$PROXY/v1/docker-flow-proxy/reconfigure" \
    --data-urlencode "serviceName=$SERVICE_NAME" --data-urlencode "servicePath=$SERVICE_PATH")" ||
    fail "reconfigure: no answer from the proxy at $PROXY"
  code="${out##*$'\n'}"
  body="${out%$'\n'*}"
  echo "$body"
  if [ "$code" != 200 ] || [[ "$body" != *'"Status":"OK"'* ]]; then
    fail "reconfigure answered $code"
  fi
}

# check_proxy N: curl -I through the proxy answers 200, and N different instances answer GETs.
check_proxy() {
  local want="$1" url="$PROXY_HTTP$SERVICE_PATH" deadline=$((SECONDS + WAIT_SECONDS)) head=""
  say "curl -I $url"
  while :; do
    head="$(curl -sS -I --max-time 5 "$url" 2>&1 | tr -d '\r')" || true
    [[ "$head" =~ ^HTTP/[0-9.]+\ 200 ]] && break
    [ "$SECONDS" -lt "$deadline" ] || fail "the proxy did not answer 200 for $url within ${WAIT_SECONDS}s; last answer:
$head"
    sleep 0.5
  done
  printf '%s\n' "$head"

  local seen=" " inst
  while :; do
    inst="$(curl -sS -o /dev/null -D - --max-time 5 "$url" 2>/dev/null | tr -d '\r' | sed -n 's/^[Xx]-[Ii]nstance: //p')" || true
    if [ -n "$inst" ] && [[ "$seen" != *" $inst "* ]]; then
      seen="$seen$inst "
    fi
    [ "$(wc -w <<<"$seen")" -ge "$want" ] && break
    [ "$SECONDS" -lt "$deadline" ] || fail "within ${WAIT_SECONDS}s only$seen answered through the proxy, want $want instances"
    sleep 0.05
  done
  say "answered through the proxy by $want instance(s):$seen"
}

destroy() {
  say "curl \"$PROXY/v1/docker-flow-proxy/remove?serviceName=$SERVICE_NAME\""
  curl -sS --max-time 60 -G "$PROXY/v1/docker-flow-proxy/remove" --data-urlencode "serviceName=$SERVICE_NAME" ||
    say "the proxy at $PROXY did not answer; its route stays"
  echo
  say "${compose_cmd[*]} -p $COMPOSE_PROJECT -f $(basename "$COMPOSE_DEMO_FILE") down"
  compose down --remove-orphans -t 5
}

case "$STAGE" in
  deploy-without-proxy)
    deploy
    ;;
  deploy-with-proxy)
    deploy
    reconfigure
    check_proxy "$(running)"
    ;;
  scale-with-proxy)
    scale
    reconfigure
    check_proxy "$SCALE"
    ;;
  destroy)
    destroy
    ;;
esac
