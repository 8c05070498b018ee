"""Small helpers shared by the op tests: error measure, tolerances, inputs,
calling an op by method name, and saved-activation accounting."""

import math
import os
from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import featadapt
from featadapt.ops import dispatch
from featadapt.profiling import saved_activation_bytes  # noqa: F401  (re-exported for the tests)

# Where the kernel tests run: the GPU when there is one, else the CPU (Triton's interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_TRITON_UNAVAILABLE = dispatch.get_backend("triton").unavailable_reason()
triton_runs = pytest.mark.skipif(_TRITON_UNAVAILABLE is not None, reason=f"triton backend: {_TRITON_UNAVAILABLE}")

# Relative error allowed against the float64 reference (DESIGN.md §4).
TOL = {
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
    torch.float64: 1e-12,
}

# (activation dtype, adapter parameter dtype or None for the same) by name:
# every dtype the ops accept, and float32 adapters on half-precision activations.
DTYPES = {
    "float32": (torch.float32, None),
    "float16": (torch.float16, None),
    "bfloat16": (torch.bfloat16, None),
    "float64": (torch.float64, None),
    "bfloat16-x-float32-params": (torch.bfloat16, torch.float32),
    "float16-x-float32-params": (torch.float16, torch.float32),
}
KERNEL_DTYPES = {name: d for name, d in DTYPES.items() if d[0] != torch.float64}  # what GPU kernels take

METHODS = ("vefa", "lorfa", "lora")
PARAM_NAMES = {"vefa": ("scale", "shift"), "lorfa": ("lora_A", "lora_B"), "lora": ("lora_A", "lora_B")}
OPS = {"vefa": featadapt.vefa_linear, "lorfa": featadapt.lorfa_linear, "lora": featadapt.lora_linear}


