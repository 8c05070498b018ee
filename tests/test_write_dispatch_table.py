"""tools/write_dispatch_table.py: the dispatch table follows the measurement —
a fused backend is listed only where the self-check passed it and the
benchmark measured it faster than torch, over the token counts measured."""

import json
import pathlib
import subprocess
import sys

from featadapt.ops import dispatch_table

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "write_dispatch_table.py"


def bench_row(method, backend, tokens, seconds, dtype="bfloat16", rank=16, mode="forward+backward"):
    return {"layer": f"{method}/{backend}", "method": method, "shape": [tokens, 4096, 4096], "dtype": dtype,
            "rank": rank, "mode": mode, "median_s": seconds}


def write_results(folder, layers, check_rows):
    environment = {"device": "NVIDIA H200", "compute_capability": "9.0", "date": "2026-12-07T00:00:00+00:00",
                   "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "featadapt_revision": "abc"}
    (folder / "bench-headline.json").write_text(json.dumps({"environment": environment, "layers": layers}))
    (folder / "self-check.json").write_text(json.dumps({"device": "cuda:0", "passed": True, "rows": check_rows}))


def check_row(backend, op, dtype="bfloat16", status="pass"):
    return {"backend": backend, "op": op, "dtype": dtype, "status": status}


def run(folder):
    done = subprocess.run([sys.executable, str(TOOL), str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    data = json.loads((folder / "dispatch_table.json").read_text())
    dispatch_table.parse_table(data, "written table")  # what featadapt will read
    return data["entries"]


def test_only_faster_and_self_checked_backends_are_listed(tmp_path):
    layers = []
    for tokens, triton_seconds in ((4096, 0.9), (8192, 0.95), (16384, 1.1)):
        layers += [bench_row("vefa", "torch", tokens, 1.0), bench_row("vefa", "triton", tokens, triton_seconds),
                   bench_row("lora", "torch", tokens, 1.0), bench_row("lora", "triton", tokens, 0.5),
                   bench_row("lorfa", "torch", tokens, 1.0), bench_row("lorfa", "cuda", tokens, 0.5),
                   bench_row("vefa", "triton", tokens, 0.1, mode="forward")]  # another mode: ignored
    checks = [check_row("triton", "vefa"), check_row("triton", "lora"), check_row("triton", "lora", status="FAIL"),
              check_row("cuda", "lorfa")]
    write_results(tmp_path, layers, checks)
    entries = run(tmp_path)
    assert [(e["op"], e["backend"], e["tokens"]) for e in entries] == [("lorfa", "cuda", [4096, 16384]),
                                                                      ("vefa", "triton", [4096, 8192])]
    vefa = entries[1]
    assert vefa["device"] == "sm_90" and vefa["dtype"] == "bfloat16" and vefa["ratio"] == 0.95
    assert vefa["rank"] is None and entries[0]["rank"] == [16, 16]
    assert vefa["measured"]["device_name"] == "NVIDIA H200" and vefa["measured"]["date"]


def test_a_backend_that_is_not_faster_anywhere_gets_no_entry(tmp_path):
    layers = [bench_row("vefa", "torch", 8192, 1.0), bench_row("vefa", "triton", 8192, 0.99)]
    write_results(tmp_path, layers, [check_row("triton", "vefa")])
    assert run(tmp_path) == []


def test_missing_results_write_nothing(tmp_path):
    done = subprocess.run([sys.executable, str(TOOL), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "missing" in done.stderr
    assert not (tmp_path / "dispatch_table.json").exists()


def test_the_cuda_backends_own_files_are_read_with_their_own_baseline(tmp_path):
    """The gpu-check measures the cuda backend after its build, in bench-cuda.json
    (with a torch baseline of that run) and self-check-cuda.json."""
    write_results(tmp_path, [bench_row("vefa", "torch", 8192, 1.0), bench_row("vefa", "triton", 8192, 1.2)],
                  [check_row("triton", "vefa")])
    environment = json.loads((tmp_path / "bench-headline.json").read_text())["environment"]
    cuda_layers = [bench_row("vefa", "torch", 8192, 2.0), bench_row("vefa", "cuda", 8192, 1.5),
                   bench_row("lora", "torch", 8192, 2.0), bench_row("lora", "cuda", 8192, 1.0)]
    (tmp_path / "bench-cuda.json").write_text(json.dumps({"environment": environment, "layers": cuda_layers}))
    (tmp_path / "self-check-cuda.json").write_text(json.dumps(
        {"rows": [check_row("cuda", "vefa"), check_row("cuda", "lora", status="FAIL")]}))
    entries = run(tmp_path)
    # 1.5 / 2.0 against its own run's torch (not 1.5 / 1.0 against the headline's); lora failed its check
    assert [(e["op"], e["backend"], e["ratio"]) for e in entries] == [("vefa", "cuda", 0.75)]
