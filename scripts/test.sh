#!/usr/bin/env bash
# `make test`: bring up the stack (reusing a running one), run the whole trial
# suite against it, and stop the stack again if this run started it.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

stack=$(scripts/stack.sh ensure) || exit 1
.venv/bin/python -m dreamraid.admin keys >/dev/null || exit 1

export DREAMRAID_STACK=1
.venv/bin/trial --temp-directory="$ROOT/_trial_temp" "${@:-tests}"
rc=$?

[ "$stack" = started ] && scripts/stack.sh down
exit $rc
