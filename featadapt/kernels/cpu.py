"""The fused CPU kernel of the `torch` backend (csrc/cpu_vefa.cpp, on the
vector layer csrc/cpu_simd.h), compiled into the extension featadapt._C
wherever it is built, with or without the CUDA kernels.

featadapt::vefa_input_grads_cpu does VeFA's backward after the frozen GEMM in
one pass: dx = g ⊙ s over g, ds = Σ_m g ⊙ x and dt = Σ_m g in float32. Its
loop is compiled for AVX2 and AVX-512 and the widest one the CPU has runs
(FEATADAPT_CPU_CAPABILITY=default|avx2|avx512 caps the choice, for tests).
Without the extension, under torch.compile (which fuses the torch ops itself)
or for tensors it does not take, the torch backend uses torch ops instead.
"""

import torch

from .extension import _C

CAPABILITY_ENV_VAR = "FEATADAPT_CPU_CAPABILITY"
CAPABILITIES = ("default", "avx2", "avx512")

OP_NAME = "vefa_input_grads_cpu"
BUILT = _C is not None and hasattr(torch.ops.featadapt, OP_NAME)

# float16 is left to torch: the kernel has no vector loop for it.
DTYPES = (torch.bfloat16, torch.float32)

if BUILT:

    @torch.library.register_fake(f"featadapt::{OP_NAME}")
    def _(g, x, scale, need_shift):
        k = g.shape[1]
        return g.new_empty((k,), dtype=torch.float32), g.new_empty((k if need_shift else 0,), dtype=torch.float32)


def capability():
    """The instruction set the kernel uses here ("default", "avx2" or "avx512"):
    the widest this CPU has, capped by FEATADAPT_CPU_CAPABILITY."""
    return _C.cpu_capability()


def takes_vefa_input_grads(g, x, scale):
    """Whether vefa_input_grads runs the fused kernel on these tensors."""
    return (
        BUILT
        and not torch.compiler.is_compiling()
        and g.device.type == "cpu"
        and x.device.type == "cpu"
        and g.dtype in DTYPES
        and x.dtype == g.dtype
        and scale.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and g.stride(-1) == 1
        and x.stride(-1) == 1
    )


def vefa_input_grads(g, x, scale, need_shift):
    """(ds, dt or None) in float32; g is overwritten with dx = g ⊙ s."""
    ds, dt = torch.ops.featadapt.vefa_input_grads_cpu(g, x, scale.to(torch.float32).contiguous(), need_shift)
    return ds, dt if need_shift else None
