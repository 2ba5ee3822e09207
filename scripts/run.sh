#!/usr/bin/env bash
# `make run`: bring up the stack, then the session server and a game server
# with their logs on this terminal.  Ctrl-C stops everything this run started.
# The stack, the servers and the demo's bots all take $DREAMRAID_CONFIG
# (default conf/dreamraid.ini); the stack keeps its data in $DREAMRAID_VAR
# (default var/).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Absolute before the cd: relative paths are taken from where this was run.
[ -n "${DREAMRAID_CONFIG:-}" ] && export DREAMRAID_CONFIG=$(realpath -m -- "$DREAMRAID_CONFIG")
[ -n "${DREAMRAID_VAR:-}" ] && export DREAMRAID_VAR=$(realpath -m -- "$DREAMRAID_VAR")
CONFIG=${DREAMRAID_CONFIG:-$ROOT/conf/dreamraid.ini}
cd "$ROOT"

stack=$(scripts/stack.sh ensure) || exit 1
addresses=$(.venv/bin/python -m dreamraid.config shell "$CONFIG") || exit 1
eval "$addresses"
.venv/bin/python -m dreamraid.admin --config "$CONFIG" keys >&2 || exit 1

pids=()
stop() {
    trap - INT TERM EXIT
    echo "run: stopping" >&2
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
    [ "$stack" = started ] && scripts/stack.sh down
    exit 0
}
trap stop INT TERM EXIT

# No per-address registration cap here: the demo's bots and load tools
# (Locust, bench/load.py) all register from this machine.
# Process substitution keeps $! the server's own pid, so stop() ends the server.
.venv/bin/twistd --nodaemon --pidfile= dreamraid-session --config "$CONFIG" --session-registrations-per-address 0 \
    > >(sed -u 's/^/session | /') 2>&1 &
pids+=($!)
# The development grant is on here so the demo's bots (and a person trying
# things) can have a weapon to enhance; a production server keeps conf's off.
.venv/bin/twistd --nodaemon --pidfile= dreamraid-game --config "$CONFIG" --game-dev-grant on \
    > >(sed -u 's/^/game    | /') 2>&1 &
pids+=($!)
echo "run: session server on $SESSION_ADDRESS (health: http://$SESSION_HTTP_ADDRESS/health)" >&2
echo "run: game server on $GAME_ADDRESS, raid UDP port $GAME_UDP_PORT (health: http://$GAME_HTTP_ADDRESS/health)" >&2
if [ "${DREAMRAID_DEMO:-1}" != 0 ]; then
    echo "run: demo: 4 bots register, hunt, enhance, raid and log out (DREAMRAID_DEMO=0 skips this)" >&2
    .venv/bin/dreamraid-bots --config "$CONFIG" --players 4 --scenario raid --wait 60 2>&1 | sed -u 's/^/demo    | /' \
        || echo "run: the demo did not go as planned (above); the servers keep running" >&2
fi
play=.venv/bin/dreamraid-play
[ -n "${DREAMRAID_CONFIG:-}" ] && play="$play --config $CONFIG"
echo "run: serving; play with $play; Ctrl-C stops everything" >&2
wait -n "${pids[@]}"
echo "run: a server exited" >&2
stop
