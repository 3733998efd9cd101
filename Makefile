# gradwatch: `make demo` runs the main example job, `make test` runs the tests.
# Both set up what they need first: a venv with the package, and Debian's Prometheus/Alertmanager,
# Chromium and PostgreSQL for tests.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# No debconf questions (tzdata, pulled in by postgresql, asks for a time zone): the defaults.
APT    := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
PYTEST_ARGS ?=
# `make test` runs two pytest-xdist workers: much of a Ray test is waiting (a job's start and end, a rule's
# `for`), and the example-job tests share one worker (tests/conftest.py groups them). 1 runs them in order.
TEST_WORKERS ?= 2

.PHONY: demo test test-alone setup tools lint format generate check-generated clean bench docs-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

tools:
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null \
	    && command -v prometheus-alertmanager >/dev/null && command -v amtool >/dev/null; then :; else \
	  echo "installing Debian's prometheus and prometheus-alertmanager"; \
	  $(APT) install -y --no-install-recommends prometheus prometheus-alertmanager >/dev/null 2>&1 \
	  || { $(APT) update >/dev/null && \
	       $(APT) install -y --no-install-recommends prometheus prometheus-alertmanager >/dev/null; }; \
	fi
	@if command -v chromium >/dev/null; then :; else \
	  echo "installing Debian's chromium (the report tests draw reports in it, headless)"; \
	  $(APT) install -y --no-install-recommends chromium >/dev/null 2>&1 \
	  || { $(APT) update >/dev/null && \
	       $(APT) install -y --no-install-recommends chromium >/dev/null; }; \
	fi
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null; then :; else \
	  echo "installing Debian's postgresql (the store tests start a private server)"; \
	  $(APT) install -y --no-install-recommends postgresql >/dev/null 2>&1 \
	  || { $(APT) update >/dev/null && \
	       $(APT) install -y --no-install-recommends postgresql >/dev/null; }; \
	fi

demo: setup
	$(VENV)/bin/gradwatch run examples/digits-mlp.yaml

test: setup tools
	$(PY) -m pytest --durations=25 -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# Each test file in a pytest of its own: a file that passes only after another left state behind fails
# here. The Ray files take most of the time; PYTEST_ARGS='-m "not ray and not prometheus"' skips them.
test-alone: setup tools
	@for f in $$(find tests -name 'test_*.py' | sort); do \
	  echo "== $$f"; $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) $$f; rc=$$?; \
	  [ $$rc = 0 ] || [ $$rc = 5 ] || exit $$rc; \
	done

# Every shell command shown in README.md and docs/*.md is run (or listed with why not), every relative link resolves.
docs-check: setup
	$(PY) -m pytest -q -p no:cacheprovider tests/test_docs.py

CODE := gradwatch service workers dashboards deploy tests bench examples

lint: setup typecheck
	$(VENV)/bin/ruff check $(CODE)
	$(VENV)/bin/ruff format --check $(CODE)

# mypy over the packages named in pyproject.toml [tool.mypy].
.PHONY: typecheck
typecheck: setup
	$(PY) -m mypy

format: setup
	$(VENV)/bin/ruff format $(CODE)
	$(VENV)/bin/ruff check --fix $(CODE)

generate: setup
	$(PY) -m deploy.rules.generate
	$(PY) -m dashboards.build

bench: setup
	$(PY) bench/detector_quality.py
	$(PY) bench/telemetry_overhead.py
	$(PY) bench/alert_latency.py
	$(PY) bench/service_load.py
	$(PY) bench/startup.py

clean:
	rm -rf runs .pytest_cache .mypy_cache
