# TCP bulk throughput and mTLS handshake cost: sourced by run.sh after the HTTP scenarios
# (it uses run.sh's helpers: start, meshd_start, alive, wait_http, fill, record, ticks, settled, die, say).
#
# Scenarios, alternated per repetition like the HTTP ones:
#   direct  iperf3 -c -> iperf3 -s
#   relay   iperf3 -c -> socat -> socat -> iperf3 -s (plain relays: the floor; CPU of their children)
#   meshd   iperf3 -c -> meshd outbound (protocol: tcp) -> meshd inbound (tcp, policy) -> iperf3 -s
#   envoy   the same with Envoy tcp_proxy (URI SAN checks both ways, network RBAC on the inbound)
#   stunnel the same with stunnel 5 (stunnel.sh: chains verified against the bundle, no ID check)
# Figures: Gbit/s received with one stream and with -P 4 (iperf3 -J, end.sum_received), and
# CPU seconds per GB moved per sidecar (/proc/PID/stat over the run).
# Handshakes: `openssl s_time -new` (full handshakes, client certificate sent) and `-reuse
# -tls1_2` (resumed by session ID) against a tcp-mode inbound of each proxy that forwards to nginx; CPU ms per
# handshake of that inbound, and handshakes per second; HAProxy's (haproxy.sh) and stunnel's
# handshake inbounds are measured the same way.

need_deb iperf3 iperf3
read -r P_IPERF P_MTO P_MTO_ADMIN P_MTI P_MTI_ADMIN P_MHS P_MHS_ADMIN \
  P_ETO P_ETO_ADMIN P_ETI P_ETI_ADMIN P_EHS P_EHS_ADMIN P_RTO P_RTI < <(free_ports 15)
if [ "$smoke" = 1 ]; then tcp_secs=1 hs_secs=1; else tcp_secs=5 hs_secs=5; fi

# iperf3 cannot listen on port 0 and say which port it got, so its port is picked above
# (outside the ephemeral range). Another test run on the machine can still take it first:
# then it picks another port and tries again.
for attempt in 1 2 3 4 5; do
  start iperf "$work/iperf.log" iperf3 -s -p "$P_IPERF" --bind 127.0.0.1 --forceflush
  for i in $(seq 100); do
    grep -q "Server listening" "$work/iperf.log" && break
    kill -0 "$pid_iperf" 2>/dev/null || break
    sleep 0.1
  done
  grep -q "Server listening" "$work/iperf.log" && break
  grep -q "Address already in use" "$work/iperf.log" ||
    die "iperf3 server did not start (log: $work/iperf.log)"
  wait "$pid_iperf" 2>/dev/null || true
  unset 'pids[-1]'
  say "iperf3: port $P_IPERF was taken in the meantime; trying another"
  P_IPERF=$(free_ports 1)
done
grep -q "Server listening" "$work/iperf.log" || die "iperf3 server did not start (log: $work/iperf.log)"

relay relay_tin "$P_RTI" "$P_IPERF"
relay relay_tout "$P_RTO" "$P_RTI"

iperf_json() { # file field -> end.sum_received.<field>
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["end"]["sum_received"][sys.argv[2]])' "$1" "$2"
}
# shellcheck source=benches/e2e/stunnel.sh
. "$here/stunnel.sh"

meshd_tcp_inbound() { # name listen admin forward
  meshd_inbound_yaml "$work/meshd-$1.yaml" "$2" tcp "$4" "$3"
  meshd_start "$1" "$work/meshd-$1.yaml"
}
meshd_outbound_yaml "$work/meshd-tout.yaml" "$P_MTO" tcp "$P_MTI" "$P_MTO_ADMIN"
meshd_tcp_inbound meshd_tin "$P_MTI" "$P_MTI_ADMIN" "$P_IPERF"
meshd_tcp_inbound meshd_hs "$P_MHS" "$P_MHS_ADMIN" "$P_BACKEND"
meshd_start meshd_tout "$work/meshd-tout.yaml"

