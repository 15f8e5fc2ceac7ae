# stunnel 5 (Debian) as a peer: sourced by tcp.sh once the iperf3 server is up (it uses
# run.sh's and tcp.sh's helpers: start, alive, fill, check, refused, die, say, iperf_json).
#
#   stunnel     iperf3 -c -> stunnel client (plain in, TLS out with the client SVID, the
#               server's chain verified against the bundle)
#                         -> stunnel server (TLS in, client certificate required and verified
#               against the bundle) -> iperf3 -s
#   stunnel_hs  a second server with the same checks in front of nginx, for the handshake row
# Foreground, one process per sidecar (stunnel runs a thread per connection), warnings and
# errors only. stunnel 5.68 cannot check a URI SAN, so neither side checks a SPIFFE ID:
# each verifies the peer's chain against the trust bundle (the config templates say so, and
# stunnel itself warns "uses verifyChain without subject checks" in its log).

read -r P_STO P_STO_WRONG P_STI P_SHS < <(free_ports 4)
stunnel_bin=$(command -v stunnel || command -v stunnel4 || true)
[ -n "$stunnel_bin" ] || die "stunnel is missing (apt-get install stunnel4)"
stunnel_version=$("$stunnel_bin" -version 2>&1 | awk '$1 == "stunnel" {print $2; exit}')

listening() { # port: a TCP socket listens on 127.0.0.1:port (/proc/net/tcp, state 0A)
  awk -v p="$(printf '%04X' "$1")" '$4 == "0A" && $2 == "0100007F:" p {f = 1} END {exit !f}' /proc/net/tcp
}
stunnel_start() { # name template listen-port KEY=VALUE...: until it listens, up to 20 s
  local name=$1 port=$3 i
  fill "$2" "$work/$name.conf" LISTEN_PORT="$port" "${@:4}"
  start "$name" "$work/$name.log" "$stunnel_bin" "$work/$name.conf"
  for i in $(seq 200); do
    alive "$name"
    listening "$port" && return 0
    sleep 0.1
  done
  die "$name not listening on :$port after 20 s (log: $work/$name.log)"
}
stunnel_server() { # name listen-port backend-port
  stunnel_start "$1" "$here/stunnel-server.conf" "$2" BACKEND_PORT="$3" \
    CERT="$work/server/svid.pem" KEY="$work/server/key.pem" BUNDLE="$work/server/bundle.pem"
}
stunnel_server stunnel_tin "$P_STI" "$P_IPERF"
stunnel_server stunnel_hs "$P_SHS" "$P_BACKEND"
[ -e "$work/other-ca/bundle.pem" ] || make_other_ca
stunnel_start stunnel_tout "$here/stunnel-client.conf" "$P_STO" WRONG_LISTEN_PORT="$P_STO_WRONG" \
  UPSTREAM_PORT="$P_STI" CERT="$work/client/svid.pem" KEY="$work/client/key.pem" \
  BUNDLE="$work/client/bundle.pem" OTHER_BUNDLE="$work/other-ca/bundle.pem"
listening "$P_STO_WRONG" || die "stunnel_tout not listening on :$P_STO_WRONG (log: $work/stunnel_tout.log)"
say "up (tcp): stunnel $stunnel_version :$P_STO -> :$P_STI; handshake inbound :$P_SHS"

logged() { # name pattern: how many lines of its log match
  grep -c -- "$2" "$work/$1.log" || true
}
# One second of iperf3 through the pair (with a byte count instead, iperf3 ends the test
# while the bytes are still in the proxies' buffers and the server counts none).
f=$work/tcp-stunnel-check.json
iperf3 -c 127.0.0.1 -p "$P_STO" -t 1 -J >"$f" 2>"$f.err" || { cat "$f" "$f.err" >&2; die "check: stunnel chain: iperf3 failed"; }
n=$(iperf_json "$f" bytes)
awk -v b="$n" 'BEGIN {exit !(b > 0)}' || die "check: stunnel chain: iperf3 received no bytes through it ($f)"
say "check: stunnel chain: iperf3 received $n bytes (ok)"
for name in stunnel_tin stunnel_hs; do
  port=$P_STI
  [ "$name" = stunnel_tin ] || port=$P_SHS
  openssl s_client -connect "127.0.0.1:$port" </dev/null >"$work/s_client-$name.txt" 2>&1 || true
  n=$(logged "$name" 'peer did not return a certificate')
  [ "$n" -gt 0 ] || die "check: $name, no client certificate: not refused (log: $work/$name.log)"
  say "check: $name, no client certificate: refused (its log: peer did not return a certificate)"
done
refused "stunnel outbound trusting another CA" "$(code --http2-prior-knowledge "http://127.0.0.1:$P_STO_WRONG/")"
[ "$(logged stunnel_tout 'certificate verify failed')" -gt 0 ] ||
  die "check: stunnel outbound trusting another CA: no 'certificate verify failed' in $work/stunnel_tout.log"
say "check: stunnel outbound trusting another CA: because its log says certificate verify failed"
say "check: stunnel, client and server IDs: not checked (stunnel 5.68 reads no URI SAN; it verifies the peer's chain against the bundle)"
