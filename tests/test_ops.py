"""The functional ops (vefa_linear, lorfa_linear, lora_linear) on the "torch" and
"reference" backends: values and gradients against the float64 reference,
gradcheck, dropout, saved-activation memory, NaN/Inf, autocast and dispatch."""

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import featadapt
from featadapt.ops import dispatch, reference, torch_backend
from helpers import (
    DTYPES,
    METHODS,
    PARAM_NAMES,
    TOL,
    call_op,
    Case,
    check_against_float64_reference,
    gradients,
    make_inputs,
    rel_err,
    saved_activation_bytes,
    to_float64,
)

BACKENDS = ("torch", "reference")
LOW_RANK = ("lorfa", "lora")


# -- which code path a shape takes ---------------------------------------------


def torch_path(method, m, n, k, dropout_p=0.0):
    """The torch backend's internal path for an (M, K) x (K, N) problem."""
    if method == "vefa":
        return "scale-weight" if torch_backend.scales_weight_once(m, n) else "scale-x"
    if torch_backend.merges_low_rank_weight(m, n, k) and dropout_p == 0.0:
        return "merged"
    if method == "lorfa":
        return torch_backend.lorfa_form(m, n, k)
    return "lora"


ALL_PATHS = {
    "vefa": {"scale-weight", "scale-x"},
    "lorfa": {torch_backend.LORFA_INPUT, torch_backend.LORFA_PROJECTED, "merged"},
    "lora": {"lora", "merged"},
}


# -- comparison against the float64 reference ----------------------------------


SHAPE_CASES = {
    "M0": Case((0,), 17, 13, r=7),
    "M1-r1-nobias-noshift": Case((1,), 17, 13, r=1, bias=False, shift=False),
    "M97-K257-N17": Case((97,), 257, 17, r=7),
    "M97-K17-N257-r16-dropout": Case((97,), 17, 257, r=16, dropout_p=0.1),
    "M1025-K257-N17-r16-nobias": Case((1025,), 257, 17, r=16, bias=False),
    "M1025-K17-N257-noncontig": Case((1025,), 17, 257, r=7, noncontiguous=True),
    "BxT-3x11-K17-N13": Case((3, 11), 17, 13, r=16, shift=False),
    "BxT-4x25-K257-N17-noncontig-dropout": Case((4, 25), 257, 17, r=1, noncontiguous=True, dropout_p=0.3),
    "M97-K17-N13-train-base-dropout": Case((97,), 17, 13, r=7, dropout_p=0.2, train_base=True),
}


@pytest.mark.parametrize("method", METHODS)
def test_shape_cases_cover_every_torch_path(method):
    """Both LoRFA forms and both VeFA paths are among the shape cases."""
    taken = {torch_path(method, c.m, c.n, c.k, c.dropout_for(method)) for c in SHAPE_CASES.values()}
    assert taken == ALL_PATHS[method]