def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64; 0 for two empty tensors.

    Any NaN or Inf (in out or in ref) gives inf, so it never passes a
    tolerance. A zero reference gives 0 when out is zero too and inf otherwise.
    """
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}"
    out = out.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    if out.numel() == 0:
        return 0.0
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return math.inf
    diff = (out - ref).norm().item()
    scale = ref.norm().item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def _noncontiguous_randn(shape, dtype):
    """Random values in a transposed (non-contiguous) view of the given shape."""
    if len(shape) < 2:
        return torch.randn(shape, dtype=dtype)
    base = torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dtype)
    return base.transpose(-1, -2)


def make_inputs(
    method,
    lead_shape,
    k,
    n,
    r=4,
    dtype=torch.float32,
    param_dtype=None,
    bias=True,
    shift=True,
    noncontiguous=False,
    requires_grad=True,
    train_base=False,
):
    """Fresh random inputs for `method`: a dict of x, weight, bias and the
    method's parameters (scale, shift or lora_A, lora_B), none of them zero.

    x has shape (*lead_shape, K) and `dtype`; weight and bias have x's dtype,
    the adapter parameters `param_dtype` (default: x's). lora_B is non-zero so
    the adapter path matters. x, scale, shift, lora_A, lora_B require grad when
    `requires_grad`; weight and bias only when `train_base`.
    """
    param_dtype = param_dtype or dtype
    shape = (*lead_shape, k)
    # Draw in float32 (half-precision randn is not everywhere), then round.
    x = (_noncontiguous_randn(shape, torch.float32) if noncontiguous else torch.randn(shape)).to(dtype)
    t = {
        "x": x,
        "weight": (torch.randn(n, k) / math.sqrt(k)).to(dtype),
        "bias": (0.5 * torch.randn(n)).to(dtype) if bias else None,
    }
    if method == "vefa":
        t["scale"] = (1.0 + 0.5 * torch.randn(k)).to(param_dtype)
        t["shift"] = (0.3 * torch.randn(k)).to(param_dtype) if shift else None
    else:
        b_rows = k if method == "lorfa" else n
        t["lora_A"] = (torch.randn(r, k) / math.sqrt(k)).to(param_dtype)
        t["lora_B"] = (0.1 * torch.randn(b_rows, r) + 0.05).to(param_dtype)
    for name, value in t.items():
        if value is None:
            continue
        wants = train_base if name in ("weight", "bias") else requires_grad
        if wants:
            if name == "x" and noncontiguous:
                # Keep x a non-contiguous view of a leaf that requires grad.
                value.requires_grad_(False)
                leaf = value.detach().transpose(-1, -2).clone().requires_grad_(True)
                t[name] = leaf.transpose(-1, -2)
            else:
                value.requires_grad_(True)
    if noncontiguous and x.dim() >= 2 and x.shape[-1] > 1 and x.shape[-2] > 1:
        assert not t["x"].is_contiguous()
    return t


def to_float64(t):
    """float64 copies of every tensor in `t`, each a leaf requiring grad as the original did."""
    out = {}
    for name, value in t.items():
        if value is None:
            out[name] = None
        else:
            out[name] = value.detach().to(torch.float64).requires_grad_(value.requires_grad)
    return out


def call_op(method, t, backend=None, scaling=0.75, dropout_p=0.0):
    """Run `method`'s functional op on the inputs `t` (from make_inputs)."""
    if method == "vefa":
        return featadapt.vefa_linear(t["x"], t["weight"], t["scale"], t["bias"], t["shift"], backend=backend)
    return OPS[method](
        t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"],
        scaling=scaling, dropout_p=dropout_p, backend=backend,
    )


def grad_names(t):
    """Names of the inputs in `t` that require grad, in a fixed order."""
    return [name for name, value in t.items() if value is not None and value.requires_grad]


def gradients(y, dy, t):
    """{name: gradient of <y, dy>} for every input of `t` that requires grad."""
    names = grad_names(t)
    grads = torch.autograd.grad(y, [t[name] for name in names], dy, allow_unused=False)
    return dict(zip(names, grads))


def check_against_float64_reference(method, backend, t, scaling=0.75, dropout_p=0.0, seed=1234):
    """Forward and every gradient of `backend` on `t` against the reference
    backend on float64 copies of `t`, within TOL of x's dtype."""
    x = t["x"]
    n = t["weight"].shape[0]
    tol = TOL[x.dtype]

    torch.manual_seed(seed)
    y = call_op(method, t, backend, scaling=scaling, dropout_p=dropout_p)
    t64 = to_float64(t)
    torch.manual_seed(seed)
    y64 = call_op(method, t64, "reference", scaling=scaling, dropout_p=dropout_p)

    assert y.dtype == x.dtype
    assert y.shape == (*x.shape[:-1], n)
    err = rel_err(y, y64)
    assert err <= tol, f"forward: relative error {err:.3g} > {tol:g}"

    dy = torch.randn(y.shape, device=y.device).to(y.dtype)
    grads = gradients(y, dy, t)
    grads64 = gradients(y64, dy.to(torch.float64), t64)
    assert set(grads) >= {"x", *(p for p in PARAM_NAMES[method] if t[p] is not None)}
    for name, grad in grads.items():
        assert grad.dtype == t[name].dtype, f"d{name} has dtype {grad.dtype}, {name} has {t[name].dtype}"
        assert grad.shape == t[name].shape
        err = rel_err(grad, grads64[name])
        assert err <= tol, f"d{name}: relative error {err:.3g} > {tol:g}"


def to_device(t, device):
    """Copies of the inputs `t` on `device`, each a leaf requiring grad as before."""
    return {
        name: None if value is None else value.detach().to(device).requires_grad_(value.requires_grad)
        for name, value in t.items()
    }


@dataclass(frozen=True)
class Case:
    """A shape case for an op test: x is (*lead, K), weight (N, K), rank r."""

    lead: tuple
    k: int
    n: int
    r: int = 7
    bias: bool = True
    shift: bool = True
    noncontiguous: bool = False
    dropout_p: float = 0.0
    train_base: bool = False

    @property
    def m(self):
        return math.prod(self.lead)

    def inputs(self, method, dtype=torch.float32, param_dtype=None, device="cpu"):
        t = make_inputs(
            method, self.lead, self.k, self.n, self.r, dtype, param_dtype,
            bias=self.bias, shift=self.shift, noncontiguous=self.noncontiguous,
            train_base=self.train_base,
        )
        return t if device == "cpu" else to_device(t, device)

    def dropout_for(self, method):
        return self.dropout_p if method != "vefa" else 0.0


def tiny_gpt2(seed=0):
    """A randomly initialised 2-layer GPT-2 (transformers' Conv1D layers; no download),
    with its own dropout off so that outputs are deterministic."""
    import transformers

    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,  # the defaults (50256) lie outside this vocabulary
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def strided_parameter_inputs(method, device, k=33, n=17, dtype=torch.float32):
    """Inputs for `method` whose scale, shift and bias are strided views (a
    column of a wider matrix): kernels must not read them as contiguous."""
    t = to_device(make_inputs(method, (37,), k, n, r=4, dtype=dtype, requires_grad=False), device)
    for name in ("scale", "shift", "bias"):
        if t.get(name) is not None:
            wide = torch.randn(t[name].shape[0], 3, device=device, dtype=t[name].dtype)
            wide[:, 1] = t[name]
            t[name] = wide[:, 1]
            assert t[name].stride() == (3,)
    for name in ("x", "scale", "shift", "lora_A", "lora_B"):
        if t.get(name) is not None:
            t[name].requires_grad_(True)
    return t


class OpRecorder(TorchDispatchMode):
    """Names of the featadapt custom ops run while it is active (backward included), in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "featadapt":
            self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def toolkit_present():
    """Whether CUDA_HOME names a CUDA toolkit (the Makefile sets it where one is)."""
    home = os.environ.get("CUDA_HOME", "")
    return bool(home) and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))


def results_tables():
    """docs/results_tables.py, the registry of tables made from the committed results files
    (docs/ is not a package: loaded by path)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "docs" / "results_tables.py"
    spec = importlib.util.spec_from_file_location("results_tables", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
