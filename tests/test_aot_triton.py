"""The Triton kernels compile for the GPU, without one: every kernel, every
dtype and flag case its launcher can produce, for sm_90 and sm_80, through
triton's whole pipeline to a cubin (tools/triton_aot.py). Plus the rules
that keep that check honest: the kernel modules import only triton, every
kernel is declared to the check, and the pruning rule behaves."""

import ast
import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="triton is not importable")

from featadapt.kernels.triton import jit as jit_package  # noqa: E402
from featadapt.kernels.triton.jit import configs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JIT_DIR = os.path.dirname(jit_package.__file__)
JIT_MODULES = [m.name for m in pkgutil.iter_modules([JIT_DIR])]
# What a module in jit/ may import: triton, the standard library's typing
# helpers, and its siblings (relative imports).
ALLOWED_IMPORTS = {"triton", "triton.language", "dataclasses", "typing"}


@pytest.mark.parametrize("name", JIT_MODULES)
def test_kernel_modules_import_only_triton(name):
    tree = ast.parse(open(os.path.join(JIT_DIR, name + ".py")).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module)
    assert imported <= ALLOWED_IMPORTS, f"jit/{name}.py imports {sorted(imported - ALLOWED_IMPORTS)}"


def _jit_functions(module):
    """The @triton.jit functions a module defines (not those it imports)."""
    return {name: obj for name, obj in vars(module).items()
            if hasattr(obj, "fn") and getattr(obj.fn, "__module__", None) == module.__name__}


def test_every_kernel_is_declared_to_the_ahead_of_time_check():
    """A module with kernels declares AOT_KERNELS covering each one; only
    tiles.py holds device helpers that are compiled inside the kernels."""
    declared = 0
    for name in JIT_MODULES:
        module = importlib.import_module(f"{jit_package.__name__}.{name}")
        functions = _jit_functions(module)
        if name == "tiles":
            assert not hasattr(module, "AOT_KERNELS")
            continue
        specs = getattr(module, "AOT_KERNELS", [])
        covered = {spec.kernel for spec in specs}
        missing = [n for n, f in functions.items() if f not in covered]
        assert not missing, f"jit/{name}.py: kernels {missing} are not in its AOT_KERNELS"
        declared += len(specs)
    assert declared >= 5


def test_pruning_rule_drops_what_cannot_fit_and_keeps_a_config():
    big = {"BLOCK_M": 128, "BLOCK_C": 256, "BLOCK_D": 64, "INPUT_PRECISION": "tf32"}
    # 3 stages × (128·64 + 64·256) float32 = 288 KiB: neither target has it; in fp16 it fits both
    assert configs.shared_memory_estimate("scaled_gemm_forward", big, 3, 4) == 3 * (128 * 64 + 64 * 256) * 4
    for arch in (80, 90):
        assert any("shared memory" in r for r in configs.prune_reasons("scaled_gemm_forward", big, 8, 3, "fp32", arch))
        assert configs.prune_reasons("scaled_gemm_forward", big, 8, 3, "fp16", arch) == []
    # the dropout dx kernel keeps two accumulators: twice the registers
    assert configs.prune_reasons("low_rank_gemm_dx", {**big, "HAS_DROPOUT": True}, 8, 3, "fp16", 90)
    # true float32 keeps the operand tiles in registers too
    assert configs.tile_registers("scaled_gemm_forward", {**big, "INPUT_PRECISION": "ieee"}, 8) > \
        configs.tile_registers("scaled_gemm_forward", big, 8)
    tiles = configs.tile_configs(interpret=False)
    for dtype in ("fp16", "bf16", "fp32"):
        kept = configs.usable_configs("scaled_gemm_forward", tiles, {"INPUT_PRECISION": "ieee"}, dtype, 80)
        assert kept and all(c in tiles for c in kept)
        fixed = configs.fixed_config("scaled_gemm_forward", tiles, {"INPUT_PRECISION": "ieee"}, dtype, 80)
        assert fixed in kept
        registers = [configs.tile_registers("scaled_gemm_forward", {**c.kwargs, "INPUT_PRECISION": "ieee"},
                                            c.num_warps) for c in kept]
        assert configs.tile_registers("scaled_gemm_forward", {**fixed.kwargs, "INPUT_PRECISION": "ieee"},
                                      fixed.num_warps) == min(registers)
    # low_rank_dy_grads, bf16, r = 64, BLOCK_M=128 w8 s4: the triton 3.6 sweep measured
    # 245760 bytes on sm_90, over its 232448: the estimate must see it (it once missed
    # the resident Cγ tile and the du layout conversion)
    dy_grads = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_R": 64}
    assert configs.shared_memory_estimate("low_rank_dy_grads", dy_grads, 4, 2) >= 245760
    assert configs.prune_reasons("low_rank_dy_grads", dy_grads, 8, 4, "bf16", 90)
    # low_rank_gemm_forward, fp32, r = 16, 128×128×32 w4 s4: measured 196608 bytes on sm_80
    # (both loops' tiles are pipelined), over its 166912
    low_rank = {"BLOCK_M": 128, "BLOCK_C": 128, "BLOCK_D": 32, "BLOCK_R": 16, "INPUT_PRECISION": "tf32"}
    assert configs.shared_memory_estimate("low_rank_gemm_forward", low_rank, 4, 4) >= 196608
    assert configs.prune_reasons("low_rank_gemm_forward", low_rank, 4, 4, "fp32", 80)
    # the backward's dscale epilogue holds an x tile beside the accumulator
    assert configs.tile_registers("scaled_gemm_backward", {**big, "WRITE_DSCALE": True}, 8) == \
        2 * configs.tile_registers("scaled_gemm_backward", big, 8)


