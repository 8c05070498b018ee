"""The CUDA extension's resource report (benchmarks/results/cuda-resources.json,
tools/cuda_resources.py): the built kernels are the reported ones, none
that used no local memory (no spills, no stack) does now, and the build the
report came from printed no ptxas warning (e.g. C7510: wgmma serialised)."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import cuda_resources  # noqa: E402

EXTENSION = cuda_resources.extension_path()
pytestmark = pytest.mark.skipif(EXTENSION is None or cuda_resources.cuobjdump() is None,
                                reason="needs the built extension featadapt._C and cuobjdump")


def committed():
    import json
    with open(cuda_resources.REPORT) as f:
        return json.load(f)["kernels"]


def test_no_kernel_that_did_not_spill_spills_now():
    worse = cuda_resources.regressions(committed(), cuda_resources.measure(EXTENSION))
    assert not worse, "newly spilling: " + "; ".join(
        f"{r['arch']} {r['kernel']} LOCAL {r['local_bytes']} STACK {r['stack_bytes']}" for r in worse)


def test_the_report_lists_the_built_kernels():
    """A kernel added or renamed needs `make cuda-resources`."""
    report = committed()
    archs = {r["arch"] for r in report}
    measured = [(r["arch"], r["kernel"]) for r in cuda_resources.measure(EXTENSION) if r["arch"] in archs]
    assert len(measured) == len(set(measured)), "two kernels share a label"
    assert set(measured) == {(r["arch"], r["kernel"]) for r in report}


def test_the_report_covers_both_cutlass_builds_and_no_ptxas_warning():
    with open(cuda_resources.REPORT) as f:
        report = json.load(f)
    kernels = {(r["arch"], r["kernel"]) for r in report["kernels"] if r["registers"] > 32}  # (not the empty stubs)
    assert any(arch == "sm_90" and "cutlass sm90 GEMM" in name for arch, name in kernels)
    assert any(arch == "sm_80" and "cutlass sm80 GEMM" in name for arch, name in kernels)
    assert report["ptxas_warnings"] == []


def test_the_warning_parser_reads_ptxas_output():
    log = """
ptxas info    : Used 168 registers, used 2 barriers
ptxas info    : (C7510) Potential Performance Loss: wgmma.mma_async instructions are serialized due to \
wgmma pipeline crossing function boundary at a function call in the function '_ZN7cutlass13device_kernelIvEEvv'
ptxas warning : Registers are spilled to local memory in function '_Z3foov', 8 bytes spill stores
"""
    warnings = cuda_resources.ptxas_warnings(log)
    assert [w.split(":")[1].split()[0] for w in warnings] == ["(C7510)", "Registers"]
    assert all("_Z" not in w for w in warnings)


def test_the_parser_reads_cuobjdump_output():
    text = """
Fatbin elf code:
================
arch = sm_90
 Resource usage:
 Function _Z6kernelv:
  REG:40 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:792 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    (record,) = cuda_resources.parse_resource_usage(text)
    assert record == {"arch": "sm_90", "kernel": "kernel()", "registers": 40, "stack_bytes": 16,
                      "shared_bytes": 1024, "local_bytes": 8}
    assert cuda_resources.spills(record)
    clean = {**record, "stack_bytes": 0, "local_bytes": 0}
    assert cuda_resources.regressions([clean], [record]) == [record]
    assert cuda_resources.regressions([record], [record]) == []
