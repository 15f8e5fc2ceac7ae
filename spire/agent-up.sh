#!/usr/bin/env bash
# Starts the spire-agent of a SPIRE started by spire/up.sh again (after spire/agent-down.sh),
# on the same socket and data_dir, so it rejoins with the node identity it already has (no new
# join token: the first one is spent). Waits for its healthcheck, records the new PID in
# RUN_DIR/env (SPIRE_AGENT_PID) and prints it.
#
#   spire/agent-up.sh RUN_DIR
#   SPIRE_UP_TIMEOUT   seconds to wait for the healthcheck (default 60)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=spire/lib.sh
. "$here/lib.sh"
[ $# -eq 1 ] || { echo "usage: spire/agent-up.sh RUN_DIR" >&2; exit 2; }
spire_env_load "$1"
if spire_alive "${SPIRE_AGENT_PID:-}" spire-agent; then
  echo "spire/agent-up.sh: spire-agent already runs (pid $SPIRE_AGENT_PID); run spire/agent-down.sh first" >&2
  exit 1
fi
spire_alive "${SPIRE_SERVER_PID:-}" spire-server ||
  { echo "spire/agent-up.sh: spire-server of $SPIRE_RUN_DIR is not running" >&2; exit 1; }
SPIRE_STARTED_PID=
if ! spire_start_agent "$SPIRE_RUN_DIR"; then
  spire_stop "$SPIRE_STARTED_PID" spire-agent || true
  echo "spire/agent-up.sh: spire-agent did not come back" >&2
  exit 1
fi
spire_env_set "$SPIRE_RUN_DIR" SPIRE_AGENT_PID "$SPIRE_STARTED_PID"
spire_log "spire-agent pid $SPIRE_STARTED_PID healthy again on $SPIRE_AGENT_SOCKET"
echo "SPIRE_AGENT_PID=$SPIRE_STARTED_PID"