def run_aot(*arguments, env_extra=None, timeout=1500):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "triton_aot.py"), *arguments],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def test_every_kernel_compiles_for_sm90_and_sm80(tmp_path):
    """The representative configuration (the one autotuning-off runs) of every
    kernel, for every case; a compile error anywhere fails here."""
    report_path = tmp_path / "aot.json"
    done = run_aot("check", "--jobs", str(os.cpu_count() or 1), "--report", str(report_path))
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]
    report = json.loads(report_path.read_text())
    compiled = report["compiled"]
    assert not [r for r in compiled if "error" in r]
    assert {r["arch"] for r in compiled} == {"sm_90", "sm_80"}
    kernels = {spec.name for name in JIT_MODULES
               for spec in getattr(importlib.import_module(f"{jit_package.__name__}.{name}"), "AOT_KERNELS", [])}
    assert {r["kernel"] for r in compiled} == kernels
    assert {r["dtype"] for r in compiled} == {"fp16", "bf16", "fp32"}
    for record in compiled:  # each compile went through ptxas and fits its target
        assert record["registers"] and record["registers"] <= 255, record
        assert record["shared_bytes"] <= configs.SHARED_MEMORY_BYTES[int(record["arch"][3:])], record


BAD_KERNEL = """
import sys
import triton
import triton.language as tl

sys.path.insert(0, TOOLS)
import triton_aot

package, _ = triton_aot.load_jit_package()
specs = sys.modules[package.__name__ + ".specs"]


@triton.jit
def dot8_kernel(a_ptr, out_ptr, INPUT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)[:, None]
    a = tl.load(a_ptr + rows * BLOCK_D + tl.arange(0, BLOCK_D)[None, :])
    c = tl.dot(a, tl.trans(a), input_precision=INPUT_PRECISION)  # a reduction of 8: below tl.dot's 16
    tl.store(out_ptr + rows * BLOCK_C + tl.arange(0, BLOCK_C)[None, :], c)


def launch_args(a, out):
    return dict(a_ptr=a, out_ptr=out, INPUT_PRECISION="tf32")


def cases(shape):
    yield dict(a=specs.tensor("float16", 16, 8), out=specs.tensor("float32", 16, 16))


config = triton.Config({"BLOCK_M": 16, "BLOCK_C": 16, "BLOCK_D": 8}, num_warps=1, num_stages=1)
spec = specs.KernelSpec("dot8", dot8_kernel, launch_args, cases, lambda: [config], operand_dtype="a")
triton_aot.kernel_specs = lambda: [spec]
sys.exit(triton_aot.main(["check", "--jobs", "1", "--arch", "90"]))
"""


def test_a_compile_error_fails_the_check(tmp_path):
    """tl.dot with a reduction of 8 runs in the interpreter, but no GPU compiles
    it: the check exits 1 and names the kernel and the error."""
    script = tmp_path / "bad_kernel.py"
    script.write_text(f"TOOLS = {os.path.join(ROOT, 'tools')!r}\n" + BAD_KERNEL)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "dot8 sm_90" in done.stdout and "1 failed" in done.stdout, done.stdout
