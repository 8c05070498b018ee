"""What the benchmarks time: shape sets, the layers (featadapt's, the frozen
floor, the peers), FLOP counts and the memory measurements.

Every layer of a case is built from one frozen nn.Linear with the same random
weights, and is fed the same random input, so its time divides by the floor's.
"""

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import featadapt
from featadapt.ops.dispatch import backends
from featadapt.profiling import saved_activation_bytes

MODES = ("forward", "backward", "forward+backward")


@dataclass(frozen=True)
class Shape:
    tokens: int  # M
    k: int  # in_features
    n: int  # out_features

    @property
    def label(self):
        return f"M{self.tokens}-K{self.k}-N{self.n}"


@dataclass(frozen=True)
class BenchSet:
    """One machine's worth of cases."""

    cases: tuple  # (Shape, dtype) pairs, each timed for every layer and mode
    rank: int
    rank_sweep: tuple  # ranks timed forward+backward for LoRA/LoRFA, in sweep_dtype
    sweep_dtype: torch.dtype
    compile_dtypes: tuple  # dtypes in which the torch.compile peers run (compiling is slow on CPU)
    seconds_per_case: float  # timing budget: rounds = seconds / (time of one call), clamped
    min_rounds: int
    max_rounds: int
    end_to_end: tuple  # model names from test_end_to_end.MODELS
    with_reference: bool = False  # time the reference backend too (the oracle, not a fast path)

    def rounds_for(self, seconds_per_call):
        if seconds_per_call <= 0:
            return self.max_rounds
        return max(self.min_rounds, min(self.max_rounds, int(self.seconds_per_case / seconds_per_call)))


_GPU_SHAPES = (Shape(4096, 4096, 4096), Shape(8192, 4096, 4096), Shape(16384, 4096, 4096), Shape(4096, 4096, 11008))

BENCH_SETS = {
    # Seconds: what `make test` runs once per case with --benchmark-disable.
    "tiny": BenchSet(
        cases=((Shape(64, 48, 40), torch.float32),), rank=4, rank_sweep=(2, 8), sweep_dtype=torch.float32,
        compile_dtypes=(torch.float32,), seconds_per_case=0.0, min_rounds=1, max_rounds=1,
        end_to_end=("tiny-bert",), with_reference=True,
    ),
    # Under 5 minutes on the 2-core CPU. bfloat16 gets a smaller shape: without
    # native bfloat16 instructions the CPU's bfloat16 backward GEMM runs at
    # about 1 GFLOP/s, for the floor as for everything else.
    "cpu": BenchSet(
        cases=((Shape(2048, 1024, 1024), torch.float32), (Shape(512, 512, 512), torch.bfloat16)),
        rank=16, rank_sweep=(8, 16, 64), sweep_dtype=torch.float32, compile_dtypes=(torch.float32,),
        seconds_per_case=0.6, min_rounds=3, max_rounds=30, end_to_end=("minilm-l6",),
    ),
    # CPUs with native bfloat16 instructions (AVX512-BF16, AMX): bfloat16 at
    # the float32 shape, and the rank sweep in bfloat16, where the passes
    # around the fast GEMMs show. About 4 minutes on 2 cores.
    "cpu-bf16": BenchSet(
        cases=((Shape(2048, 1024, 1024), torch.float32), (Shape(2048, 1024, 1024), torch.bfloat16)),
        rank=16, rank_sweep=(8, 16, 64), sweep_dtype=torch.bfloat16, compile_dtypes=(torch.float32,),
        seconds_per_case=0.6, min_rounds=3, max_rounds=40, end_to_end=("minilm-l6", "minilm-l6-bf16"),
    ),
    "gpu": BenchSet(
        # Every shape in bfloat16; float16 and float32 at the kernel issue's target shape.
        cases=tuple((shape, torch.bfloat16) for shape in _GPU_SHAPES)
        + ((Shape(8192, 4096, 4096), torch.float16), (Shape(8192, 4096, 4096), torch.float32)),
        rank=16, rank_sweep=(8, 16, 64), sweep_dtype=torch.bfloat16, compile_dtypes=(torch.bfloat16,),
        seconds_per_case=0.3, min_rounds=10, max_rounds=100, end_to_end=("bert-base", "gpt2-medium-size"),
    ),
}

