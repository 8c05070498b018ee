"""Many adapters in one batch: the functional ops with adapter_index=.

Every backend (torch in both of its plans, triton in the interpreter or on a
GPU) against the per-row reference in float64; gradcheck; what is saved for
backward; the argument errors; and the auto fallback past backends without
indexed ops (cuda).
"""

import math
from dataclasses import dataclass

import pytest
import torch

import featadapt
from featadapt.ops import BackendUnavailableError, dispatch, torch_indexed
from helpers import DEVICE, OpRecorder, TOL, rel_err, saved_activation_bytes, triton_runs

METHODS = ("vefa", "lorfa", "lora")
OPS = {"vefa": featadapt.vefa_linear, "lorfa": featadapt.lorfa_linear, "lora": featadapt.lora_linear}
pytestmark = pytest.mark.usefixtures("true_float32")


def draw_ids(pattern, m, n, generator):
    """Per-row adapter ids of a pattern, for m rows and n adapters."""
    if pattern == "mixed-with-base":  # random, unsorted, -1 included
        return torch.randint(-1, n, (m,), generator=generator)
    if pattern == "one-adapter":  # runs the single-adapter op
        return torch.full((m,), n - 1, dtype=torch.int64)
    if pattern == "one-adapter-and-base":  # the indexed path with a single adapter
        ids = torch.full((m,), n - 1, dtype=torch.int64)
        ids[m // 2] = -1
        return ids
    if pattern == "every-row-different":  # as many adapters as rows (the rest -1), shuffled
        ids = torch.arange(m) % (n + 1) - 1
        return ids[torch.randperm(m, generator=generator)]
    if pattern == "unsorted-segments":  # runs of equal ids, in descending order
        return (torch.arange(m).flip(0) * n // max(m, 1)).clamp(max=n - 1)
    raise ValueError(pattern)


@dataclass(frozen=True)
class Scenario:
    lead: tuple
    k: int
    n_out: int
    n_adapters: int
    pattern: str
    r: int = 7
    bias: bool = True
    shift: bool = True
    noncontiguous: bool = False
    dropout_p: float = 0.0
    per_adapter_scaling: bool = True

    def inputs(self, method, dtype, param_dtype=None, device="cpu", seed=0):
        """x, weight, bias, the stacked parameters, scaling and ids; none zero."""
        g = torch.Generator().manual_seed(seed)
        param_dtype = param_dtype or dtype
        n, k = self.n_adapters, self.k

        def randn(*shape):
            return torch.randn(*shape, generator=g)

        if self.noncontiguous:
            x = randn(*self.lead[:-1], k, self.lead[-1]).transpose(-1, -2)
        else:
            x = randn(*self.lead, k)
        t = {
            "x": x.to(dtype),
            "weight": (randn(self.n_out, k) / math.sqrt(k)).to(dtype),
            "bias": (0.5 * randn(self.n_out)).to(dtype) if self.bias else None,
        }
        if method == "vefa":
            t["scale"] = (1.0 + 0.5 * randn(n, k)).to(param_dtype)
            t["shift"] = (0.3 * randn(n, k)).to(param_dtype) if self.shift else None
        else:
            b_rows = k if method == "lorfa" else self.n_out
            t["lora_A"] = (randn(n, self.r, k) / math.sqrt(k)).to(param_dtype)
            t["lora_B"] = (0.2 * randn(n, b_rows, self.r) + 0.05).to(param_dtype)
            t["scaling"] = 0.25 + torch.rand(n, generator=g) if self.per_adapter_scaling else 0.75
        m = math.prod(self.lead)
        ids = draw_ids(self.pattern, m, n, g).reshape(self.lead)
        t = {name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in t.items()}
        for name in ("x", "scale", "shift", "lora_A", "lora_B"):
            if t.get(name) is not None:
                t[name] = leaf_like(t[name])
        t["ids"] = ids.to(device)
        return t


def leaf_like(value):
    """A leaf requiring grad with value's values and strides (a transposed x stays transposed)."""
    if value.is_contiguous() or value.dim() < 2:
        return value.detach().clone().requires_grad_(True)
    leaf = value.detach().transpose(-1, -2).clone().requires_grad_(True)
    return leaf.transpose(-1, -2)


SCENARIOS = {
    "M0": Scenario((0,), 17, 13, 3, "mixed-with-base"),
    "M1-n1-r1": Scenario((1,), 17, 13, 1, "one-adapter", r=1, bias=False, shift=False),
    "M97-n5-mixed": Scenario((97,), 17, 33, 5, "mixed-with-base"),
    "M97-n8-one-adapter-float-scaling": Scenario((97,), 33, 17, 8, "one-adapter", per_adapter_scaling=False),
    "M97-n3-one-adapter-and-base": Scenario((97,), 33, 17, 3, "one-adapter-and-base"),
    "M97-n40-unsorted": Scenario((97,), 17, 13, 40, "unsorted-segments", r=16),
    "BxT-3x11-noncontig-dropout": Scenario((3, 11), 33, 17, 4, "mixed-with-base", noncontiguous=True,
                                           dropout_p=0.2),
    "M1025-n1000-every-row-different": Scenario((1025,), 17, 13, 1000, "every-row-different", r=4),
    "M40-K257-N17-n6": Scenario((40,), 257, 17, 6, "mixed-with-base", r=16, bias=False),
}


def call(method, t, backend, dropout_p=0.0):
    if method == "vefa":
        return featadapt.vefa_linear(t["x"], t["weight"], t["scale"], t["bias"], t["shift"],
                                     adapter_index=t["ids"], backend=backend)
    return OPS[method](t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], scaling=t["scaling"],
                       dropout_p=dropout_p, adapter_index=t["ids"], backend=backend)


def grad_inputs(t):
    return {name: v for name, v in t.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def to_float64(t):
    out = {}
    for name, v in t.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            out[name] = v.detach().double().requires_grad_(v.requires_grad)
        else:
            out[name] = v
    return out


def check_against_reference(method, backend, t, dropout_p, seed=1234):
    x = t["x"]
    tol = TOL[x.dtype]
    torch.manual_seed(seed)
    y = call(method, t, backend, dropout_p)
    t64 = to_float64(t)
    torch.manual_seed(seed)
    y64 = call(method, t64, "reference", dropout_p)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], t["weight"].shape[0])
    assert rel_err(y, y64) <= tol, f"forward: {rel_err(y, y64):.3g}"
    dy = torch.randn(y.shape, device=y.device).to(y.dtype)
    names = list(grad_inputs(t))
    grads = torch.autograd.grad(y, [t[n] for n in names], dy)
    grads64 = torch.autograd.grad(y64, [t64[n] for n in names], dy.double())
    for name, grad, grad64 in zip(names, grads, grads64):
        assert grad.dtype == t[name].dtype and grad.shape == t[name].shape, name
        err = rel_err(grad, grad64)
        assert err <= tol, f"d{name}: relative error {err:.3g} > {tol:g}"


