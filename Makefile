# Every target sets itself up: a .venv that can see the system's packages (so a
# machine that already has torch reuses it), torch only when none is importable,
# and this package installed editable with its test extras.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.14.1
STAMP := $(VENV)/.featadapt-installed

.PHONY: test demo setup clean

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) examples/quickstart.py

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): pyproject.toml setup.py | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==$(TORCH_VERSION)
	$(PY) -m pip install "setuptools>=64" wheel
	$(PY) -m pip install --no-build-isolation -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) build dist *.egg-info
