#!/usr/bin/env bash
# PEFT's own custom-model test suite (tests/test_custom_models.py of the
# installed peft's source release) with featadapt's VeFA and LoRFA rows added
# (tools/peft_suite_cases.py), run against this tree:
#
#   tools/peft-suite.sh [PY]        (make peft-suite)
#
# Needs the network: it downloads peft's source release and, into a side
# folder under build/ (never into the environment), the packages only PEFT's
# test helpers import (diffusers, datasets and theirs).
set -euo pipefail
cd "$(dirname "$0")/.."
HERE=$(pwd)
PY=${1:-.venv/bin/python}
if [[ "$PY" == */* ]]; then PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY"); fi  # it runs from another folder
DIR=$HERE/build/peft-suite
version=$("$PY" -c "import peft; print(peft.__version__)")
rm -rf "$DIR/src"
mkdir -p "$DIR/src" "$DIR/deps"
"$PY" -m pip download -q --no-binary :all: --no-deps "peft==$version" -d "$DIR"
tar xzf "$DIR/peft-$version.tar.gz" -C "$DIR/src"
tests=$DIR/src/peft-$version/tests
touch "$tests/__init__.py"  # its modules import each other relatively
"$PY" - "$tests/test_custom_models.py" <<'PATCH'
import sys
path = sys.argv[1]
text = open(path).read()
# featadapt's rows first in each list PEFT parametrizes over
for name in ("TEST_CASES", "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES", "MIXED_ADAPTER_TEST_CASES"):
    marker = f"\n{name} = [\n"
    if text.count(marker) != 1:
        sys.exit(f"peft-suite: {path} has {text.count(marker)} lines '{name} = [', expected 1")
    text = text.replace(marker, f"\n{name} = [*featadapt_cases.{name},\n")
marker = "\nimport pytest\n"
if marker not in text:
    sys.exit(f"peft-suite: no 'import pytest' line in {path}")
text = text.replace(marker, marker + "import peft_suite_cases as featadapt_cases\n", 1)
open(path, "w").write(text)
PATCH
"$PY" -m pip install -q --no-deps --target "$DIR/deps" diffusers datasets multiprocess dill xxhash pandas pyarrow
cd "$DIR/src/peft-$version"
PYTHONPATH="$DIR/deps:$HERE:$HERE/tools" "$PY" -m pytest tests/test_custom_models.py -p no:cacheprovider -q \
    -o addopts="" -k "VeFA or LoRFA" -rfE
