"""What the Triton kernels are launched with at run time is what the
ahead-of-time check compiles and what the autotuner keys on:
  - every argument the pruning rule reads is in each kernel's autotune key,
    so a configuration chosen for one variant is never reused for another;
  - every launch the ops make matches an ahead-of-time case (the same dtypes,
    optional tensors and flags), so the compiled cases cannot drift from
    what runs (the dropout mask's dtype, for one);
  - launches run under the tensor's CUDA device."""

import importlib

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not importable")

import featadapt  # noqa: E402
from featadapt.kernels import triton as kt  # noqa: E402
from featadapt.kernels.triton import indexed_ops, low_rank_gemm, scaled_gemm  # noqa: E402
from featadapt.kernels.triton.jit import configs  # noqa: E402
from featadapt.kernels.triton.jit.specs import KEEP_MASK_DTYPE, REPRESENTATIVE_SHAPE, TensorSpec  # noqa: E402
from featadapt.ops import dropout  # noqa: E402

JIT_MODULES = ("scaled_gemm", "low_rank_gemm", "indexed")
SPECS = {spec.name: spec for module in JIT_MODULES
         for spec in importlib.import_module(f"featadapt.kernels.triton.jit.{module}").AOT_KERNELS}
TUNED = {k.name: k for module in (scaled_gemm, low_rank_gemm, indexed_ops)
         for k in vars(module).values() if isinstance(k, kt.TunedKernel)}


class Recording(dict):
    """A dict that remembers which of its keys were read (a key it lacks is a
    variant the kernel does not have: nothing to key on)."""

    def __init__(self, data, read):
        super().__init__(data)
        self.read = read

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def rule_inputs(name, monkeypatch):
    """Every launch argument the pruning rule and the few-tokens pruning read for
    kernel `name`, over every ahead-of-time case at the representative shape."""
    read = set()
    # both take the launch arguments second: staged_tiles(name, meta), prune_for_few_tokens(configs, args)
    for function in ("staged_tiles", "prune_for_few_tokens"):
        original = getattr(configs, function)
        monkeypatch.setattr(configs, function,
                            lambda first, meta, *rest, _original=original: _original(first, Recording(meta, read),
                                                                                      *rest))
    spec = SPECS[name]
    for case in spec.cases(REPRESENTATIVE_SHAPE):
        args = spec.launch_args(**case)
        operand = case[spec.operand_dtype]
        dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[operand.dtype.name]
        for arch in (80, 90):
            configs.usable_configs(name, spec.configs(), args, dtype, arch)
            configs.fixed_config(name, spec.configs(), args, dtype, arch)
        if TUNED[name].few_tokens:
            configs.prune_for_few_tokens(spec.configs(), args)
    return read


@pytest.mark.parametrize("name", sorted(TUNED))
def test_the_autotune_key_holds_every_argument_the_pruning_rule_reads(name, monkeypatch):
    kernel = TUNED[name]
    tuned = set().union(*(c.kwargs for c in SPECS[name].configs()))
    read = rule_inputs(name, monkeypatch)
    assert read, "the rule read nothing: the recording is broken"
    missing = read - tuned - set(kernel.key)
    assert not missing, f"{name}: the pruning rule reads {sorted(missing)}, which the autotune key {kernel.key} lacks"
    assert set(configs.RULE_INPUTS) >= read - tuned, "configs.RULE_INPUTS must list what the rule reads"


# -- run-time launches against the ahead-of-time cases ------------------------------


def signature(args):
    """What a compile specializes on besides sizes: tensor dtypes, absent tensors, flags."""
    def kind(value):
        if value is None:
            return None
        if isinstance(value, (torch.Tensor, TensorSpec)):
            return str(value.dtype).removeprefix("torch.")
        if isinstance(value, (bool, str)):
            return value
        return type(value).__name__ if not isinstance(value, int) else "int"
    return tuple(sorted((k, kind(v)) for k, v in args.items()))


def aot_signatures(name):
    spec = SPECS[name]
    return {signature(spec.launch_args(**case)) for case in spec.cases(REPRESENTATIVE_SHAPE)}


