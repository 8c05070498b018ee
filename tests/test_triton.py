"""The `triton` backend: forward and every gradient against the float64
reference, saved activations, the deterministic reduction, dispatch and the
custom ops.

Without a GPU the kernels run on CPU tensors in Triton's interpreter
(conftest.py sets TRITON_INTERPRET=1); with one, the same tests run on CUDA.
What triton 3.8's interpreter can be trusted with was checked first: float32
and float16 tiles (loads, tl.dot, elementwise arithmetic, stores) are right;
bfloat16 loads, stores and conversions to float32 are right, but bfloat16
arithmetic (tl.dot and elementwise multiply) gives garbage. So the backend
refuses bfloat16 under the interpreter, and every bfloat16 case is a `gpu` test.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import featadapt
from featadapt.ops import dispatch, dispatch_table, triton_backend
from helpers import (
    DEVICE,
    KERNEL_DTYPES,
    METHODS,
    Case,
    OpRecorder,
    TOL,
    call_op,
    check_against_float64_reference,
    grad_names,
    gradients,
    make_inputs,
    rel_err,
    saved_activation_bytes,
    strided_parameter_inputs,
    to_device,
    to_float64,
    triton_runs,
)

kernels = pytest.importorskip("featadapt.kernels.triton", reason="triton is not importable")
low_rank_dy_grads = pytest.importorskip("featadapt.kernels.triton.low_rank_gemm").low_rank_dy_grads

BACKEND = dispatch.get_backend("triton")
runs_here = triton_runs
interpreter_only = pytest.mark.skipif(not kernels.INTERPRET, reason="needs TRITON_INTERPRET=1")
LOW_RANK = ("lorfa", "lora")
pytestmark = pytest.mark.usefixtures("true_float32")


# Tiny odd shapes: the interpreter's tiles are 32 (rows, columns) by 16
# (reduction) and rank steps 16, so these give masked tails everywhere, several
# tiles and reduction steps, partial groups of row tiles and two rank steps.
SHAPES = {
    "M0": Case((0,), 17, 13),
    "M1-r1-nobias-noshift": Case((1,), 17, 13, r=1, bias=False, shift=False),
    "M37-K33-N17": Case((37,), 33, 17),
    "M37-K17-N33-r17-dropout": Case((37,), 17, 33, r=17, dropout_p=0.1),
    "M70-K40-N70-nobias": Case((70,), 40, 70, bias=False),
    "BxT-3x11-K33-N17-noncontig-dropout": Case((3, 11), 33, 17, noncontiguous=True, dropout_p=0.3),
    "M37-K17-N13-train-base-dropout": Case((37,), 17, 13, dropout_p=0.2, train_base=True),
    "M97-K129-N65-r16-dropout": Case((97,), 129, 65, r=16, dropout_p=0.1),
}

gpu = pytest.mark.gpu
# x dtype, adapter parameter dtype
# bfloat16 only on a GPU (see the module docstring)
DTYPES = {name: pytest.param(d, marks=gpu) if d[0] == torch.bfloat16 else d for name, d in KERNEL_DTYPES.items()}


@runs_here
@pytest.mark.parametrize("case", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("method", METHODS)
def test_matches_float64_reference(method, dtypes, case):
    t = case.inputs(method, *dtypes, device=DEVICE)
    check_against_float64_reference(method, "triton", t, dropout_p=case.dropout_for(method))


KERNELS = {
    "vefa": ["scaled_gemm", "scaled_gemm_backward"],
    "lorfa": ["low_rank_gemm", "low_rank_dy_grads", "low_rank_gemm_dx"],
    "lora": ["low_rank_gemm", "low_rank_dy_grads", "low_rank_gemm_dx"],
}


@runs_here
@pytest.mark.parametrize("method", METHODS)
def test_runs_the_kernels_forward_and_backward(method):
    """backend="triton" really runs the custom ops (nothing falls back to torch)."""
    t = SHAPES["M37-K33-N17"].inputs(method, device=DEVICE)
    with OpRecorder() as recorder:
        y = call_op(method, t, "triton", dropout_p=0.1 if method in LOW_RANK else 0.0)
        gradients(y, torch.randn_like(y), t)
    assert recorder.ops == KERNELS[method]


@runs_here
@pytest.mark.parametrize("wanted", ["x", "params"])
@pytest.mark.parametrize("method", METHODS)
def test_only_some_inputs_require_grad(method, wanted):
    """x alone, or the adapter parameters alone: the kernels skip what is not asked for."""
    t = SHAPES["M37-K33-N17"].inputs(method, torch.float16, device=DEVICE)
    for name, value in t.items():
        if value is not None:
            value.requires_grad_((name == "x") == (wanted == "x"))
    dropout_p = 0.2 if method in LOW_RANK else 0.0
    t64 = to_float64(t)
    torch.manual_seed(3)
    y = call_op(method, t, "triton", dropout_p=dropout_p)
    torch.manual_seed(3)
    y64 = call_op(method, t64, "reference", dropout_p=dropout_p)
    dy = torch.randn_like(y)
    grads, grads64 = gradients(y, dy, t), gradients(y64, dy.double(), t64)
    assert (set(grads) == {"x"}) == (wanted == "x")
    for name, grad in grads.items():
        assert rel_err(grad, grads64[name]) <= TOL[torch.float16], name


@runs_here
@pytest.mark.parametrize("method", METHODS)
def test_expanded_output_gradient(method):
    """y.sum().backward() hands the kernels a dy with zero strides."""
    t = SHAPES["BxT-3x11-K33-N17-noncontig-dropout"].inputs(method, device=DEVICE)
    t64 = to_float64(t)
    names = grad_names(t)
    dropout_p = 0.3 if method in LOW_RANK else 0.0
    torch.manual_seed(7)
    y = call_op(method, t, "triton", dropout_p=dropout_p)
    torch.manual_seed(7)
    y64 = call_op(method, t64, "reference", dropout_p=dropout_p)
    grads = torch.autograd.grad(y.sum(), [t[name] for name in names])
    grads64 = torch.autograd.grad(y64.sum(), [t64[name] for name in names])
    for name, grad, grad64 in zip(names, grads, grads64):
        assert rel_err(grad, grad64) <= TOL[torch.float32], name


@runs_here
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_x_stays_in_its_row(method):
    t = make_inputs(method, (40,), 17, 13, r=4, requires_grad=False)
    t["x"][2, 3] = float("nan")
    y = call_op(method, to_device(t, DEVICE), "triton")
    assert torch.isnan(y[2]).all()
    assert torch.isfinite(torch.cat([y[:2], y[3:]])).all()


# -- memory rule and determinism -----------------------------------------------


MEMORY_RUNS = [("vefa", 0.0), ("lorfa", 0.0), ("lorfa", 0.2), ("lora", 0.0), ("lora", 0.2)]


@runs_here
@pytest.mark.parametrize("x_dtype", [torch.float16, pytest.param(torch.bfloat16, marks=gpu)])
@pytest.mark.parametrize("method,dropout_p", MEMORY_RUNS, ids=[f"{m}-p{p}" for m, p in MEMORY_RUNS])
def test_saves_only_x_and_u(method, dropout_p, x_dtype):
    """VeFA saves x; LoRA/LoRFA save x and u (M×r) in x's dtype: no float32
    copy of a half-precision x even with float32 adapters, no x̂, no mask."""
    m, r = 45, 8
    t = to_device(make_inputs(method, (m,), 40, 24, r=r, dtype=x_dtype, param_dtype=torch.float32), DEVICE)
    params = [value for name, value in t.items() if name != "x"]
    saved = saved_activation_bytes(lambda: call_op(method, t, "triton", dropout_p=dropout_p), params)
    x_bytes = t["x"].numel() * t["x"].element_size()
    assert saved == x_bytes + (0 if method == "vefa" else m * r * t["x"].element_size())


@runs_here
def test_vefa_parameter_gradients_are_bit_identical_across_runs():
    """ds and dt are per-row-tile partial sums added in a fixed order: no atomics."""
    t = SHAPES["M70-K40-N70-nobias"].inputs("vefa", device=DEVICE)
    dy = torch.randn(70, 70, device=DEVICE)
    runs = [gradients(call_op("vefa", t, "triton"), dy, t) for _ in range(2)]
    for name in ("scale", "shift", "x"):
        assert torch.equal(runs[0][name], runs[1][name]), name


# -- the low-rank backward's du and dC kernel ------------------------------------


def dy_grads_inputs(m, n, r, dtype, device=DEVICE):
    """dy (m, n), u (m, r), c (n, r): drawn in float32, then rounded to dtype."""
    return [torch.randn(shape, device=device).to(dtype) for shape in ((m, n), (m, r), (n, r))]


def check_dy_grads(dy, u, c, scaling, tol):
    du, dc = low_rank_dy_grads(dy, u, c, scaling, True, True)
    assert du.dtype == dc.dtype == torch.float32
    assert rel_err(du, dy.double() @ c.double()) <= tol
    assert rel_err(dc, scaling * dy.double().T @ u.double()) <= tol


# M = 0 and 1, tails of the 16-wide column tiles, ranks padded to 16 and to 32,
# and for M = 37 two row chunks of the interpreter's (so two dC partials).
DY_GRADS_SHAPES = [(m, n, r) for m in (0, 1, 37) for n in (17, 33) for r in (1, 7, 17)]


@runs_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=gpu)])
@pytest.mark.parametrize("m,n,r", DY_GRADS_SHAPES, ids=[f"M{m}-N{n}-r{r}" for m, n, r in DY_GRADS_SHAPES])
def test_dy_grads_kernel_matches_matmuls(m, n, r, dtype):
    """du = dy c and dc = γ dyᵀ u against float64 matmuls of the same (rounded) inputs."""
    check_dy_grads(*dy_grads_inputs(m, n, r, dtype), 0.5, TOL[dtype])


@runs_here
def test_dy_grads_kernel_takes_strided_inputs():
    dy, u, c = (t.T.contiguous().T for t in dy_grads_inputs(37, 33, 7, torch.float32))
    assert dy.stride() == (1, 37)
    check_dy_grads(dy, u, c, -1.5, TOL[torch.float32])


@runs_here
def test_dy_grads_kernel_computes_only_what_is_asked():
    dy, u, c = dy_grads_inputs(37, 33, 7, torch.float32)
    du, dc = low_rank_dy_grads(dy, u, c, 2.0, True, False)
    assert dc.numel() == 0 and rel_err(du, dy.double() @ c.double()) <= TOL[torch.float32]
    # without du, c is not read: an empty one will do
    du, dc = low_rank_dy_grads(dy, u, c[:0], 2.0, False, True)
    assert du.numel() == 0 and rel_err(dc, 2.0 * dy.double().T @ u.double()) <= TOL[torch.float32]


@runs_here
def test_dy_grads_kernel_is_bit_identical_across_runs():
    """Partials summed in a fixed order: no atomics, the same bits every run."""
    dy, u, c = dy_grads_inputs(70, 65, 17, torch.float32)
    runs = [low_rank_dy_grads(dy, u, c, 0.5, True, True) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# -- dispatch ------------------------------------------------------------------


def chosen_name(method, t, backend=None):
    tensors = tuple(v for v in t.values() if v is not None)
    return dispatch.select_backend(method, tensors, backend).name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("method", METHODS)
def test_auto_never_picks_triton_for_cpu_tensors(monkeypatch, method, dtype):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    t = make_inputs(method, (4,), 17, 13, r=3, dtype=dtype)
    assert chosen_name(method, t) == "torch"
    with OpRecorder() as recorder:
        y = call_op(method, t)
        gradients(y, torch.randn_like(y), t)
    # No Triton or CUDA op; the torch backend's own fused CPU kernel may run.
    assert [op for op in recorder.ops if op != "vefa_input_grads_cpu"] == []


@runs_here
@interpreter_only
def test_cpu_tensors_run_by_name_and_from_the_environment(monkeypatch):
    t = make_inputs("lora", (4,), 17, 13, r=3)
    assert chosen_name("lora", t, "triton") == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert chosen_name("lora", t) == "triton"
    reasons = BACKEND.reasons_against("lora", tuple(v for v in t.values() if v is not None), auto=True)
    assert any("interpreter" in reason for reason in reasons)


@runs_here
def test_float64_is_refused_with_the_reason():
    t = to_device(make_inputs("vefa", (4,), 17, 13, dtype=torch.float64), DEVICE)
    with pytest.raises(featadapt.BackendUnavailableError, match=triton_backend.FLOAT64):
        call_op("vefa", t, "triton")
    assert chosen_name("vefa", t) == "torch"


@runs_here
@interpreter_only
@pytest.mark.parametrize("param_dtype", [None, torch.float32])
def test_bfloat16_is_refused_under_the_interpreter(param_dtype):
    t = make_inputs("lorfa", (4,), 17, 13, r=3, dtype=torch.bfloat16, param_dtype=param_dtype)
    with pytest.raises(featadapt.BackendUnavailableError, match="bfloat16 arithmetic is wrong"):
        call_op("lorfa", t, "triton")


def test_without_cuda_or_interpreter_it_says_how_to_test(monkeypatch):
    monkeypatch.setattr(triton_backend, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert BACKEND.unavailable_reason() == (
        "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU for testing)"
    )
    t = make_inputs("vefa", (4,), 17, 13)
    assert chosen_name("vefa", t) == "torch"
    with pytest.raises(featadapt.BackendUnavailableError, match="no CUDA device"):
        call_op("vefa", t, "triton")


def test_a_broken_triton_does_not_break_import(tmp_path):
    """`import featadapt` works with a triton that fails to import; the backend says why."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('simulated broken triton')\n")
    script = textwrap.dedent("""
        import featadapt
        from featadapt.ops.dispatch import get_backend
        print(get_backend("triton").unavailable_reason())
    """)
    paths = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "triton is not importable" in done.stdout and "simulated broken triton" in done.stdout


