"""Reliability of the functional ops at the edges: a broken adapter must not
leak into rows that do not use it, K = 0 behaves as F.linear does, ids on the
meta device get a named error, and half precision gives the same (finite)
answer on every plan and backend when only the unscaled low-rank product
would overflow.

Every backend and plan is compared with the float64 reference (DESIGN.md §4).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import featadapt
from featadapt.ops import torch_indexed
from helpers import DEVICE, TOL, rel_err, triton_runs

METHODS = ("vefa", "lorfa", "lora")
LOW_RANK = ("lorfa", "lora")
OPS = {"vefa": featadapt.vefa_linear, "lorfa": featadapt.lorfa_linear, "lora": featadapt.lora_linear}
pytestmark = pytest.mark.usefixtures("true_float32")

GATHER, GROUPED = torch_indexed.GATHER, torch_indexed.GROUPED


def force_plan(monkeypatch, plan):
    """Forces the torch backend's indexed low-rank plan (GATHER_BUDGET decides it by shape); None leaves it."""
    if plan is not None:
        monkeypatch.setattr(torch_indexed, "GATHER_BUDGET", math.inf if plan == GATHER else -1)


# (backend, torch plan) for the indexed ops: the torch backend in both of its
# low-rank plans (VeFA always gathers), the reference, triton (interpreter or GPU).
INDEXED_RUNS = [("torch", GATHER), ("torch", GROUPED), ("reference", None),
                pytest.param("triton", None, marks=triton_runs)]
INDEXED_RUN_IDS = ["torch-gather", "torch-grouped", "reference", "triton"]
BACKENDS = ["torch", "reference", pytest.param("triton", marks=triton_runs)]


def device_for(backend):
    return DEVICE if backend == "triton" else "cpu"


def call(method, t, backend, ids=None):
    if method == "vefa":
        return featadapt.vefa_linear(t["x"], t["weight"], t["scale"], t["bias"], t.get("shift"),
                                     adapter_index=ids, backend=backend)
    return OPS[method](t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], scaling=t["scaling"],
                       adapter_index=ids, backend=backend)


def param_names(method):
    return ("scale", "shift") if method == "vefa" else ("lora_A", "lora_B")


def leaves(t, names):
    """Copies of t whose tensors `names` are fresh leaves requiring grad."""
    return {k: v.detach().clone().requires_grad_(True) if k in names else v for k, v in t.items()}


def forward_and_grads(method, t, backend, ids, dy_seed=7):
    """y and {name: gradient} for x and the adapter parameters, for a fixed random dy."""
    names = ("x", *param_names(method))
    t = leaves(t, names)
    y = call(method, t, backend, ids)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed)).to(y.device, y.dtype)
    grads = torch.autograd.grad(y, [t[n] for n in names], dy)
    return y.detach(), dict(zip(names, grads)), dy


def to(t, device=None, dtype=None):
    """Copies of t's tensors on `device`, the floating ones in `dtype`."""
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
            if isinstance(v, torch.Tensor) else v for k, v in t.items()}


# -- 1. a broken adapter stays in its own rows --------------------------------------

M, K, N, R, ADAPTERS = 24, 17, 13, 4, 3
IDS = {
    # no row uses adapter 0: a NaN there must change nothing at all
    "adapter-0-unused": torch.tensor([-1, 1, 2, -1, 1, 1, -1, 2] * 3),
    # some rows use it: only those may turn NaN
    "adapter-0-used": torch.tensor([-1, 0, 1, 2, 0, -1, 1, 0] * 3),
}


def healthy_inputs(method):
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    t = {"x": randn(M, K), "weight": randn(N, K) / math.sqrt(K), "bias": 0.5 * randn(N)}
    if method == "vefa":
        t["scale"] = 1.0 + 0.5 * randn(ADAPTERS, K)
        t["shift"] = 0.3 * randn(ADAPTERS, K)
    else:
        b_rows = K if method == "lorfa" else N
        t["lora_A"] = randn(ADAPTERS, R, K) / math.sqrt(K)
        t["lora_B"] = 0.2 * randn(ADAPTERS, b_rows, R) + 0.05
        t["scaling"] = 0.25 + torch.rand(ADAPTERS, generator=g)
    return t


def broken(t, method, value):
    """t with every parameter of adapter 0 set to `value` (NaN or Inf)."""
    t = dict(t)
    for name in param_names(method):
        t[name] = t[name].clone()
        t[name][0] = value
    return t


