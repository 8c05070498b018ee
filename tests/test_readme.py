"""The README: a short front door whose example runs, whose tables are the
generated ones, and whose links lead to pages of the docs."""

import pathlib
import re

import pytest

import featadapt
from helpers import results_tables as load_results_tables

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_is_short_and_sets_up_first():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    headings = re.findall(r"^## (.*)", text, flags=re.M)
    assert headings[0] == "Set up"
    assert "make demo    # creates .venv" in text and "make test    # the same set-up, then the test suite" in text


def test_quick_start_runs(tmp_path, monkeypatch):
    """The README's one example, as written: every op, module and helper it shows works."""
    pytest.importorskip("peft")
    [example] = python_blocks()
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert (tmp_path / "my-adapters" / "adapter_config.json").is_file()
    assert isinstance(namespace["model"][0], featadapt.VeFALinear)


def test_tables_after_a_marker_are_the_generated_ones():
    """Each `<!-- results-table: NAME -->` line is followed by TABLES[NAME]'s table, as the docs build would make it."""
    registry = load_results_tables()
    text = README.read_text()
    quoted = re.findall(r"^<!-- results-table: (\S+) -->\n(.*?)(?:\n\n|\Z)", text, flags=re.S | re.M)
    assert quoted, "the README quotes the headline performance table"
    for name, table in quoted:
        assert table.strip() == registry.table(name), name


def test_links_into_the_docs_point_at_pages():
    """Every docs/*.md link names a page of the site."""
    for target in re.findall(r"\]\((docs/[^)#]+)", README.read_text()):
        assert (README.parent / target).is_file(), target


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
