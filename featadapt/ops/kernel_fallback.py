"""Falling back to torch ops when a fused kernel that automatic dispatch chose
fails to compile or launch (DESIGN.md §2).

A fused backend chosen by `auto` runs its kernels through `with_fallback`:
a kernel that raises a compile or launch failure (`is_kernel_failure`) is
computed by its torch-op twin instead, the failure is remembered for its
case (backend, device class, op, dtype), automatic dispatch sends that case
to `torch` from then on, and one warning names it. A backend asked for by
name runs its kernels unwrapped, so the failure reaches the caller.

The twins below compute what each kernel's docstring says, on torch ops,
accumulating in float32 as the kernels do.
"""

import threading
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import dispatch_table

# Launch failures a retry on other code can cure; anything else (an illegal
# address, a wrong answer) is not a "failure to compile or launch" and is raised.
_LAUNCH_FAILURE_TEXT = (
    "no kernel image is available",
    "too many resources requested for launch",
    "out of resources",
    "ptxas",
    "invalid device function",
    "unsupported configuration",
    "cutlass could not launch",  # the cuda backend's GEMMs (csrc/gemm_sm90.cuh, gemm_sm80.cu)
)
# Which ops each kernel serves, so a failure steers exactly those ops away.
KERNEL_OPS = {
    "scaled_gemm": ("vefa",),
    "scaled_gemm_backward": ("vefa",),
    "low_rank_gemm": ("lora", "lorfa"),
    "low_rank_gemm_dx": ("lora", "lorfa"),
    "low_rank_dy_grads": ("lora", "lorfa"),
    "indexed_scaled_gemm": ("vefa_indexed",),
    "indexed_shrink": ("lora_indexed", "lorfa_indexed"),
    "indexed_low_rank_gemm": ("lora_indexed", "lorfa_indexed"),
}


class KernelUnsupportedError(RuntimeError):
    """A kernel cannot run this configuration on this device (raised by launchers)."""


def _triton_errors():
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources
    except Exception:  # no triton: only the other kinds apply
        return ()
    errors = (CompilationError, OutOfResources)
    try:
        from triton.runtime.errors import PTXASError
    except ImportError:  # older triton: ptxas errors come as RuntimeError (matched by text)
        return errors
    return errors + (PTXASError,)


_FAILURE_TYPES = (KernelUnsupportedError,) + _triton_errors()


def is_kernel_failure(error):
    """True for an error that means the kernel could not be compiled or launched here."""
    if isinstance(error, _FAILURE_TYPES):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(part in text for part in _LAUNCH_FAILURE_TEXT)


# -- remembered failures ------------------------------------------------------------

_lock = threading.Lock()
_failed = {}  # (backend, device class, op, dtype) -> the error's text


def record_failure(backend, device, op, dtype, error):
    """Remember a failure; True the first time for this case (warn then)."""
    key = (backend, device, op, dtype)
    with _lock:
        first = key not in _failed
        _failed.setdefault(key, f"{type(error).__name__}: {error}")
    return first


def failure_reason(backend, device, op, dtype):
    """Why automatic dispatch no longer picks `backend` for this case, or None."""
    error = _failed.get((backend, device, op, dtype))  # a dict read needs no lock (and compiles)
    if error is None:
        return None
    return f"its kernel failed to compile or launch for {op} {dtype} on {device} earlier in this process ({error})"


def forget_failures():
    """Forget every remembered failure (tests; after fixing a driver or cache)."""
    with _lock:
        _failed.clear()


# -- the torch-op twins of the kernels ----------------------------------------------


def _scaled_gemm(x, weight, bias, scale, shift):
    x_tilde = x.float() * scale.float()
    if shift is not None:
        x_tilde = x_tilde + shift.float()
    return F.linear(x_tilde.to(x.dtype), weight, bias)


def _scaled_gemm_backward(dy, x, weight, scale, need_dx, need_dscale, need_dshift):
    g = dy.float() @ weight.float()
    empty = x.new_empty((0,), dtype=torch.float32)
    dx = (g * scale.float()).to(x.dtype) if need_dx else x.new_empty((0,))
    dscale = (g * x.float()).sum(0) if need_dscale else empty
    dshift = g.sum(0) if need_dshift else empty
    return dx, dscale, dshift


