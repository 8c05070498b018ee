"""The fused CPU kernel of the torch backend (featadapt::vefa_input_grads_cpu,
csrc/cpu_vefa.cpp): VeFA's dx = g ⊙ s, ds = Σ_m g ⊙ x and dt = Σ_m g in one
pass, against float64, on odd shapes and strided rows, for every instruction
set this CPU has (FEATADAPT_CPU_CAPABILITY); the torch backend uses it where
it applies and gives the same gradients through torch ops without it."""

import pytest
import torch

import featadapt
from featadapt.kernels import cpu
from featadapt.ops import torch_backend
from helpers import TOL, rel_err

built = pytest.mark.skipif(not cpu.BUILT, reason="featadapt._C is not built (the torch ops are the fallback)")

SHAPES = [(0, 17), (1, 17), (3, 257), (97, 17), (1025, 257), (5, 16), (4, 8)]


def _best_capability(monkeypatch):
    monkeypatch.delenv(cpu.CAPABILITY_ENV_VAR, raising=False)
    return cpu.capability()


@pytest.fixture(params=cpu.CAPABILITIES)
def capability(request, monkeypatch):
    """Each instruction set's loop in turn; those this CPU lacks are skipped."""
    if not cpu.BUILT:
        pytest.skip("featadapt._C is not built")
    best = _best_capability(monkeypatch)
    if cpu.CAPABILITIES.index(request.param) > cpu.CAPABILITIES.index(best):
        pytest.skip(f"this CPU's widest instruction set for the kernel is {best}")
    monkeypatch.setenv(cpu.CAPABILITY_ENV_VAR, request.param)
    assert cpu.capability() == request.param
    return request.param


def _inputs(m, k, dtype, row_stride=None):
    g = torch.randn(m, k).to(dtype)
    wide = torch.randn(m, row_stride or k).to(dtype)
    x = wide[:, :k]  # rows further apart than K when row_stride > K
    scale = 1.0 + 0.1 * torch.randn(k)
    return g, x, scale


@built
@pytest.mark.parametrize("need_shift", [True, False], ids=["shift", "noshift"])
@pytest.mark.parametrize("dtype", cpu.DTYPES, ids=str)
@pytest.mark.parametrize("m,k", SHAPES, ids=[f"M{m}-K{k}" for m, k in SHAPES])
def test_kernel_matches_float64(m, k, dtype, need_shift, capability):
    g, x, scale = _inputs(m, k, dtype, row_stride=k + 5)
    dx = g.clone()
    ds, dt = cpu.vefa_input_grads(dx, x, scale, need_shift)
    g64, x64, s64 = g.double(), x.double(), scale.double()
    assert ds.dtype == torch.float32 and ds.shape == (k,)
    assert rel_err(ds, (g64 * x64).sum(0)) <= 1e-5  # float32 sums of exact products
    assert rel_err(dx, g64 * s64) <= TOL[dtype]
    # each element of dx is the float32 product rounded once (to nearest even)
    assert torch.equal(dx, (g.float() * scale).to(dtype))
    assert dx.dtype == dtype
    if need_shift:
        assert dt.dtype == torch.float32 and rel_err(dt, g64.sum(0)) <= 1e-5
    else:
        assert dt is None


