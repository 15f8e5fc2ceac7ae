#!/usr/bin/env bash
# Per-request cost of the meshd pair, for comparing builds on a busy machine.
#
#   benches/e2e/cost.sh [--n N] [--reps R] [--unloaded] [--mallocs] [--record SECONDS]
#                       [--instructions] [--handshakes]
#
# Sets up the `meshd` chain of run.sh only (nginx h2c backend, meshd outbound -> meshd
# inbound, same certificates, policy and settings) and runs `h2load -n N -c 16 -m 8`
# R times (default 100000 x 3). For each run and sidecar it prints the CPU time per
# request (perf stat task-clock on the PID, i.e. CPU actually used, not wall clock, so it
# changes far less with outside load than req/s does) and, with --mallocs, the number of
# glibc malloc/realloc calls per request (uprobes; needs `perf probe`, root, and a build
# using the system allocator). --record S also samples both sidecars for S seconds under
# load with `perf record -F 999 -g` (perf.data files kept in the work folder; PERF_RECORD_ARGS
# replaces `-F 999 -g`, e.g. "-F 999 --call-graph dwarf,16384" (no frame pointers here) or
# "-e probe_libc:malloc -c 7 --call-graph dwarf" with --mallocs for who allocates).
# --unloaded runs `h2load -c 1 -m 1` instead (default N 20000), takes the CPU from /proc
# (perf stat's context-switch hooks would add to the latency) and adds to each row the p50
# and p99 of the chain and of nginx alone; --record then profiles that load.
# --instructions runs both sidecars under valgrind's callgrind and prints the instructions
# each executed per request (default N 10000; with --unloaded too): slow, but the same
# build gives the same count to within 1 % however busy the machine is, so two builds can
# be compared where CPU time moves by 15 %. The callgrind files stay in the work folder
# (callgrind_annotate FILE shows where the instructions go). Needs valgrind.
# --handshakes measures full mTLS handshakes instead of requests: a tcp-mode inbound (as in
# tcp.sh) forwarding to nginx, `openssl s_time -new` for 5 s per repetition (10 s with
# --instructions), and the inbound's CPU ms (or, with --instructions, instructions) per
# handshake; with --record S, the inbound is sampled for S seconds of the first repetition
# (perf-hs.data in the work folder).
#
# Environment: MESHD_BIN (default $CARGO_TARGET_DIR/release/meshd). Needs nginx, h2load,
# perf (apt-get install linux-perf), openssl, curl, python3.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
say() { printf 'cost: %s\n' "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }

n= reps=3 mallocs=0 record=0 unloaded=0 instr=0 handshakes=0
while [ $# -gt 0 ]; do
  case $1 in
    --n) n=$2; shift ;;
    --unloaded) unloaded=1 ;;
    --reps) reps=$2; shift ;;
    --mallocs) mallocs=1 ;;
    --instructions) instr=1 ;;
    --handshakes) handshakes=1 ;;
    --record) record=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
[ "$unloaded$mallocs" = 11 ] && die "--mallocs counts with perf stat, which --unloaded leaves out"
[ "$instr" = 1 ] && [ "$mallocs$record" != 00 ] && die "--instructions runs under valgrind: no --mallocs or --record with it"
[ "$handshakes" = 1 ] && [ "$unloaded$mallocs" != 00 ] && die "--handshakes goes alone, with --instructions or with --record"
[ "$instr" = 1 ] && n=${n:-10000}
if [ "$unloaded" = 1 ]; then conc=(-c 1 -m 1) n=${n:-20000}; else conc=(-c 16 -m 8) n=${n:-100000}; fi
tools=(nginx h2load perf openssl curl python3)
[ "$instr" = 1 ] && tools+=(valgrind callgrind_control)
[ "$handshakes" = 1 ] && tools+=(openssl)
for t in "${tools[@]}"; do
  command -v "$t" >/dev/null 2>&1 || [ -x "/usr/sbin/$t" ] || die "$t is missing"
