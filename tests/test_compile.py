"""torch.compile(fullgraph=True) over models with featadapt adapters, and
torch.library.opcheck over every featadapt custom op.

Compile runs on the CPU with the `torch` backend: torch.compile over the Triton
ops on CPU cannot work (under TRITON_INTERPRET=1 the interpreter reads the data
pointers of fake tensors; DESIGN.md §7), so the Triton path is compiled on a GPU.
"""

import copy

import pytest
import torch
import torch._dynamo.config as dynamo_config
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn

import featadapt
from featadapt.ops import torch_backend as tb
from featadapt.ops.dispatch import ENV_VAR
from helpers import tiny_gpt2

# -- torch.compile -------------------------------------------------------------


def mlp():
    return nn.Sequential(nn.Linear(11, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))


def adapt_with_all_three(model, names, dropout, backend="torch"):
    """VeFA, LoRFA and LoRA on the layers `names` (one each), with non-trivial values."""
    featadapt.inject(model, "vefa", [names[0]], shift=True, backend=backend)
    featadapt.inject(model, "lorfa", [names[1]], r=4, alpha=8, dropout=dropout, backend=backend)
    featadapt.inject(model, "lora", [names[2]], r=4, alpha=8, dropout=dropout, backend=backend)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    return model


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def check_compiled_training(model, loss_fn, steps=2, seed=5):
    """Train a copy of `model` compiled with fullgraph=True next to `model` in eager mode,
    with the same seeds: losses and gradients agree at every step, and the SGD steps
    change the adapters, not the base, and trigger no recompilation."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable(model).items()}
    compiled_model = copy.deepcopy(model)
    runs = {
        "eager": (model, model),
        "compiled": (compiled_model, torch.compile(compiled_model, fullgraph=True)),
    }
    optimizers = {k: torch.optim.SGD(trainable(m).values(), lr=0.1) for k, (m, _) in runs.items()}
    for step in range(steps):
        results = {}
        for kind, (module, run) in runs.items():
            # the step after the first must reuse the compiled graph
            with dynamo_config.patch(error_on_recompile=step > 0):
                torch.manual_seed(seed + step)
                loss = loss_fn(run)
                optimizers[kind].zero_grad()
                loss.backward()
            results[kind] = loss.detach(), {n: p.grad.clone() for n, p in trainable(module).items()}
            optimizers[kind].step()
        (loss_e, grads_e), (loss_c, grads_c) = results["eager"], results["compiled"]
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        assert set(grads_c) == set(grads_e) == set(start)
        for name, grad in grads_c.items():
            assert torch.count_nonzero(grad) > 0, name
            torch.testing.assert_close(grad, grads_e[name], rtol=1e-4, atol=1e-6, msg=name)
    for name, param in compiled_model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
        else:
            assert not torch.equal(param, start[name]), f"{name} did not train"
            torch.testing.assert_close(param, dict(model.named_parameters())[name], rtol=1e-5, atol=1e-6)
    return runs["compiled"][1]


def test_compiled_mlp_trains_like_eager(monkeypatch):
    # The backend from the environment, read inside the compiled region.
    monkeypatch.setenv(ENV_VAR, "torch")
    model = adapt_with_all_three(mlp(), ["0", "2", "4"], dropout=0.0, backend=None).train()
    x = torch.randn(2, 5, 11)
    check_compiled_training(model, lambda run: run(x).square().mean())


def test_compiled_mlp_with_dropout_trains_like_eager():
    # fallback_random: inductor draws with eager's RNG, so the compiled model draws
    # the same dropout seeds as the eager one and the runs compare exactly.
    model = adapt_with_all_three(mlp(), ["0", "2", "4"], dropout=0.25).train()
    x = torch.randn(2, 5, 11)
    with inductor_config.patch(fallback_random=True):
        compiled = check_compiled_training(model, lambda run: run(x).square().mean())
        with dynamo_config.patch(error_on_recompile=True):
            torch.manual_seed(1)
            a = compiled(x)
            torch.manual_seed(2)
            b = compiled(x)
    assert not torch.equal(a, b)  # dropout is on: a fresh mask per call


def test_compiled_gpt2_with_adapters_trains_like_eager():
    model = tiny_gpt2().train()
    # VeFA on the attention's input projection, LoRFA on its output, LoRA on the
    # MLP's input; mlp.c_proj stays a plain Conv1D
    model = adapt_with_all_three(model, ["attn.c_attn", "attn.c_proj", "mlp.c_fc"], dropout=0.1)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(3))

    def loss_fn(run):
        # The loss outside the model: transformers' own loss_function logs a
        # warning_once, which breaks fullgraph compilation.
        logits = run(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    with inductor_config.patch(fallback_random=True):
        check_compiled_training(model, loss_fn)


@pytest.mark.gpu
@pytest.mark.usefixtures("true_float32")
def test_compiled_triton_backend_on_gpu():
    model = adapt_with_all_three(mlp(), ["0", "2", "4"], dropout=0.25, backend="triton").cuda().train()
    x = torch.randn(2, 5, 11, device="cuda")
    with inductor_config.patch(fallback_random=True):
        check_compiled_training(model, lambda run: run(x).square().mean())


# -- every forward form of the torch backend -------------------------------------

# (method, M, N, K, dropout): shapes that make the torch backend's rules pick each
# of its forward forms (the test checks that they still do).
TORCH_BACKEND_CASES = [
    ("vefa", 24, 4, 8, 0.0),
    ("vefa", 2, 8, 8, 0.0),
    ("lora", 24, 4, 4, 0.0),
    ("lora", 2, 8, 8, 0.0),
    ("lora", 24, 4, 4, 0.25),  # dropout: the low-rank term cannot be merged
    ("lorfa", 24, 4, 4, 0.0),
    ("lorfa", 2, 8, 8, 0.0),
    ("lorfa", 8, 2, 8, 0.25),
]


def torch_backend_form(method, m, n, k, dropout):
    if method == "vefa":
        return "vefa, W0 scaled" if tb.scales_weight_once(m, n) else "vefa, x scaled"
    if tb.merges_low_rank_weight(m, n, k) and dropout == 0.0:
        return f"{method}, merged weight"
    form = tb.LORA if method == "lora" else tb.lorfa_form(m, n, k)
    return f"{form}, dropout {dropout}"


def test_compiled_torch_backend_forms_match_eager():
    """Each forward form of the torch backend's autograd Functions, compiled with
    fullgraph=True, gives eager's gradients for x, W0, b and the adapter. (Under
    torch 2.11 the forms that add γ u Cᵀ to the output in place had zero gradients.)"""
    forms = [torch_backend_form(*case) for case in TORCH_BACKEND_CASES]
    assert sorted(set(forms)) == sorted([
        "vefa, W0 scaled", "vefa, x scaled", "lora, merged weight", "lora, dropout 0.0",
        "lora, dropout 0.25", "lorfa, merged weight", "lorfa-input, dropout 0.0",
        "lorfa-projected, dropout 0.25"]), forms
    generator = torch.Generator().manual_seed(0)
    cases = []
    for method, m, n, k, _ in TORCH_BACKEND_CASES:
        shapes = {"x": (m, k), "weight": (n, k), "bias": (n,)}
        if method == "vefa":
            shapes.update(scale=(k,), shift=(k,))
        else:
            shapes.update(A=(4, k), B=(k if method == "lorfa" else n, 4))
        cases.append({name: torch.randn(shape, generator=generator).requires_grad_() for name, shape in shapes.items()})

    def loss(cases):
        total = 0.0
        for (method, *_, dropout), t in zip(TORCH_BACKEND_CASES, cases):
            if method == "vefa":
                y = tb.vefa_linear(t["x"], t["weight"], t["bias"], t["scale"], t["shift"])
            else:
                linear = tb.lora_linear if method == "lora" else tb.lorfa_linear
                y = linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], 2.0, dropout, 11)
            total = total + y.square().sum()
        return total

    grads = {}
    for kind, run in ("eager", loss), ("compiled", torch.compile(loss, fullgraph=True)):
        for t in cases:
            for tensor in t.values():
                tensor.grad = None
        run(cases).backward()
        grads[kind] = [{name: tensor.grad.clone() for name, tensor in t.items()} for t in cases]
    for form, eager, compiled in zip(forms, grads["eager"], grads["compiled"]):
        for name, grad in eager.items():
            assert torch.count_nonzero(grad) > 0, f"{form}: d{name} is zero in eager"
            torch.testing.assert_close(compiled[name], grad, rtol=1e-4, atol=1e-5, msg=f"{form}: d{name}")


# -- opcheck -------------------------------------------------------------------

M, K, N, R = 97, 17, 33, 7
K2 = 33  # a second reduction depth, used with a transposed weight


def _randn(device, *shape):
    return torch.randn(*shape, device=device)


def _keep(device, shape, p=0.25):
    return (torch.rand(shape, device=device) >= p).float()


def _scaled_gemm_args(device):
    return [
        (_randn(device, M, K), _randn(device, N, K), _randn(device, N), _randn(device, K), _randn(device, K)),
        # a Conv1D's weight: (N, K) as the transpose of an (K, N) tensor; no bias, no shift
        (_randn(device, M, K2), _randn(device, K2, N).T, None, _randn(device, K2), None),
    ]


def _scaled_gemm_backward_args(device):
    def args(k, weight, *needs):
        return (_randn(device, M, N), _randn(device, M, k), weight, _randn(device, k), *needs)

    return [
        args(K, _randn(device, N, K), True, True, True),
        args(K, _randn(device, N, K), False, True, False),
        args(K2, _randn(device, K2, N).T, True, False, True),
    ]


def _low_rank_gemm_args(device):
    return [
        (_randn(device, M, K), _randn(device, N, K), _randn(device, N), _randn(device, M, R), _randn(device, N, R)),
        (_randn(device, M, K2), _randn(device, K2, N).T, None, _randn(device, M, R), _randn(device, N, R)),
    ]


def _low_rank_gemm_dx_args(device):
    return [
        (_randn(device, M, N), _randn(device, N, K), _randn(device, M, R), _randn(device, R, K), None, 1.0),
        (_randn(device, M, N), _randn(device, K2, N).T, _randn(device, M, R), _randn(device, R, K2),
         _keep(device, (M, K2)), 1.0 / 0.75),
    ]


def _low_rank_dy_grads_args(device):
    dy, u = _randn(device, M, N), _randn(device, M, R)
    return [
        (dy, u, _randn(device, N, R), 0.5, True, True),
        (dy, u, _randn(device, N, R), 0.5, True, False),
        (dy, u, u.new_empty((0, R)), 0.5, False, True),  # c is not read without du (as the backend calls it)
    ]


# The cuda ops' CUTLASS kernels take float16/bfloat16 with K and N multiples of 8
# and a contiguous weight (cuda_backend.not_supported_reasons keeps everything
# else away from them): their own samples.
CK, CN = 40, 24


def _bf16(device, *shape):
    return torch.randn(*shape, device=device).bfloat16()


def _cuda_scaled_gemm_args(device):
    return [(_bf16(device, M, CK), _bf16(device, CN, CK), _bf16(device, CN), _randn(device, CK), _randn(device, CK)),
            (_bf16(device, M, CK), _bf16(device, CN, CK), None, _randn(device, CK), None)]


def _cuda_scaled_gemm_backward_args(device):
    def args(*needs):
        return (_bf16(device, M, CN), _bf16(device, M, CK), _bf16(device, CN, CK), _randn(device, CK), *needs)

    return [args(True, True, True), args(False, True, False)]


def _cuda_low_rank_gemm_args(device):
    return [(_bf16(device, M, CK), _bf16(device, CN, CK), b, _bf16(device, M, R), _bf16(device, CN, R))
            for b in (_bf16(device, CN), None)]


def _cuda_low_rank_gemm_dx_args(device):
    keep = torch.rand(M, CK, device=device) >= 0.25
    return [(_bf16(device, M, CN), _bf16(device, CN, CK), _bf16(device, M, R), _bf16(device, R, CK), None, 1.0),
            (_bf16(device, M, CN), _bf16(device, CN, CK), _bf16(device, M, R), _bf16(device, R, CK), keep, 1 / 0.75)]


def _cuda_low_rank_dy_grads_args(device):
    dy, u = _bf16(device, M, CN), _bf16(device, M, R)
    return [(dy, u, _bf16(device, CN, R), 0.5, True, True), (dy, u, u.new_empty((0, R)), 0.5, False, True)]


def _adapter_ids(device, adapters=3):
    """Per-row adapter ids for the indexed ops: unsorted, with -1 (no adapter) rows."""
    return ((torch.arange(M) * 7) % (adapters + 1) - 1).to(device)


def _indexed_scaled_gemm_args(device):
    ids = _adapter_ids(device)
    return [
        (_randn(device, M, K), _randn(device, N, K), _randn(device, N), _randn(device, 3, K), _randn(device, 3, K), ids),
        (_randn(device, M, K2), _randn(device, K2, N).T, None, _randn(device, 3, K2), None, ids),
    ]


def _indexed_shrink_args(device):
    return [(_randn(device, M, K), _randn(device, 3, R, K), _adapter_ids(device))]


def _indexed_low_rank_gemm_args(device):
    ids, scaling = _adapter_ids(device), _randn(device, 3)
    return [
        (_randn(device, M, K), _randn(device, N, K), _randn(device, N), _randn(device, M, R), _randn(device, 3, K, R),
         scaling, ids, True),
        (_randn(device, M, K), _randn(device, N, K), None, _randn(device, M, R), _randn(device, 3, N, R),
         scaling, ids, False),
    ]


def _vefa_input_grads_cpu_args(device):
    if device != "cpu":
        return []  # a CPU kernel
    g, x = _randn(device, M, K), _randn(device, M, K)
    return [(g, x, _randn(device, K), True), (g.clone(), _randn(device, M, 2 * K)[:, :K], _randn(device, K), False)]


def _dropout_keep_mask_args(device):
    return [([M, K], 0.25, 1234, torch.device(device)), ([3, 5, 7], 0.5, 2**62 - 1, torch.device(device))]


# featadapt::<name> -> device -> list of argument tuples (float32 unless the op
# needs otherwise, none requiring grad: the kernel ops are building blocks under
# featadapt's autograd Functions and have no autograd formula of their own).
# featadapt::cuda_<name> ops run on CUDA only.
SAMPLE_ARGS = {
    "scaled_gemm": _scaled_gemm_args,
    "scaled_gemm_backward": _scaled_gemm_backward_args,
    "low_rank_gemm": _low_rank_gemm_args,
    "low_rank_gemm_dx": _low_rank_gemm_dx_args,
    "low_rank_dy_grads": _low_rank_dy_grads_args,
    "dropout_keep_mask": _dropout_keep_mask_args,
    "indexed_scaled_gemm": _indexed_scaled_gemm_args,
    "indexed_shrink": _indexed_shrink_args,
    "indexed_low_rank_gemm": _indexed_low_rank_gemm_args,
    "vefa_input_grads_cpu": _vefa_input_grads_cpu_args,
    "cuda_scaled_gemm": _cuda_scaled_gemm_args,
    "cuda_scaled_gemm_backward": _cuda_scaled_gemm_backward_args,
    "cuda_low_rank_gemm": _cuda_low_rank_gemm_args,
    "cuda_low_rank_gemm_dx": _cuda_low_rank_gemm_dx_args,
    "cuda_low_rank_dy_grads": _cuda_low_rank_dy_grads_args,
}
# Ops opcheck cannot exercise, and where they are tested instead.
NOT_OPCHECKED = {"cuda_plan": "takes no tensors (a question to CUTLASS): tests/test_cuda.py asks it"}
# Ops that launch Triton kernels: on CPU they run only under TRITON_INTERPRET=1.
TRITON_OPS = {"scaled_gemm", "scaled_gemm_backward", "low_rank_gemm", "low_rank_gemm_dx", "low_rank_dy_grads",
              "indexed_scaled_gemm", "indexed_shrink", "indexed_low_rank_gemm"}
CUDA_PREFIX = "cuda_"
# What opcheck can test of a Triton op run by the interpreter on CPU. Left out:
# test_faketensor, test_aot_dispatch_static and test_aot_dispatch_dynamic, which
# run the op on fake tensors; the interpreter then copies their (nonexistent)
# storage and fails ("Attempted to set the storage of a tensor on device meta to
# a storage on different device cpu"). On CUDA every test runs (below).
INTERPRETER_TEST_UTILS = ("test_schema", "test_autograd_registration")


def registered_ops():
    """Names of every op registered in the featadapt namespace: the dispatcher's
    list (dir(torch.ops.featadapt) lists only the ops already looked up)."""
    import featadapt  # noqa: F401  (registers the ops, the extension's included)

    prefix = "featadapt::"
    return sorted(n[len(prefix):] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix))


def sample_builder(name):
    if name in SAMPLE_ARGS:
        return SAMPLE_ARGS[name]
    if name.startswith(CUDA_PREFIX):
        return SAMPLE_ARGS.get(name[len(CUDA_PREFIX):])
    return None


def triton_interpreted():
    from featadapt.ops import triton_backend

    if triton_backend._IMPORT_ERROR is not None:
        return False
    from featadapt.kernels.triton import INTERPRET

    return INTERPRET


def test_every_registered_op_has_sample_inputs():
    ops = registered_ops()
    assert set(SAMPLE_ARGS) <= set(ops), f"SAMPLE_ARGS names ops that are not registered: {set(SAMPLE_ARGS) - set(ops)}"
    missing = [name for name in ops if sample_builder(name) is None and name not in NOT_OPCHECKED]
    assert not missing, f"add sample-input builders to SAMPLE_ARGS for featadapt::{', featadapt::'.join(missing)}"


OPCHECK_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", OPCHECK_DEVICES)
@pytest.mark.parametrize("name", sorted(set(SAMPLE_ARGS) | set(registered_ops())))
def test_opcheck(name, device):
    only = {}  # opcheck's default: every test util
    if name in NOT_OPCHECKED:
        pytest.skip(NOT_OPCHECKED[name])
    if name.startswith(CUDA_PREFIX) and device != "cuda":
        pytest.skip(f"featadapt::{name} is CUDA-only")
    if name in TRITON_OPS and device == "cpu":
        if not triton_interpreted():
            pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
        only = {"test_utils": INTERPRETER_TEST_UTILS}
    op = getattr(torch.ops.featadapt, name).default
    builder = sample_builder(name)
    assert builder is not None, f"no sample inputs for featadapt::{name}"
    for args in builder(device):
        result = torch.library.opcheck(op, args, **only)
        assert all(v == "SUCCESS" for v in result.values()), result
