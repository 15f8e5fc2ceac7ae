# JSON clients through an edge gateway: sourced by run.sh after grpc.sh (it uses grpc.sh's
# contact app, $P_APP, and run.sh's helpers: start, meshd_start, alive, wait_http, fill,
# h2load_ok, ticks, record, die, say).
#
# Backend: the demo payment app (CreatePayment asks the contact, family and document apps,
# directly over h2c) behind one meshd inbound (protocol: grpc, policy allowing the client
# ID). Chains, the same call through each gateway:
#   meshd  h2load (HTTPS h2, JSON POST) -> meshd gateway (`gateway.transcoding` compiled from
#          proto/payment.proto; mTLS gRPC with the client SVID) -> meshd inbound -> payment
#   envoy  h2load -> Envoy 1.40 grpc_json_transcoder (a descriptor set of the same proto,
#          --concurrency 1) -> the same meshd inbound -> payment
# Both gateways: CreatePayment with the design's JSON body (meshd at the design's URL
# /payment.v1.PaymentService/CreatePayment, Envoy at the method's REST binding /v1/payments),
# answers in JSON with lowerCamelCase names. Figures: saturated req/s, and CPU s per 10k
# requests of the gateway process alone; every request must be a 2xx.

# Envoy needs a descriptor set (protoc --include_imports); there is no protoc here, so
# grpcio-tools' bundled one compiles it (with its copy of google/protobuf/*.proto).
grpc_tools_protos() { python3 -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))' 2>/dev/null; }
if ! gt_protos=$(grpc_tools_protos); then
  say "installing grpcio-tools (pip install grpcio-tools: protoc for Envoy's descriptor set)"
  python3 -m pip install -q grpcio-tools >&2 || die "grpcio-tools is missing and pip install grpcio-tools failed (Envoy's transcoder needs protoc)"
  gt_protos=$(grpc_tools_protos) || die "grpcio-tools installed but python3 cannot import grpc_tools"
fi
python3 -m grpc_tools.protoc -I "$repo/proto" -I "$gt_protos" --include_imports \
  --descriptor_set_out="$work/payment_api.pb" payment.proto >"$work/protoc.log" 2>&1 ||
  { cat "$work/protoc.log" >&2; die "grpc_tools.protoc could not compile proto/payment.proto"; }

read -r P_JI P_JI_ADMIN P_JM P_JM_ADMIN P_JE P_JE_ADMIN < <(free_ports 6)
if [ "$smoke" = 1 ]; then
  json_n=200 json_c=4 json_m=4 json_warm=50
else
  json_n=20000 json_c=16 json_m=8 json_warm=2000
fi