def force_plan(monkeypatch, plan):
    """Forces the torch backend's low-rank plan (GATHER_BUDGET decides it by shape); None leaves it."""
    if plan is not None:
        monkeypatch.setattr(torch_indexed, "GATHER_BUDGET", math.inf if plan == torch_indexed.GATHER else -1)


# The torch backend's low-rank plans, both for each low-rank method (VeFA always gathers).
PLANS = [("vefa", None)] + [(m, plan) for m in ("lorfa", "lora") for plan in (torch_indexed.GATHER, torch_indexed.GROUPED)]
PLAN_IDS = [f"{m}-{plan}" if plan else m for m, plan in PLANS]


gpu = pytest.mark.gpu
TORCH_DTYPES = {
    "float32": (torch.float32, None),
    "float16": (torch.float16, None),
    "bfloat16-x-float32-params": (torch.bfloat16, torch.float32),
    "float64": (torch.float64, None),
}
TRITON_DTYPES = {
    "float32": (torch.float32, None),
    "float16": (torch.float16, None),
    "float16-x-float32-params": (torch.float16, torch.float32),
    "bfloat16": (torch.bfloat16, None),  # gpu-marked: the interpreter's bf16 arithmetic is wrong
}


def scenarios_by_dtype(dtypes, bfloat16_marks=()):
    """(dtypes, scenario) pairs: every scenario in float32 and float16 (the slow n = 1000 one only
    there), the others in every dtype."""
    pairs = []
    for dtype_name, dtype in dtypes.items():
        marks = bfloat16_marks if dtype[0] == torch.bfloat16 else ()
        for name, scenario in SCENARIOS.items():
            if scenario.n_adapters < 1000 or dtype_name in ("float32", "float16"):
                pairs.append(pytest.param(dtype, scenario, id=f"{dtype_name}-{name}", marks=marks))
    return pairs


@pytest.mark.parametrize("dtypes, scenario", scenarios_by_dtype(TORCH_DTYPES))
@pytest.mark.parametrize("method, plan", PLANS, ids=PLAN_IDS)
def test_torch_matches_float64_reference(method, plan, dtypes, scenario, monkeypatch):
    force_plan(monkeypatch, plan)
    t = scenario.inputs(method, *dtypes)
    check_against_reference(method, "torch", t, scenario.dropout_p if method != "vefa" else 0.0)


