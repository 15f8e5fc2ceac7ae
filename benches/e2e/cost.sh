#!/usr/bin/env bash
# Per-request cost of the meshd pair, for comparing builds on a busy machine.
#
#   benches/e2e/cost.sh [--n N] [--reps R] [--mallocs] [--record SECONDS]
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
#
# Environment: MESHD_BIN (default $CARGO_TARGET_DIR/release/meshd). Needs nginx, h2load,
# perf (apt-get install linux-perf), openssl, curl, python3.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
say() { printf 'cost: %s\n' "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }

n=100000 reps=3 mallocs=0 record=0
while [ $# -gt 0 ]; do
  case $1 in
    --n) n=$2; shift ;;
    --reps) reps=$2; shift ;;
    --mallocs) mallocs=1 ;;
    --record) record=$2; shift ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
for t in nginx h2load perf openssl curl python3; do
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
  [ "$record" = 0 ] && [ "$rc" = 0 ] && rm -rf "$work" || say "work folder kept: $work"
  exit "$rc"
}
trap cleanup EXIT
start() { # name command...
  local name=$1; shift
  "$@" >"$work/$name.log" 2>&1 &
  pids+=("$!")
  eval "pid_$name=$!"
}
wait_http() { # url [curl args...]
  local url=$1 i; shift
  for i in $(seq 200); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' -m 2 "$@" "$url" || true)" = 200 ] && return 0
    sleep 0.1
  done
  die "not ready: $url"
}
read -r P_BACKEND P_MO P_MO_ADMIN P_MI P_MI_ADMIN < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(5)]
for s in ss: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))')

# Certificates as in run.sh: one EC P-256 CA, one SVID per side.
gen_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
gen_key "$work/ca.key"
openssl req -x509 -new -key "$work/ca.key" -sha256 -days 2 -subj "/O=meshd bench/CN=bench CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -addext "subjectAltName=URI:spiffe://jia.app" -out "$work/bundle.pem" 2>/dev/null
CLIENT_ID=spiffe://jia.app/bench-client SERVER_ID=spiffe://jia.app/bench-server
for side in client server; do
  d=$work/$side
  mkdir -p "$d"
  gen_key "$d/key.pem"
  openssl req -new -key "$d/key.pem" -subj "/O=meshd bench" -out "$d/csr.pem" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=URI:spiffe://jia.app/bench-$side" >"$d/ext.cnf"
  openssl x509 -req -in "$d/csr.pem" -CA "$work/bundle.pem" -CAkey "$work/ca.key" -CAcreateserial \
    -days 1 -sha256 -extfile "$d/ext.cnf" -out "$d/svid.pem" 2>/dev/null
  cp "$work/bundle.pem" "$d/bundle.pem" # beside the SVID: meshd watches these folders
done

mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 3600s;
  http2_max_concurrent_streams 1024;
  server {
    listen 127.0.0.1:$P_BACKEND http2;
    location / { return 200 "ok\n"; }
  }
}
EOF
start nginx "$nginx_bin" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log"
wait_http "http://127.0.0.1:$P_BACKEND/" --http2-prior-knowledge

# In a folder of its own: meshd watches the policy's folder, and the logs, h2load outputs
# (and perf.data) written into $work would wake that watcher during the measurements.
mkdir -p "$work/policy"
cat >"$work/policy/policy.yaml" <<EOF
service: bench-server
default: deny
rules:
  - name: bench-client
    from: ["$CLIENT_ID"]
EOF
cat >"$work/out.yaml" <<EOF
service: bench-client
identity:
  files: {cert: $work/client/svid.pem, key: $work/client/key.pem, bundle: $work/client/bundle.pem}
  expect: $CLIENT_ID
outbound:
  - name: bench-server
    listen: 127.0.0.1:$P_MO
    protocol: http
    endpoints: ["127.0.0.1:$P_MI"]
    server_id: $SERVER_ID
    timeout: 5s
admin:
  listen: 127.0.0.1:$P_MO_ADMIN
runtime:
  worker_threads: 1
log:
  access: off
EOF
cat >"$work/in.yaml" <<EOF
service: bench-server
identity:
  files: {cert: $work/server/svid.pem, key: $work/server/key.pem, bundle: $work/server/bundle.pem}
  expect: $SERVER_ID
inbound:
  listen: 127.0.0.1:$P_MI
  forward: 127.0.0.1:$P_BACKEND
  protocol: http
  policy: $work/policy/policy.yaml
admin:
  listen: 127.0.0.1:$P_MI_ADMIN
runtime:
  worker_threads: 1
log:
  access: off
EOF
start meshd_in "$MESHD_BIN" run --config "$work/in.yaml"
start meshd_out "$MESHD_BIN" run --config "$work/out.yaml"
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
printf 'rep\treq/s\tout_cpu_us/req\tin_cpu_us/req'
[ "$mallocs" = 1 ] && printf '\tout_allocs/req\tin_allocs/req'
printf '\tout_rss_mb\tin_rss_mb\n'
for rep in $(seq "$reps"); do
  perf stat -x, -e "$events" -p "$pid_meshd_out" -o "$work/out-$rep.csv" &
  ps_out=$!
  perf stat -x, -e "$events" -p "$pid_meshd_in" -o "$work/in-$rep.csv" &
  ps_in=$!
  sleep 0.5
  h2load -n "$n" -c 16 -m 8 "$url" >"$work/sat-$rep.txt" 2>&1 || die "h2load failed"
  kill -INT "$ps_out" "$ps_in"
  wait "$ps_out" "$ps_in" || true
  grep -q "status codes: $n 2xx" "$work/sat-$rep.txt" || { cat "$work/sat-$rep.txt" >&2; die "not all 2xx"; }
  val() { awk -F, -v e="$2" '$3 == e {print $1}' "$1"; }
  per() { awk -v v="$1" -v n="$n" -v k="$2" 'BEGIN {printf "%.2f", v * k / n}'; }
  line="$rep\t$(awk '/^finished in/ {print $4}' "$work/sat-$rep.txt")"
  # task-clock is in ms: x1000 / n = µs per request
  line="$line\t$(per "$(val "$work/out-$rep.csv" task-clock)" 1000)\t$(per "$(val "$work/in-$rep.csv" task-clock)" 1000)"
  if [ "$mallocs" = 1 ]; then
    for side in out in; do
      m=$(val "$work/$side-$rep.csv" probe_libc:malloc) r=$(val "$work/$side-$rep.csv" probe_libc:realloc)
      line="$line\t$(per "$((m + r))" 1)"
    done
  fi
  printf '%b\t%s\t%s\n' "$line" "$(rss_mb "$pid_meshd_out")" "$(rss_mb "$pid_meshd_in")"
done
if [ "$record" != 0 ]; then
  h2load -n 100000000 -c 16 -m 8 "$url" >/dev/null 2>&1 &
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
