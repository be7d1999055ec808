#!/usr/bin/env bash
# Runs every test: installs what is missing (HAProxy, Consul, Docker, docker-compose), starts the
# Docker engine if none runs, then the unit and integration tests with the race detector against
# the real programs, then the demo's own check.
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(scripts/setup.sh --print-env)"
export DFP_HAPROXY_BIN DFP_CONSUL_BIN DFP_DOCKER_COMPOSE_BIN

# The Docker engine of the integration tests: started here when none answers, and then stopped at
# the end, whatever the outcome; one that was already running is left alone.
trap 'scripts/docker.sh stop || true' EXIT
trap 'exit 130' INT TERM
scripts/docker.sh start

echo "== gofmt"
unformatted="$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))"
if [ -n "$unformatted" ]; then echo "gofmt would change: $unformatted"; exit 1; fi
echo "== go vet"
go vet ./...
echo "== go test -race"
# One package at a time: the integration tests measure delays, and two cores shared by every
# package at once make them flaky.
go test -race -count=1 -p 1 -timeout 40m ./...
echo "== fuzz: any reconfigure query is refused or renders a config that passes haproxy -c (20 s)"
go test -run '^$' -fuzz FuzzReconfigureQuery -fuzztime 20s ./haproxy/
echo "== go test: the registrar follows a restarted Docker engine"
# Alone, after the others: it restarts the engine, which only a daemon started by this script allows.
if scripts/docker.sh started; then
  DFP_DOCKERD_RESTART=1 go test -race -count=1 -timeout 10m -run TestRegistrarFollowsARestartedEngine ./e2e/
elif [ "${CI:-}" = "true" ]; then
  echo "the Docker engine was not started by scripts/docker.sh, so it cannot be restarted for this test"; exit 1
else
  echo "skipped: the Docker engine was not started by scripts/docker.sh, which restarts only its own"
fi
echo "== demo check"
DEMO_CONSUL_PORT="${DEMO_CONSUL_PORT:-18500}" DEMO_HTTP_PORT="${DEMO_HTTP_PORT:-18000}" \
DEMO_API_PORT="${DEMO_API_PORT:-18080}" DEMO_BACKEND_PORTS="${DEMO_BACKEND_PORTS:-19001 19002}" \
  scripts/demo.sh --check