done
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
MESHD_BIN=${MESHD_BIN:-${CARGO_TARGET_DIR:-$repo/target}/release/meshd}
[ -x "$MESHD_BIN" ] || die "meshd binary missing: $MESHD_BIN"

work=$(mktemp -d "${TMPDIR:-/tmp}/meshd-cost.XXXXXX")
pids=()
cleanup() {
  local rc=$? pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ "$mallocs" = 0 ] || perf probe -q -d 'probe_libc:malloc' -d 'probe_libc:realloc' 2>/dev/null || true
  [ "$record$instr" = 00 ] && [ "$rc" = 0 ] && rm -rf "$work" || say "work folder kept: $work"
  exit "$rc"
}
trap cleanup EXIT
wait_http() { # url [curl args...]
  local url=$1 i; shift
  for i in $(seq 200); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' -m 2 "$@" "$url" || true)" = 200 ] && return 0
    sleep 0.1
  done
  die "not ready: $url"
}
# shellcheck source=benches/e2e/lib.sh
. "$here/lib.sh"
read -r P_BACKEND P_MO P_MO_ADMIN P_MI P_MI_ADMIN P_HS P_HS_ADMIN < <(free_ports 7)

# Certificates, backend and sidecars as in run.sh.
make_certs client="$CLIENT_ID" server="$SERVER_ID"
write_nginx_conf "$P_BACKEND"
start_logged nginx "$nginx_bin" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log"
wait_http "http://127.0.0.1:$P_BACKEND/" --http2-prior-knowledge

# With --instructions: counters zeroed before each run and dumped after it; each dump is
# a new file.
dump() { # side pid -> instructions since the last zeroing
  local before i
  before=$(ls "$work"/callgrind."$1".* 2>/dev/null | wc -l)
  callgrind_control -d "$2" >/dev/null 2>&1
  for i in $(seq 100); do
    [ "$(ls "$work"/callgrind."$1".* 2>/dev/null | wc -l)" -gt "$before" ] && break
    sleep 0.1
  done
  awk '/^totals:/ {print $2}' "$(ls -t "$work"/callgrind."$1".* | head -1)"
}