def method_runs():
    """(method, backend, plan) for every indexed run; VeFA has one plan (it gathers)."""
    runs = []
    for method in METHODS:
        for run, run_id in zip(INDEXED_RUNS, INDEXED_RUN_IDS):
            values, marks = (run.values, run.marks) if hasattr(run, "values") else (run, ())
            if method == "vefa" and values[1] == GROUPED:
                continue
            run_id = "torch" if method == "vefa" and values[0] == "torch" else run_id
            runs.append(pytest.param(method, *values, marks=marks, id=f"{method}-{run_id}"))
    return runs


# (the rows that use the broken adapter compute with NaN, and the interpreter's numpy says so)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("pattern", list(IDS))
@pytest.mark.parametrize("method, backend, plan", method_runs())
def test_a_broken_adapter_leaves_other_rows_alone(method, backend, plan, pattern, bad, monkeypatch):
    force_plan(monkeypatch, plan)
    device = device_for(backend)
    ids = IDS[pattern].to(device)
    healthy = to(healthy_inputs(method), device)

    y, grads, dy = forward_and_grads(method, broken(healthy, method, bad), backend, ids)
    y_ok, grads_ok, _ = forward_and_grads(method, healthy, backend, ids)

    # rows without an adapter: the base layer's output and dx, whatever adapter 0 holds
    base = ids < 0
    assert torch.isfinite(y[base]).all() and torch.isfinite(grads["x"][base]).all()
    assert torch.equal(y[base], y_ok[base])
    assert torch.equal(grads["x"][base], grads_ok["x"][base])
    if backend == "torch":  # its base rows are F.linear's and dy W0, bit for bit
        assert torch.equal(y[base], F.linear(healthy["x"], healthy["weight"], healthy["bias"])[base])
        assert torch.equal(grads["x"][base], (dy @ healthy["weight"])[base])

    # every row but adapter 0's, and every other adapter's gradient, as the float64 reference says
    y64, grads64, _ = forward_and_grads(method, to(healthy, "cpu", torch.float64), "reference", ids.cpu())
    rows = (ids != 0).cpu()
    tol = TOL[torch.float32]
    assert rel_err(y.cpu()[rows], y64[rows]) <= tol
    assert rel_err(grads["x"].cpu()[rows], grads64["x"][rows]) <= tol
    for name in param_names(method):
        assert rel_err(grads[name].cpu()[1:], grads64[name][1:]) <= tol, name
        if pattern == "adapter-0-unused":  # an adapter without rows gets a zero gradient
            assert torch.equal(grads[name][0], torch.zeros_like(grads[name][0])), name


# -- 9. K = 0: y = bias (or zeros), as F.linear gives ---------------------------------


def empty_k_inputs(method, bias, indexed, device):
    n_adapters = 2
    lead = (2, 3)
    t = {"x": torch.randn(*lead, 0), "weight": torch.randn(N, 0), "bias": torch.randn(N) if bias else None}
    stack = (n_adapters,) if indexed else ()
    if method == "vefa":
        t["scale"], t["shift"] = torch.randn(*stack, 0), torch.randn(*stack, 0)
    else:
        t["lora_A"] = torch.randn(*stack, R, 0)
        t["lora_B"] = torch.randn(*stack, 0 if method == "lorfa" else N, R)
        t["scaling"] = 0.5
    ids = torch.tensor([[0, -1, 1], [1, 1, 0]]) if indexed else None
    t = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
    return t, None if ids is None else ids.to(device)


@pytest.mark.parametrize("indexed", [False, True], ids=["one-adapter", "adapter_index"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_k0_gives_the_bias_like_f_linear(method, backend, bias, indexed):
    t, ids = empty_k_inputs(method, bias, indexed, device_for(backend))
    names = ["x", "weight", *param_names(method)] + (["bias"] if bias else [])
    t = leaves(t, names)
    y = call(method, t, backend, ids)
    expected = F.linear(t["x"], t["weight"], t["bias"])
    assert y.shape == (2, 3, N) and torch.equal(y, expected)

    dy = torch.randn(y.shape, device=y.device)
    grads = dict(zip(names, torch.autograd.grad(y, [t[n] for n in names], dy)))
    for name in names:
        assert grads[name].shape == t[name].shape, name
        want = dy.sum((0, 1)) if name == "bias" else torch.zeros_like(t[name])  # nothing else reaches y
        assert torch.allclose(grads[name], want), name


# -- 10. ids on the meta device --------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_meta_ids_get_a_named_error(method):
    def meta(*shape):
        return torch.empty(*shape, device="meta")

    t = {"x": meta(4, K), "weight": meta(N, K), "bias": meta(N)}
    if method == "vefa":
        t["scale"], t["shift"] = meta(ADAPTERS, K), meta(ADAPTERS, K)
    else:
        t["lora_A"] = meta(ADAPTERS, R, K)
        t["lora_B"] = meta(ADAPTERS, K if method == "lorfa" else N, R)
        t["scaling"] = 0.5
    ids = torch.zeros(4, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match=r"adapter_index must .*got a tensor on the meta device"):
        call(method, t, "torch", ids)


# -- 11. half precision: scaling on u, before the expand, in every plan and backend ------

# Large adapter factors with a small scaling: every output is below 6e4 in
# float64, but u·Bᵀ without the scaling exceeds float16's 65504.
BIG = dict(m=16, k=64, n=48, r=8, b_scale=3000.0, scaling=0.05)
BIG_IDS = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1] * 2)


