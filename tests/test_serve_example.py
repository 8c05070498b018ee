"""examples/serve_many_adapters.py checks itself: one mixed batch over 100 VeFA
adapters, greedy generate(), each sequence against generating it alone."""

import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_serve_many_adapters_example_runs():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "serve_many_adapters.py"), "--adapters", "100", "--prompts", "6"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "100 VeFA adapters loaded into one GPT-2" in proc.stdout
    assert "OK: every sequence equals generating it alone" in proc.stdout
