# One command sets up and serves, one sets up and tests (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# perf_analyzer (tests, load tests) needs libb64; the compose file is checked with docker-compose.
SYSTEM_PACKAGES := libb64-0d docker-compose

.PHONY: venv test serve clean

venv: $(STAMP)

# The venv is rebuilt when a requirements file or the package metadata changes.
$(STAMP): requirements.txt requirements-test.txt requirements-serve.txt pyproject.toml
	dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES)) || \
	  echo "warning: could not install $(SYSTEM_PACKAGES) (needs root); perf_analyzer and the compose check need them"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt -r requirements-serve.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# pytest, not `python -m pytest`: that would put the repo root, and so its kernels/
# directory, on sys.path, where transformers mistakes it for the `kernels` package.
test: venv
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

serve: venv
	$(PY) scripts/serve.py $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