@triton_runs
@pytest.mark.parametrize("dtypes, scenario", scenarios_by_dtype(TRITON_DTYPES, bfloat16_marks=gpu))
@pytest.mark.parametrize("method", METHODS)
def test_triton_matches_float64_reference(method, dtypes, scenario):
    t = scenario.inputs(method, *dtypes, device=DEVICE)
    check_against_reference(method, "triton", t, scenario.dropout_p if method != "vefa" else 0.0)


INDEXED_KERNELS = {
    "vefa": ["indexed_scaled_gemm"],
    "lorfa": ["indexed_shrink", "indexed_low_rank_gemm"],
    "lora": ["indexed_shrink", "indexed_low_rank_gemm"],
}


@triton_runs
@pytest.mark.parametrize("method", METHODS)
def test_triton_runs_the_indexed_kernels(method):
    t = SCENARIOS["M97-n5-mixed"].inputs(method, torch.float32, device=DEVICE)
    with OpRecorder() as recorder:
        call(method, t, "triton")
    assert recorder.ops == INDEXED_KERNELS[method]


@pytest.mark.parametrize("backend, method, plan", [("reference", m, None) for m in METHODS]
                         + [("torch", m, plan) for m, plan in PLANS],
                         ids=[f"reference-{m}" for m in METHODS] + [f"torch-{i}" for i in PLAN_IDS])
def test_gradcheck_float64(method, backend, plan, monkeypatch):
    force_plan(monkeypatch, plan)
    scenario = Scenario((2, 5), 6, 5, 3, "mixed-with-base", r=2)
    t = scenario.inputs(method, torch.float64)
    names = list(grad_inputs(t))

    def fn(*values):
        return call(method, {**t, **dict(zip(names, values))}, backend)

    assert torch.autograd.gradcheck(fn, [t[n] for n in names])


@pytest.mark.parametrize("method, plan", PLANS, ids=PLAN_IDS)
def test_every_adapter_gets_its_gradient(method, plan, monkeypatch):
    force_plan(monkeypatch, plan)
    """Adapters with no rows get zero gradients; each other adapter gets only its rows'."""
    scenario = Scenario((30,), 17, 13, 6, "mixed-with-base")
    t = scenario.inputs(method, torch.float64)
    t["ids"] = torch.tensor([0, 2, -1] * 10)
    y = call(method, t, "torch")
    params = [p for p in ("scale", "shift", "lora_A", "lora_B") if t.get(p) is not None]
    grads = torch.autograd.grad(y.square().sum(), [t[p] for p in params])
    for name, grad in zip(params, grads):
        per_adapter = grad.flatten(1).norm(dim=1)
        assert (per_adapter[[0, 2]] > 0).all(), name
        assert (per_adapter[[1, 3, 4, 5]] == 0).all(), name


@pytest.mark.parametrize("method, plan", PLANS, ids=PLAN_IDS)
def test_one_adapter_for_all_rows_equals_the_single_adapter_op(method, plan, monkeypatch):
    force_plan(monkeypatch, plan)
    scenario = Scenario((4, 9), 33, 17, 5, "one-adapter", per_adapter_scaling=False)
    t = scenario.inputs(method, torch.float32)
    chosen = scenario.n_adapters - 1
    y = call(method, t, "torch")
    if method == "vefa":
        single = featadapt.vefa_linear(t["x"], t["weight"], t["scale"][chosen], t["bias"], t["shift"][chosen])
    else:
        single = OPS[method](t["x"], t["weight"], t["lora_A"][chosen], t["lora_B"][chosen], t["bias"],
                             scaling=t["scaling"])
    assert rel_err(y, single) <= TOL[torch.float32]


@pytest.mark.parametrize("method", METHODS)
def test_rows_without_adapter_are_the_base_layer(method):
    t = SCENARIOS["M97-n5-mixed"].inputs(method, torch.float32)
    base = torch.nn.functional.linear(t["x"], t["weight"], t["bias"])
    y = call(method, t, "torch")
    rows = t["ids"] < 0
    assert rows.any() and (~rows).any()
    assert torch.equal(y[rows], base[rows])
    assert not torch.allclose(y[~rows], base[~rows])


def _plan_bytes(method, t):
    x = t["x"]
    r = t["lora_A"].shape[1] if method != "vefa" else 0
    return x.numel() * x.element_size() + x.shape[0] * r * x.element_size() + t["ids"].numel() * 8


@pytest.mark.parametrize("backend, method, plan", [("torch", m, plan) for m, plan in PLANS]
                         + [pytest.param("triton", m, None, marks=triton_runs) for m in METHODS],
                         ids=[f"torch-{i}" for i in PLAN_IDS] + [f"triton-{m}" for m in METHODS])
