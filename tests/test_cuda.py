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
    to_float64,
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


def test_a_library_that_does_not_load_says_what_to_do():
    """Checked by hand with a CPU-only torch 2.13: the CUDA build's library
    needs libtorch_cuda.so, and featadapt then runs on torch ops."""
    from featadapt.kernels.extension import load_failure

    cpu_torch = load_failure(ImportError("libtorch_cuda.so: cannot open shared object file: No such file or directory"))
    assert "this torch has no CUDA libraries" in cpu_torch and "libtorch_cuda.so" in cpu_torch
    old_torch = load_failure(ImportError("undefined symbol: torch_call_dispatcher"))
    assert "it needs torch 2.10 or newer" in old_torch and "torch_call_dispatcher" in old_torch


# -- CUTLASS's plan, on any machine with the extension ------------------------
#
# The extension's cuda_plan asks CUTLASS (can_implement and workspace sizing)
# whether it can run a problem, without a GPU. What it refuses, the backend's
# layout_reasons must refuse too, so that dispatch never launches it.

PLAN_SHAPES = [  # (M, K, N, x row stride or None for contiguous)
    (0, 16, 8, None), (1, 17, 33, None), (97, 257, 17, None), (130, 48, 257, None), (1025, 264, 136, None),
    (1, 8, 8, None), (97, 40, 24, None), (4096, 4096, 4096, None), (1025, 17, 24, None), (97, 24, 17, None),
    (97, 40, 24, 48), (97, 40, 24, 41), (97, 40, 24, 44),
]
PLAN_IDS = [f"M{m}-K{k}-N{n}" + (f"-ld{ld}" if ld else "") for m, k, n, ld in PLAN_SHAPES]


def x_with_row_stride(m, k, ld, dtype):
    if ld is None:
        return torch.empty(m, k, dtype=dtype)
    return torch.empty(m, ld, dtype=dtype)[:, :k]


@built
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("m,k,n,ld", PLAN_SHAPES, ids=PLAN_IDS)
def test_plan_agrees_with_the_backends_reasons(m, k, n, ld, dtype, capability):
    from featadapt.ops.cuda_backend import layout_reasons

    x = x_with_row_stride(m, k, ld, dtype)
    reasons = layout_reasons(x, torch.empty(n, k, dtype=dtype))
    row = x.stride(0) if m > 1 else k
    for op in ("vefa_forward", "low_rank_forward"):
        answer = kernels.plan(op, capability, dtype, m, n, k, row)
        assert (answer == "") == (not reasons), (op, answer, reasons)
    # the backward ops read dy (M, N), contiguous as autograd hands it over (the op copies any other layout)
    for op in ("vefa_backward", "low_rank_dx"):
        answer = kernels.plan(op, capability, dtype, m, n, k)
        assert (answer == "") == (k % 8 == 0 and n % 8 == 0), (op, answer)


@built
def test_plan_reasons_say_what_is_wrong():
    answer = kernels.plan("vefa_forward", 90, torch.bfloat16, 97, 24, 17)
    assert answer.startswith("the reduction size 17 is not a multiple of 8") and "sm_90a" in answer
    # the backward's GEMM reduces over N: the forward's N = 33 is its reduction size
    answer = kernels.plan("vefa_backward", 80, torch.float16, 97, 33, 40)
    assert answer.startswith("the reduction size 33 is not a multiple of 8") and "sm_80" in answer
    assert "leading dimension" in kernels.plan("low_rank_forward", 90, torch.bfloat16, 97, 24, 40, 41)
    assert kernels.plan("vefa_backward", 90, torch.bfloat16, 2048, 4096, 4096) == ""
    with pytest.raises(RuntimeError, match="capability must be 80 .* or 90 .*, got 75"):
        kernels.plan("vefa_forward", 75, torch.bfloat16, 8, 8, 8)
    with pytest.raises(RuntimeError, match="op must be vefa_forward, .*got 'vefa'"):
        kernels.plan("vefa", 90, torch.bfloat16, 8, 8, 8)
    with pytest.raises(RuntimeError, match="float32 and float64 run on backend='torch'"):
        kernels.plan("vefa_forward", 90, torch.float32, 8, 8, 8)


@built
def test_the_plan_op_needs_no_tensor_and_no_device():
    schema = str(torch.ops.featadapt.cuda_plan.default._schema)
    assert schema == ("featadapt::cuda_plan(str op, int capability, ScalarType dtype, int m, int n, int k, "
                      "int x_row_stride) -> str")
    assert torch.ops.featadapt.cuda_plan("low_rank_dx", 80, torch.bfloat16, 1, 8, 8, 8) == ""


