#!/usr/bin/env bash
# Writes link/meshd.order: the functions a meshd sidecar runs, which build.rs has the linker
# lay out first in the binary (the kernel maps code 64 KB around each page touched, so hot
# code scattered over .text made most of it resident; optimisation log, 2026-12-07).
#
#   benches/e2e/hot-order.sh [--smoke] [--out FILE]
#
# Runs three meshd sidecars under valgrind's callgrind, from exec to exit: an http-mode
# outbound -> inbound pair in front of nginx (h2c), loaded with h2load (saturated, then one
# request at a time) after a scrape of each admin /metrics, and a tcp-mode inbound given
# full mTLS handshakes with `openssl s_time -new`. What goes wrong in a sidecar's life runs
# too, as run.sh's checks make it: an outbound whose server has the wrong SPIFFE ID (the
# refused handshake, its 503 and log line), a caller the policy denies (403, the denial
# logged), a direct mTLS client of the inbound. Then 12 s idle (keepalive PINGs, timers,
# the watchers) and SIGTERM (drain and exit). Every function callgrind saw run, and that
# the binary defines, is written to FILE (default link/meshd.order), one mangled name per
# line. The names are those of the binary run: make the list with a release build
# (`cargo build --release`), the profile the order is meant for. --smoke: tiny loads, no
# idle time, and the list is written to FILE only (for tests/bench_smoke.rs).
#
# Environment: MESHD_BIN (default $CARGO_TARGET_DIR/release/meshd, built when missing).
# Needs valgrind, nginx, h2load, openssl, curl, nm (installed with apt-get when missing).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
say() { printf 'hot-order: %s\n' "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }

smoke=0 out=$repo/link/meshd.order
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) smoke=1 ;;
    --out) out=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
if [ "$smoke" = 1 ]; then sat=(-n 200 -c 2 -m 2) one=20 hs_secs=1 idle=0; else
  sat=(-n 3000 -c 4 -m 4) one=200 hs_secs=3 idle=12; fi

# shellcheck source=benches/e2e/lib.sh
. "$here/lib.sh"
need_deb valgrind valgrind
need_deb nginx nginx
need_deb h2load nghttp2-client
need_deb openssl openssl
need_deb curl curl
need_deb nm binutils
find_meshd "$repo"
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

work=$(mktemp -d "${TMPDIR:-/tmp}/meshd-hot-order.XXXXXX")
pids=()
cleanup() {
  local rc=$? pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$rc" = 0 ]; then rm -rf "$work"; else say "work folder kept: $work"; fi
  exit "$rc"
}
trap cleanup EXIT
wait_ready() { # admin-port: up to 120 s (callgrind runs a sidecar some 50x slower)
  local i
  for i in $(seq 600); do
    curl -sf -o /dev/null -m 2 "http://127.0.0.1:$1/ready" && return 0
    sleep 0.2
  done
  die "a sidecar was not ready in 120 s (logs in $work)"
}

make_certs client="$CLIENT_ID" server="$SERVER_ID" impostor="$IMPOSTOR_ID"
write_policy
read -r P_BACKEND P_MO P_MO_ADMIN P_MI P_MI_ADMIN P_HS P_HS_ADMIN P_MO_WRONG < <(free_ports 8)
write_nginx_conf "$P_BACKEND"
start_logged nginx "$nginx_bin" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log"
meshd_inbound_yaml "$work/in.yaml" "$P_MI" http "$P_BACKEND" "$P_MI_ADMIN"
meshd_outbound_yaml "$work/out.yaml" "$P_MO" http "$P_MI" "$P_MO_ADMIN" "$(wrong_id_outbound "$P_MO_WRONG" "$P_MI")"$'\n'
meshd_inbound_yaml "$work/hs.yaml" "$P_HS" tcp "$P_BACKEND" "$P_HS_ADMIN"
for side in in out hs; do
  start_logged "meshd_$side" valgrind --tool=callgrind --demangle=no --dump-instr=no --compress-strings=no \
    --compress-pos=no --callgrind-out-file="$work/callgrind.$side" "$MESHD_BIN" run --config "$work/$side.yaml"
done
wait_ready "$P_MI_ADMIN"
wait_ready "$P_MO_ADMIN"
wait_ready "$P_HS_ADMIN"
say "sidecars ready under callgrind; loading them"
for port in "$P_MI_ADMIN" "$P_MO_ADMIN" "$P_HS_ADMIN"; do
  curl -sf -o /dev/null "http://127.0.0.1:$port/metrics" || die "GET /metrics on port $port failed"
done
code() { curl -s -o /dev/null -w '%{http_code}' -m 30 "$@" || true; }
mtls() { # who: a request straight to the inbound with that SVID
  code --http2 -k --cert "$work/$1/svid.pem" --key "$work/$1/key.pem" "https://127.0.0.1:$P_MI/"
}
[ "$(code --http2-prior-knowledge "http://127.0.0.1:$P_MO/xfcc")" = 200 ] || die "no 200 through the pair"
[ "$(code --http2-prior-knowledge "http://127.0.0.1:$P_MO_WRONG/")" != 200 ] || die "the wrong server ID was not refused"
[ "$(mtls client)" = 200 ] || die "the inbound refused $CLIENT_ID"
[ "$(mtls impostor)" = 403 ] || die "the inbound did not deny $IMPOSTOR_ID"
url=http://127.0.0.1:$P_MO/
h2load "${sat[@]}" "$url" >"$work/sat.txt" 2>&1 || die "h2load failed (log: $work/sat.txt)"
grep -q "status codes: ${sat[1]} 2xx" "$work/sat.txt" || { cat "$work/sat.txt" >&2; die "not all 2xx"; }
h2load -n "$one" -c 1 -m 1 "$url" >"$work/one.txt" 2>&1 || die "h2load -c 1 failed"
openssl s_time -connect "127.0.0.1:$P_HS" -new -time "$hs_secs" -cert "$work/client/svid.pem" \
  -key "$work/client/key.pem" -CAfile "$work/client/bundle.pem" >"$work/s_time.txt" 2>&1 ||
  { cat "$work/s_time.txt" >&2; die "openssl s_time failed"; }
grep -q 'connections in' "$work/s_time.txt" || die "no handshake completed (log: $work/s_time.txt)"
[ "$idle" = 0 ] || { say "idle for ${idle}s"; sleep "$idle"; }
for side in in out hs; do
  v=pid_meshd_$side
  kill -TERM "${!v}"
  wait "${!v}" || true
done
pids=("$pid_nginx")

# Every function named in a callgrind file (fn= and cfn= lines) that the binary defines.
nm --defined-only "$MESHD_BIN" | awk '{print $3}' | sort -u >"$work/defined.txt"
[ -s "$work/defined.txt" ] || die "nm found no symbols in $MESHD_BIN (stripped?)"
grep -h -E '^c?fn=' "$work"/callgrind.* | sed -E 's/^c?fn=(\([0-9]+\) ?)?//' | grep -v '^$' |
  sort -u >"$work/run.txt"
grep -Fxf "$work/defined.txt" "$work/run.txt" >"$work/order.txt" || true
n=$(wc -l <"$work/order.txt")
[ "$n" -ge 100 ] || die "only $n functions found run by the sidecars (callgrind files in $work)"
mkdir -p "$(dirname "$out")"
mv "$work/order.txt" "$out"
say "$n functions written to $out"
