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


# The integration examples that save something, each found by a line only it has
# (so a new block elsewhere in the README does not shift them).
INTEGRATION_BLOCKS = {
    "peft": "from featadapt.integrations.peft import VeFAConfig, accelerate",
    "gpt2-conv1d": 'featadapt.save_adapters(model, "gpt2-lorfa")',
    "trainer": "Trainer(model=model, args=args, train_dataset=train_set).train()",
    "many-adapters": "scale = 1 + 0.1 * torch.randn(100, 32)",
    "trainer-intruders": "watch = IntruderDimensionsCallback(trainer, every=4)",
    "peft-quantized": 'model.save_pretrained("lorfa-4bit")',
}
# The blocks with tests of their own: the usage example, the signatures, the
# quantized base, and the demo's files in the stock models (run by tests/test_demo.py).
OTHER_BLOCKS = 4


def block_with(marker):
    found = [block for block in python_blocks() if marker in block]
    assert len(found) == 1, f"{len(found)} README python blocks contain {marker!r}"
    return found[0]


def quantized_block():
    return block_with("plain = featadapt.unload(model, merge=True, dequantize=True)")


def test_every_python_block_is_checked():
    assert len(python_blocks()) == OTHER_BLOCKS + len(INTEGRATION_BLOCKS)


def test_quantized_base_example_runs():
    pytest.importorskip("bitsandbytes")
    namespace = {}
    exec(compile(quantized_block(), "README.md", "exec"), namespace)
    plain = namespace["plain"]
    assert type(plain[0]) is torch.nn.Linear and plain[0].weight.dtype == torch.float32
    # the float32 weight is the 4-bit one dequantized (the adapter starts at zero): close to, not equal to, the original
    error = (plain[0].weight - namespace["full"][0].weight).norm() / namespace["full"][0].weight.norm()
    assert 0 < error < 0.2


@pytest.mark.parametrize("marker", INTEGRATION_BLOCKS.values(), ids=INTEGRATION_BLOCKS.keys())
def test_integration_example_runs(marker, tmp_path, monkeypatch):
    """Each runs as written (their own asserts included), in a fresh directory."""
    monkeypatch.chdir(tmp_path)
    block = block_with(marker)
    if "import bitsandbytes" in block:
        pytest.importorskip("bitsandbytes")
    exec(compile(block, "README.md", "exec"), {})
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
    quoted = dict(re.findall(r"<!-- perf-table:start (\S+) -->\n(.*?)\n<!-- perf-table:end -->", text, flags=re.S))
    # the benchmark results files: layers and end to end, and mixed-adapter batches
    # (the compile-resource reports in the same folder have neither)
    files = [f for f in sorted((README.parent / "benchmarks" / "results").glob("*.json"))
             if {"layers", "layer"} & set(json.loads(f.read_text()))]
    assert files and sorted(quoted) == sorted(f.stem for f in files), "one README table per results file"
    for path in files:
        assert quoted[path.stem].strip() == plot.tables(json.loads(path.read_text())).strip(), path.name


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


def test_qlora_style_example_runs(tmp_path):
    """examples/qlora_style.py checks itself (loss falls, reloaded 4-bit models
    compute the same, 4-bit weights unchanged) and exits non-zero otherwise."""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    done = subprocess.run(
        [sys.executable, str(README.parent / "examples" / "qlora_style.py"), "--steps", "20", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4-bit weights unchanged: True" in done.stdout
    assert (tmp_path / "lorfa" / "adapters.safetensors").is_file()