def _low_rank_gemm(x, weight, bias, u, c):
    return (F.linear(x, weight, bias).float() + u.float() @ c.float().T).to(x.dtype)


def _low_rank_gemm_dx(dy, weight, du, a, keep, keep_scale):
    low_rank = du.float() @ a.float()
    if keep is not None:
        low_rank = low_rank * keep.float() * keep_scale
    return (dy.float() @ weight.float() + low_rank).to(dy.dtype)


def _low_rank_dy_grads(dy, u, c, scaling, need_du, need_dc):
    empty = dy.new_empty((0,), dtype=torch.float32)
    du = dy.float() @ c.float() if need_du else empty
    dc = scaling * (dy.float().T @ u.float()) if need_dc else empty
    return du, dc


def _rows_of(stacked, ids, fill):
    """stacked[ids[i]] per row, `fill` where ids[i] is -1."""
    rows = stacked[ids.clamp(min=0)].float()
    return torch.where((ids >= 0).view(-1, *([1] * (rows.dim() - 1))), rows, torch.full_like(rows, fill))


def _indexed_scaled_gemm(x, weight, bias, scale, shift, ids):
    x_tilde = x.float() * _rows_of(scale, ids, 1.0)
    if shift is not None:
        x_tilde = x_tilde + _rows_of(shift, ids, 0.0)
    return F.linear(x_tilde.to(x.dtype), weight, bias)


def _indexed_shrink(x, lora_A, ids):
    u = torch.einsum("mrk,mk->mr", _rows_of(lora_A, ids, 0.0), x.float())
    return u.to(x.dtype)


def _indexed_low_rank_gemm(x, weight, bias, u, lora_B, scaling, ids, lorfa):
    gamma = _rows_of(scaling, ids, 0.0).unsqueeze(1)
    # rows without an adapter get an exact zero, whatever u holds there
    gamma_u = torch.where(ids.view(-1, 1) >= 0, gamma * u.float(), torch.zeros((), device=u.device))
    low_rank = torch.einsum("mnr,mr->mn", _rows_of(lora_B, ids, 0.0), gamma_u)
    if lorfa:
        return F.linear((x.float() + low_rank).to(x.dtype), weight, bias)
    return (F.linear(x, weight, bias).float() + low_rank).to(x.dtype)


TORCH_TWINS = {
    "scaled_gemm": _scaled_gemm,
    "scaled_gemm_backward": _scaled_gemm_backward,
    "low_rank_gemm": _low_rank_gemm,
    "low_rank_gemm_dx": _low_rank_gemm_dx,
    "low_rank_dy_grads": _low_rank_dy_grads,
    "indexed_scaled_gemm": _indexed_scaled_gemm,
    "indexed_shrink": _indexed_shrink,
    "indexed_low_rank_gemm": _indexed_low_rank_gemm,
}


def _guarded(backend, name, kernel):
    twin = TORCH_TWINS[name]

    def call(*args):
        try:
            return kernel(*args)
        except Exception as raised:
            if not is_kernel_failure(raised):
                raise
            error = raised
        first_tensor = next(a for a in args if isinstance(a, torch.Tensor))
        device = dispatch_table.device_class(first_tensor.device)
        dtype = str(first_tensor.dtype).removeprefix("torch.")
        new = [record_failure(backend, device, op, dtype, error) for op in KERNEL_OPS[name]]
        if any(new):
            warnings.warn(
                f"featadapt: the {backend} kernel {name} failed to compile or launch for {dtype} on {device} "
                f"({type(error).__name__}: {str(error)[:300]}); this call and every later "
                f"{'/'.join(KERNEL_OPS[name])} {dtype} call on {device} run on the torch backend. "
                f"Ask for backend={backend!r} by name to see the error raised.",
                RuntimeWarning,
                stacklevel=2,
            )
        return twin(*args)

    return call


def with_fallback(backend, kernels):
    """`kernels` (an object with kernel functions as attributes, or None) with each
    kernel that has a twin falling back to it on a compile or launch failure."""
    if kernels is None:
        return None
    wrapped = {name: _guarded(backend, name, getattr(kernels, name))
               for name in TORCH_TWINS if hasattr(kernels, name)}
    return SimpleNamespace(**wrapped)
