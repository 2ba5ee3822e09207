#!/usr/bin/env bash
# `make test`: bring up the stack (reusing a running one), run the whole trial
# suite against it, and stop the stack again if this run started it.
# The stack and the tests take $DREAMRAID_CONFIG (default conf/dreamraid.ini);
# the stack keeps its data in $DREAMRAID_VAR (default var/).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Absolute before the cd (trial runs the tests in _trial_temp): relative
# paths are taken from where this was run.
[ -n "${DREAMRAID_CONFIG:-}" ] && export DREAMRAID_CONFIG=$(realpath -m -- "$DREAMRAID_CONFIG")
[ -n "${DREAMRAID_VAR:-}" ] && export DREAMRAID_VAR=$(realpath -m -- "$DREAMRAID_VAR")
CONFIG=${DREAMRAID_CONFIG:-$ROOT/conf/dreamraid.ini}
cd "$ROOT"

stack=$(scripts/stack.sh ensure) || exit 1
.venv/bin/python -m dreamraid.admin --config "$CONFIG" keys >/dev/null || exit 1

export DREAMRAID_STACK=1
.venv/bin/trial --temp-directory="$ROOT/_trial_temp" "${@:-tests}"
rc=$?

[ "$stack" = started ] && scripts/stack.sh down
exit $rc