# -- kernel configuration ------------------------------------------------------


def test_float32_uses_true_float32_unless_torch_allows_tf32():
    assert kernels.input_precision(torch.float32) == "ieee"
    torch.backends.cuda.matmul.allow_tf32 = True  # restored by the _true_float32 fixture
    assert kernels.input_precision(torch.float32) == "tf32"


@pytest.mark.parametrize("with_block_m", [True, False])
def test_cuda_tile_configs(with_block_m):
    """The GPU configurations (only the interpreter's one runs here) are
    well-formed: power-of-two tiles of at least 16, no duplicates."""
    configs = kernels.tile_configs(with_block_m, interpret=False)
    names = {"BLOCK_C", "BLOCK_D", "GROUP_M"} | ({"BLOCK_M"} if with_block_m else set())
    seen = set()
    for config in configs:
        assert set(config.kwargs) == names
        for name in names - {"GROUP_M"}:
            size = config.kwargs[name]
            assert size >= 16 and size & (size - 1) == 0, config
        key = (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)
        assert key not in seen
        seen.add(key)
    if with_block_m:
        few = kernels.prune_for_few_tokens(configs, {"M_BUCKET": 1})
        assert few and {c.kwargs["BLOCK_M"] for c in few} == {16}
        assert kernels.prune_for_few_tokens(configs, {"M_BUCKET": 8192}) == configs


