# Two commands set everything up on a fresh machine:
#   make demo   a collector and a simulated 10,000-GPU fleet on localhost
#   make test   the whole test suite (installs what it needs first)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the tests run for real: Prometheus (and promtool), Mosquitto, the Pushgateway,
# systemd-analyze (systemd) for the units in deploy/systemd, PostgreSQL (tests/postgres_server.py,
# which runs it as the package's postgres user through setpriv, from util-linux), VictoriaMetrics
# (the global view of a tier of collectors), Chromium (the fleet map, in a real browser), tmux
# (`gpufleet top` in a real terminal).
SYSTEM_PACKAGES := prometheus mosquitto prometheus-pushgateway systemd postgresql util-linux victoria-metrics \
	chromium tmux
SYSTEM_COMMANDS := promtool prometheus mosquitto prometheus-pushgateway systemd-analyze setpriv victoria-metrics \
	chromium tmux
# Files that tell a package is there when its commands are off PATH, as PostgreSQL's server's are.
SYSTEM_FILES := /usr/lib/postgresql/*/bin/initdb /usr/lib/postgresql/*/bin/postgres

.PHONY: demo test lint bench fuzz proto system-deps clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/gpufleet demo

system-deps:
	@missing=""; for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	for f in $(SYSTEM_FILES); do [ -e "$$f" ] || missing="$$missing $$f"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages for:$$missing"; \
		if [ "$$(id -u)" -ne 0 ]; then echo "run as root, or: sudo apt-get install $(SYSTEM_PACKAGES)"; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			$(SYSTEM_PACKAGES) >/dev/null; \
	fi

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

test: $(BIN)/.installed system-deps lint
	$(BIN)/python -m pytest -n 3

bench: $(BIN)/.installed system-deps
	$(BIN)/python -m bench

# Ten minutes of coverage-guided fuzzing of the ingest path (the test suite runs 20 s of it).
fuzz: $(BIN)/.installed
	$(BIN)/python fuzz/ingest_fuzz.py -max_total_time=600

proto: $(BIN)/.installed
	$(BIN)/python tools/generate_proto.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
