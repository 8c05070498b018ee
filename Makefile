# Every target sets itself up: a .venv that can see the system's packages (so a
# machine that already has torch reuses it), torch only when none is importable,
# and this package installed editable with its test extras.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.14.1
STAMP := $(VENV)/.featadapt-installed

.PHONY: test demo bench plot gpu-check gpu-test gpu-bench setup clean

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) examples/quickstart.py

# The benchmark set that fits this machine (gpu when CUDA is available, else
# cpu); writes benchmarks/results/<device>.json and prints the summary table.
bench: $(STAMP)
	$(PY) -m pytest benchmarks -q -p no:cacheprovider $(BENCH_ARGS)

# PNG charts from every committed results file.
plot: $(STAMP)
	$(PY) -m pip install -e ".[bench]" --no-build-isolation -q
	for f in benchmarks/results/*.json; do $(PY) benchmarks/plot.py $$f; done

# On a machine with a GPU: the gpu tests, then the GPU benchmark set (two
# targets, so that each fits one device command's time limit).
gpu-check: gpu-test gpu-bench

gpu-test: $(STAMP)
	$(PY) -m featadapt.info
	$(PY) -m pytest tests -m gpu -v

gpu-bench: $(STAMP)
	$(PY) -m pytest benchmarks -q -p no:cacheprovider --bench-set gpu $(BENCH_ARGS)

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): pyproject.toml setup.py | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==$(TORCH_VERSION)
	$(PY) -m pip install "setuptools>=70.1"  # builds editable wheels without the wheel package
	$(PY) -m pip install --no-build-isolation -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) build dist *.egg-info
