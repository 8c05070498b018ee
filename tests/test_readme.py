"""The README's usage example runs as written."""

import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_usage_example_runs(tmp_path, monkeypatch):
    example = python_blocks()[0]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    plain = namespace["plain"]
    assert all(type(m) in (torch.nn.Linear, torch.nn.GELU) for m in plain)
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()


# The integration examples (PEFT, GPT-2, Trainer), after the usage example and the signatures.
INTEGRATION_BLOCKS = {"peft": 2, "gpt2-conv1d": 3, "trainer": 4, "trainer-intruders": 6}
# Run by tests/test_demo.py on the demo's files: loading its adapters into the stock models.
DEMO_BLOCKS = 1


def test_every_python_block_is_checked():
    assert len(python_blocks()) == 2 + len(INTEGRATION_BLOCKS) + DEMO_BLOCKS


@pytest.mark.parametrize("index", INTEGRATION_BLOCKS.values(), ids=INTEGRATION_BLOCKS.keys())
def test_integration_example_runs(index, tmp_path, monkeypatch):
    """Each runs as written (their own asserts included), in a fresh directory."""
    monkeypatch.chdir(tmp_path)
    exec(compile(python_blocks()[index], "README.md", "exec"), {})
    assert any(tmp_path.iterdir())  # each saves something


def test_functional_signatures_match_the_code():
    import inspect

    import featadapt

    block = python_blocks()[1]
    for name in ("vefa_linear", "lorfa_linear", "lora_linear"):
        documented = re.search(rf"featadapt\.{name}(\(.*?\))", block).group(1)
        actual = str(inspect.signature(getattr(featadapt, name)))
        assert documented == actual, (name, documented, actual)


def test_performance_tables_match_the_committed_results():
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("plot", README.parent / "benchmarks" / "plot.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    text = README.read_text()
    quoted = re.search(r"<!-- perf-table:start -->\n(.*?)\n<!-- perf-table:end -->", text, flags=re.S).group(1)
    results = json.loads((README.parent / "benchmarks" / "results" / "amd-epyc-2-cores.json").read_text())
    assert quoted.strip() == plot.markdown(results).strip()


def test_quickstart_example_runs(tmp_path):
    """examples/quickstart.py checks itself (loss falls, round trips preserve outputs) and exits non-zero otherwise."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(README.parent / "examples" / "quickstart.py"), "--steps", "150", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "OK: VeFA trained" in proc.stdout
    assert (tmp_path / "adapter_config.json").is_file()