@pytest.fixture
def launches(monkeypatch):
    """Every Triton launch the ops make during the test, as (spec name, args)."""
    seen = []
    original = kt.TunedKernel.launch

    def launch(self, grid, args):
        seen.append((self.name, dict(args)))
        return original(self, grid, args)

    monkeypatch.setattr(kt.TunedKernel, "launch", launch)
    fixed = indexed_ops.launch_fixed

    def launch_fixed(kernel, grid, args):
        seen.append((next(s.name for s in SPECS.values() if s.kernel is kernel), dict(args)))
        return fixed(kernel, grid, args)

    monkeypatch.setattr(indexed_ops, "launch_fixed", launch_fixed)
    return seen


def _run_everything(dtype, param_dtype, dropout_p, with_bias):
    """Every op through the triton backend, forward and backward, plain and indexed."""
    m, k, n, r = 9, 19, 21, 3
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    weight = torch.randn(n, k, dtype=dtype) / k ** 0.5
    bias = torch.randn(n, dtype=dtype) if with_bias else None
    ids = torch.tensor([0, 1, -1, 1, 0, 0, -1, 1, 1])
    for index in (None, ids):
        lead = () if index is None else (2,)
        scale = (1 + 0.1 * torch.randn(*lead, k, dtype=param_dtype)).requires_grad_()
        shift = (0.1 * torch.randn(*lead, k, dtype=param_dtype)).requires_grad_()
        featadapt.vefa_linear(x, weight, scale, bias, shift, adapter_index=index, backend="triton").sum().backward()
        featadapt.vefa_linear(x, weight, scale, bias, adapter_index=index, backend="triton").sum().backward()
        for op, b_rows in ((featadapt.lora_linear, n), (featadapt.lorfa_linear, k)):
            lora_A = (torch.randn(*lead, r, k, dtype=param_dtype) / k ** 0.5).requires_grad_()
            lora_B = torch.randn(*lead, b_rows, r, dtype=param_dtype).requires_grad_()
            op(x, weight, lora_A, lora_B, bias, scaling=0.5, dropout_p=dropout_p, adapter_index=index,
               backend="triton").sum().backward()


@pytest.mark.parametrize("dtype, param_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                (torch.float16, torch.float32)])
@pytest.mark.parametrize("dropout_p, with_bias", [(0.0, True), (0.25, False)])
def test_every_launch_matches_an_ahead_of_time_case(launches, dtype, param_dtype, dropout_p, with_bias):
    _run_everything(dtype, param_dtype, dropout_p, with_bias)
    assert {name for name, _ in launches} >= {"scaled_gemm_forward", "scaled_gemm_backward", "low_rank_gemm_forward",
                                              "low_rank_dy_grads", "low_rank_gemm_dx", "indexed_vefa_forward",
                                              "indexed_shrink", "indexed_low_rank_forward"}
    compiled = {name: aot_signatures(name) for name in SPECS}
    for name, args in launches:
        args = {k: v for k, v in args.items() if k in dict(next(iter(compiled[name])))}
        assert signature(args) in compiled[name], (
            f"{name} was launched with {dict(signature(args))}, which no ahead-of-time case compiles")


def test_the_dropout_mask_is_compact_and_what_the_kernels_compile():
    mask = dropout.keep_mask((64, 32), 0.1, seed=3, device="cpu")
    assert mask.dtype == torch.bool and mask.element_size() == 1
    assert str(dropout.KEEP_MASK_DTYPE).removeprefix("torch.") == KEEP_MASK_DTYPE


# -- device guard -------------------------------------------------------------------


def test_launches_run_under_the_tensors_device(monkeypatch):
    """Triton launches on the current device: the launcher makes the tensor's current."""
    entered = []

    class Guard:
        def __init__(self, device):
            entered.append(torch.device(device))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Guard)
    x = torch.empty(0)
    assert isinstance(kt.device_guard(x), type(kt.contextlib.nullcontext()))  # CPU: nothing to guard

    class CudaLike:
        device = torch.device("cuda", 1)

    with kt.device_guard(CudaLike()):
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.gpu
def test_gpu_a_launch_on_another_device_is_right():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = torch.randn(33, 17, device="cuda:1")
    weight = torch.randn(19, 17, device="cuda:1")
    scale = torch.rand(17, device="cuda:1") + 0.5
    with torch.cuda.device(0):
        y = featadapt.vefa_linear(x, weight, scale, backend="triton")
    torch.testing.assert_close(y, (x * scale) @ weight.T, rtol=1e-4, atol=1e-4)
