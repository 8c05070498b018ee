"""What the ahead-of-time check needs to know about a kernel: `KernelSpec`,
and `TensorSpec`, a tensor's dtype, shape and strides without torch.

A spec names the launch-argument builder that the launcher calls, so the
check compiles exactly what a launch would: the builder takes the launcher's
inputs (tensors, flags) and returns every non-configuration argument of the
kernel. `cases` lists those inputs over every dtype and flag combination the
launcher can produce; combinations that give the same compile are compiled once.
"""

from dataclasses import dataclass
from typing import Callable, Iterable, List, Tuple

# The activation dtypes the kernels take, with the adapter-parameter dtypes
# that may come with them (parameters may be float32 under half-precision
# activations), as torch names them.
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")
PARAMETER_DTYPES = {"float32": ("float32",), "float16": ("float16", "float32"), "bfloat16": ("bfloat16", "float32")}
# tl.dot's float32 precision follows torch.backends.cuda.matmul.allow_tf32: both are possible.
ALLOW_TF32 = (False, True)
# The dropout keep mask's dtype, as featadapt/ops/dropout.py draws it (a test checks they agree).
KEEP_MASK_DTYPE = "bool"
# Triton's short names, for reports and the pruning rule.
SHORT_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "bool": "i1", "int64": "i64"}


class _DtypeName:
    """Stands in for a torch.dtype: triton reads a tensor's dtype through its str()."""

    def __init__(self, name):
        self.name = name

    def __str__(self):
        return f"torch.{self.name}"

    __repr__ = __str__

    def __eq__(self, other):
        return str(self) == str(other)

    def __hash__(self):
        return hash(str(self))


class TensorSpec:
    """A tensor's dtype, shape and strides, enough for a launch-argument builder
    and for triton's argument specialization (data_ptr: a 16-byte-aligned address)."""

    def __init__(self, dtype, shape, strides=None):
        self.dtype = _DtypeName(dtype)
        self.shape = tuple(shape)
        if strides is None:  # contiguous
            strides, step = [], 1
            for size in reversed(self.shape):
                strides.insert(0, step)
                step *= max(size, 1)
        self._strides = tuple(strides)

    def stride(self, dim=None):
        return self._strides if dim is None else self._strides[dim]

    def data_ptr(self):
        return 0  # what matters to triton is only that it is 16-byte aligned

    def __repr__(self):
        return f"TensorSpec({self.dtype.name}, {self.shape})"


def tensor(dtype, *shape):
    """A contiguous TensorSpec, or None for dtype None (an absent optional tensor)."""
    return None if dtype is None else TensorSpec(dtype, shape)


@dataclass(frozen=True)
class Shape:
    """The problem size the cases are built at: M tokens, K in-features, N out-features, rank r."""

    m: int
    k: int
    n: int
    r: int


# The headline benchmark's shape: what a representative compile specializes on.
REPRESENTATIVE_SHAPE = Shape(8192, 4096, 4096, 16)
# The full sweep adds the largest rank block (BLOCK_R 64; 32 lies between).
SWEEP_SHAPES = (REPRESENTATIVE_SHAPE, Shape(8192, 4096, 4096, 64))


@dataclass(frozen=True)
class KernelSpec:
    name: str  # as the reports and the pruning rule name it
    kernel: object  # the @triton.jit function
    launch_args: Callable[..., dict]  # the launcher's builder: inputs -> {argument name: value}
    cases: Callable[[Shape], Iterable[dict]]  # the launcher's possible inputs, as keyword arguments of launch_args
    configs: Callable[[], List]  # the triton.Configs it is tuned over on a GPU
    operand_dtype: str = "x"  # the input whose dtype decides the operand dtype (pruning rule)

    def representative_config(self, fixed_meta, dtype, arch):
        """The configuration compiled in CI: the one used when autotuning is off."""
        from .configs import fixed_config
        return fixed_config(self.name, self.configs(), fixed_meta, dtype, arch)


def cases_over(**choices) -> Iterable[dict]:
    """Every combination of the given choices, as dicts: cases_over(a=(1, 2), b=(3,))."""
    names = list(choices)
    combos: List[Tuple] = [()]
    for name in names:
        combos = [c + (v,) for c in combos for v in choices[name]]
    return [dict(zip(names, c)) for c in combos]