# tools/gpu-check.sh runs the gpu set in two parts, so that the headline
# (every method and backend against the floor and the PEFT peers, bf16 and
# fp16 at 8192x4096x4096, r = 16) is measured first and cannot be starved.
_HEADLINE = ((Shape(8192, 4096, 4096), torch.bfloat16), (Shape(8192, 4096, 4096), torch.float16))
BENCH_SETS["gpu-headline"] = BenchSet(
    cases=_HEADLINE, rank=16, rank_sweep=(), sweep_dtype=torch.bfloat16, compile_dtypes=(),
    seconds_per_case=0.3, min_rounds=10, max_rounds=100, end_to_end=(),
)
BENCH_SETS["gpu-rest"] = BenchSet(
    cases=tuple(c for c in BENCH_SETS["gpu"].cases if c not in _HEADLINE),
    rank=16, rank_sweep=(8, 16, 64), sweep_dtype=torch.bfloat16, compile_dtypes=(torch.bfloat16,),
    seconds_per_case=0.2, min_rounds=10, max_rounds=50, end_to_end=("bert-base", "gpt2-medium-size"),
)


def default_set_name():
    if torch.cuda.is_available():
        return "gpu"
    from bench_report import has_native_bfloat16

    return "cpu-bf16" if has_native_bfloat16() else "cpu"


def bench_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(runs, rounds):
    """Median seconds of each (setup, target) pair in `runs`, timed in turn,
    round after round: a machine whose speed drifts (a shared or throttled
    one) slows them alike, so their ratios hold where separate runs would not.
    The targets synchronise the device themselves."""
    times = [[] for _ in runs]
    for _ in range(rounds):
        for (setup, target), spent in zip(runs, times):
            args, _ = setup()
            start = time.perf_counter()
            target(*args)
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


# -- the layers --------------------------------------------------------------


@dataclass
class Layer:
    name: str  # e.g. "lorfa/torch", "floor", "peft-lora"
    method: str  # "floor", "vefa", "lorfa" or "lora": which FLOP count and which floor
    kind: str  # "featadapt", "floor" or "peer"
    forward: Callable
    parameters: List[torch.Tensor] = field(default_factory=list)  # left out of saved bytes


# The peer each featadapt method is compared with. PEFT has no LoRFA: its peer
# is the naive composite a user would write.
PEER_OF = {"vefa": "peft-ia3", "lora": "peft-lora", "lorfa": "naive-lorfa"}


def _randomize(params, around_one=()):
    """Trained-looking adapter values: never time on zeros (or on exact ones)."""
    with torch.no_grad():
        for name, p in params:
            if name in around_one:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.02 * torch.randn_like(p))


def _featadapt_layer(method, base, rank, backend):
    if method == "vefa":
        module = featadapt.VeFALinear(base, backend=backend)
        _randomize(module.named_parameters(recurse=False), around_one=("scale",))
    else:
        cls = featadapt.LoRFALinear if method == "lorfa" else featadapt.LoRALinear
        module = cls(base, r=rank, alpha=2 * rank, backend=backend)
        _randomize(module.named_parameters(recurse=False))
    return Layer(f"{method}/{backend}", method, "featadapt", module, list(module.parameters()))


