#!/usr/bin/env bash
# `make test`: bring up the stack (reusing a running one), run the whole trial
# suite against it, and stop the stack again if this run started it.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

started=0
if ! scripts/stack.sh status >/dev/null 2>&1; then
    scripts/stack.sh up || exit 1
    started=1
fi

export DREAMRAID_STACK=1
.venv/bin/trial --temp-directory="$ROOT/_trial_temp" "${@:-tests}"
rc=$?

[ $started = 1 ] && scripts/stack.sh down
exit $rc
