#!/usr/bin/env bash
# Stops the SPIRE that spire/up.sh started in RUN_DIR: exactly the agent and server PIDs
# recorded in RUN_DIR/env (each checked to still be that program), waits for them to exit,
# and removes their sockets. Keeps the run folder (data, logs) for a look afterwards.
#
#   spire/down.sh RUN_DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=spire/lib.sh
. "$here/lib.sh"
[ $# -eq 1 ] || { echo "usage: spire/down.sh RUN_DIR" >&2; exit 2; }
spire_env_load "$1"
status=0
spire_stop "${SPIRE_AGENT_PID:-}" spire-agent || status=1
spire_stop "${SPIRE_SERVER_PID:-}" spire-server || status=1
rm -f "$SPIRE_AGENT_SOCKET" "$SPIRE_SERVER_SOCKET"
if [ "$status" -eq 0 ]; then
  spire_env_set "$SPIRE_RUN_DIR" SPIRE_AGENT_PID ""
  spire_env_set "$SPIRE_RUN_DIR" SPIRE_SERVER_PID ""
  spire_log "stopped SPIRE in $SPIRE_RUN_DIR"
fi
exit "$status"
