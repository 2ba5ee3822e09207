# dreamraid: `make run` brings everything up, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test stack-up stack-down stack-status stack-reset venv protocol-doc bench clean

run: $(STAMP)
	@scripts/run.sh

test: $(STAMP)
	@scripts/test.sh

venv: $(STAMP)

# The editable install is in "compat" mode so the project root is on sys.path
# and twistd finds twisted/plugins/dreamraid_plugins.py in the work tree.
$(STAMP): setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found (dreamraid needs Python 3.11+)"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "make: dreamraid needs Python 3.11+"; exit 1; }
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV) || { echo "make: cannot create $(VENV); on Debian: apt-get install -y python3-venv"; exit 1; }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
	@touch $@

stack-up: $(STAMP)
	@scripts/stack.sh up

stack-down: $(STAMP)
	@scripts/stack.sh down

stack-status: $(STAMP)
	@scripts/stack.sh status

stack-reset: $(STAMP)
	@scripts/stack.sh reset

protocol-doc: $(STAMP)
	$(BIN)/dreamraid-protocol-doc

# The benchmarks read conf/dreamraid.ini only: refuse to run them against a
# stack of another configuration rather than load another stack's ports.
bench: $(STAMP)
	@[ -z "$$DREAMRAID_CONFIG" ] || [ "$$(realpath -m -- "$$DREAMRAID_CONFIG")" = "$$(realpath conf/dreamraid.ini)" ] || \
		{ echo "make: the benchmarks use conf/dreamraid.ini's stack only; unset DREAMRAID_CONFIG"; exit 1; }
	$(BIN)/python bench/codec.py --quick
	scripts/stack.sh ensure >/dev/null
	$(BIN)/python bench/redis_router.py --quick
	$(BIN)/python bench/sync.py --quick
	$(BIN)/python bench/game_ops.py --quick
	$(BIN)/python bench/raid_load.py --quick
	$(BIN)/python bench/resume.py --quick
	$(BIN)/python bench/ccu.py --quick
	$(BIN)/python bench/load.py --quick
	$(BIN)/python bench/metrics_overhead.py --quick
	$(BIN)/python bench/login_race.py
	$(BIN)/python bench/udp_flood.py --seconds 3

clean:
	rm -rf $(VENV) _trial_temp* *.egg-info twisted/plugins/dropin.cache