def test_the_backend_refuses_what_cutlass_cannot_take():
    """Checked before dispatch, on any device: 16-bit dtypes, K and N multiples of
    8, x row-major with 16-byte rows at a 16-byte boundary, a contiguous weight."""
    from featadapt.ops.cuda_backend import dtype_reasons_16bit, layout_reasons

    w = torch.empty(24, 40, dtype=torch.bfloat16)
    assert layout_reasons(torch.empty(3, 5, 40, dtype=torch.bfloat16), w) == []
    assert layout_reasons(torch.empty(97, 17, dtype=torch.bfloat16), torch.empty(24, 17))[0].startswith(
        "K = 17 is not a multiple of 8")
    assert layout_reasons(torch.empty(97, 40), torch.empty(13, 40))[0].startswith("N = 13 is not a multiple of 8")
    transposed = torch.empty(3, 5, 40, dtype=torch.bfloat16).transpose(0, 1)
    assert "is not row-major" in layout_reasons(transposed, w)[0]
    assert "is not contiguous" in layout_reasons(torch.empty(4, 40, dtype=torch.bfloat16), w.T.contiguous().T)[0]
    offset = torch.empty(97 * 40 + 1, dtype=torch.bfloat16)[1:].view(97, 40)
    assert "not at a 16-byte boundary" in layout_reasons(offset, w)[0]
    assert "run on backend='torch'" in dtype_reasons_16bit([torch.empty(2, 8), torch.empty(8, 8)])[0]
    assert "float64" in dtype_reasons_16bit([torch.empty(2, 8, dtype=torch.float64)])[0]
    assert dtype_reasons_16bit([torch.empty(2, 8, dtype=torch.float16), torch.empty(8, dtype=torch.float32)]) == []


@pytest.mark.parametrize("capability,built_for,runs", [
    (90, (90,), True), (90, (80,), True), (90, (80, 90), True), (80, (90,), False), (86, (80,), True),
    (80, (86,), False), (100, (80, 90), True), (100, (90,), False), (120, (), True),
])
def test_which_gpus_an_extension_serves(capability, built_for, runs):
    from featadapt.ops.cuda_backend import runs_on_capability

    why = runs_on_capability(capability, built_for)
    assert (why is None) == runs, why
    if why is not None:
        assert "rebuild with FEATADAPT_CUDA_ARCHS=" in why


# -- on a GPU: every op against float64 ---------------------------------------

CUDA_DTYPES = {name: d for name, d in KERNEL_DTYPES.items() if d[0] in (torch.float16, torch.bfloat16)}

# Odd shapes for CUTLASS's tiles (sm_90a: 128 × 256 × 64; sm_80: 128 × 128 × 32)
# with K and N multiples of 8, which the kernels need: tails everywhere, M = 0
# and 1, ranks 1, 7, 17 and 100, 3-D x.
SHAPES = {
    "M0": Case((0,), 16, 8),
    "M1-r1-nobias-noshift": Case((1,), 24, 16, r=1, bias=False, shift=False),
    "M97-K40-N24": Case((97,), 40, 24),
    "M1025-K264-N136-r17-dropout": Case((1025,), 264, 136, r=17, dropout_p=0.1),
    "M130-K64-N264-nobias": Case((130,), 64, 264, bias=False),
    "BxT-3x43-K40-N72-dropout": Case((3, 43), 40, 72, dropout_p=0.3),
    "M200-K96-N80-r100-train-base-dropout": Case((200,), 96, 80, r=100, dropout_p=0.2, train_base=True),
}
# What the backend refuses (auto then runs torch): the kernels never see them.
REFUSED = {
    "M97-K33-N24": (Case((97,), 33, 24), "K = 33 is not a multiple of 8"),
    "M97-K40-N17": (Case((97,), 40, 17), "N = 17 is not a multiple of 8"),
    "BxT-3x43-K40-N72-noncontig": (Case((3, 43), 40, 72, noncontiguous=True), "is not row-major"),
}


