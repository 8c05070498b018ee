"""The backends on a CUDA GPU: every dtype and larger shapes against the float64
reference, saved bytes and autocast. Skipped cleanly without a GPU."""

import pytest
import torch

from featadapt.ops.dispatch import backends, get_backend
from helpers import (
    KERNEL_DTYPES,
    METHODS,
    TOL,
    Case,
    call_op,
    check_against_float64_reference,
    make_inputs,
    rel_err,
    saved_activation_bytes,
    to_device,
    to_float64,
)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("true_float32")]

DTYPES = KERNEL_DTYPES
# (lead, K, N, r, dropout_p): odd tails, both sides of the path choices, and a large case
SHAPES = {
    "M1025-K257-N17": ((1025,), 257, 17, 7, 0.0),
    "M1025-K264-N136": ((1025,), 264, 136, 7, 0.0),
    "BxT-4x97-K17-N257-dropout": ((4, 97), 17, 257, 16, 0.1),
    "M4096-K1024-N1024-r16": ((4096,), 1024, 1024, 16, 0.0),
    "M8192-K4096-N4096-r16": ((8192,), 4096, 4096, 16, 0.0),
}


def gpu_backends():
    """Every backend that can run on this machine (the kernel backends register themselves)."""
    return [b.name for b in backends() if b.unavailable_reason() is None and b.name != "reference"]


def takes(backend, method, t):
    """Whether `backend` takes this call. The cuda backend refuses what CUTLASS
    cannot run (K or N not a multiple of 8, float32): test_cuda.py checks those
    refusals, and auto sends such calls to torch."""
    tensors = (t["x"], t["weight"], t["bias"], *(v for k, v in t.items() if k not in ("x", "weight", "bias")))
    return not get_backend(backend).reasons_against(method, tensors)




@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("method", METHODS)
def test_gpu_matches_float64_reference(method, dtypes, shape):
    lead, k, n, r, dropout_p = shape
    dtype, param_dtype = dtypes
    ran = []
    for backend in gpu_backends():
        t = to_device(make_inputs(method, lead, k, n, r, dtype, param_dtype), "cuda")
        if takes(backend, method, t):
            check_against_float64_reference(method, backend, t, dropout_p=dropout_p if method != "vefa" else 0.0)
            ran.append(backend)
    assert "torch" in ran


@pytest.mark.parametrize("method", METHODS)
def test_gpu_saved_bytes_follow_the_memory_rule(method):
    m, k, n, r = 512, 384, 256, 16
    for backend in gpu_backends():
        t = to_device(make_inputs(method, (m,), k, n, r, torch.bfloat16, torch.float32), "cuda")
        params = [t[name] for name in t if name != "x"]
        saved = saved_activation_bytes(lambda: call_op(method, t, backend), params)
        x_bytes = m * k * 2
        expected = x_bytes if method == "vefa" else x_bytes + m * r * 2
        assert saved == expected, (backend, saved, expected)


@pytest.mark.parametrize("method", METHODS)
def test_gpu_autocast_bfloat16(method):
    for backend in gpu_backends():
        t = to_device(make_inputs(method, (257,), 136, 72, 8, torch.float32), "cuda")  # (K, N: multiples of 8 for cuda)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = call_op(method, t, backend)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        for name, value in t.items():
            if value is not None and value.requires_grad:
                assert value.grad is not None and value.grad.dtype == value.dtype
                assert torch.isfinite(value.grad).all(), name


# -- the fused-kernel backends -------------------------------------------------

FUSED = ("triton", "cuda")


def usable(backend):
    why = get_backend(backend).unavailable_reason()
    if why is not None:
        pytest.skip(f"{backend} backend: {why}")
    return backend


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("method", ["vefa", "lora"])
def test_gpu_offsets_past_2_pow_31(method, backend):
    """M·K above 2³¹ elements: the kernels' 64-bit offsets reach the last rows."""
    backend = usable(backend)
    m, k, n = 2**21 + 37, 1024, 16
    assert m * k > 2**31
    t = to_device(make_inputs(method, (1,), k, n, r=4, dtype=torch.bfloat16), "cuda")
    t["x"] = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = call_op(method, t, backend)
    dy = torch.randn_like(y)
    dx = torch.autograd.grad(y, t["x"], dy)[0]

    # Rows are independent: the last ones against the float64 reference.
    tail = to_float64({**t, "x": t["x"][-64:]})
    y64 = call_op(method, tail, "reference")
    dx64 = torch.autograd.grad(y64, tail["x"], dy[-64:].double())[0]
    assert rel_err(y[-64:], y64) <= TOL[torch.bfloat16]
    assert rel_err(dx[-64:], dx64) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("method", METHODS)
def test_gpu_torch_compile_fullgraph(method, backend):
    """The custom ops trace: forward compiled with fullgraph=True, backward through AOTAutograd."""
    backend = usable(backend)
    # (the cuda backend refuses a non-contiguous x and K, N off multiples of 8)
    case = (Case((3, 11), 40, 24, dropout_p=0.3) if backend == "cuda"
            else Case((3, 11), 33, 17, noncontiguous=True, dropout_p=0.3))
    t = case.inputs(method, torch.bfloat16, torch.float32, device="cuda")
    names = [name for name, value in t.items() if value is not None]

    def forward(*tensors):
        return call_op(method, dict(t, **dict(zip(names, tensors))), backend)

    tensors = [t[name] for name in names]
    y_eager = forward(*tensors)
    y_compiled = torch.compile(forward, fullgraph=True)(*tensors)
    torch.testing.assert_close(y_compiled, y_eager)
    dy = torch.randn_like(y_eager)
    needing = [v for v in tensors if v.requires_grad]
    grads_compiled = torch.autograd.grad(y_compiled, needing, dy)
    torch.testing.assert_close(grads_compiled, torch.autograd.grad(y_eager, needing, dy))
