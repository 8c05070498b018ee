"""The mixed-adapter benchmark (benchmarks/test_multi_adapter.py) runs its tiny
set and writes every variant, its memory and the targets to its results file."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytest.importorskip("pytest_benchmark")
pytest.importorskip("peft")
pytest.importorskip("transformers")


def test_tiny_set_writes_every_variant_and_the_targets(tmp_path):
    given = tmp_path / "tiny.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_multi_adapter.py", "--bench-set", "tiny",
         "--benchmark-disable", "--bench-results", str(given), "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "tiny-multi-adapter.json").read_text())
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import test_multi_adapter as bench
    finally:
        sys.path.pop(0)
    counts = bench.MULTI_SETS["tiny"].adapter_counts
    for kind, variants in (("layer", bench.LAYER_VARIANTS), ("model", bench.MODEL_VARIANTS)):
        recorded = {(row["variant"], row["adapters"]) for row in results[kind]}
        assert recorded == {(v, n) for v in variants for n in counts}
        assert all(row["median_s"] > 0 and row["peak_bytes"] >= 0 for row in results[kind])
    # one VeFA target and a LoRA and a LoRFA target per n, for the layer and the model
    assert len(results["targets"]) == 2 * (1 + 2 * len(counts))
    assert results["environment"]["bench_set"] == "tiny" and results["environment"]["device"]


def test_every_bench_set_collects_in_every_benchmark_module():
    # tools/gpu-check.sh runs the benchmarks with sets the CPU never picks
    # (gpu-headline, gpu-rest): a module that lacks one fails at collection.
    script = (
        "import sys, pytest\n"
        "sys.path.insert(0, 'benchmarks')\n"
        "from bench_cases import BENCH_SETS\n"
        "failed = [name for name in sorted(BENCH_SETS) if pytest.main(\n"
        "    ['benchmarks', '--collect-only', '-q', '-p', 'no:cacheprovider', '--bench-set', name]) != 0]\n"
        "print('FAILED', failed)\n"
        "sys.exit(1 if failed else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