class _Holder(nn.Module):
    """PEFT wraps modules of a model; this model is just the one layer."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _peft_layer(name, base, rank):
    import peft

    if name == "peft-ia3":
        config = peft.IA3Config(target_modules=["layer"], feedforward_modules=["layer"])
    else:
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["layer"], lora_dropout=0.0)
    model = peft.get_peft_model(_Holder(base), config)
    layer = model.base_model.model.layer
    adapter = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    _randomize(adapter, around_one=[n for n, _ in adapter if "ia3" in n])
    method = "vefa" if name == "peft-ia3" else "lora"
    return Layer(name, method, "peer", layer, list(layer.parameters()))


def _adapter_dtype(base):
    # As featadapt's modules and PEFT do by default: float32 adapters on half-precision layers.
    return torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype


def _naive_vefa(base):
    scale = nn.Parameter(1.0 + 0.1 * torch.randn(base.in_features, device=base.weight.device, dtype=_adapter_dtype(base)))

    def forward(x):
        return F.linear((x * scale).to(x.dtype), base.weight, base.bias)

    return forward, [scale]


def _naive_lorfa(base, rank):
    kwargs = {"device": base.weight.device, "dtype": _adapter_dtype(base)}
    A = nn.Parameter(torch.randn(rank, base.in_features, **kwargs) / math.sqrt(base.in_features))
    B = nn.Parameter(0.02 * torch.randn(base.in_features, rank, **kwargs))
    gamma = 2.0

    def forward(x):
        # F.linear(x + (dropout(x) @ A.T) @ B.T * γ, W, b), adapters in their own dtype
        delta = (F.dropout(x, 0.0).to(A.dtype) @ A.T) @ B.T * gamma
        return F.linear(x + delta.to(x.dtype), base.weight, base.bias)

    return forward, [A, B]


def _naive_layer(name, base, rank, compiled):
    forward, params = _naive_vefa(base) if name.endswith("vefa") else _naive_lorfa(base, rank)
    if compiled:
        forward = torch.compile(forward)
    method = "vefa" if name.endswith("vefa") else "lorfa"
    return Layer(name, method, "peer", forward, params + list(base.parameters()))


def _backend_takes(backend, shape, dtype):
    """Whether `backend` runs this case: the cuda backend's CUTLASS kernels take
    float16/bfloat16 with K and N multiples of 8 (it refuses the rest, and
    automatic dispatch runs those on torch); the others take every case here."""
    if backend != "cuda":
        return True
    from featadapt.ops import cuda_backend

    x, w = torch.empty(1, shape.k, dtype=dtype), torch.empty(shape.n, shape.k, dtype=dtype)
    return not (cuda_backend.dtype_reasons_16bit([x, w]) or cuda_backend.layout_reasons(x, w))


def layer_names(bench_set, dtype, shape):
    """Every layer a case times, in order: the floor first."""
    names = ["floor"]
    usable = [b.name for b in backends() if b.unavailable_reason() is None and _backend_takes(b.name, shape, dtype)]
    if not bench_set.with_reference:
        usable.remove("reference")
    names += [f"{m}/{b}" for m in ("vefa", "lorfa", "lora") for b in usable]
    names += ["peft-ia3", "peft-lora", "naive-vefa", "naive-lorfa"]
    if dtype in bench_set.compile_dtypes:
        names += ["compiled-naive-vefa", "compiled-naive-lorfa"]
    return names


def build_layer(name, shape, dtype, rank, device):
    """The layer `name` around a fresh frozen nn.Linear seeded by the shape."""
    torch.manual_seed(shape.k * 7919 + shape.n)
    base = nn.Linear(shape.k, shape.n, device=device, dtype=dtype).requires_grad_(False)
    if name == "floor":
        return Layer("floor", "floor", "floor", base, list(base.parameters()))
    if "/" in name:
        method, backend = name.split("/")
        return _featadapt_layer(method, base, rank, backend)
    if name.startswith("peft-"):
        return _peft_layer(name, base, rank)
    return _naive_layer(name.removeprefix("compiled-"), base, rank, compiled=name.startswith("compiled-"))


# -- FLOPs ---------------------------------------------------------------------


def flops(method, mode, shape, rank):
    """FLOPs of the method's definition (DESIGN.md §1), per call of `mode`.

    Backward is to the input and the adapter parameters (the floor: to the
    input only). LoRFA is counted in its x̃ form.
    """
    m, k, n, r = shape.tokens, shape.k, shape.n, rank
    gemm = 2 * m * n * k
    extra = {
        "floor": (0, 0),
        "vefa": (2 * m * k, 4 * m * k),
        "lora": (2 * m * r * (k + n), 4 * m * r * (k + n)),
        "lorfa": (4 * m * k * r, 8 * m * k * r),
    }[method]
    fwd, bwd = gemm + extra[0], gemm + extra[1]
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


# -- memory --------------------------------------------------------------------


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of the tensor storages torch creates while active, and
    their peak: each op's outputs are counted until their storage is freed."""

    def __init__(self):
        super().__init__()
        self.live = {}  # storage -> (weak reference, bytes)
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, t.untyped_storage().nbytes())
                    self.current += self.live[ref.cdata][1]
        self.peak = max(self.peak, self.current)
        return out


def peak_memory_bytes(run, device):
    """Peak bytes of memory one call of run() allocates beyond what was in use
    before it: torch.cuda.max_memory_allocated on GPU; on CPU, the tensors torch
    creates during the call, tracked op by op (not usable on compiled code)."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with _LiveTensorBytes() as tracker:
        run()
    return tracker.peak


def saved_bytes(layer, x):
    """Saved-activation bytes of one forward, the layer's parameters left out."""
    return saved_activation_bytes(lambda: layer.forward(x), exclude=layer.parameters)
