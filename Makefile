# One venv, built from pyproject.toml; every target installs what it needs first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PORT   ?= 8080

.PHONY: setup run test test-fast lint check-policies prove-policies postgres chromium vendor bench bench-peers bench-service clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check engine api tests bench
	$(VENV)/bin/mypy

check-policies: $(STAMP)
	$(VENV)/bin/bindpolicy check policies

# Proofs over every request the contract accepts: no rule may be dead or shadowed (engine/prover/).
prove-policies: $(STAMP)
	$(VENV)/bin/bindpolicy check --prove policies

# The suite starts its own PostgreSQL (initdb into a temp folder): the server must be installed.
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null)

# The console's browser tests drive Debian's chromium (Playwright's own browser download is not
# reachable); a CJK font so that the Chinese pages render (and their screenshots read).
chromium:
	@command -v chromium >/dev/null 2>&1 && fc-list 2>/dev/null | grep -qi "wenquanyi\|noto sans cjk" || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-microhei >/dev/null)

# Rebuild the console's vendored front-end files (CodeMirror, axe-core) from npm; not needed to run or test.
vendor:
	vendor/build.sh

test: lint prove-policies postgres chromium
	$(VENV)/bin/bindpolicy fmt --check policies
	$(VENV)/bin/bindpolicy test policies
	$(PY) -m pytest

# The fast tests only: no real servers, PostgreSQL, browsers or Ray.
test-fast: lint check-policies
	$(VENV)/bin/bindpolicy fmt --check policies
	$(VENV)/bin/bindpolicy test policies
	$(PY) -m pytest -m "not slow"

# The log's keys live in keys/ (apart from data/), made once; BINDPOLICY_* set outside win.
run: $(STAMP)
	@echo "console: http://$${BINDPOLICY_HOST:-127.0.0.1}:$(PORT)/console/"
	@test -f keys/log-mac.key -a -f keys/checkpoint.key || $(VENV)/bin/bindpolicy log keygen --out keys
	BINDPOLICY_LOG_MAC_KEY_FILE=$${BINDPOLICY_LOG_MAC_KEY_FILE:-keys/log-mac.key} \
	BINDPOLICY_CHECKPOINT_KEY_FILE=$${BINDPOLICY_CHECKPOINT_KEY_FILE:-keys/checkpoint.key} \
	$(VENV)/bin/bindpolicy serve --policies policies --data data --port $(PORT)

bench: $(STAMP)
	$(PY) bench/bench_decide.py
	$(PY) bench/bench_scale.py
	$(PY) bench/bench_memory.py

bench-peers: $(STAMP)
	$(PY) -m pip install --quiet -r bench/peers/requirements.txt
	$(PY) bench/peers/run.py

bench-service: $(STAMP) postgres
	@command -v hey >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq hey >/dev/null)
	$(PY) bench/bench_service.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
