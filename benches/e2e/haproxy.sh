# HAProxy 2.6 (Debian) as a peer: sourced by run.sh after the meshd and Envoy checks (it
# uses run.sh's helpers: start, alive, wait_http, fill, check, refused, why, code, h2c, mtls,
# body, die, say, and lib.sh's).
#
#   haproxy  h2load -> haproxy outbound (h2c in, `mode http`, mTLS HTTP/2 out with the
#                      client SVID, the server's chain verified against the bundle)
#                   -> haproxy inbound (mTLS HTTP/2 in, client certificate required and
#                      verified against the bundle, the client ID's URI general name wanted
#                      in its DER, XFCC set) -> nginx (h2c)
#   haproxy_hs      a tcp-mode inbound with the same checks in front of nginx, for the
#                   handshake row (tcp.sh)
# One process per sidecar, `nbthread 1` (Envoy runs with --concurrency 1), no logs, run in
# the foreground (-db) so that the measured PID is the proxy. HAProxy 2.6 cannot read a
# URI SAN: what each side checks instead is written at the top of its config template.

read -r P_HO P_HO_WRONG P_HO_ADMIN P_HI P_HI_ADMIN P_HHS P_HHS_ADMIN < <(free_ports 7)
haproxy_bin=$(command -v haproxy || echo /usr/sbin/haproxy)
[ -x "$haproxy_bin" ] || die "haproxy is missing (apt-get install haproxy)"
haproxy_version=$("$haproxy_bin" -v | awk 'NR == 1 {print $3}')

# HAProxy wants the certificate and its key in one file; they go into a folder of their own
# (meshd watches the client and server folders).
mkdir -p "$work/haproxy"
for side in client server; do
  cat "$work/$side/svid.pem" "$work/$side/key.pem" >"$work/haproxy/$side.pem"
done
make_other_ca
client_uri_der=$(uri_san_der_hex "$CLIENT_ID")

haproxy_start() { # name template out KEY=VALUE...: `haproxy -c` must accept the config, then run it
  local name=$1 cfg=$work/$1.cfg
  fill "$2" "$cfg" "${@:3}"
  "$haproxy_bin" -c -q -f "$cfg" >"$work/check-$name.log" 2>&1 ||
    { cat "$work/check-$name.log" >&2; die "haproxy -c rejected $cfg"; }
  start "$name" "$work/$name.log" "$haproxy_bin" -db -f "$cfg"
}
haproxy_start haproxy_in "$here/haproxy-inbound.cfg" LISTEN_PORT="$P_HI" ADMIN_PORT="$P_HI_ADMIN" \
  BACKEND_PORT="$P_BACKEND" CERT_KEY="$work/haproxy/server.pem" BUNDLE="$work/server/bundle.pem" \
  CLIENT_URI_DER_HEX="$client_uri_der" CLIENT_ID="$CLIENT_ID" SERVER_ID="$SERVER_ID"
haproxy_start haproxy_out "$here/haproxy-outbound.cfg" LISTEN_PORT="$P_HO" WRONG_LISTEN_PORT="$P_HO_WRONG" \
  ADMIN_PORT="$P_HO_ADMIN" UPSTREAM_PORT="$P_HI" CERT_KEY="$work/haproxy/client.pem" \
  BUNDLE="$work/client/bundle.pem" OTHER_BUNDLE="$work/other-ca/bundle.pem"
haproxy_start haproxy_hs "$here/haproxy-tcp-inbound.cfg" LISTEN_PORT="$P_HHS" ADMIN_PORT="$P_HHS_ADMIN" \
  BACKEND_PORT="$P_BACKEND" CERT_KEY="$work/haproxy/server.pem" BUNDLE="$work/server/bundle.pem" \
  CLIENT_URI_DER_HEX="$client_uri_der"
wait_http haproxy_in "http://127.0.0.1:$P_HI_ADMIN/ready"
wait_http haproxy_out "http://127.0.0.1:$P_HO_ADMIN/ready"
wait_http haproxy_hs "http://127.0.0.1:$P_HHS_ADMIN/ready"
say "up: haproxy $haproxy_version out :$P_HO -> in :$P_HI; handshake inbound :$P_HHS"

# denied_sessions() admin-port: connections the inbound closed after the handshake (its ACL)
denied_sessions() {
  curl -s -m 5 "http://127.0.0.1:$1/metrics" |
    awk '/^haproxy_frontend_denied_sessions_total\{proxy="inbound"\}/ {print $NF + 0; found = 1} END {if (!found) print "none"}'
}
check "haproxy chain" 200 "$(h2c "$P_HO")"
check "haproxy chain XFCC at the backend" "By=$SERVER_ID;URI=$CLIENT_ID" \
  "$(body --http2-prior-knowledge "http://127.0.0.1:$P_HO/xfcc")"
check "haproxy inbound, client $CLIENT_ID" 200 "$(mtls "$P_HI" client)"
check "haproxy inbound, connections refused so far" 0 "$(denied_sessions "$P_HI_ADMIN")"
refused "haproxy inbound, client $IMPOSTOR_ID" "$(mtls "$P_HI" impostor)"
why "haproxy inbound, client $IMPOSTOR_ID" "http://127.0.0.1:$P_HI_ADMIN/metrics" \
  '^haproxy_frontend_denied_sessions_total\{proxy="inbound"\}'
refused "haproxy inbound, no client certificate" "$(code --http2 -k "https://127.0.0.1:$P_HI/")"
refused "haproxy outbound trusting another CA" "$(h2c "$P_HO_WRONG")"
why "haproxy outbound trusting another CA" "http://127.0.0.1:$P_HO_ADMIN/metrics" \
  '^haproxy_backend_connection_errors_total\{proxy="wrong-trust"\}'
say "check: haproxy outbound, server ID: not checked (HAProxy 2.6 reads no URI SAN; it verifies the server's chain against the bundle)"
# The tcp-mode inbound forwards to nginx's h2c port, so curl gets no HTTP answer through it
# (000 either way): its ACL is checked by what it counted.
mtls "$P_HHS" client >/dev/null
check "haproxy handshake inbound, client $CLIENT_ID let through" 0 "$(denied_sessions "$P_HHS_ADMIN")"
mtls "$P_HHS" impostor >/dev/null
check "haproxy handshake inbound, client $IMPOSTOR_ID refused" 1 "$(denied_sessions "$P_HHS_ADMIN")"
say "haproxy: chain returned 200; wrong client ID refused (inbound and handshake inbound), other CA refused (outbound)"
