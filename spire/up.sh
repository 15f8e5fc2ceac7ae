#!/usr/bin/env bash
# Starts a private SPIRE (server + one agent, trust domain jia.app) for tests and local runs,
# registers the reference identities of DESIGN.md §1 by unix uid, and waits until the agent
# actually serves them.
#
#   spire/up.sh [RUN_DIR]     RUN_DIR defaults to a new `mktemp -d` folder; it must be empty
#                             or hold no running SPIRE; its path must match [A-Za-z0-9._/-]+.
#
# Environment:
#   MESHD_SPIRE_BIN    folder with spire-server and spire-agent (default: the cache folder
#                      that spire/install.sh fills)
#   SPIRE_SVID_TTL     -x509SVIDTTL for the registered entries, in seconds (default: the
#                      server's default_x509_svid_ttl, 1h)
#   SPIRE_UP_TIMEOUT   seconds to wait for each readiness step (default 60)
#
# Registered (spiffe://jia.app/NAME  <-  unix:uid:UID, parent = this agent):
#   payment-service 20001, api-gateway 20002, contact-service 20003, family-service 20004,
#   document-service 20005
#
# Prints, and writes to RUN_DIR/env, KEY=value lines (source them; `set -a` to export):
#   SPIRE_RUN_DIR SPIRE_SERVER_SOCKET SPIRE_AGENT_SOCKET SPIRE_AGENT_ID SPIRE_BIN SPIRE_RUN_BIN
#   SPIRE_SERVER_PORT SPIRE_TRUST_DOMAIN SPIRE_SERVER_PID SPIRE_AGENT_PID
# SPIRE_RUN_BIN holds hard links (or copies) of the two binaries that any uid can execute
# (the cache under /root is not traversable by test uids).
# Logs: RUN_DIR/server.log, RUN_DIR/agent.log. On failure: the log's tail, what was started is
# stopped, exit 1. Stop everything with spire/down.sh RUN_DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=spire/lib.sh
. "$here/lib.sh"

identities=(payment-service:20001 api-gateway:20002 contact-service:20003 family-service:20004
  document-service:20005)
timeout=${SPIRE_UP_TIMEOUT:-60}
svid_ttl=${SPIRE_SVID_TTL:-}
if [ -n "$svid_ttl" ] && ! [[ $svid_ttl =~ ^[0-9]+$ ]]; then
  echo "spire/up.sh: SPIRE_SVID_TTL must be a number of seconds, got '$svid_ttl'" >&2
  exit 1
fi

bin=$(spire_bin_dir)
if [ $# -ge 1 ]; then
  mkdir -p "$1"
  run_dir=$(cd "$1" && pwd)
else
  run_dir=$(mktemp -d "${TMPDIR:-/tmp}/meshd-spire.XXXXXX")
fi
if ! [[ $run_dir =~ ^[A-Za-z0-9._/-]+$ ]]; then
  echo "spire/up.sh: run folder '$run_dir' has characters outside [A-Za-z0-9._/-]" >&2
  exit 1
fi
# Unix socket paths hold at most 107 bytes; SPIRE hangs instead of failing on a longer one.
if [ "${#run_dir}" -gt 83 ]; then  # + "/server/private/api.sock" (24)
  echo "spire/up.sh: run folder '$run_dir' is too long for unix socket paths (at most 83 characters)" >&2
  exit 1
fi
if [ -f "$run_dir/env" ]; then
  (
    spire_env_load "$run_dir"
    if spire_alive "${SPIRE_SERVER_PID:-}" spire-server || spire_alive "${SPIRE_AGENT_PID:-}" spire-agent; then
      echo "spire/up.sh: SPIRE is already running in $run_dir; run spire/down.sh $run_dir first" >&2
      exit 1
    fi
  )
fi
# Workloads under test uids must reach the agent socket: every folder on the way is 0755.
chmod 0755 "$run_dir"
mkdir -p "$run_dir/server/private" "$run_dir/server/data" "$run_dir/bin"
chmod 0700 "$run_dir/server/private" "$run_dir/server/data"
for b in spire-server spire-agent; do
  ln -f "$bin/$b" "$run_dir/bin/$b" 2>/dev/null || cp "$bin/$b" "$run_dir/bin/$b"
  chmod 0755 "$run_dir/bin/$b"
done
server_socket=$run_dir/server/private/api.sock
agent_socket=$run_dir/agent/public/api.sock
server_pid=
agent_pid=
ok=

# On any failure: stop exactly what this script started.
on_exit() {
  [ -z "$ok" ] || return 0
  [ -z "$agent_pid" ] || spire_stop "$agent_pid" spire-agent || true
  [ -z "$server_pid" ] || spire_stop "$server_pid" spire-server || true
  echo "spire/up.sh: failed; stopped what it started (run folder kept: $run_dir)" >&2
}
trap on_exit EXIT

# render TEMPLATE OUT PORT: the template with ${RUN_DIR} and ${SERVER_PORT} substituted.
render() {
  sed -e "s|\${RUN_DIR}|$run_dir|g" -e "s|\${SERVER_PORT}|$3|g" "$1" >"$2"
}

# free_port: a loopback port in 20000..31999 (below Linux's ephemeral range) that nobody
# listens on right now. A rare race with another starter is handled by the retry below.
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 12000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  echo "spire/up.sh: no free loopback port found" >&2
  return 1
}

