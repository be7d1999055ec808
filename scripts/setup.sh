#!/usr/bin/env bash
# Installs what docker-flow-proxy's demo and tests need on a Debian machine, reusing what is there:
#   - HAProxy from Debian's package
#   - Consul, built from the Go module proxy at a pinned version and cached outside the clone
#   - Docker (Debian's docker.io: dockerd 20.10) and docker-compose (Debian's, the v1 tool with
#     `scale`) for the integration tests; scripts/docker.sh starts the daemon
# Prints nothing but progress; exits non-zero when something cannot be installed.
# Usage: scripts/setup.sh            (HAProxy + Consul + Docker + docker-compose)
#        scripts/setup.sh --print-env (also prints export lines for the binaries found)
set -euo pipefail

CONSUL_VERSION="${CONSUL_VERSION:-v1.22.5}"
DFP_CACHE="${DFP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/docker-flow-proxy}"
CONSUL_BIN_DEFAULT="$DFP_CACHE/consul-$CONSUL_VERSION/consul"

log() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive timeout 600 apt-get update -qq >&2
    apt_updated=1
  fi
  log "apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends "$@" >&2
}

ensure_haproxy() {
  if command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; then
    return
  fi
  apt_install haproxy
  # The package's own service is not ours: the proxy runs HAProxy as its child.
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    as_root systemctl disable --now haproxy >/dev/null 2>&1 || true
  fi
}

ensure_consul() {
  local bin="${DFP_CONSUL_BIN:-$CONSUL_BIN_DEFAULT}"
  if [ -x "$bin" ]; then
    return
  fi
  if ! command -v go >/dev/null 2>&1; then
    log "Go is required to build Consul"; exit 1
  fi
  local work
  work="$(mktemp -d)"
  log "building Consul $CONSUL_VERSION from the Go module proxy (several minutes on a cold cache)"
  (
    cd "$work"
    go mod init consulbuild >/dev/null 2>&1
    timeout 1200 go get "github.com/hashicorp/consul@$CONSUL_VERSION" >&2
    mkdir -p "$(dirname "$bin")"
    CGO_ENABLED=0 timeout 1800 go build -o "$bin.tmp" github.com/hashicorp/consul >&2
    mv "$bin.tmp" "$bin"
  )
  rm -rf "$work"
  log "Consul cached at $bin"
}

ensure_docker() {
  local pkgs=()
  if ! command -v dockerd >/dev/null 2>&1 && [ ! -x /usr/sbin/dockerd ]; then
    pkgs+=(docker.io)
  fi
  if ! command -v docker-compose >/dev/null 2>&1 && [ ! -x /usr/bin/docker-compose ]; then
    pkgs+=(docker-compose)
  fi
  if [ "${#pkgs[@]}" -eq 0 ]; then
    return
  fi
  apt_install "${pkgs[@]}"
  # The package's own service is not ours: scripts/docker.sh starts dockerd when none answers.
  # Where systemd runs, the package has started it already, and it serves the tests as it is.
}

ensure_haproxy
ensure_consul
ensure_docker
# The lab's tools (Ansible, ansible-lint, Vagrant, debootstrap), for the tests of ansible/ and the
# Vagrantfile; on stderr, so that --print-env's output stays clean.
"$(dirname "$0")/lab-setup.sh" --tools >&2

if [ "${1:-}" = "--print-env" ]; then
  haproxy_bin="$(command -v haproxy || echo /usr/sbin/haproxy)"
  echo "export DFP_HAPROXY_BIN='$haproxy_bin'"
  echo "export DFP_CONSUL_BIN='${DFP_CONSUL_BIN:-$CONSUL_BIN_DEFAULT}'"
  compose_bin="$(command -v docker-compose || echo /usr/bin/docker-compose)"
  echo "export DFP_DOCKER_COMPOSE_BIN='${DFP_DOCKER_COMPOSE_BIN:-$compose_bin}'"
fi