# -- on a GPU ------------------------------------------------------------------


LARGE = {
    "M8192-K4096-N4096-r16": Case((8192,), 4096, 4096, r=16),
    "BxT-4x1025-K1024-N2752-r64-dropout": Case((4, 1025), 1024, 2752, r=64, dropout_p=0.1),
}


@gpu
@pytest.mark.parametrize("case", LARGE.values(), ids=LARGE.keys())
@pytest.mark.parametrize("dtypes", KERNEL_DTYPES.values(), ids=KERNEL_DTYPES.keys())
@pytest.mark.parametrize("method", METHODS)
def test_gpu_large_shapes_match_float64_reference(method, dtypes, case):
    t = case.inputs(method, *dtypes, device=DEVICE)
    check_against_float64_reference(method, "triton", t, dropout_p=case.dropout_for(method))


LARGE_DY_GRADS = [(8192, 4096, 16), (4100, 2752, 64), (3000, 1000, 100), (1, 4096, 16)]


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,r", LARGE_DY_GRADS, ids=[f"M{m}-N{n}-r{r}" for m, n, r in LARGE_DY_GRADS])
def test_gpu_dy_grads_kernel_large_shapes(m, n, r, dtype):
    check_dy_grads(*dy_grads_inputs(m, n, r, dtype), 0.5, TOL[dtype])


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_gpu_auto_picks_triton_only_where_the_table_says(monkeypatch, tmp_path, method, dtype):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    t = to_device(make_inputs(method, (4,), 17, 13, r=3, dtype=dtype), "cuda")
    assert chosen_name(method, t) == "torch"  # no measurement: torch
    entry = {"device": dispatch_table.device_class("cuda"), "op": method, "dtype": str(dtype)[6:],
             "tokens": None, "rank": None, "backend": "triton", "ratio": 0.9}
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"format": 1, "entries": [entry]}))
    monkeypatch.setenv(dispatch_table.TABLE_ENV, str(path))
    assert chosen_name(method, t) == "triton"


