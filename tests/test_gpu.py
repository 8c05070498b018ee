"""The backends on a CUDA GPU: every dtype and larger shapes against the float64
reference, saved bytes and autocast. Skipped cleanly without a GPU."""

import pytest
import torch

from featadapt.ops.dispatch import backends
from helpers import KERNEL_DTYPES, METHODS, call_op, check_against_float64_reference, make_inputs, saved_activation_bytes, to_device

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("true_float32")]

DTYPES = KERNEL_DTYPES
# (lead, K, N, r, dropout_p): odd tails, both sides of the path choices, and a large case
SHAPES = {
    "M1025-K257-N17": ((1025,), 257, 17, 7, 0.0),
    "BxT-4x97-K17-N257-dropout": ((4, 97), 17, 257, 16, 0.1),
    "M4096-K1024-N1024-r16": ((4096,), 1024, 1024, 16, 0.0),
    "M8192-K4096-N4096-r16": ((8192,), 4096, 4096, 16, 0.0),
}


def gpu_backends():
    """Every backend that can run on this machine (the kernel backends register themselves)."""
    return [b.name for b in backends() if b.unavailable_reason() is None and b.name != "reference"]




@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("method", METHODS)
def test_gpu_matches_float64_reference(method, dtypes, shape):
    lead, k, n, r, dropout_p = shape
    dtype, param_dtype = dtypes
    for backend in gpu_backends():
        t = to_device(make_inputs(method, lead, k, n, r, dtype, param_dtype), "cuda")
        check_against_float64_reference(method, backend, t, dropout_p=dropout_p if method != "vefa" else 0.0)


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
        t = to_device(make_inputs(method, (257,), 129, 65, 8, torch.float32), "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = call_op(method, t, backend)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        for name, value in t.items():
            if value is not None and value.requires_grad:
                assert value.grad is not None and value.grad.dtype == value.dtype
                assert torch.isfinite(value.grad).all(), name