# 1. The server, on a free port (retried if another process grabbed the port meanwhile).
for attempt in 1 2 3; do
  port=$(free_port)
  render "$here/server.conf" "$run_dir/server.conf" "$port"
  rm -f "$server_socket"
  echo "=== spire-server start $(date -u +%FT%TZ) port $port ===" >>"$run_dir/server.log"
  "$run_dir/bin/spire-server" run -config "$run_dir/server.conf" </dev/null >>"$run_dir/server.log" 2>&1 &
  server_pid=$!
  if spire_wait_healthy "$run_dir/bin/spire-server" "$server_socket" "$server_pid" spire-server \
    "$run_dir/server.log" "$timeout" 2>"$run_dir/.wait.err"; then
    rm -f "$run_dir/.wait.err"
    break
  fi
  spire_stop "$server_pid" spire-server || true
  server_pid=
  if [ "$attempt" -lt 3 ] && tail -n 20 "$run_dir/server.log" | grep -q 'address already in use'; then
    spire_log "port $port was taken; trying another"
    continue
  fi
  cat "$run_dir/.wait.err" >&2
  exit 1
done
spire_log "spire-server pid $server_pid healthy on 127.0.0.1:$port"
srv() { "$run_dir/bin/spire-server" "$@" -socketPath "$server_socket"; }

# 2. The agent: bootstrap bundle from the server, one join token.
mkdir -p "$run_dir/agent"
srv bundle show -format pem >"$run_dir/agent/bootstrap-bundle.pem" 2>>"$run_dir/server.log" || {
  echo "spire/up.sh: spire-server bundle show failed" >&2
  spire_tail "$run_dir/server.log"
  exit 1
}
out=$(srv token generate -ttl 600 2>&1) || true
token=$(awk '/^Token:/ {print $2}' <<<"$out")
[ -n "$token" ] || { echo "spire/up.sh: spire-server token generate failed: $out" >&2; exit 1; }
agent_id="spiffe://$SPIRE_TRUST_DOMAIN/spire/agent/join_token/$token"
render "$here/agent.conf" "$run_dir/agent.conf" "$port"
SPIRE_STARTED_PID=
if ! spire_start_agent "$run_dir" "$token"; then
  agent_pid=$SPIRE_STARTED_PID
  exit 1
fi
agent_pid=$SPIRE_STARTED_PID
spire_log "spire-agent pid $agent_pid healthy on $agent_socket ($agent_id)"

# 3. The reference identities, one unix uid each.
ttl_args=()
[ -z "$svid_ttl" ] || ttl_args=(-x509SVIDTTL "$svid_ttl")
for pair in "${identities[@]}"; do
  name=${pair%%:*} uid=${pair##*:}
  if ! out=$(srv entry create -parentID "$agent_id" -spiffeID "spiffe://$SPIRE_TRUST_DOMAIN/$name" \
    -selector "unix:uid:$uid" "${ttl_args[@]}" 2>&1); then
    echo "spire/up.sh: entry create for $name failed: $out" >&2
    spire_tail "$run_dir/server.log"
    exit 1
  fi
done

# 4. Served, not just stored: each uid gets its SVID from the agent (entries reach the agent on
# its next sync, every few seconds).
deadline=$((SECONDS + timeout))
for pair in "${identities[@]}"; do
  name=${pair%%:*} uid=${pair##*:}
  until out=$(setpriv --reuid "$uid" --regid "$uid" --clear-groups \
    "$run_dir/bin/spire-agent" api fetch x509 -socketPath "$agent_socket" -timeout 2s 2>&1) &&
    grep -q "spiffe://$SPIRE_TRUST_DOMAIN/$name" <<<"$out"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "spire/up.sh: uid $uid got no SVID for spiffe://$SPIRE_TRUST_DOMAIN/$name within ${timeout}s; last answer:" >&2
      echo "$out" >&2
      spire_tail "$run_dir/agent.log"
      exit 1
    fi
    sleep 0.5
  done
done
spire_log "entries served for uids ${identities[*]}"

cat >"$run_dir/env" <<EOF
SPIRE_RUN_DIR=$run_dir
SPIRE_SERVER_SOCKET=$server_socket
SPIRE_AGENT_SOCKET=$agent_socket
SPIRE_AGENT_ID=$agent_id
SPIRE_BIN=$bin
SPIRE_RUN_BIN=$run_dir/bin
SPIRE_SERVER_PORT=$port
SPIRE_TRUST_DOMAIN=$SPIRE_TRUST_DOMAIN
SPIRE_SERVER_PID=$server_pid
SPIRE_AGENT_PID=$agent_pid
EOF
chmod 0644 "$run_dir/env"
ok=1
cat "$run_dir/env"
