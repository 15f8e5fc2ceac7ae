#!/usr/bin/env bash
# Builds spire-server and spire-agent (SPIRE v1.13.3) from the Go module proxy into a cache
# folder outside the repository, once. Prints the folder that holds the two binaries.
#   MESHD_CACHE   cache root (default: ~/.cache/meshd)
set -euo pipefail
version=v1.13.3
cache="${MESHD_CACHE:-$HOME/.cache/meshd}"
bin="$cache/spire-$version/bin"
if [ -x "$bin/spire-server" ] && [ -x "$bin/spire-agent" ]; then
  echo "$bin"
  exit 0
fi
command -v go >/dev/null || { echo "spire/install.sh: go is required to build SPIRE" >&2; exit 1; }
mkdir -p "$bin"
scratch="$cache/spire-$version/mod"
mkdir -p "$scratch"
cd "$scratch"
[ -f go.mod ] || go mod init meshd.local/spire-build >/dev/null 2>&1
export CGO_ENABLED=1 GOFLAGS=-mod=mod
echo "spire/install.sh: building SPIRE $version into $bin (first time only, several minutes)" >&2
go get -tool "github.com/spiffe/spire/cmd/spire-server@$version" >&2
go get -tool "github.com/spiffe/spire/cmd/spire-agent@$version" >&2
GOBIN="$bin" go install github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent >&2
"$bin/spire-server" --version >&2 2>&1 || true
echo "$bin"
