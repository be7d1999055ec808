#!/usr/bin/env bash
# Installs and builds what the lab needs on a Debian machine, reusing what is there:
#   - the lab's tools from Debian's packages: ansible (with the community.docker collection),
#     ansible-lint, vagrant and debootstrap (the lab's tests make a Debian host with it)
#   - the binaries the playbooks install, built from this clone into .tmp/lab/ (static:
#     CGO_ENABLED=0): docker-flow-proxy (proxy and registrar) and books-ms (the demo service)
#   - Consul, through scripts/setup.sh (built once, cached in ~/.cache/docker-flow-proxy/)
# Usage: scripts/lab-setup.sh            tools, binaries and Consul
#        scripts/lab-setup.sh --tools    the tools only
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[lab-setup] %s\n' "$*" >&2; }
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v ansible-playbook >/dev/null 2>&1 || missing+=(ansible)
command -v ansible-lint >/dev/null 2>&1 || missing+=(ansible-lint)
command -v vagrant >/dev/null 2>&1 || missing+=(vagrant)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive timeout 600 apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive timeout 1200 apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

if [ "${1:-}" = "--tools" ]; then
  exit 0
fi

command -v go >/dev/null 2>&1 || { log "Go is required to build the lab's binaries"; exit 1; }
mkdir -p .tmp/lab
log "building .tmp/lab/docker-flow-proxy and .tmp/lab/books-ms"
CGO_ENABLED=0 go build -trimpath -o .tmp/lab/docker-flow-proxy ./cmd/docker-flow-proxy
CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o .tmp/lab/books-ms ./demo/books-ms
scripts/setup.sh
