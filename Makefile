# Two commands for a newcomer: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench serve clean infra-check chromium screenshots

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt -e .
	touch $(STAMP)

# Azurite (Microsoft's Storage emulator) for the state port's Table tests, pinned in package-lock.json.
NODE_STAMP := node_modules/.installed

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $(NODE_STAMP)

demo: $(STAMP)
	$(VENV)/bin/leadwriter demo

test: infra-check lint typecheck unit $(NODE_STAMP)

# checkov conflicts with our dependencies: it gets a venv of its own, installed once (~30 s).
CHECKOV_VENV ?= .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

$(CHECKOV_STAMP):
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet 'checkov>=3.3.30,<3.4'
	touch $(CHECKOV_STAMP)

# Offline validation of infra/, host.json and azure.yaml (pycep checks + checkov); see docs/deploy.md.
infra-check: $(STAMP) $(CHECKOV_STAMP)
	$(PY) -m tests.infra_checks --checkov $(CHECKOV_VENV)/bin/checkov

lint: $(STAMP)
	$(PY) -m ruff check .

typecheck: $(STAMP)
	$(PY) -m mypy

unit: $(STAMP) $(NODE_STAMP) chromium
	$(PY) -m pytest

# The browser tests drive Debian's chromium through Playwright's Python package (Playwright's own
# browser download is not reachable). Installed once, when missing; sudo only when not root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# Redraw docs/console-1280.png and docs/console-390.png from a seeded console.
screenshots: $(STAMP) chromium
	$(PY) -m tests.fixtures.screenshots

bench: $(STAMP)
	$(VENV)/bin/leadwriter bench

serve: $(STAMP)
	$(VENV)/bin/leadwriter serve

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) node_modules .leadwriter .mypy_cache .ruff_cache .pytest_cache
