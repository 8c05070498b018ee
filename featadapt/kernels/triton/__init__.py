"""Triton kernels for the `triton` backend: torch custom ops over the kernels in jit/.

Two kernel families cover the three methods (DESIGN.md §1):
`scaled_gemm` (VeFA) and `low_rank_gemm` (LoRA and LoRFA). Each kernel
computes one output tile of BLOCK_M rows (tokens) by BLOCK_C columns, reducing
over a depth in steps of BLOCK_D (and over the rank in steps of BLOCK_R), with
float32 accumulation and masked tails, so any M, N, K and strides work.
Offsets are 64-bit: M·K above 2³¹ is safe.

The `@triton.jit` functions and their launch-argument builders live in jit/,
which imports only triton (so they can be compiled ahead of time under any
triton version, tools/triton_aot.py); this package adds torch: the custom
ops, buffers and autotuning.

On CUDA the tile sizes are autotuned per (M bucket, N, K, dtypes), over the
configurations the pruning rule (jit/configs.py) keeps for the device;
FEATADAPT_AUTOTUNE=0 launches the rule's fixed configuration instead, with
no benchmarking (the GPU tests); FEATADAPT_AUTOTUNE_CONFIGS=N tunes over the
first N kept ones only (tools/gpu-check.sh, to bound compile time). Under TRITON_INTERPRET=1 (CPU tensors, for the
tests) the kernels run with a single small configuration. Whether the
kernels are interpreted is decided when this package is imported: set the
variable before importing featadapt.
"""

import contextlib
import os

import torch
import triton
from torch.library import wrap_triton

from .jit.configs import (  # noqa: F401  (the launchers' shared choices, re-exported)
    GROUP_M,
    INTERPRET,
    RULE_INPUTS,
    m_bucket,
    partial_block_m,
    prune_for_few_tokens,
    rank_block,
    fixed_config,
    tile_configs,
    usable_configs,
)
from .jit.configs import input_precision as _input_precision
from .jit.specs import SHORT_NAMES
from .jit.tiles import accumulate_dot, grouped_tile, output_tile  # noqa: F401

AUTOTUNE_ENV = "FEATADAPT_AUTOTUNE"
AUTOTUNE_LIMIT_ENV = "FEATADAPT_AUTOTUNE_CONFIGS"


def autotune_enabled():
    """False when FEATADAPT_AUTOTUNE=0: each kernel runs the pruning rule's fixed
    configuration (jit/configs.py), without benchmarking (read at every launch)."""
    return os.environ.get(AUTOTUNE_ENV, "1") != "0"


def autotune_limit():
    """FEATADAPT_AUTOTUNE_CONFIGS=N: tune over at most the first N kept
    configurations (in the order of preference), to bound compile time."""
    value = os.environ.get(AUTOTUNE_LIMIT_ENV, "")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{AUTOTUNE_LIMIT_ENV} must be a positive integer, got {value!r}")
    return int(value)


def unit_stride(*vectors):
    """The (N,) or (K,) vectors (bias, scale, shift) with unit stride: the kernels
    index them as contiguous. None stays None; a contiguous vector is not copied."""
    return tuple(None if v is None else v.contiguous() for v in vectors)


def allow_tf32():
    return torch.backends.cuda.matmul.allow_tf32


def input_precision(dtype):
    """tl.dot's precision for float32 operands: true float32 unless torch allows TF32."""
    return _input_precision(str(dtype), allow_tf32())


def launch_grid(rows, cols):
    """The 1-D grid over output tiles, for an autotuned kernel."""
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_C"]),)


def compute_capability(device):
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


# The self-check (featadapt.check_backends) runs every kept configuration: while
# `pinned_config(i)` is active, each launch runs the i-th configuration the rule
# keeps for its arguments (modulo their number). A process-wide setting, not a
# per-thread one: backward runs on autograd's own threads.
_PIN = {"index": None, "most_kept": 0}