def test_saved_for_backward_is_x_u_and_the_ids(method, backend, plan, monkeypatch):
    """Memory rule: x, u (M×r, low-rank methods) and the ids; nothing M×N, no factor copies."""
    force_plan(monkeypatch, plan)
    t = Scenario((96,), 40, 200, 8, "mixed-with-base", r=4).inputs(method, torch.float16, torch.float32,
                                                                     device=DEVICE if backend == "triton" else "cpu")
    params = [t["weight"], t["bias"]] + [t[p] for p in ("scale", "shift", "lora_A", "lora_B") if t.get(p) is not None]
    if method != "vefa":
        params.append(None)
    saved = saved_activation_bytes(lambda: call(method, t, backend), params)
    # the ids are int64 (M,); scaling (n,) float32 is a parameter-sized vector
    extra = t["scaling"].numel() * 4 if method != "vefa" else 0
    assert saved == _plan_bytes(method, t) + extra


def test_the_plan_follows_the_shape():
    assert torch_indexed.low_rank_plan(8, 16, 768, 768) == torch_indexed.GATHER  # decoding a mixed batch
    assert torch_indexed.low_rank_plan(4096, 16, 768, 768) == torch_indexed.GROUPED


# -- argument errors -------------------------------------------------------------


def _errors_inputs(method):
    return Scenario((4, 5), 17, 13, 3, "mixed-with-base").inputs(method, torch.float32)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad_id", [3, -2], ids=["too-large", "below-minus-one"])
def test_out_of_range_ids_are_refused(method, bad_id):
    t = _errors_inputs(method)
    t["ids"][1, 2] = bad_id
    with pytest.raises(ValueError, match=rf"adapter_index must hold ids in \[-1, 2\].*got {bad_id}"):
        call(method, t, "torch")


@pytest.mark.parametrize("method", METHODS)
def test_ids_of_a_wrong_dtype_or_shape_are_refused(method):
    t = _errors_inputs(method)
    with pytest.raises(TypeError, match="adapter_index must have an integer dtype.*float32"):
        call(method, {**t, "ids": t["ids"].float()}, "torch")
    with pytest.raises(TypeError, match="adapter_index must have an integer dtype.*bool"):
        call(method, {**t, "ids": t["ids"] > 0}, "torch")
    with pytest.raises(ValueError, match=r"adapter_index must have x's leading shape .*\(4, 5\).*got \(20,\)"):
        call(method, {**t, "ids": t["ids"].reshape(-1)}, "torch")
    with pytest.raises(TypeError, match="adapter_index must be a torch.Tensor"):
        call(method, {**t, "ids": [0, 1]}, "torch")


def test_parameters_without_the_adapter_dimension_are_refused():
    t = _errors_inputs("vefa")
    with pytest.raises(ValueError, match=r"scale must have shape \(n, K\) = \(n, 17\).*got \(17,\)"):
        call("vefa", {**t, "scale": t["scale"][0]}, "torch")
    with pytest.raises(ValueError, match=r"shift must have shape \(n, K\) = \(3, 17\).*got \(2, 17\)"):
        call("vefa", {**t, "shift": t["shift"][:2]}, "torch")
    t = _errors_inputs("lora")
    with pytest.raises(ValueError, match=r"lora_A must have shape \(n, r, K\)"):
        call("lora", {**t, "lora_A": t["lora_A"][0]}, "torch")
    with pytest.raises(ValueError, match=r"lora_B must have shape \(n, N, r\) = \(3, 13, 7\).*got \(2, 13, 7\)"):
        call("lora", {**t, "lora_B": t["lora_B"][:2]}, "torch")
    with pytest.raises(ValueError, match=r"scaling must be .* shape \(n,\) = \(3,\).*got .*\(2,\)"):
        call("lora", {**t, "scaling": t["scaling"][:2]}, "torch")
    t = _errors_inputs("lorfa")
    with pytest.raises(ValueError, match=r"lora_B must have shape \(n, K, r\) = \(3, 17, 7\)"):
        call("lorfa", {**t, "lora_B": t["lora_B"].transpose(1, 2)}, "torch")


def test_auto_passes_over_backends_without_indexed_ops():
    """The cuda backend has no indexed ops: by name it says so, auto never picks it."""
    cuda = dispatch.get_backend("cuda")
    assert all(op not in cuda.ops for op in dispatch.INDEXED_OPS)
    t = _errors_inputs("vefa")
    tensors = (t["x"], t["weight"], t["bias"], t["scale"], t["shift"])
    assert dispatch.select_backend("vefa_indexed", tensors).name in ("torch", "triton")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        call("vefa", t, "cuda")
