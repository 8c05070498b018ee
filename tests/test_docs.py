"""The documentation site (docs/): it builds with every warning an error, its API
reference covers every public name, every public name has a docstring, and
every Python example on its pages runs as written."""

import importlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import results_tables as load_results_tables

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# docs/demo.md's examples need the demo's data and files: tests/test_demo.py runs them
PAGES_TESTED_ELSEWHERE = {"demo.md"}
# Blocks that are not programs, each found by a line only it has: the functional
# ops' signatures (checked against the code below)
NOT_PROGRAMS = {"signatures": "featadapt.vefa_linear(x, weight, scale, bias=None"}
PUBLIC_MODULES = ["featadapt", "featadapt.integrations.peft"]


def python_blocks(path):
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def page_examples():
    for page in sorted(DOCS.glob("*.md")):
        if page.name in PAGES_TESTED_ELSEWHERE:
            continue
        for i, block in enumerate(python_blocks(page)):
            if not any(marker in block for marker in NOT_PROGRAMS.values()):
                yield pytest.param(block, id=f"{page.stem}-{i}")


def public_names():
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            yield module_name, name, getattr(module, name)


@pytest.mark.parametrize("block", list(page_examples()))
def test_page_example_runs(block, tmp_path, monkeypatch):
    """Each runs as written (its own asserts included), in a fresh directory."""
    for package in ("bitsandbytes", "peft", "transformers"):
        if re.search(rf"^\s*(import|from) {package}\b", block, flags=re.M):
            pytest.importorskip(package)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs example", "exec"), {})


def block_with(page, marker):
    [block] = [b for b in python_blocks(DOCS / page) if marker in b]
    return block


def test_usage_example_leaves_plain_layers_and_adapter_files(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(block_with("usage.md", 'featadapt.save_adapters(model, "adapters/")'), namespace)
    assert all(type(m) in (torch.nn.Linear, torch.nn.GELU) for m in namespace["plain"])
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()


def test_quantized_example_dequantizes(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import torch

    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(block_with("quantized.md", "plain = featadapt.unload(model, merge=True, dequantize=True)"), namespace)
    plain, full = namespace["plain"], namespace["full"]
    assert type(plain[0]) is torch.nn.Linear and plain[0].weight.dtype == torch.float32
    # the float32 weight is the 4-bit one dequantized (the adapter starts at zero): close to, not equal to, the original
    error = (plain[0].weight - full[0].weight).norm() / full[0].weight.norm()
    assert 0 < error < 0.2


def test_functional_signatures_match_the_code():
    import featadapt

    block = block_with("usage.md", NOT_PROGRAMS["signatures"])
    for name in ("vefa_linear", "lorfa_linear", "lora_linear"):
        documented = re.search(rf"featadapt\.{name}(\(.*?\))", block).group(1)
        assert documented == str(inspect.signature(getattr(featadapt, name))), name


def test_every_public_name_has_a_docstring():
    pytest.importorskip("peft")
    missing = [f"{module}.{name}" for module, name, value in public_names()
               if (inspect.isclass(value) or callable(value)) and not (value.__doc__ or "").strip()]
    assert not missing, f"public names without a docstring: {missing}"


def test_results_tables_cover_every_results_file():
    results_tables = load_results_tables()
    for page in DOCS.glob("*.md"):
        for name in results_tables.MARKER.findall(page.read_text()):
            assert results_tables.table(name).startswith(("|", "Device:")), (page.name, name)
    # every benchmark results file (not the compile-resource reports beside them) has its tables on a page
    quoted = {name for page in DOCS.glob("*.md") for name in results_tables.MARKER.findall(page.read_text())}
    files = [f.stem for f in results_tables.RESULTS.glob("*.json")
             if {"layers", "layer"} & set(json.loads(f.read_text()))]
    assert files and set(files) <= quoted, sorted(set(files) - quoted)
    with pytest.raises(KeyError, match="no results table 'no-such-table'"):
        results_tables.expand("<!-- results-table: no-such-table -->")


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    for package in ("sphinx", "myst_parser", "furo"):
        pytest.importorskip(package, reason=f"{package} builds the docs (pinned in requirements/constraints.txt)")
    pytest.importorskip("peft")  # the API reference documents the PEFT integration
    out = tmp_path_factory.mktemp("docs") / "html"
    # -n: every unresolved reference is a warning; -W: every warning fails the build
    done = subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-n", "-W", "--keep-going", "-q",
                           str(DOCS), str(out)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out


def test_site_builds_strictly(built_site):
    pages = {p.stem for p in DOCS.glob("*.md")}
    assert pages <= {p.stem for p in built_site.glob("*.html")}


def test_api_reference_covers_every_public_name(built_site):
    html = (built_site / "api.html").read_text()
    missing = [f"{module}.{name}" for module, name, _ in public_names() if f'id="{module}.{name}"' not in html]
    assert not missing, f"not in the API reference: {missing}"


def test_results_tables_are_filled_in(built_site):
    html = (built_site / "performance.html").read_text()
    assert "results-table" not in html and "time / floor" in html
