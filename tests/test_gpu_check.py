"""The reworked `make gpu-check`, dry-run here: every stage's CPU-side part
runs and writes what the GPU run would (self-check, benchmark, dispatch table,
summary), so the first GPU run does not fail on a script error."""

import json
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytest.importorskip("pytest_benchmark")


def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FEATADAPT_AUTOTUNE")}
    done = subprocess.run(["bash", "tools/gpu-check.sh", "--dry-run", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stages = dict(line.split()[0:2] for line in (tmp_path / "stages.txt").read_text().splitlines())
    assert set(stages) == {"self-check", "headline", "setup", "cuda-check", "cuda-bench", "sanitize", "gpu-tests"}
    assert all(rc == "0" for rc in stages.values()), (stages, (tmp_path / "summary.txt").read_text())
    check = json.loads((tmp_path / "self-check.json").read_text())
    assert check["passed"] and {r["backend"] for r in check["rows"] if r["status"] == "pass"} == {"torch", "triton"}
    assert json.loads((tmp_path / "bench-headline.json").read_text())["layers"]
    # the cuda backend's own benchmark run: torch's layers as its baseline (no GPU: no cuda layers)
    cuda_bench = json.loads((tmp_path / "bench-cuda.json").read_text())["layers"]
    assert cuda_bench and all(row["layer"].endswith(("/torch", "/cuda")) for row in cuda_bench)
    table = json.loads((tmp_path / "dispatch_table.json").read_text())
    assert table["format"] == 1 and table["entries"] == []  # nothing was timed in the dry run
    summary = (tmp_path / "summary.txt").read_text()
    assert "self-check.json:" in summary and "dispatch table: 0 entries" in summary