write_policy
if [ "$handshakes" = 1 ]; then
  # Full mTLS handshakes against a tcp-mode inbound that forwards to nginx (tcp.sh's setup).
  meshd_inbound_yaml "$work/hs.yaml" "$P_HS" tcp "$P_BACKEND" "$P_HS_ADMIN"
  under=()
  [ "$instr" = 1 ] && under=(valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.hs")
  start_logged meshd_hs "${under[@]}" "$MESHD_BIN" run --config "$work/hs.yaml"
  wait_http "http://127.0.0.1:$P_HS_ADMIN/ready"
  secs=5
  [ "$instr" = 1 ] && secs=10
  s_time() { # seconds -> the number of handshakes done
    openssl s_time -connect "127.0.0.1:$P_HS" -new -time "$1" -cert "$work/client/svid.pem" \
      -key "$work/client/key.pem" -CAfile "$work/client/bundle.pem" >"$work/s_time.txt" 2>&1 ||
      { cat "$work/s_time.txt" >&2; die "openssl s_time failed"; }
    awk '/connections in [0-9.]+ real seconds/ {n = $1} END {print n + 0}' "$work/s_time.txt"
  }
  s_time 2 >/dev/null # warm-up
  say "meshd $("$MESHD_BIN" --version 2>/dev/null || echo "$MESHD_BIN"), load $(cut -d' ' -f1-3 /proc/loadavg)"
  hz=$(getconf CLK_TCK)
  ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
  if [ "$instr" = 1 ]; then printf 'rep\thandshakes\tinstructions/handshake\n'; else printf 'rep\thandshakes\tcpu_ms/handshake\n'; fi
  for rep in $(seq "$reps"); do
    if [ "$instr" = 1 ]; then
      callgrind_control -z "$pid_meshd_hs" >/dev/null 2>&1
      hs=$(s_time "$secs")
      ir=$(dump hs "$pid_meshd_hs")
      printf '%s\t%s\t%.0f\n' "$rep" "$hs" "$(awk -v v="$ir" -v n="$hs" 'BEGIN {print v / n}')"
    else
      t0=$(ticks "$pid_meshd_hs")
      if [ "$record" != 0 ] && [ "$rep" = 1 ]; then
        perf record ${PERF_RECORD_ARGS:--F 999 -g} -p "$pid_meshd_hs" -o "$work/perf-hs.data" -- sleep "$record" 2>/dev/null &
      fi
      hs=$(s_time "$secs")
      printf '%s\t%s\t%.3f\n' "$rep" "$hs" \
        "$(awk -v d="$(($(ticks "$pid_meshd_hs") - t0))" -v hz="$hz" -v n="$hs" 'BEGIN {print d / hz / n * 1000}')"
    fi
  done
  exit 0
fi
meshd_outbound_yaml "$work/out.yaml" "$P_MO" http "$P_MI" "$P_MO_ADMIN"
meshd_inbound_yaml "$work/in.yaml" "$P_MI" http "$P_BACKEND" "$P_MI_ADMIN"
under_in=() under_out=()
if [ "$instr" = 1 ]; then
  under_in=(valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.in")
  under_out=(valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out")
fi
start_logged meshd_in "${under_in[@]}" "$MESHD_BIN" run --config "$work/in.yaml"
start_logged meshd_out "${under_out[@]}" "$MESHD_BIN" run --config "$work/out.yaml"
wait_http "http://127.0.0.1:$P_MI_ADMIN/ready"
wait_http "http://127.0.0.1:$P_MO_ADMIN/ready"
url=http://127.0.0.1:$P_MO/
rss_mb() { awk '/^VmRSS:/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
say "RSS idle MB: outbound $(rss_mb "$pid_meshd_out"), inbound $(rss_mb "$pid_meshd_in")"
h2load -n 5000 -c 16 -m 8 "$url" >"$work/warm.txt" 2>&1 || die "warm-up failed"
grep -q "status codes: 5000 2xx" "$work/warm.txt" || { cat "$work/warm.txt" >&2; die "warm-up not all 2xx"; }

events=task-clock
if [ "$mallocs" = 1 ]; then
  libc=$(ldd "$MESHD_BIN" | awk '/libc\.so/ {print $3}')
  for f in malloc realloc; do
    perf probe -q -x "$libc" "$f" 2>/dev/null || true
  done
  events=$events,probe_libc:malloc,probe_libc:realloc
fi

say "meshd $("$MESHD_BIN" --version 2>/dev/null || echo "$MESHD_BIN"), load $(cut -d' ' -f1-3 /proc/loadavg)"
per() { awk -v v="$1" -v n="$n" -v k="$2" 'BEGIN {printf "%.2f", v * k / n}'; }
if [ "$instr" = 1 ]; then
  printf 'rep\treq/s\tout_instructions/req\tin_instructions/req\n'
  for rep in $(seq "$reps"); do
    callgrind_control -z "$pid_meshd_out" >/dev/null 2>&1
    callgrind_control -z "$pid_meshd_in" >/dev/null 2>&1
    h2load -n "$n" "${conc[@]}" "$url" >"$work/sat-$rep.txt" 2>&1 || die "h2load failed"
    grep -q "status codes: $n 2xx" "$work/sat-$rep.txt" || { cat "$work/sat-$rep.txt" >&2; die "not all 2xx"; }
    out_ir=$(dump out "$pid_meshd_out") in_ir=$(dump in "$pid_meshd_in")
    printf '%s\t%s\t%.0f\t%.0f\n' "$rep" "$(awk '/^finished in/ {print $4}' "$work/sat-$rep.txt")" \
      "$(per "$out_ir" 1)" "$(per "$in_ir" 1)"
  done
  exit 0
fi
printf 'rep\treq/s\tout_cpu_us/req\tin_cpu_us/req'
[ "$mallocs" = 1 ] && printf '\tout_allocs/req\tin_allocs/req'
printf '\tout_rss_mb\tin_rss_mb'
[ "$unloaded" = 1 ] && printf '\tp50_us\tp99_us\tdirect_p50_us\tdirect_p99_us'
printf '\n'
hz=$(getconf CLK_TCK)
cpu_ms() { awk -v hz="$hz" '{printf "%.1f", ($14 + $15) * 1000 / hz}' "/proc/$1/stat"; }
val() { awk -F, -v e="$2" '$3 == e {print $1}' "$1"; }
for rep in $(seq "$reps"); do
  lat=()
  if [ "$unloaded" = 1 ]; then
    # Unloaded: CPU from /proc (perf stat's context-switch hooks would add to the latency).
    lat=(--log-file "$work/lat-$rep.log")
    out0=$(cpu_ms "$pid_meshd_out") in0=$(cpu_ms "$pid_meshd_in")
  else
    perf stat -x, -e "$events" -p "$pid_meshd_out" -o "$work/out-$rep.csv" &
    ps_out=$!
    perf stat -x, -e "$events" -p "$pid_meshd_in" -o "$work/in-$rep.csv" &
    ps_in=$!
    sleep 0.5
  fi
  h2load -n "$n" "${conc[@]}" "${lat[@]}" "$url" >"$work/sat-$rep.txt" 2>&1 || die "h2load failed"
  if [ "$unloaded" = 1 ]; then
    out_ms=$(awk -v a="$out0" -v b="$(cpu_ms "$pid_meshd_out")" 'BEGIN {print b - a}')
    in_ms=$(awk -v a="$in0" -v b="$(cpu_ms "$pid_meshd_in")" 'BEGIN {print b - a}')
  else
    kill -INT "$ps_out" "$ps_in"
    wait "$ps_out" "$ps_in" || true
    out_ms=$(val "$work/out-$rep.csv" task-clock) in_ms=$(val "$work/in-$rep.csv" task-clock)
  fi
  grep -q "status codes: $n 2xx" "$work/sat-$rep.txt" || { cat "$work/sat-$rep.txt" >&2; die "not all 2xx"; }
  line="$rep\t$(awk '/^finished in/ {print $4}' "$work/sat-$rep.txt")"
  # CPU in ms: x1000 / n = µs per request
  line="$line\t$(per "$out_ms" 1000)\t$(per "$in_ms" 1000)"
  if [ "$mallocs" = 1 ]; then
    for side in out in; do
      m=$(val "$work/$side-$rep.csv" probe_libc:malloc) r=$(val "$work/$side-$rep.csv" probe_libc:realloc)
      line="$line\t$(per "$((m + r))" 1)"
    done
  fi
  line="$line\t$(rss_mb "$pid_meshd_out")\t$(rss_mb "$pid_meshd_in")"
  if [ "$unloaded" = 1 ]; then
    h2load -n "$n" -c 1 -m 1 --log-file "$work/direct-$rep.log" "http://127.0.0.1:$P_BACKEND/" >/dev/null 2>&1 ||
      die "h2load on nginx failed"
    line="$line\t$(latency_pctls "$work/lat-$rep.log")\t$(latency_pctls "$work/direct-$rep.log")"
  fi
  printf '%b\n' "$line"
done
if [ "$record" != 0 ]; then
  h2load -n 100000000 "${conc[@]}" "$url" >/dev/null 2>&1 &
  load=$!
  sleep 1
  perf record ${PERF_RECORD_ARGS:--F 999 -g} -p "$pid_meshd_out" -o "$work/perf-out.data" -- sleep "$record" 2>/dev/null &
  r1=$!
  perf record ${PERF_RECORD_ARGS:--F 999 -g} -p "$pid_meshd_in" -o "$work/perf-in.data" -- sleep "$record" 2>/dev/null &
  r2=$!
  wait "$r1" "$r2" || true
  kill "$load" 2>/dev/null || true
  wait "$load" 2>/dev/null || true
  say "profiles: $work/perf-out.data $work/perf-in.data"
fi
say "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
