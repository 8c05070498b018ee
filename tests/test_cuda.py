"""The `cuda` backend: the CUDA C++ kernels of csrc/, built as featadapt._C.

On any machine with a CUDA toolkit (CUDA_HOME) and a CUDA build of torch, the
extension must be built, import, and register every op with its schema and a
fake implementation; the backend must say why it cannot run without a GPU.
The kernels' numerics need a GPU: those tests carry the `gpu` marker and
compare every op against the float64 reference (DESIGN.md §4).
"""

import os
import re
import subprocess
import sys

import pytest
import torch

import featadapt
from featadapt.kernels import cuda as kernels
from featadapt.ops import dispatch
from helpers import (
    KERNEL_DTYPES,
    METHODS,
    TOL,
    Case,
    OpRecorder,
    call_op,
    check_against_float64_reference,
    gradients,
    make_inputs,
    rel_err,
    saved_activation_bytes,
    strided_parameter_inputs,
    to_device,
    toolkit_present,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = dispatch.get_backend("cuda")
gpu = pytest.mark.gpu


built = pytest.mark.skipif(kernels.IMPORT_ERROR is not None, reason=f"cuda backend: {kernels.IMPORT_ERROR}")
pytestmark = pytest.mark.usefixtures("true_float32")


# -- the build, on any machine -------------------------------------------------


@pytest.mark.skipif(
    not toolkit_present() or torch.version.cuda is None or os.environ.get("FEATADAPT_SKIP_CUDA_BUILD") == "1",
    reason="needs a CUDA toolkit in CUDA_HOME and a CUDA build of torch (the Makefile sets CUDA_HOME)",
)
def test_the_extension_is_built_wherever_a_toolkit_is():
    assert kernels.IMPORT_ERROR is None
    assert kernels.CUDA_ARCHS and all(arch >= 80 for arch in kernels.CUDA_ARCHS)


SCHEMAS = {
    "cuda_scaled_gemm": "(Tensor x, Tensor weight, Tensor? bias, Tensor scale, Tensor? shift) -> Tensor",
    "cuda_scaled_gemm_backward": "(Tensor dy, Tensor x, Tensor weight, Tensor scale, bool need_dx, "
                                 "bool need_dscale, bool need_dshift) -> (Tensor, Tensor, Tensor)",
    "cuda_low_rank_gemm": "(Tensor x, Tensor weight, Tensor? bias, Tensor u, Tensor c) -> Tensor",
    "cuda_low_rank_gemm_dx": "(Tensor dy, Tensor weight, Tensor du, Tensor a, Tensor? keep, "
                             "float keep_scale) -> Tensor",
    "cuda_low_rank_dy_grads": "(Tensor dy, Tensor u, Tensor c, float scaling, bool need_du, "
                              "bool need_dc) -> (Tensor, Tensor)",
}


@built
@pytest.mark.parametrize("name", kernels.OP_NAMES)
def test_every_op_is_registered_with_its_schema(name):
    schema = str(getattr(torch.ops.featadapt, name).default._schema)
    assert schema == f"featadapt::{name}{SCHEMAS[name]}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"featadapt::{name}", "CUDA")


def meta(*shape, dtype=torch.float16):
    return torch.empty(shape, device="meta", dtype=dtype)


F32 = torch.float32
# op -> (arguments on the meta device, expected output shapes and dtypes)
FAKE_CASES = {
    "cuda_scaled_gemm": ((meta(5, 7), meta(3, 7), meta(3), meta(7, dtype=F32), None), [((5, 3), torch.float16)]),
    "cuda_scaled_gemm_backward": (
        (meta(5, 3), meta(5, 7), meta(3, 7), meta(7, dtype=F32), True, False, True),
        [((5, 7), torch.float16), ((0,), F32), ((7,), F32)],
    ),
    "cuda_low_rank_gemm": ((meta(5, 7), meta(3, 7), None, meta(5, 2), meta(3, 2)), [((5, 3), torch.float16)]),
    "cuda_low_rank_gemm_dx": (
        (meta(5, 3), meta(3, 7), meta(5, 2), meta(2, 7), meta(5, 7, dtype=F32), 1.25),
        [((5, 7), torch.float16)],
    ),
    "cuda_low_rank_dy_grads": (
        (meta(5, 3), meta(5, 2), meta(3, 2), 0.5, True, True),
        [((5, 2), F32), ((3, 2), F32)],
    ),
}


@built
@pytest.mark.parametrize("name", kernels.OP_NAMES)
def test_fake_implementations_give_output_shapes_and_dtypes(name):
    """What torch.compile traces with: shapes and dtypes, no kernel run."""
    args, expected = FAKE_CASES[name]
    outputs = getattr(torch.ops.featadapt, name)(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert [(tuple(o.shape), o.dtype) for o in outputs] == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")
def test_without_a_gpu_it_says_why_and_auto_passes_it_over(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    reason = BACKEND.unavailable_reason()
    assert reason == (kernels.IMPORT_ERROR or "no CUDA device")
    t = make_inputs("lora", (4,), 17, 13, r=3)
    with pytest.raises(featadapt.BackendUnavailableError,
                       match=re.escape(f"backend 'cuda' (from backend=) cannot run lora: {reason}")):
        call_op("lora", t, "cuda")
    assert dispatch.select_backend("lora", tuple(v for v in t.values() if v is not None)).name == "torch"


def test_info_reports_the_extension():
    from featadapt.info import report

    text = report()
    line = next(line for line in text.splitlines() if line.startswith("featadapt._C"))
    if kernels.IMPORT_ERROR is None:
        assert "built for compute capabilities" in line
    else:
        assert kernels.IMPORT_ERROR in line


def test_a_missing_extension_does_not_break_import():
    """Without featadapt._C, `import featadapt` works and the backend says why."""
    script = (
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'featadapt._C' else real(name, *a)\n"
        "import featadapt\n"
        "from featadapt.ops.dispatch import get_backend\n"
        "print(get_backend('cuda').unavailable_reason())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == kernels.NOT_BUILT


# -- on a GPU: every op against float64 ---------------------------------------

# Odd shapes for the tile sizes (64 and 128 rows and columns, depth steps of
# 16 and 32, rank slices of 16, 32 and 64): tails everywhere, M = 0 and 1,
# ranks 1, 7, 17 and 100 (two rank slices), 3-D and non-contiguous x.
SHAPES = {
    "M0": Case((0,), 17, 13),
    "M1-r1-nobias-noshift": Case((1,), 17, 13, r=1, bias=False, shift=False),
    "M97-K33-N17": Case((97,), 33, 17),
    "M1025-K257-N129-r17-dropout": Case((1025,), 257, 129, r=17, dropout_p=0.1),
    "M130-K64-N192-nobias": Case((130,), 64, 192, bias=False),
    "BxT-3x43-K40-N72-noncontig-dropout": Case((3, 43), 40, 72, noncontiguous=True, dropout_p=0.3),
    "M200-K96-N80-r100-train-base-dropout": Case((200,), 96, 80, r=100, dropout_p=0.2, train_base=True),
}


@gpu
@pytest.mark.parametrize("case", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtypes", KERNEL_DTYPES.values(), ids=KERNEL_DTYPES.keys())
@pytest.mark.parametrize("method", METHODS)
def test_gpu_matches_float64_reference(method, dtypes, case):
    t = case.inputs(method, *dtypes, device="cuda")
    check_against_float64_reference(method, "cuda", t, dropout_p=case.dropout_for(method))


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_gpu_unaligned_and_transposed_operands(method, dtype):
    """x one element past an aligned address (no vector loads) and a transposed
    weight view (GPT-2's Conv1D stores W0ᵀ): the kernels take any strides."""
    t = make_inputs(method, (77,), 40, 24, r=5, dtype=dtype, requires_grad=False)
    t = to_device(t, "cuda")
    storage = torch.randn(77 * 40 + 1, device="cuda").to(dtype)
    t["x"] = storage[1:].view(77, 40).copy_(t["x"]).requires_grad_(True)
    t["weight"] = t["weight"].T.contiguous().T
    assert t["x"].data_ptr() % 16 != 0 and not t["weight"].is_contiguous()
    for name in ("scale", "shift", "lora_A", "lora_B"):
        if t.get(name) is not None:
            t[name].requires_grad_(True)
    check_against_float64_reference(method, "cuda", t, dropout_p=0.1 if method != "vefa" else 0.0)


@gpu
@pytest.mark.parametrize("method", METHODS)
def test_gpu_strided_parameter_vectors(method):
    check_against_float64_reference(method, "cuda", strided_parameter_inputs(method, "cuda"))


@gpu
@pytest.mark.parametrize("method", METHODS)
def test_gpu_runs_the_cuda_ops(method):
    t = SHAPES["M97-K33-N17"].inputs(method, torch.bfloat16, device="cuda")
    with OpRecorder() as recorder:
        y = call_op(method, t, "cuda", dropout_p=0.1 if method != "vefa" else 0.0)
        gradients(y, torch.randn_like(y), t)
    expected = {"cuda_scaled_gemm", "cuda_scaled_gemm_backward"} if method == "vefa" else {
        "cuda_low_rank_gemm", "cuda_low_rank_dy_grads", "cuda_low_rank_gemm_dx"}
    assert set(recorder.ops) == expected


@gpu
@pytest.mark.parametrize("method,dropout_p", [("vefa", 0.0), ("lorfa", 0.2), ("lora", 0.0), ("lora", 0.2)])
def test_gpu_saves_only_x_and_u(method, dropout_p):
    m, r = 45, 8
    t = to_device(make_inputs(method, (m,), 40, 24, r=r, dtype=torch.bfloat16, param_dtype=torch.float32), "cuda")
    params = [value for name, value in t.items() if name != "x"]
    saved = saved_activation_bytes(lambda: call_op(method, t, "cuda", dropout_p=dropout_p), params)
    assert saved == t["x"].numel() * 2 + (0 if method == "vefa" else m * r * 2)


@gpu
@pytest.mark.parametrize("method", METHODS)
def test_gpu_gradients_are_bit_identical_across_runs(method):
    """Partial sums added in a fixed order: no atomics anywhere."""
    t = SHAPES["M1025-K257-N129-r17-dropout"].inputs(method, torch.bfloat16, torch.float32, device="cuda")
    dy = torch.randn(1025, 129, device="cuda", dtype=torch.bfloat16)
    runs = [gradients(call_op(method, t, "cuda"), dy, t) for _ in range(2)]
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


DY_GRADS_SHAPES = [(1, 17, 1), (97, 257, 7), (1025, 129, 17), (300, 200, 100), (8192, 4096, 16)]


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,r", DY_GRADS_SHAPES, ids=[f"M{m}-N{n}-r{r}" for m, n, r in DY_GRADS_SHAPES])
def test_gpu_dy_grads_op_matches_matmuls(m, n, r, dtype):
    dy, u, c = (torch.randn(shape, device="cuda").to(dtype) for shape in ((m, n), (m, r), (n, r)))
    du, dc = kernels.low_rank_dy_grads(dy, u, c, 0.5, True, True)
    assert du.dtype == dc.dtype == torch.float32
    assert rel_err(du, dy.double() @ c.double()) <= TOL[dtype]
    assert rel_err(dc, 0.5 * dy.double().T @ u.double()) <= TOL[dtype]
    du_only, dc_none = kernels.low_rank_dy_grads(dy, u, c, 0.5, True, False)
    assert dc_none.numel() == 0 and torch.equal(du_only, du)


@gpu
def test_gpu_bad_inputs_get_clear_errors():
    x = torch.randn(8, 16, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 16, device="cuda", dtype=torch.bfloat16)
    scale = torch.ones(16, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="scale must have dtype Float, got BFloat16"):
        torch.ops.featadapt.cuda_scaled_gemm(x, w, None, scale, None)
    with pytest.raises(RuntimeError, match=r"weight.shape\[1\] must be x.shape\[1\] \(K\) = 16"):
        torch.ops.featadapt.cuda_scaled_gemm(x, w[:, :8], None, scale.float(), None)
    with pytest.raises(RuntimeError, match="float64 runs on backend='torch'"):
        torch.ops.featadapt.cuda_low_rank_gemm(x.double(), w.double(), None, x[:, :2].double(), w[:, :2].double())