@built
def test_kernel_splits_rows_across_threads(capability):
    """Sums of every thread's rows are combined, whatever the thread count."""
    g, x, scale = _inputs(1025, 257, torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(cpu.vefa_input_grads(g.clone(), x, scale, True))
    finally:
        torch.set_num_threads(before)
    for ds, dt in results[1:]:
        torch.testing.assert_close(ds, results[0][0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(dt, results[0][1], rtol=1e-5, atol=1e-4)


@built
@pytest.mark.parametrize("dtype", cpu.DTYPES, ids=str)
def test_kernel_propagates_nan(dtype, capability):
    g, x, scale = _inputs(6, 17, dtype)
    x[2, 3] = float("nan")
    g[4, 5] = float("nan")  # a vector lane
    g[1, 16] = float("nan")  # a column past the last whole vector
    dx = g.clone()
    ds, dt = cpu.vefa_input_grads(dx, x, scale, True)
    assert ds[3].isnan() and ds[5].isnan() and dt[5].isnan() and dx[4, 5].isnan()
    assert ds[16].isnan() and dt[16].isnan() and dx[1, 16].isnan()
    assert torch.isfinite(ds[[0, 1, 2, 4]]).all()


@built
def test_kernel_names_the_bad_argument():
    g, x, scale = _inputs(5, 8, torch.float32)
    op = torch.ops.featadapt.vefa_input_grads_cpu
    with pytest.raises(RuntimeError, match=r"x must have g's shape"):
        op(g, x[:, :4], scale, False)
    with pytest.raises(RuntimeError, match=r"x must have g's dtype"):
        op(g, x.double(), scale, False)
    with pytest.raises(RuntimeError, match=r"unit stride along K"):
        op(g, x.T.contiguous().T, scale, False)
    with pytest.raises(RuntimeError, match=r"scale must be a contiguous float32 vector of size 8"):
        op(g, x, scale[:4], False)


@built
def test_kernel_runs_on_every_thread():
    """at::parallel_for is a serial loop unless the extension is built with OpenMP."""
    from featadapt.kernels.cuda import _C

    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert _C.parallel_threads() == threads
    finally:
        torch.set_num_threads(before)


@built
def test_capability_names_a_bad_setting(monkeypatch):
    best = _best_capability(monkeypatch)
    assert best in cpu.CAPABILITIES
    monkeypatch.setenv(cpu.CAPABILITY_ENV_VAR, "sse9")
    with pytest.raises(ValueError, match=r"FEATADAPT_CPU_CAPABILITY must be one of default, avx2, avx512, got 'sse9'"):
        cpu.capability()
    g, x, scale = _inputs(3, 8, torch.float32)
    with pytest.raises(RuntimeError, match=r"got 'sse9'"):
        cpu.vefa_input_grads(g, x, scale, False)


def test_info_names_the_cpu_kernels_instruction_set(monkeypatch):
    from featadapt.info import report

    monkeypatch.delenv(cpu.CAPABILITY_ENV_VAR, raising=False)
    line = next(line for line in report().splitlines() if line.startswith("CPU kernel"))
    if cpu.BUILT:
        assert f"{cpu.capability()} loops" in line
        monkeypatch.setenv(cpu.CAPABILITY_ENV_VAR, "default")
        assert "default loops" in next(line for line in report().splitlines() if line.startswith("CPU kernel"))
    else:
        assert "not built" in line


def _vefa_grads(t):
    y = featadapt.vefa_linear(t["x"], t["weight"], t["scale"], t["bias"], shift=t["shift"], backend="torch")
    names = [n for n, v in t.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(y, [t[n] for n in names], torch.ones_like(y))
    return dict(zip(names, grads))


@built
@pytest.mark.parametrize("dtype", cpu.DTYPES, ids=str)
def test_torch_backend_uses_the_kernel_and_matches_its_fallback(monkeypatch, dtype):
    torch.manual_seed(0)
    t = {
        "x": torch.randn(97, 33).to(dtype).requires_grad_(),
        "weight": torch.randn(40, 33).to(dtype),
        "bias": torch.randn(40).to(dtype),
        "scale": (1.0 + 0.1 * torch.randn(33)).requires_grad_(),
        "shift": (0.1 * torch.randn(33)).requires_grad_(),
    }
    calls = []
    real = cpu.vefa_input_grads
    monkeypatch.setattr(cpu, "vefa_input_grads", lambda *a: calls.append(1) or real(*a))
    fused = _vefa_grads(t)
    assert calls, "the torch backend did not use the fused kernel"
    monkeypatch.setattr(cpu, "BUILT", False)
    fallback = _vefa_grads(t)
    assert len(calls) == 1
    for name in fused:
        assert rel_err(fused[name], fallback[name]) <= TOL[dtype], name


def test_kernel_is_skipped_for_tensors_it_does_not_take():
    g = torch.randn(4, 6, dtype=torch.float64)
    assert not cpu.takes_vefa_input_grads(g, g, torch.ones(6, dtype=torch.float64))
    half = g.half()
    assert not cpu.takes_vefa_input_grads(half, half, torch.ones(6))
    f32 = g.float()
    assert not cpu.takes_vefa_input_grads(f32, f32.T.contiguous().T, torch.ones(6))
    assert torch_backend.cpu_kernels is cpu