envoy_tcp_inbound() { # name listen admin backend
  fill "$here/envoy-tcp-inbound.yaml" "$work/envoy-$1.yaml" ADMIN_PORT="$3" LISTEN_PORT="$2" \
    BACKEND_PORT="$4" CLIENT_ID="$CLIENT_ID" \
    CERT="$work/server/svid.pem" KEY="$work/server/key.pem" BUNDLE="$work/server/bundle.pem"
  start "$1" "$work/$1.log" "$ENVOY_BIN" -c "$work/envoy-$1.yaml" "${envoy_args[@]}"
}
envoy_tcp_inbound envoy_tin "$P_ETI" "$P_ETI_ADMIN" "$P_IPERF"
envoy_tcp_inbound envoy_hs "$P_EHS" "$P_EHS_ADMIN" "$P_BACKEND"
fill "$here/envoy-tcp-outbound.yaml" "$work/envoy-tout.yaml" ADMIN_PORT="$P_ETO_ADMIN" \
  LISTEN_PORT="$P_ETO" UPSTREAM_PORT="$P_ETI" SERVER_ID="$SERVER_ID" \
  CERT="$work/client/svid.pem" KEY="$work/client/key.pem" BUNDLE="$work/client/bundle.pem"
start envoy_tout "$work/envoy_tout.log" "$ENVOY_BIN" -c "$work/envoy-tout.yaml" "${envoy_args[@]}"

for name in meshd_tin:$P_MTI_ADMIN meshd_hs:$P_MHS_ADMIN meshd_tout:$P_MTO_ADMIN \
  envoy_tin:$P_ETI_ADMIN envoy_hs:$P_EHS_ADMIN envoy_tout:$P_ETO_ADMIN; do
  wait_http "${name%%:*}" "http://127.0.0.1:${name#*:}/ready"
done
say "up (tcp): iperf3 :$P_IPERF; meshd :$P_MTO -> :$P_MTI; envoy :$P_ETO -> :$P_ETI; handshake inbounds meshd :$P_MHS, envoy :$P_EHS"

declare -A tcp_port=([direct]=$P_IPERF [relay]=$P_RTO [meshd]=$P_MTO [envoy]=$P_ETO [stunnel]=$P_STO)
tcp_sidecars() { # scenario -> pid variable names (out, in)
  case $1 in
    meshd) echo "meshd_tout meshd_tin" ;; envoy) echo "envoy_tout envoy_tin" ;; relay) echo "relay_tout relay_tin" ;;
    stunnel) echo "stunnel_tout stunnel_tin" ;;
    *) echo "" ;;
  esac
}