@gpu
@pytest.mark.parametrize("case", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtypes", CUDA_DTYPES.values(), ids=CUDA_DTYPES.keys())
@pytest.mark.parametrize("method", METHODS)
def test_gpu_matches_float64_reference(method, dtypes, case):
    t = case.inputs(method, *dtypes, device="cuda")
    check_against_float64_reference(method, "cuda", t, dropout_p=case.dropout_for(method))


@gpu
@pytest.mark.parametrize("case,reason", REFUSED.values(), ids=REFUSED.keys())
@pytest.mark.parametrize("method", METHODS)
def test_gpu_refused_shapes_say_why_and_auto_runs_torch(method, case, reason):
    t = case.inputs(method, torch.bfloat16, device="cuda")
    with pytest.raises(featadapt.BackendUnavailableError, match=re.escape(reason)):
        call_op(method, t, "cuda")
    assert dispatch.select_backend(method, tuple(v for v in t.values() if v is not None)).name != "cuda"


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_gpu_ops_copy_gradients_they_cannot_read(method, dtype):
    """The backward ops take dy as autograd hands it over: an expanded or
    misaligned gradient is copied, not refused."""
    t = to_device(make_inputs(method, (77,), 40, 24, r=5, dtype=dtype), "cuda")
    y = call_op(method, t, "cuda", dropout_p=0.1 if method != "vefa" else 0.0)
    grads = torch.autograd.grad(y.sum(), [v for v in t.values() if v is not None and v.requires_grad])
    y64 = call_op(method, to_float64(t), "reference", dropout_p=0.1 if method != "vefa" else 0.0)
    needing = [v for v in to_float64(t).values() if v is not None and v.requires_grad]
    expected = torch.autograd.grad(y64.sum(), needing) if method == "vefa" else None
    for g in grads:
        assert torch.isfinite(g).all()
    if expected is not None:  # (dropout draws differ between the two dtypes' runs)
        for g, e in zip(grads, expected):
            assert rel_err(g, e) <= TOL[dtype]


@gpu
@pytest.mark.parametrize("method", METHODS)
def test_gpu_strided_parameter_vectors(method):
    t = strided_parameter_inputs(method, "cuda", k=40, n=24, dtype=torch.bfloat16)
    check_against_float64_reference(method, "cuda", t)


@gpu
@pytest.mark.parametrize("method", METHODS)
def test_gpu_runs_the_cuda_ops(method):
    t = SHAPES["M97-K40-N24"].inputs(method, torch.bfloat16, device="cuda")
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
    t = SHAPES["M1025-K264-N136-r17-dropout"].inputs(method, torch.bfloat16, torch.float32, device="cuda")
    dy = torch.randn(1025, 136, device="cuda", dtype=torch.bfloat16)
    runs = [gradients(call_op(method, t, "cuda"), dy, t) for _ in range(2)]
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


@gpu
@pytest.mark.parametrize("method", METHODS)
def test_gpu_the_ampere_kernels_on_a_hopper_gpu(method, monkeypatch):
    """FEATADAPT_CUTLASS_ARCH=sm80 runs CUTLASS's sm_80 kernels (from their PTX)
    on an sm_90 GPU, so one machine checks both builds."""
    if not any(80 <= a < 90 for a in kernels.CUDA_ARCHS):
        pytest.skip(f"the extension has no sm_80 kernels (built for {kernels.CUDA_ARCHS})")
    monkeypatch.setenv("FEATADAPT_CUTLASS_ARCH", "sm80")
    t = SHAPES["M1025-K264-N136-r17-dropout"].inputs(method, torch.bfloat16, torch.float32, device="cuda")
    check_against_float64_reference(method, "cuda", t, dropout_p=SHAPES["M1025-K264-N136-r17-dropout"].dropout_for(method))


DY_GRADS_SHAPES = [(1, 17, 1), (97, 257, 7), (1025, 129, 17), (300, 200, 100), (8192, 4096, 16)]


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
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
    w = torch.randn(8, 16, device="cuda", dtype=torch.bfloat16)
    scale = torch.ones(16, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="scale must have dtype Float, got BFloat16"):
        torch.ops.featadapt.cuda_scaled_gemm(x, w, None, scale, None)
    with pytest.raises(RuntimeError, match=r"weight.shape\[1\] must be x.shape\[1\] \(K\) = 16"):
        torch.ops.featadapt.cuda_scaled_gemm(x, w[:, :8], None, scale.float(), None)
    with pytest.raises(RuntimeError, match="float32 and float64 run on backend='torch'"):
        torch.ops.featadapt.cuda_low_rank_gemm(x.float(), w.float(), None, x[:, :2].float(), w[:, :2].float())
    x17, w17 = torch.randn(8, 17, device="cuda", dtype=torch.bfloat16), torch.randn(8, 17, device="cuda").bfloat16()
    with pytest.raises(RuntimeError, match="the reduction size 17 is not a multiple of 8"):
        torch.ops.featadapt.cuda_scaled_gemm(x17, w17, None, torch.ones(17, device="cuda"), None)