def big_inputs(method, indexed, device):
    g = torch.Generator().manual_seed(3)
    m, k, n, r = BIG["m"], BIG["k"], BIG["n"], BIG["r"]
    stack = (2,) if indexed else ()

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    t = {"x": randn(m, k), "weight": 0.5 * randn(n, k) / math.sqrt(k), "bias": randn(n),
         "lora_A": 8.0 * randn(*stack, r, k) / math.sqrt(k),
         "lora_B": BIG["b_scale"] * randn(*stack, k if method == "lorfa" else n, r),
         "scaling": torch.full(stack, BIG["scaling"], dtype=torch.float64) if indexed else BIG["scaling"]}
    return to(t, device, torch.float16), to(t, "cpu", torch.float64)


def unscaled_product(t64, indexed):
    """u·Bᵀ in float64, per row's adapter (rows without one: 0)."""
    if not indexed:
        return t64["x"] @ t64["lora_A"].T @ t64["lora_B"].T
    ids = BIG_IDS.clamp(min=0)
    u = torch.einsum("mk,mrk->mr", t64["x"], t64["lora_A"][ids])
    return torch.einsum("mr,mdr->md", u, t64["lora_B"][ids]) * (BIG_IDS >= 0).unsqueeze(1)


@pytest.mark.parametrize("indexed", [True, False], ids=["adapter_index", "one-adapter"])
@pytest.mark.parametrize("method", LOW_RANK)
def test_the_large_float16_case_overflows_only_without_scaling(method, indexed):
    """The case below is a real one: finite in float64 and within float16, but not u·Bᵀ."""
    _, t64 = big_inputs(method, indexed, "cpu")
    ids = BIG_IDS if indexed else None
    y64 = call(method, t64, "reference", ids)
    assert y64.abs().max() < 6e4
    assert unscaled_product(t64, indexed).abs().max() > 65504
    if method == "lorfa":  # x̃ = x + γ u Bᵀ too
        x_tilde = t64["x"] + BIG["scaling"] * unscaled_product(t64, indexed)
        assert x_tilde.abs().max() < 6e4


def check_large_float16_case(method, backend, indexed):
    """Finite outputs and gradients within float16's tolerance of the float64 reference."""
    t16, t64 = big_inputs(method, indexed, device_for(backend))
    ids = BIG_IDS if indexed else None
    y, grads, _ = forward_and_grads(method, t16, backend, None if ids is None else ids.to(t16["x"].device))
    y64, grads64, _ = forward_and_grads(method, t64, "reference", ids)
    assert torch.isfinite(y).all()
    assert rel_err(y.cpu(), y64) <= TOL[torch.float16], "forward"
    for name, grad in grads.items():
        assert rel_err(grad.cpu(), grads64[name]) <= TOL[torch.float16], f"d{name}"


@pytest.mark.parametrize("backend, plan", INDEXED_RUNS, ids=INDEXED_RUN_IDS)
@pytest.mark.parametrize("method", LOW_RANK)
def test_float16_scaling_before_the_expand_indexed(method, backend, plan, monkeypatch):
    force_plan(monkeypatch, plan)
    if plan is not None:
        b_rows = BIG["k"] if method == "lorfa" else BIG["n"]
        assert torch_indexed.low_rank_plan(BIG["m"], BIG["r"], BIG["k"], b_rows) == plan
    check_large_float16_case(method, backend, indexed=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", LOW_RANK)
def test_float16_scaling_before_the_expand_one_adapter(method, backend):
    check_large_float16_case(method, backend, indexed=False)