@pytest.mark.parametrize("case", SHAPE_CASES.values(), ids=SHAPE_CASES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_shapes_match_float64_reference(method, backend, case):
    t = case.inputs(method)
    check_against_float64_reference(method, backend, t, dropout_p=case.dropout_for(method))


# x dtype, adapter parameter dtype
# One shape on each side of both path choices (scale-x / input form, and
# scale-weight / projected form), so every dtype runs every path.
DTYPE_SHAPES = {
    "BxT-3x11-K17-N257": Case((3, 11), 17, 257, r=7),
    "M97-K257-N17-dropout": Case((97,), 257, 17, r=16, dropout_p=0.1),
    "M5-K17-N257": Case((5,), 17, 257, r=7),
}


@pytest.mark.parametrize("method", METHODS)
def test_dtype_shapes_cover_every_torch_path(method):
    taken = {torch_path(method, c.m, c.n, c.k, c.dropout_for(method)) for c in DTYPE_SHAPES.values()}
    assert taken == ALL_PATHS[method]


@pytest.mark.parametrize("case", DTYPE_SHAPES.values(), ids=DTYPE_SHAPES.keys())
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_dtypes_match_float64_reference(method, backend, dtypes, case):
    dtype, param_dtype = dtypes
    t = case.inputs(method, dtype, param_dtype)
    check_against_float64_reference(method, backend, t, dropout_p=case.dropout_for(method))


FORCED = [
    ("lorfa", "lorfa_form", torch_backend.LORFA_INPUT),
    ("lorfa", "lorfa_form", torch_backend.LORFA_PROJECTED),
    ("vefa", "scales_weight_once", True),
    ("vefa", "scales_weight_once", False),
    ("lora", "merges_low_rank_weight", True),
    ("lora", "merges_low_rank_weight", False),
    ("lorfa", "merges_low_rank_weight", True),
]


@pytest.mark.parametrize("case", [SHAPE_CASES["M0"], SHAPE_CASES["M1-r1-nobias-noshift"],
                                  SHAPE_CASES["BxT-4x25-K257-N17-noncontig-dropout"]], ids=["M0", "M1", "BxT"])
@pytest.mark.parametrize("dtypes", [DTYPES["float32"], DTYPES["bfloat16-x-float32-params"]],
                         ids=["float32", "bf16-x-f32-params"])
@pytest.mark.parametrize("method,chooser,choice", FORCED, ids=[f"{c}={v}" for _, c, v in FORCED])
def test_forced_torch_path_matches_float64_reference(monkeypatch, method, chooser, choice, dtypes, case):
    """Each path is right on shapes where it would not be chosen by itself."""
    calls = []

    def forced(*args):
        calls.append(args)
        return choice

    monkeypatch.setattr(torch_backend, chooser, forced)
    t = case.inputs(method, *dtypes)
    check_against_float64_reference(method, "torch", t, dropout_p=case.dropout_for(method))
    assert calls, f"{chooser} was never consulted"


# -- M = 0 ---------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=["M0", "Bx0"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_empty_input_gives_empty_output_and_zero_gradients(method, backend, lead):
    t = make_inputs(method, lead, 17, 13, r=7, dtype=torch.bfloat16, param_dtype=torch.float32,
                    train_base=True)
    y = call_op(method, t, backend, dropout_p=0.1 if method in LOW_RANK else 0.0)
    assert y.shape == (*lead, 13)
    assert y.dtype == torch.bfloat16
    grads = gradients(y, torch.ones_like(y), t)
    assert grads["x"].shape == t["x"].shape
    for name in ("weight", "bias", *PARAM_NAMES[method]):
        grad = grads[name]
        assert grad.shape == t[name].shape and grad.dtype == t[name].dtype
        assert torch.equal(grad, torch.zeros_like(grad)), f"d{name} is not zero for an empty input"


# -- gradcheck -----------------------------------------------------------------

# (method, lead, K, N, the path it must take, dropout_p)
GRADCHECK_CASES = [
    ("vefa", (5,), 7, 6, "scale-x", 0.0),
    ("vefa", (2, 4), 9, 3, "scale-weight", 0.0),
    ("lorfa", (5,), 7, 6, torch_backend.LORFA_INPUT, 0.0),
    ("lorfa", (5,), 7, 6, torch_backend.LORFA_INPUT, 0.3),
    ("lorfa", (3,), 9, 2, torch_backend.LORFA_PROJECTED, 0.0),
    ("lorfa", (2, 4), 9, 2, torch_backend.LORFA_PROJECTED, 0.3),
    ("lorfa", (4, 5), 7, 5, "merged", 0.0),
    ("lora", (2, 3), 7, 9, "lora", 0.0),
    ("lora", (2, 3), 7, 5, "lora", 0.3),
    ("lora", (4, 5), 7, 5, "merged", 0.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "method,lead,k,n,path,dropout_p", GRADCHECK_CASES,
    ids=[f"{c[0]}-{c[4]}-p{c[5]}" for c in GRADCHECK_CASES],
)
def test_gradcheck_float64(method, backend, lead, k, n, path, dropout_p):
    assert torch_path(method, math.prod(lead), n, k, dropout_p) == path
    t = make_inputs(method, lead, k, n, r=3, dtype=torch.float64, train_base=True)
    names = [name for name, value in t.items() if value is not None]
    assert {"x", "weight", "bias"} <= set(names) and all(t[name].requires_grad for name in names)

    def op(*tensors):
        torch.manual_seed(11)  # the dropout seed is drawn from the default generator
        return call_op(method, dict(zip(names, tensors)), backend, scaling=0.7, dropout_p=dropout_p)

    assert torch.autograd.gradcheck(op, [t[name] for name in names])


# -- dropout -------------------------------------------------------------------


def run_seeded(method, t, backend, seed, dropout_p):
    torch.manual_seed(seed)
    return call_op(method, t, backend, dropout_p=dropout_p)


@pytest.mark.parametrize("shape", [(40, 17, 13), (40, 257, 13)], ids=["M40-K17-N13", "M40-K257-N13"])
@pytest.mark.parametrize("method", LOW_RANK)
def test_dropout_same_seed_same_result_across_backends(method, shape):
    m, k, n = shape
    t = make_inputs(method, (m,), k, n, r=7, dtype=torch.float64)
    y_torch = run_seeded(method, t, "torch", 5, 0.4)
    y_ref = run_seeded(method, t, "reference", 5, 0.4)
    torch.testing.assert_close(y_torch, y_ref, rtol=1e-12, atol=1e-12)

    dy = torch.randn_like(y_torch)
    g_torch, g_ref = gradients(y_torch, dy, t), gradients(y_ref, dy, t)
    for name in g_torch:
        torch.testing.assert_close(g_torch[name], g_ref[name], rtol=1e-12, atol=1e-12, msg=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", LOW_RANK)
def test_dropout_changes_output_and_depends_on_seed(method, backend):
    t = make_inputs(method, (40,), 17, 13, r=7, requires_grad=False)
    no_dropout = run_seeded(method, t, backend, 5, 0.0)
    seed5 = run_seeded(method, t, backend, 5, 0.4)
    assert torch.equal(seed5, run_seeded(method, t, backend, 5, 0.4)), "same seed, different result"
    assert rel_err(seed5, no_dropout) > 1e-3, "dropout_p > 0 did not change the output"
    assert rel_err(run_seeded(method, t, backend, 6, 0.4), seed5) > 1e-3, "another seed gave the same mask"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", LOW_RANK)
def test_dropout_touches_only_the_adapter_path(method, backend):
    """With lora_B = 0 the adapter adds nothing, so dropout must change nothing."""
    t = make_inputs(method, (40,), 17, 13, r=7, requires_grad=False)
    t["lora_B"] = torch.zeros_like(t["lora_B"])
    torch.testing.assert_close(run_seeded(method, t, backend, 5, 0.5), run_seeded(method, t, backend, 5, 0.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_inverted_dropout_with_rate_p(backend):
    """LoRA with A = B = I and γ = 1 adds x̂ itself to the frozen output."""
    m, k, p = 200, 16, 0.25
    x = torch.rand(m, k, dtype=torch.float64) + 0.5  # no zeros, so zeros in x̂ are dropped entries
    weight = torch.randn(k, k, dtype=torch.float64)
    eye = torch.eye(k, dtype=torch.float64)
    torch.manual_seed(3)
    y = featadapt.lora_linear(x, weight, eye, eye, scaling=1.0, dropout_p=p, backend=backend)
    x_hat = y - x @ weight.T
    kept = x_hat.abs() > 1e-9
    torch.testing.assert_close(x_hat[kept], (x / (1 - p))[kept])
    dropped = 1.0 - kept.double().mean().item()
    assert abs(dropped - p) < 0.04, f"dropped fraction {dropped:.3f}, expected about {p}"


# -- saved activations (memory rule) -------------------------------------------


def nbytes(t):
    return t.numel() * t.element_size()


def measure_saved(method, t, backend, dropout_p):
    params = [t["weight"], t["bias"], *(t[name] for name in PARAM_NAMES[method])]
    return saved_activation_bytes(lambda: call_op(method, t, backend, dropout_p=dropout_p), params)


# (method, M, K, N): both VeFA paths, both LoRFA forms and the merged weight
MEMORY_CASES = [
    ("vefa", 64, 96, 80),
    ("vefa", 200, 96, 80),
    ("lorfa", 64, 96, 80),
    ("lorfa", 24, 96, 16),
    ("lorfa", 200, 96, 16),
    ("lora", 64, 96, 80),
    ("lora", 200, 96, 16),
]


def test_memory_cases_cover_every_torch_path():
    for method in METHODS:
        taken = {torch_path(method, m, n, k) for meth, m, k, n in MEMORY_CASES if meth == method}
        assert taken == ALL_PATHS[method]


# VeFA has no dropout; the low-rank methods run with and without it.
MEMORY_RUNS = [(*c, p) for c in MEMORY_CASES for p in ((0.0,) if c[0] == "vefa" else (0.0, 0.2))]


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method,m,k,n,dropout_p", MEMORY_RUNS,
                         ids=[f"{c[0]}-{torch_path(c[0], c[1], c[3], c[2], c[4])}-p{c[4]}" for c in MEMORY_RUNS])
def test_torch_backend_saves_only_x_and_u(method, m, k, n, dropout_p, x_dtype):
    """VeFA saves x; LoRA/LoRFA save x and u (M×r) in x's dtype: no float32
    copy of a half-precision x even with float32 adapters."""
    r = 8
    t = make_inputs(method, (m,), k, n, r=r, dtype=x_dtype, param_dtype=torch.float32)
    expected = nbytes(t["x"])
    if method != "vefa":
        expected += m * r * torch.finfo(x_dtype).bits // 8
    assert measure_saved(method, t, "torch", dropout_p) == expected


@pytest.mark.parametrize("method", METHODS)
def test_reference_backend_saves_more_than_torch_backend(method):
    """The byte count can tell a lean backend from a wasteful one. (With a
    frozen weight the reference VeFA happens to save only x too; training the
    base weight makes it keep x ⊙ s + t as well, while the torch backend
    still keeps only x.)"""
    r = 8
    t = make_inputs(method, (64,), 96, 80, r=r, dtype=torch.bfloat16, param_dtype=torch.float32,
                    train_base=True)
    dropout_p = 0.2 if method in LOW_RANK else 0.0
    lean = measure_saved(method, t, "torch", dropout_p)
    assert lean == nbytes(t["x"]) + (0 if method == "vefa" else 64 * r * 2)
    assert measure_saved(method, t, "reference", dropout_p) > lean


def test_saved_bytes_helper_sees_a_float32_copy_of_x():
    """The peer pattern (float32 adapter vector on bf16 x) doubles the bytes of x."""
    x = torch.randn(64, 96).to(torch.bfloat16).requires_grad_()
    scale = torch.randn(96, requires_grad=True)
    weight = torch.randn(80, 96)
    weight_bf16 = weight.bfloat16()
    linear = torch.nn.functional.linear
    lean = saved_activation_bytes(lambda: linear((x * scale).to(x.dtype), weight_bf16), [scale, weight_bf16])
    peer = saved_activation_bytes(lambda: linear(x.float() * scale, weight), [scale, weight])
    assert lean == nbytes(x)
    assert peer == 2 * nbytes(x)


# -- non-finite inputs ---------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 17, 13), (40, 257, 13)], ids=["M6-K17-N13", "M40-K257-N13"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_x_propagates(method, backend, bad, shape):
    m, k, n = shape
    t = make_inputs(method, (m,), k, n, r=4, requires_grad=False)
    t["x"][2, 3] = bad
    y = call_op(method, t, backend)
    bad_row = 2
    assert not torch.isfinite(y[bad_row]).any(), "a non-finite input was masked in its output row"
    if math.isnan(bad):
        assert torch.isnan(y[bad_row]).all()
    others = torch.cat([y[:bad_row], y[bad_row + 1:]])
    assert torch.isfinite(others).all(), "a non-finite input leaked into other rows"


# -- autocast ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_cpu_autocast_bfloat16(method, backend):
    t = make_inputs(method, (3, 11), 17, 13, r=7, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = call_op(method, t, backend)
    assert y.dtype == torch.bfloat16
    t64 = to_float64(t)
    y64 = call_op(method, t64, "reference")
    tol = TOL[torch.bfloat16]
    assert rel_err(y, y64) <= tol

    dy = torch.randn(y.shape).to(torch.bfloat16)
    grads = gradients(y, dy, t)
    grads64 = gradients(y64, dy.to(torch.float64), t64)
    assert set(grads) == {"x", *PARAM_NAMES[method]}
    for name, grad in grads.items():
        assert grad.dtype == t[name].dtype == torch.float32
        err = rel_err(grad, grads64[name])
        assert err <= tol, f"d{name}: relative error {err:.3g} > {tol:g}"


# -- dispatch ------------------------------------------------------------------


@pytest.fixture
def register():
    """register(backend) for the duration of one test."""
    added = []

    def _register(backend):
        dispatch.register_backend(backend)
        added.append(backend.name)
        return backend

    yield _register
    for name in added:
        dispatch._BACKENDS.pop(name, None)


REFERENCE_OPS = {"vefa": reference.vefa_linear, "lorfa": reference.lorfa_linear, "lora": reference.lora_linear}


def spy_backend(name, calls, auto_priority=None, **kwargs):
    """A backend that runs the reference ops and records each call's op name."""
    def recording(op):
        def run(*args):
            calls.append(op)
            return REFERENCE_OPS[op](*args)
        return run

    ops = {op: recording(op) for op in REFERENCE_OPS}
    return dispatch.Backend(name=name, summary="test spy", ops=ops, auto_priority=auto_priority, **kwargs)


def some_inputs(method="vefa", dtype=torch.float32):
    return make_inputs(method, (4,), 17, 13, r=3, dtype=dtype, requires_grad=False)


def chosen_name(method, t, backend=None):
    tensors = tuple(v for v in t.values() if v is not None)
    return dispatch.select_backend(method, tensors, backend).name


def test_auto_picks_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    t = some_inputs()
    assert chosen_name("vefa", t) == "torch"
    assert chosen_name("vefa", t, "auto") == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert chosen_name("vefa", t) == "torch"


@pytest.mark.parametrize("method", METHODS)
def test_explicit_backend_beats_environment_beats_auto(monkeypatch, register, method):
    calls = []
    register(spy_backend("spy", calls))
    t = some_inputs(method)

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    call_op(method, t)
    assert calls == [], "auto chose a by-name-only backend"

    monkeypatch.setenv(dispatch.ENV_VAR, "spy")
    call_op(method, t)
    assert calls == [method], f"{dispatch.ENV_VAR} was not honoured"
    assert chosen_name(method, t) == "spy"

    call_op(method, t, backend="torch")
    assert calls == [method], "backend= did not override the environment"
    assert chosen_name(method, t, "reference") == "reference"

    call_op(method, t, backend="spy")
    assert calls == [method, method]


def test_unknown_backend_name_is_named_with_the_known_ones(monkeypatch):
    t = some_inputs()
    with pytest.raises(ValueError, match=r"unknown backend 'nope'.*expected one of: auto.*reference.*torch"):
        call_op("vefa", t, backend="nope")
    monkeypatch.setenv(dispatch.ENV_VAR, "also-nope")
    with pytest.raises(ValueError, match=r"FEATADAPT_BACKEND='also-nope' names no backend.*reference.*torch"):
        call_op("vefa", t)


@pytest.mark.parametrize("method", METHODS)
def test_unavailable_backend_raises_by_name_and_is_skipped_by_auto(monkeypatch, register, method):
    calls = []
    register(spy_backend("fakegpu", calls, auto_priority=1000,
                         unavailable_reason=lambda: "needs the flux capacitor"))
    t = some_inputs(method)
    with pytest.raises(featadapt.BackendUnavailableError, match=r"'fakegpu'.*needs the flux capacitor"):
        call_op(method, t, backend="fakegpu")
    monkeypatch.setenv(dispatch.ENV_VAR, "fakegpu")
    with pytest.raises(featadapt.BackendUnavailableError, match=r"needs the flux capacitor"):
        call_op(method, t)

    monkeypatch.delenv(dispatch.ENV_VAR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # skipped quietly
        y = call_op(method, t)
    assert calls == []
    assert chosen_name(method, t) == "torch"
    torch.testing.assert_close(y, call_op(method, t, backend="torch"))


def test_auto_falls_back_when_a_backend_does_not_support_the_call(monkeypatch, register):
    """A preferred backend that rejects float64 runs float32 calls only."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    calls = []

    def no_float64(op, tensors):
        return ["float64 is not supported"] if any(t.dtype == torch.float64 for t in tensors) else []

    register(spy_backend("fast", calls, auto_priority=1000, not_supported_reasons=no_float64))
    call_op("lora", some_inputs("lora", torch.float32))
    assert calls == ["lora"]
    call_op("lora", some_inputs("lora", torch.float64))
    assert calls == ["lora"]
    with pytest.raises(featadapt.BackendUnavailableError, match="float64 is not supported"):
        call_op("lora", some_inputs("lora", torch.float64), backend="fast")


def test_backend_missing_an_op_says_so(register):
    register(dispatch.Backend(name="vefaonly", summary="test", ops={"vefa": reference.vefa_linear}))
    with pytest.raises(featadapt.BackendUnavailableError, match="does not implement lora"):
        call_op("lora", some_inputs("lora"), backend="vefaonly")


def test_info_lists_torch_and_reference_backends():
    env = {k: v for k, v in os.environ.items() if k != dispatch.ENV_VAR}
    done = subprocess.run([sys.executable, "-m", "featadapt.info"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for name in ("torch", "reference"):
        assert any(line.split()[:2] == [name, "usable"] for line in lines), done.stdout
