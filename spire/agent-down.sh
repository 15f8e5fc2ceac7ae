#!/usr/bin/env bash
# Stops only the spire-agent of a SPIRE started by spire/up.sh (the PID recorded in
# RUN_DIR/env), waits for it to exit and removes its socket. The server keeps running; the
# agent's data_dir (key + SVID) stays, so spire/agent-up.sh brings back the same node identity.
#
#   spire/agent-down.sh RUN_DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=spire/lib.sh
. "$here/lib.sh"
[ $# -eq 1 ] || { echo "usage: spire/agent-down.sh RUN_DIR" >&2; exit 2; }
spire_env_load "$1"
spire_stop "${SPIRE_AGENT_PID:-}" spire-agent
rm -f "$SPIRE_AGENT_SOCKET"
spire_env_set "$SPIRE_RUN_DIR" SPIRE_AGENT_PID ""
spire_log "stopped spire-agent in $SPIRE_RUN_DIR"
