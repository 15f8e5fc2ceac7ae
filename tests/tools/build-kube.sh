#!/usr/bin/env bash
# Builds etcd, kube-apiserver and kube-controller-manager (Kubernetes v1.34.2, the etcd it
# pins) from the Go module proxy into a cache folder outside the repository, once. Prints the
# folder that holds them. tests/common/kube.rs starts them on loopback; no cluster, container
# runtime, scheduler or kubelet.
#
#   tests/tools/build-kube.sh          build what is missing; prints the bin folder
#   MESHD_CACHE   cache root (default: ~/.cache/meshd)
#
# `go install pkg@version` refuses them (their go.mod files have replace directives), so each
# is built from a scratch wrapper module:
#   - etcd: a main calling go.etcd.io/etcd/server/v3/etcdmain.Main(os.Args);
#   - kube-apiserver and kube-controller-manager: one module with a main for each, calling
#     app.NewAPIServerCommand() from k8s.io/kubernetes/cmd/kube-apiserver/app and
#     app.NewControllerManagerCommand() from k8s.io/kubernetes/cmd/kube-controller-manager/app,
#     with each k8s.io/* staging module (the `=> ./staging/...` lines of k8s.io/kubernetes's
#     go.mod) replaced by its published v0.34.2.
# Only the missing binaries are built (a cache from before the controller manager builds just
# that one), in a temporary folder; each appears in the bin folder whole (one rename) or not
# at all. The first build takes 20-30 minutes on 2 busy cores (kube-apiserver is ~150 MB of
# Go); the controller manager alone, with the Go build cache warm, a few minutes.
set -euo pipefail
kube_version=v1.34.2
staging_version=v0.34.2
etcd_version=v3.6.4 # what k8s.io/kubernetes v1.34.2's go.mod requires
cache="${MESHD_CACHE:-$HOME/.cache/meshd}"
dest="$cache/kube-$kube_version"
bin="$dest/bin"
say() { echo "build-kube.sh: $*" >&2; }
die() {
  say "FAILED: $*"
  exit 1
}

k8s_cmds=(kube-apiserver kube-controller-manager)
missing_k8s=()
for c in "${k8s_cmds[@]}"; do [ -x "$bin/$c" ] || missing_k8s+=("$c"); done
need_etcd=0
[ -x "$bin/etcd" ] || need_etcd=1
if [ "$need_etcd" = 0 ] && [ "${#missing_k8s[@]}" = 0 ]; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || die "go is required to build etcd, kube-apiserver and kube-controller-manager (https://go.dev/dl)"
mkdir -p "$cache"
work=$(mktemp -d "$cache/.kube-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 GOTOOLCHAIN=local
ldflags="-s -w"
started=$(date +%s)
elapsed() { echo "$(($(date +%s) - started))s"; }

# The Go the modules need: k8s.io/kubernetes's `go` line, against the go on PATH.
say "reading k8s.io/kubernetes $kube_version's go.mod from the module proxy"
mkdir -p "$work/probe"
(cd "$work/probe" && go mod init meshd.local/probe >/dev/null 2>&1)
gomod=$(cd "$work/probe" && go mod download -json "k8s.io/kubernetes@$kube_version" |
  sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
[ -n "$gomod" ] && [ -f "$gomod" ] || die "could not download k8s.io/kubernetes@$kube_version (is the Go module proxy reachable? GOPROXY=$(go env GOPROXY))"
need_go=$(awk '$1 == "go" { print $2; exit }' "$gomod")
have_go=$(go env GOVERSION | sed 's/^go//')
if [ "$(printf '%s\n%s\n' "$need_go" "$have_go" | sort -V | head -1)" != "$need_go" ]; then
  die "k8s.io/kubernetes $kube_version needs go >= $need_go; go on PATH is $have_go"
fi
say "go $have_go (modules need >= $need_go)"

mkdir -p "$work/bin"

# etcd.
if [ "$need_etcd" = 1 ]; then
  say "building etcd $etcd_version ($(elapsed))"
  mkdir -p "$work/etcd"
  cd "$work/etcd"
  go mod init meshd.local/etcd-build >/dev/null 2>&1
  cat >main.go <<'EOF'
// etcd, built from the module proxy for meshd's API server tests.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  go get "go.etcd.io/etcd/server/v3@$etcd_version" >&2 || die "go get etcd $etcd_version"
  go mod tidy >&2 || die "go mod tidy (etcd)"
  go build -trimpath -ldflags="$ldflags" -o "$work/bin/etcd" . >&2 || die "go build etcd"
  "$work/bin/etcd" --version >&2 || die "the built etcd does not run"
fi

# kube-apiserver and kube-controller-manager: one wrapper module, a main for each missing one,
# as upstream's cmd/<name>/<name>.go.
if [ "${#missing_k8s[@]}" != 0 ]; then
  say "building ${missing_k8s[*]} $kube_version ($(elapsed); kube-apiserver is the long one, 15-25 min on 2 cores)"
  mkdir -p "$work/k8s"
  cd "$work/k8s"
  go mod init meshd.local/kube-build >/dev/null 2>&1
  go mod edit -go="$need_go"
  for c in "${missing_k8s[@]}"; do
    case $c in
    kube-apiserver) constructor=NewAPIServerCommand ;;
    kube-controller-manager) constructor=NewControllerManagerCommand ;;
    esac
    mkdir -p "cmd/$c"
    cat >"cmd/$c/main.go" <<EOF
// $c, built from the module proxy for meshd's Kubernetes tests.
package main

import (
	"os"
	_ "time/tzdata" // for CronJob time zone support

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/$c/app"
)

func main() { os.Exit(cli.Run(app.$constructor())) }
EOF
  done
  staging=$(awk '$2 == "=>" && $3 ~ /^\.\/staging\// { print $1 }' "$gomod")
  [ -n "$staging" ] || die "found no staging modules in $gomod"
  edits=(-require="k8s.io/kubernetes@$kube_version")
  for m in $staging; do edits+=(-replace="$m=$m@$staging_version"); done
  go mod edit "${edits[@]}"
  # The upstream module's GODEBUG defaults, so the servers behave as the release does.
  if grep -q '^godebug default=' "$gomod"; then
    go mod edit -godebug="$(awk '$1 == "godebug" { print $2; exit }' "$gomod")"
  fi
  say "$(echo "$staging" | wc -w) staging modules replaced by $staging_version; go mod tidy ($(elapsed))"
  go mod tidy >&2 || die "go mod tidy (${missing_k8s[*]})"
  # The version the release reports (/version, --version), as upstream's hack/lib/version.sh
  # stamps it; unstamped, it would say v0.0.0-master.
  minor=${kube_version#v1.}
  minor=${minor%%.*}
  stamp=
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    stamp+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  for c in "${missing_k8s[@]}"; do
    say "go build $c ($(elapsed))"
    go build -trimpath -ldflags="$ldflags$stamp" -o "$work/bin/$c" "./cmd/$c" >&2 || die "go build $c"
    "$work/bin/$c" --version >&2 || die "the built $c does not run"
  done
fi

# Into the cache, each binary in one rename (a half-built one never looks done); what was
# there already stays.
mkdir -p "$bin"
for f in "$work/bin"/*; do mv -f "$f" "$bin/"; done
say "done in $(elapsed): $bin"
echo "$bin"