@contextlib.contextmanager
def pinned_config(index):
    """Launch every tuned kernel with the `index`-th kept configuration inside
    the block; yields a dict whose "most_kept" is the largest number of kept
    configurations any launch had (iterate index up to it to cover them all)."""
    previous = dict(_PIN)
    _PIN.update(index=index, most_kept=0)
    try:
        yield _PIN
    finally:
        _PIN.update(previous)


def pinned_config_index():
    return _PIN["index"]


def device_guard(tensor):
    """The tensor's CUDA device made current for a launch: triton launches on the
    current device, which with several GPUs (device_map="auto") need not be the
    tensor's. Compiled code sets the device itself (and dynamo need not trace this)."""
    if tensor.device.type != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


def _first_tensor(args):
    return next(v for v in args.values() if isinstance(v, torch.Tensor))


def launch_fixed(kernel, grid, args):
    """Launch a jit kernel that is not autotuned (its blocks are in `args`): through
    wrap_triton, so that torch.compile traces it. Under the interpreter directly:
    torch before 2.12 cannot wrap an interpreted kernel, and nothing traces it there."""
    with device_guard(_first_tensor(args)):
        (kernel if INTERPRET else wrap_triton(kernel))[grid](**args)


class TunedKernel:
    """A jit kernel launched over the configurations the pruning rule keeps for
    the operand dtype and the device: autotuned among them, or (autotuning
    off) the first of them. `name` is the kernel's name in the rule and the
    ahead-of-time specs; `operand` the argument whose dtype is the operand dtype."""

    def __init__(self, name, kernel, configs, key, operand, few_tokens=False):
        self.name, self.kernel, self.configs = name, kernel, configs
        self.operand, self.few_tokens = operand, few_tokens
        # The key holds every argument the pruning rule reads, so a configuration
        # chosen for one variant (dropout, true float32, ...) is never reused for another.
        tuned = set().union(*(c.kwargs for c in configs))
        self.key = list(key) + [a for a in RULE_INPUTS if a in kernel.arg_names and a not in tuned and a not in key]
        self.autotuner = triton.autotune(configs=configs, key=self.key,
                                         prune_configs_by={"early_config_prune": self._usable})(kernel)

    def _usable(self, configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        return self.kept({**(named_args or {}), **kwargs}, configs)[:autotune_limit()]

    def kept(self, args, configs=None):
        """The configurations the rule keeps for these arguments (all of them: no autotune limit)."""
        if INTERPRET:
            return self.configs[:1]
        configs = self.configs if configs is None else configs
        if self.few_tokens:
            configs = prune_for_few_tokens(configs, args)
        operand = args[self.operand]
        dtype = SHORT_NAMES[str(operand.dtype).removeprefix("torch.")]
        kept = usable_configs(self.name, configs, args, dtype, compute_capability(operand.device))
        _PIN["most_kept"] = max(_PIN["most_kept"], len(kept))
        return kept

    def fixed(self, args):
        """The configuration for these arguments with autotuning off."""
        if INTERPRET:
            return self.configs[0]
        operand = args[self.operand]
        dtype = SHORT_NAMES[str(operand.dtype).removeprefix("torch.")]
        return fixed_config(self.name, self.configs, args, dtype, compute_capability(operand.device))

    def launch(self, grid, args):
        # (the interpreter's autotuner holds one configuration and benchmarks
        # nothing; torch before 2.12 cannot wrap an interpreted kernel itself)
        pinned = pinned_config_index()
        with device_guard(args[self.operand]):
            if pinned is not None and not INTERPRET:
                kept = self.kept(args)
                self._launch_config(grid, args, kept[pinned % len(kept)])
            elif INTERPRET or autotune_enabled():
                wrap_triton(self.autotuner)[grid](**args)
            else:
                self._launch_config(grid, args, self.fixed(args))

    def _launch_config(self, grid, args, config):
        wrap_triton(self.kernel)[grid](**args, **config.kwargs, num_warps=config.num_warps,
                                      num_stages=config.num_stages)
