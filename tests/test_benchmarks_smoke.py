"""The benchmark suite runs: its tiny set, once per case (--benchmark-disable),
writes a results file with every case, and prints the summary table."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytest.importorskip("pytest_benchmark")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--bench-set", "tiny", "--benchmark-disable",
         "--bench-results", str(path), "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(path.read_text()), proc.stdout


def test_every_layer_case_is_recorded(tiny_run):
    results, _ = tiny_run
    layers = {row["layer"] for row in results["layers"]}
    assert {"floor", "vefa/torch", "lorfa/torch", "lora/torch", "peft-ia3", "peft-lora",
            "naive-lorfa", "compiled-naive-vefa", "compiled-naive-lorfa"} <= layers
    modes = {row["mode"] for row in results["layers"]}
    assert modes == {"forward", "backward", "forward+backward"}
    assert {row["method"] for row in results["end_to_end"]} == {"full", "vefa", "lorfa", "lora", "peft-ia3", "peft-lora"}


def test_saved_bytes_follow_the_memory_rule(tiny_run):
    results, _ = tiny_run
    for row in results["layers"]:
        if row["layer"] == "vefa/torch":
            assert row["saved_bytes"] == row["x_bytes"]
        if row["layer"] in ("lora/torch", "lorfa/torch"):
            m = row["shape"][0]
            assert row["saved_bytes"] == row["x_bytes"] + m * row["rank"] * 4  # float32 u


def test_environment_and_summary(tiny_run):
    results, stdout = tiny_run
    env = results["environment"]
    assert env["bench_set"] == "tiny" and env["torch"] and env["device"] and env["date"]
    assert "featadapt benchmark summary" in stdout and "lorfa/torch" in stdout


def test_quantized_base_cases_are_recorded(tiny_run):
    pytest.importorskip("bitsandbytes")
    results, _ = tiny_run
    rows = [row for row in results["end_to_end"] if "base)" in row["model"]]
    assert {(row["model"], row["method"]) for row in rows} == {
        (f"tiny-bert ({base} base)", method) for base in ("nf4", "int8") for method in ("vefa", "lorfa", "lora", "peft-lora")
    }
    assert all(row["peak_bytes"] > 0 and row["peak_bytes_full_precision"] > 0 for row in rows)
