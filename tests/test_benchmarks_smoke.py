"""The benchmark suite runs: its tiny set, once per case (--benchmark-disable),
writes a results file with every case, and prints the summary table."""

import json
import os
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


def _bench_module(name):
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_cpu_device_name_gives_model_cores_and_features(monkeypatch):
    import torch

    report = _bench_module("bench_report")
    monkeypatch.setattr(report, "cpu_model", lambda: "Intel Xeon")
    monkeypatch.setattr(report, "cpu_features", lambda: ["AVX2", "AVX512", "AVX512-BF16", "AMX"])
    name = report.device_name(torch.device("cpu"))
    assert name == f"Intel Xeon ({os.cpu_count()} cores; AVX2, AVX512, AVX512-BF16, AMX)"
    assert report.device_slug(name) == f"intel-xeon-{os.cpu_count()}-cores-avx2-avx512-avx512-bf16-amx"
    assert report.target_kind(torch.device("cpu")) == "cpu-bf16"
    monkeypatch.setattr(report, "cpu_features", lambda: ["AVX2"])
    assert report.target_kind(torch.device("cpu")) == "cpu"


def test_cpu_model_drops_trademarks_and_clock(monkeypatch):
    import builtins
    import io

    report = _bench_module("bench_report")
    cpuinfo = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz\n"
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: io.StringIO(cpuinfo) if path == "/proc/cpuinfo"
                        else real_open(path, *a, **k))
    assert report.cpu_model() == "Intel Xeon Platinum 8480+"


def test_targets_depend_on_the_kind_of_cpu_and_the_dtype():
    report = _bench_module("bench_report")
    assert report.target_ratio("cpu-bf16", "bfloat16", "vefa") == 1.10
    assert report.target_ratio("cpu-bf16", "float32", "lora") == 1.12
    assert report.target_ratio("cpu", "bfloat16", "lorfa") == 1.20
    assert report.target_ratio("cpu-bf16", "float16", "vefa") is None


def test_profile_missed_stores_where_the_time_goes(tiny_run, tmp_path):
    results, _ = tiny_run
    results = json.loads(json.dumps(results))
    # --benchmark-disable times nothing, so no target row is judged: mark one missed.
    row = next(r for r in results["layers"] if r["layer"] == "vefa/torch" and r["mode"] == "forward+backward")
    case = _bench_module("bench_report").case_label(row)
    results["targets"] = [{"case": case, "met": False}]
    path = tmp_path / "missed.json"
    path.write_text(json.dumps(results))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_missed.py"), str(path), "--steps", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    profiles = json.loads(path.read_text())["profiles"]
    assert list(profiles) == [case]
    for side in ("layer", "floor"):
        ops = profiles[case][side]["ops"]
        assert ops and all(op["self_ms"] >= 0 and 0 < op["share"] <= 1 for op in ops)


def test_fused_layers_are_checked_against_torch(tiny_run):
    """The benchmark that times a fused backend also checks its output and dx against torch's."""
    results, _ = tiny_run
    rows = [r for r in results["layers"] if r["layer"].endswith("/triton") and r["mode"] == "forward+backward"]
    assert rows, "no fused layer was benchmarked (the triton interpreter is on in the tests)"
    for row in rows:
        assert row["rel_error_vs_torch"] is not None and 0 <= row["rel_error_vs_torch"] <= 1e-4, row