tcp_run() { # scenario rep
  local s=$1 rep=$2 streams f v i names t0=() bytes side
  names=$(tcp_sidecars "$s")
  for streams in 1 4; do
    alive iperf
    i=0
    for v in $names; do alive "$v"; v="pid_$v"; settled "${!v}"; t0[i]=$(ticks "${!v}"); i=$((i + 1)); done
    f=$work/tcp-$s-P$streams-$rep.json
    "${on_load_cpus[@]}" iperf3 -c 127.0.0.1 -p "${tcp_port[$s]}" -t "$tcp_secs" -P "$streams" -J >"$f" 2>"$f.err" ||
      { cat "$f" "$f.err" >&2; die "iperf3 through $s (-P $streams) failed"; }
    bytes=$(iperf_json "$f" bytes)
    awk -v b="$bytes" 'BEGIN {exit !(b > 0)}' || die "iperf3 through $s moved no bytes"
    record "$s" "$rep" "tcp${streams}_gbps" "$(awk -v v="$(iperf_json "$f" bits_per_second)" 'BEGIN {printf "%.3f", v / 1e9}')"
    i=0
    for v in $names; do
      side=${v##*_t}
      v="pid_$v"
      settled "${!v}"
      record "$s" "$rep" "tcp${streams}_cpugb_$side" "$(awk -v d=$(($(ticks "${!v}") - t0[i])) -v hz="$hz" -v b="$bytes" \
        'BEGIN {printf "%.4f", d / hz / (b / 1e9)}')"
      i=$((i + 1))
    done
    say "rep $rep $s tcp -P $streams: $(awk -v v="$(iperf_json "$f" bits_per_second)" 'BEGIN {printf "%.2f", v / 1e9}') Gbit/s"
  done
}

hs_run() { # scenario rep   (meshd, envoy, haproxy or stunnel)
  local s=$1 rep=$2 port pidv mode t0 f n
  case $s in
    meshd) port=$P_MHS pidv=pid_meshd_hs ;; envoy) port=$P_EHS pidv=pid_envoy_hs ;;
    haproxy) port=$P_HHS pidv=pid_haproxy_hs ;; stunnel) port=$P_SHS pidv=pid_stunnel_hs ;;
  esac
  for mode in new reuse; do
    alive "${pidv#pid_}"
    t0=$(ticks "${!pidv}")
    f=$work/hs-$s-$mode-$rep.txt
    # Resumption is measured with TLS 1.2 session IDs: s_time does not wait for TLS 1.3
    # session tickets (it would count full handshakes as "resumed").
    "${on_load_cpus[@]}" openssl s_time -connect "127.0.0.1:$port" "-$mode" -time "$hs_secs" $([ "$mode" = reuse ] && echo -tls1_2) \
      -cert "$work/client/svid.pem" -key "$work/client/key.pem" -CAfile "$work/client/bundle.pem" \
      >"$f" 2>&1 || { cat "$f" >&2; die "openssl s_time -$mode against $s failed"; }
    # "N connections in T real seconds, ..." (the last such line is the run's total)
    n=$(awk '/connections in [0-9.]+ real seconds/ {n = $1} END {print n + 0}' "$f")
    [ "$n" -gt 0 ] || { cat "$f" >&2; die "no handshake completed against $s (-$mode)"; }
    record "$s" "$rep" "hs_${mode}_rate" "$(awk '/connections in [0-9.]+ real seconds/ {r = $1 / $4} END {printf "%.1f", r}' "$f")"
    record "$s" "$rep" "hs_${mode}_cpums" "$(awk -v d=$(($(ticks "${!pidv}") - t0)) -v hz="$hz" -v n="$n" \
      'BEGIN {printf "%.4f", d / hz / n * 1000}')"
    say "rep $rep $s handshakes -$mode: $n in ${hs_secs}s"
  done
}

# HAProxy is in the handshake row only, stunnel in the TCP rows and the handshake row.
tcp_order=(direct relay meshd envoy stunnel haproxy)
for rep in $(seq "$reps"); do
  for i in "${!tcp_order[@]}"; do
    s=${tcp_order[$(((i + rep - 1) % ${#tcp_order[@]}))]}
    [ "$s" = haproxy ] || tcp_run "$s" "$rep"
    case $s in meshd | envoy | haproxy | stunnel) hs_run "$s" "$rep" ;; esac
  done
done

# Record crypto alone (benches/record_crypto.rs: ring's AES-128-GCM on full 16 KiB records,
# CPU s per GB, sealed and opened): what a TLS sidecar must spend per GB on top of what a
# plain relay does, so the floor under the TCP CPU-per-GB rows (floor_verdicts).
# Smoke: a debug build moving 64 MB once (as tests/bench_smoke.rs runs the scale benches).
if [ "$smoke" = 1 ]; then rc_cargo=(env MESHD_SCALE_QUICK=1 cargo test -q); else rc_cargo=(cargo bench -q); fi
say "record crypto alone (${rc_cargo[*]} --bench record_crypto)"
(cd "$repo" && "${on_load_cpus[@]}" "${rc_cargo[@]}" --bench record_crypto) \
  >"$work/record_crypto.txt" 2>"$work/record_crypto.err" ||
  { cat "$work/record_crypto.err" >&2; die "${rc_cargo[*]} --bench record_crypto failed"; }
for op in seal open; do
  v=$(awk -v k="${op}_s_per_gb" '$1 == k {print $2}' "$work/record_crypto.txt")
  [ -n "$v" ] || { cat "$work/record_crypto.txt" >&2; die "record_crypto printed no ${op}_s_per_gb"; }
  record crypto 1 "${op}_cpugb" "$v"
  say "record crypto alone: $op $v CPU s / GB$([ "$smoke" = 1 ] && echo " (smoke: the numbers mean nothing)")"
done
