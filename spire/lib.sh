# shellcheck shell=bash disable=SC2034
# Shared helpers for spire/up.sh, down.sh, agent-up.sh and agent-down.sh. Sourced, not run.
# Every wait here is a poll with a deadline; every stop targets one recorded PID whose
# command line is checked first, so a recycled PID is never signalled.

SPIRE_VERSION=v1.13.3
SPIRE_TRUST_DOMAIN=jia.app

# spire_log MESSAGE...: a progress line on stderr.
spire_log() { echo "spire: $*" >&2; }

# spire_tail LOG: the end of a log file on stderr, framed, so failures explain themselves.
spire_tail() {
  local log=$1
  [ -f "$log" ] || return 0
  echo "----- last lines of $log -----" >&2
  tail -n 40 "$log" >&2
  echo "----- end of $log -----" >&2
}

# spire_bin_dir: the folder holding spire-server and spire-agent, or an error that names
# spire/install.sh. MESHD_SPIRE_BIN wins; else the cache folder that install.sh fills.
spire_bin_dir() {
  local dir=${MESHD_SPIRE_BIN:-${MESHD_CACHE:-$HOME/.cache/meshd}/spire-$SPIRE_VERSION/bin}
  if [ ! -x "$dir/spire-server" ] || [ ! -x "$dir/spire-agent" ]; then
    echo "spire: spire-server/spire-agent not found in $dir; run spire/install.sh (or set MESHD_SPIRE_BIN)" >&2
    return 1
  fi
  (cd "$dir" && pwd)
}

# spire_env_load RUN_DIR: reads RUN_DIR/env (KEY=value lines written by up.sh) into the shell.
spire_env_load() {
  local env=$1/env
  [ -f "$env" ] || { echo "spire: $env not found (was spire/up.sh run with this folder?)" >&2; return 1; }
  # shellcheck disable=SC1090
  . "$env"
}

# spire_env_set RUN_DIR KEY VALUE: replaces (or appends) one KEY=value line of RUN_DIR/env.
spire_env_set() {
  local env=$1/env key=$2 value=$3 tmp
  tmp=$(mktemp "$env.XXXXXX")
  grep -v "^$key=" "$env" >"$tmp" || true
  echo "$key=$value" >>"$tmp"
  chmod 0644 "$tmp"
  mv "$tmp" "$env"
}

# spire_alive PID NAME: true while PID runs (not a zombie) and its command line mentions NAME.
spire_alive() {
  local pid=$1 name=$2 state
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ "$state" != Z ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$name"
}

# spire_stop PID NAME: SIGTERM, wait up to 20 s for the exit, then SIGKILL and wait again.
spire_stop() {
  local pid=$1 name=$2 i
  spire_alive "$pid" "$name" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 200); do
    spire_alive "$pid" "$name" || return 0
    sleep 0.1
  done
  spire_log "$name (pid $pid) ignored SIGTERM for 20 s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do
    spire_alive "$pid" "$name" || return 0
    sleep 0.1
  done
  spire_log "$name (pid $pid) is still running after SIGKILL"
  return 1
}

# spire_wait_healthy BIN SOCKET PID NAME LOG TIMEOUT_S: polls `BIN healthcheck -socketPath SOCKET`
# until it passes; fails early if the process died, or at the deadline.
spire_wait_healthy() {
  local bin=$1 socket=$2 pid=$3 name=$4 log=$5 timeout=$6 deadline
  deadline=$((SECONDS + timeout))
  while :; do
    if "$bin" healthcheck -socketPath "$socket" >/dev/null 2>&1; then
      return 0
    fi
    if ! spire_alive "$pid" "$name"; then
      echo "spire: $name (pid $pid) exited before becoming healthy" >&2
      spire_tail "$log"
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "spire: $name not healthy on $socket after ${timeout}s" >&2
      spire_tail "$log"
      return 1
    fi
    sleep 0.2
  done
}

# spire_start_agent RUN_DIR [JOIN_TOKEN]: starts spire-agent in the background (stdin, stdout and
# stderr detached from the caller, output appended to RUN_DIR/agent.log), sets SPIRE_STARTED_PID,
# and waits for its healthcheck. Without a token the agent must rejoin with the SVID and key
# kept in its data_dir.
spire_start_agent() {
  local run_dir=$1 token=${2:-} timeout=${SPIRE_UP_TIMEOUT:-60}
  local socket=$run_dir/agent/public/api.sock
  local -a args=(run -config "$run_dir/agent.conf")
  [ -z "$token" ] || args+=(-joinToken "$token")
  mkdir -p "$run_dir/agent/public" "$run_dir/agent/data"
  chmod 0755 "$run_dir/agent" "$run_dir/agent/public"
  chmod 0700 "$run_dir/agent/data"
  rm -f "$socket"
  echo "=== spire-agent start $(date -u +%FT%TZ) ===" >>"$run_dir/agent.log"
  "$run_dir/bin/spire-agent" "${args[@]}" </dev/null >>"$run_dir/agent.log" 2>&1 &
  SPIRE_STARTED_PID=$!
  spire_wait_healthy "$run_dir/bin/spire-agent" "$socket" "$SPIRE_STARTED_PID" spire-agent \
    "$run_dir/agent.log" "$timeout"
}