@runs_here
@pytest.mark.parametrize("method", METHODS)
def test_strided_parameter_vectors(method):
    check_against_float64_reference(method, "triton", strided_parameter_inputs(method, DEVICE))


# -- autotuning on and off -------------------------------------------------------


@gpu
@pytest.mark.parametrize("method", METHODS)
def test_gpu_autotuner_benchmarks_the_kept_configurations(monkeypatch, method):
    """The rest of the suite runs with autotuning off (conftest.py); here it is on:
    each kernel benchmarks the configurations the pruning rule keeps for the
    device, caches its choice, and the result still matches the reference."""
    from featadapt.kernels.triton import low_rank_gemm, scaled_gemm

    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "1")
    tuned = [scaled_gemm._forward, scaled_gemm._backward] if method == "vefa" else \
        [low_rank_gemm._forward, low_rank_gemm._dx, low_rank_gemm._dy_grads]
    before = [len(k.autotuner.cache) for k in tuned]
    case = Case((640,), 384, 320, r=16)  # a shape no other test uses: a new autotuning key
    check_against_float64_reference(method, "triton", case.inputs(method, torch.float16, None, device=DEVICE))
    for kernel, count in zip(tuned, before):
        assert len(kernel.autotuner.cache) > count, kernel.name
        chosen = next(reversed(kernel.autotuner.cache.values()))
        assert chosen in kernel.configs


@gpu
def test_autotuning_off_runs_the_fixed_configuration(monkeypatch):
    """FEATADAPT_AUTOTUNE=0 (the tests' default) launches the kernel itself with
    one configuration, so nothing is benchmarked and no autotuner cache fills."""
    from featadapt.kernels.triton import scaled_gemm

    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "0")
    assert not kernels.autotune_enabled()
    before = len(scaled_gemm._forward.autotuner.cache)
    t = Case((33,), 48, 40).inputs("vefa", torch.float32, None, device=DEVICE)
    check_against_float64_reference("vefa", "triton", t)
    assert len(scaled_gemm._forward.autotuner.cache) == before
    fixed = scaled_gemm._forward.fixed({"x_ptr": t["x"], "INPUT_PRECISION": "ieee"})
    assert fixed in scaled_gemm._forward.configs
