# gRPC unary latency at a fixed rate with ghz: sourced by run.sh after the HTTP scenarios
# (it uses run.sh's helpers: start, meshd_start, alive, wait_http, fill, record, die, say).
#
# Backend: the demo contact service (`meshd demo-app --service contact`, tonic). Chains:
#   direct  ghz -> contact
#   meshd   ghz -> meshd outbound (protocol: grpc) -> meshd inbound (grpc, policy) -> contact
#   envoy   ghz -> the same Envoy pair templates as the HTTP run, backend = contact
# Figures: p50 and p99 of `ghz --rps R -n N --connections 1 -c 4` on GetContact, every
# call OK (any error fails the run).

gobin=${MESHD_CACHE:-$HOME/.cache/meshd}/bin
if ! command -v ghz >/dev/null 2>&1 && [ ! -x "$gobin/ghz" ]; then
  command -v go >/dev/null 2>&1 || die "ghz is missing and go is required to build it"
  say "go install github.com/bojand/ghz/cmd/ghz@v0.120.0 (once, into $gobin)"
  mkdir -p "$gobin"
  GOBIN=$gobin go install github.com/bojand/ghz/cmd/ghz@v0.120.0 >&2 || die "go install ghz failed"
fi
ghz_bin=$(command -v ghz || echo "$gobin/ghz")

read -r P_MGO P_MGO_ADMIN P_MGI P_MGI_ADMIN P_EGO P_EGO_WRONG P_EGO_ADMIN P_EGI P_EGI_ADMIN < <(free_ports 9)
if [ "$smoke" = 1 ]; then ghz_rps=200 ghz_n=200; else ghz_rps=1000 ghz_n=20000; fi

# The app binds a port of its own choosing and prints it (`demo-app ready 127.0.0.1:P`): a
# port picked here and bound later was taken in between on a loaded machine (soak runs).
start contact "$work/contact.log" "$MESHD_BIN" demo-app --service contact --listen "127.0.0.1:0"
for i in $(seq 100); do grep -q "demo-app ready" "$work/contact.log" && break; alive contact; sleep 0.1; done
grep -q "demo-app ready" "$work/contact.log" || die "demo contact app did not start (log: $work/contact.log)"
P_APP=$(sed -n 's/.*demo-app ready 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/contact.log" | head -n 1)
[ -n "$P_APP" ] || die "demo contact app printed no port (log: $work/contact.log)"

meshd_outbound_yaml "$work/meshd-gout.yaml" "$P_MGO" grpc "$P_MGI" "$P_MGO_ADMIN"
meshd_inbound_yaml "$work/meshd-gin.yaml" "$P_MGI" grpc "$P_APP" "$P_MGI_ADMIN"
meshd_start meshd_gin "$work/meshd-gin.yaml"
meshd_start meshd_gout "$work/meshd-gout.yaml"

fill "$here/envoy-inbound.yaml" "$work/envoy-gin.yaml" ADMIN_PORT="$P_EGI_ADMIN" \
  LISTEN_PORT="$P_EGI" BACKEND_PORT="$P_APP" CLIENT_ID="$CLIENT_ID" \
  CERT="$work/server/svid.pem" KEY="$work/server/key.pem" BUNDLE="$work/server/bundle.pem"
fill "$here/envoy-outbound.yaml" "$work/envoy-gout.yaml" ADMIN_PORT="$P_EGO_ADMIN" \
  LISTEN_PORT="$P_EGO" WRONG_LISTEN_PORT="$P_EGO_WRONG" UPSTREAM_PORT="$P_EGI" \
  SERVER_ID="$SERVER_ID" WRONG_SERVER_ID="$WRONG_SERVER_ID" \
  CERT="$work/client/svid.pem" KEY="$work/client/key.pem" BUNDLE="$work/client/bundle.pem"
start envoy_gin "$work/envoy_gin.log" "$ENVOY_BIN" -c "$work/envoy-gin.yaml" "${envoy_args[@]}"
start envoy_gout "$work/envoy_gout.log" "$ENVOY_BIN" -c "$work/envoy-gout.yaml" "${envoy_args[@]}"
for name in meshd_gin:$P_MGI_ADMIN meshd_gout:$P_MGO_ADMIN envoy_gin:$P_EGI_ADMIN envoy_gout:$P_EGO_ADMIN; do
  wait_http "${name%%:*}" "http://127.0.0.1:${name#*:}/ready"
done
say "up (grpc): contact :$P_APP; meshd :$P_MGO -> :$P_MGI; envoy :$P_EGO -> :$P_EGI"

declare -A grpc_port=([direct]=$P_APP [meshd]=$P_MGO [envoy]=$P_EGO)
grpc_order=(direct meshd envoy)
ghz_run() { # scenario rep
  local s=$1 rep=$2 f
  alive contact
  f=$work/ghz-$s-$rep.json
  "${on_load_cpus[@]}" "$ghz_bin" --insecure --proto "$repo/proto/contact.proto" \
    --call contact.v1.ContactService/GetContact -d '{"contact_id": "c1"}' \
    --rps "$ghz_rps" -n "$ghz_n" -c 4 --connections 1 --format json \
    "127.0.0.1:${grpc_port[$s]}" >"$f" 2>"$f.err" || { cat "$f.err" >&2; die "ghz through $s failed"; }
  python3 - "$f" "$ghz_n" <<'EOF' || die "ghz through $s: not every call was OK ($f)"
import json, sys
r = json.load(open(sys.argv[1]))
ok = r.get("statusCodeDistribution", {}).get("OK", 0)
sys.exit(0 if ok == int(sys.argv[2]) else 1)
EOF
  local p
  for p in 50 99; do
    record "$s" "$rep" "grpc_p${p}_us" "$(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
print(next(d["latency"] for d in r["latencyDistribution"] if d["percentage"] == int(sys.argv[2])) / 1000)' "$f" "$p")"
  done
  say "rep $rep $s grpc: p50 $(awk -F'\t' -v s="$s" -v r="$rep" '$1 == s && $2 == r && $3 == "grpc_p50_us" {print $4}' "$results") µs"
}

for rep in $(seq "$reps"); do
  for i in 0 1 2; do ghz_run "${grpc_order[$(((i + rep - 1) % 3))]}" "$rep"; done
done