# Not in $(...): start must record the PID in this shell. The port lands in $demo_port.
demo_app() { # name service [args...]: the app binds a port of its own and prints it
  local name=$1 service=$2 i; shift 2
  start "$name" "$work/$name.log" "$MESHD_BIN" demo-app --service "$service" --listen "127.0.0.1:0" "$@"
  for i in $(seq 100); do grep -q "demo-app ready" "$work/$name.log" && break; alive "$name"; sleep 0.1; done
  demo_port=$(sed -n 's/.*demo-app ready 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/$name.log" | head -n 1)
  [ -n "$demo_port" ] || die "demo $service app did not start or printed no port (log: $work/$name.log)"
}
demo_app family family
P_FAMILY=$demo_port
demo_app document document
P_DOCUMENT=$demo_port
demo_app payment payment --contact "http://127.0.0.1:$P_APP" \
  --family "http://127.0.0.1:$P_FAMILY" --document "http://127.0.0.1:$P_DOCUMENT"
P_PAYMENT=$demo_port

meshd_inbound_yaml "$work/meshd-jin.yaml" "$P_JI" grpc "$P_PAYMENT" "$P_JI_ADMIN"
cat >"$work/meshd-jgw.yaml" <<EOF
service: bench-gateway
identity:
  files: {cert: $work/client/svid.pem, key: $work/client/key.pem, bundle: $work/client/bundle.pem}
  expect: $CLIENT_ID
outbound:
  - name: payment
    protocol: grpc
    endpoints: ["127.0.0.1:$P_JI"]
    server_id: $SERVER_ID
    timeout: 5s
gateway:
  listen: 127.0.0.1:$P_JM
  tls: {cert: $work/server/svid.pem, key: $work/server/key.pem}
  routes:
    - name: payments
      prefix: /payment.v1.PaymentService/
      upstream: payment
      auth: none
  transcoding:
    protos: [$repo/proto/payment.proto]
    services: [payment.v1.PaymentService]
admin:
  listen: 127.0.0.1:$P_JM_ADMIN
runtime:
  worker_threads: 1
log:
  access: off
EOF
meshd_start meshd_jin "$work/meshd-jin.yaml"
meshd_start meshd_jgw "$work/meshd-jgw.yaml"
fill "$here/envoy-json-gateway.yaml" "$work/envoy-jgw.yaml" ADMIN_PORT="$P_JE_ADMIN" \
  LISTEN_PORT="$P_JE" UPSTREAM_PORT="$P_JI" SERVER_ID="$SERVER_ID" DESCRIPTOR="$work/payment_api.pb" \
  CERT="$work/server/svid.pem" KEY="$work/server/key.pem" \
  CERT_OUT="$work/client/svid.pem" KEY_OUT="$work/client/key.pem" BUNDLE="$work/client/bundle.pem"
start envoy_jgw "$work/envoy_jgw.log" "$ENVOY_BIN" -c "$work/envoy-jgw.yaml" "${envoy_args[@]}"
for name in meshd_jin:$P_JI_ADMIN meshd_jgw:$P_JM_ADMIN envoy_jgw:$P_JE_ADMIN; do
  wait_http "${name%%:*}" "http://127.0.0.1:${name#*:}/ready"
done
say "up (json): payment :$P_PAYMENT behind meshd inbound :$P_JI; gateways meshd :$P_JM, envoy :$P_JE"

# The same call, CreatePayment with the same JSON body, at the path each gateway maps:
# meshd transcodes the gRPC path itself, the design's URL; Envoy maps a method that has a
# google.api.http option only by that option (its auto_mapping skips such methods), here
# `post: "/v1/payments" body: "*"`, and routes on the gRPC path it rewrote.
declare -A json_port=([meshd]=$P_JM [envoy]=$P_JE) json_gw=([meshd]=meshd_jgw [envoy]=envoy_jgw)
declare -A json_path=([meshd]=/payment.v1.PaymentService/CreatePayment [envoy]=/v1/payments)
printf '%s' '{"amount": 2999, "currency": "usd", "payment_method": "credit_card", "customer_id": "user_123"}' \
  >"$work/json-body.json"

# Correctness: the design's call answers 200 with the payment in JSON through each gateway.
for s in meshd envoy; do
  json_got=$(curl -s -k --http2 -m 10 -X POST -H 'content-type: application/json' --data-binary "@$work/json-body.json" \
    -w '\n%{http_code} %{content_type}' "https://127.0.0.1:${json_port[$s]}${json_path[$s]}" || true)
  json_status=${json_got##*$'\n'} json_answer=${json_got%$'\n'*}
  case $json_status in
    "200 application/json"*) ;;
    *) tail -5 "$work/${json_gw[$s]}.log" >&2; die "check: JSON CreatePayment via $s gateway: got '$json_status', want 200 application/json: $json_answer (log: $work/${json_gw[$s]}.log)" ;;
  esac
  for want in '"customerId":"user_123"' '"amountCents":"2999"' '"paymentMethod":"credit_card"' '"currency":"usd"'; do
    case $json_answer in *"$want"*) ;; *) die "check: JSON CreatePayment via $s gateway: no $want in $json_answer" ;; esac
  done
  say "check: JSON CreatePayment via $s gateway: 200 (ok) ${json_answer:0:120}..."
done

json_run() { # scenario rep
  local s=$1 rep=$2 f gw t0 url
  gw="pid_${json_gw[$s]}"
  url="https://127.0.0.1:${json_port[$s]}${json_path[$s]}"
  alive payment
  alive meshd_jin
  alive "${json_gw[$s]}"
  "${on_load_cpus[@]}" h2load -n "$json_warm" -c 4 -m 4 -d "$work/json-body.json" -H 'content-type: application/json' \
    "$url" >"$work/jwarm-$s-$rep.txt" 2>&1 || die "h2load JSON warm-up via $s gateway failed"
  h2load_ok "$work/jwarm-$s-$rep.txt" "$json_warm"
  f=$work/jsat-$s-$rep.txt
  t0=$(ticks "${!gw}")
  "${on_load_cpus[@]}" h2load -n "$json_n" -c "$json_c" -m "$json_m" -d "$work/json-body.json" \
    -H 'content-type: application/json' "$url" >"$f" 2>&1 || die "h2load JSON via $s gateway failed"
  h2load_ok "$f" "$json_n"
  record "$s" "$rep" json_rps "$(awk '/^finished in/ {print $4}' "$f")"
  record "$s" "$rep" json_cpu10k "$(awk -v d=$(($(ticks "${!gw}") - t0)) -v hz="$hz" -v n="$json_n" \
    'BEGIN {printf "%.4f", d / hz / n * 10000}')"
  say "rep $rep $s json: $(awk '/^finished in/ {print $4, "req/s"}' "$f")"
}

json_order=(meshd envoy)
for rep in $(seq "$reps"); do
  for i in 0 1; do json_run "${json_order[$(((i + rep - 1) % 2))]}" "$rep"; done
done
