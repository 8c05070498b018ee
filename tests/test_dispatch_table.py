"""Automatic dispatch by measurement (DESIGN.md §2): on a (mocked) GPU, auto
runs a fused backend only where the dispatch table lists the case, and falls
back to torch, with one warning, when its kernels fail to compile or launch."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import featadapt
from featadapt.ops import dispatch, dispatch_table, kernel_fallback
from featadapt.ops.fused import KernelSet, fused_ops
from featadapt.ops.kernel_fallback import TORCH_TWINS, KernelUnsupportedError, with_fallback
from helpers import call_op, make_inputs

METHODS = ("vefa", "lorfa", "lora")


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv(dispatch_table.TABLE_ENV, raising=False)
    dispatch_table.reload()
    kernel_fallback.forget_failures()
    yield
    dispatch_table.reload()
    kernel_fallback.forget_failures()


@pytest.fixture
def mocked_gpu(monkeypatch):
    """CPU tensors look like tensors on an sm_90 GPU to the dispatch table."""
    monkeypatch.setattr(dispatch_table, "device_class", lambda device: "sm_90")


@pytest.fixture
def table(tmp_path, monkeypatch):
    """table(entries): use a dispatch table with these entries for the test."""
    def use(entries):
        path = tmp_path / "dispatch_table.json"
        path.write_text(json.dumps({"format": 1, "entries": entries}))
        monkeypatch.setenv(dispatch_table.TABLE_ENV, str(path))
        dispatch_table.reload()
        return path
    return use


def entry(op, backend="fused", dtype="float32", device="sm_90", tokens=None, rank=None, ratio=0.8):
    return {"device": device, "op": op, "dtype": dtype, "tokens": tokens, "rank": rank, "backend": backend,
            "ratio": ratio, "measured": {"device_name": "NVIDIA H200", "date": "2026-12-07"}}


class Kernels:
    """The torch twins as a kernel set, counting calls, with kernels that can be made to fail."""

    def __init__(self, failing=(), error=None):
        self.calls = []
        for name, twin in TORCH_TWINS.items():
            setattr(self, name, self._kernel(name, twin, name in failing, error))

    def _kernel(self, name, twin, fails, error):
        def run(*args):
            self.calls.append(name)
            if fails:
                raise error
            return twin(*args)
        return run


@pytest.fixture
def fused_backend(monkeypatch):
    """fused_backend(kernels): register a fused backend named "fused" over `kernels`,
    like the triton and cuda backends (measured-only, with fallback under auto)."""
    def make(kernels):
        kernel_set = KernelSet(*(getattr(kernels, n) for n in ("scaled_gemm", "scaled_gemm_backward", "low_rank_gemm",
                                                              "low_rank_gemm_dx", "low_rank_dy_grads")))
        backend = dispatch.Backend(name="fused", summary="test", ops=fused_ops(kernel_set), auto_priority=100,
                                   needs_measurement=True, auto_ops=fused_ops(with_fallback("fused", kernel_set)))
        monkeypatch.setitem(dispatch._BACKENDS, "fused", backend)
        return backend
    return make


def inputs(method, m=5, dtype=torch.float32, requires_grad=False):
    return make_inputs(method, (m,), 17, 13, r=3, dtype=dtype, requires_grad=requires_grad)


def chosen(method, t, backend=None):
    return dispatch.choose(method, tuple(v for v in t.values() if v is not None), backend)


# -- auto picks torch without a measurement, the tabled backend with one --------------


def test_the_shipped_table_is_valid_and_lists_nothing_unmeasured():
    """No fused kernel has been measured on a GPU: the shipped table is empty,
    so auto runs torch everywhere; when the GPU check fills it, each entry
    must name where it was measured."""
    entries = dispatch_table.read_table(dispatch_table.SHIPPED_TABLE)
    for e in entries:
        assert e.measured.get("device_name") and e.measured.get("date"), e


@pytest.mark.parametrize("method", METHODS)
def test_auto_picks_torch_on_a_gpu_with_no_table_entry(mocked_gpu, fused_backend, method):
    kernels = Kernels()
    fused_backend(kernels)
    t = inputs(method)
    choice = chosen(method, t)
    assert choice.backend.name == "torch"
    assert f"no measurement for {method} float32 on sm_90 at 5 tokens" in choice.why
    call_op(method, t)
    assert kernels.calls == []
    # asked for by name it still runs
    call_op(method, t, backend="fused")
    assert kernels.calls


@pytest.mark.parametrize("method", METHODS)
def test_auto_picks_the_tabled_backend(mocked_gpu, fused_backend, table, method):
    kernels = Kernels()
    fused_backend(kernels)
    table([entry(method)])
    t = inputs(method, requires_grad=True)
    choice = chosen(method, t)
    assert choice.backend.name == "fused"
    assert "the dispatch table: fused measured 0.80x torch's time on NVIDIA H200" in choice.why
    y = call_op(method, t)
    y.sum().backward()
    assert kernels.calls, "the tabled backend did not run"
    torch.testing.assert_close(y, call_op(method, t, backend="reference"))


def test_table_entries_match_device_dtype_tokens_and_rank(mocked_gpu, fused_backend, table):
    fused_backend(Kernels())
    table([entry("lora", tokens=[4, 8], rank=[2, 16]), entry("vefa", dtype="float16")])
    assert chosen("lora", inputs("lora", m=4)).backend.name == "fused"
    assert chosen("lora", inputs("lora", m=8)).backend.name == "fused"
    assert chosen("lora", inputs("lora", m=9)).backend.name == "torch"  # tokens outside the measured range
    assert chosen("lora", inputs("lora", m=3)).backend.name == "torch"
    t = make_inputs("lora", (5,), 17, 13, r=1, requires_grad=False)
    assert chosen("lora", t).backend.name == "torch"  # rank outside
    assert chosen("lorfa", inputs("lorfa")).backend.name == "torch"  # another op
    assert chosen("vefa", inputs("vefa")).backend.name == "torch"  # another dtype
    assert chosen("vefa", inputs("vefa", dtype=torch.float16)).backend.name == "fused"


def test_an_entry_for_another_gpu_does_not_apply(fused_backend, table, monkeypatch):
    fused_backend(Kernels())
    table([entry("vefa", device="sm_90")])
    monkeypatch.setattr(dispatch_table, "device_class", lambda device: "sm_80")
    assert chosen("vefa", inputs("vefa")).backend.name == "torch"


def test_cpu_tensors_keep_the_torch_backend_without_a_cpu_entry(fused_backend, table):
    fused_backend(Kernels())
    table([entry("vefa", device="sm_90")])
    assert dispatch_table.device_class(torch.device("cpu")) == "cpu"
    assert chosen("vefa", inputs("vefa")).backend.name == "torch"


def test_a_tabled_backend_that_cannot_run_the_call_is_passed_over_with_the_reason(mocked_gpu, table, monkeypatch):
    """The triton backend refuses CPU tensors under auto (its interpreter is for tests)."""
    table([entry("vefa", backend="triton")])
    choice = chosen("vefa", inputs("vefa"))
    assert choice.backend.name == "torch"
    assert "the table's triton passed over" in choice.why


def test_the_cuda_backend_is_never_picked_by_auto_without_an_entry(mocked_gpu):
    assert dispatch.get_backend("cuda").needs_measurement
    assert dispatch.get_backend("triton").needs_measurement
    assert not dispatch.get_backend("torch").needs_measurement


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"format": 2, "entries": []}), '"format": 1'),
    (json.dumps({"format": 1, "entries": [{"op": "vefa"}]}), r"entry 0: missing \['backend', 'device', 'dtype'"),
    (json.dumps({"format": 1, "entries": [entry("nope")]}), "op must be one of"),
    (json.dumps({"format": 1, "entries": [entry("vefa", dtype="float8")]}), "dtype must be one of"),
    (json.dumps({"format": 1, "entries": [entry("vefa", ratio=-1)]}), "ratio must be a positive number"),
    (json.dumps({"format": 1, "entries": [entry("vefa", tokens=[1])]}), r"tokens must be null or \[low, high\]"),
])
def test_a_malformed_table_is_refused_naming_the_file_and_entry(tmp_path, monkeypatch, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    monkeypatch.setenv(dispatch_table.TABLE_ENV, str(path))
    with pytest.raises(dispatch_table.DispatchTableError, match=message) as raised:
        call_op("vefa", inputs("vefa"))
    assert "bad.json" in str(raised.value)


def test_a_missing_table_named_by_the_environment_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch_table.TABLE_ENV, str(tmp_path / "nowhere.json"))
    with pytest.raises(dispatch_table.DispatchTableError, match="FEATADAPT_DISPATCH_TABLE=.*nowhere.json"):
        call_op("vefa", inputs("vefa"))


# -- falling back instead of failing ----------------------------------------------------


def _launch_failures():
    failures = [KernelUnsupportedError("BLOCK_M=256 is not supported here"),
                RuntimeError("CUDA error: no kernel image is available for execution on the device"),
                RuntimeError("featadapt sm_90a GEMM: CUTLASS could not launch it (initialize: Error Internal)")]
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:
        return failures
    return failures + [OutOfResources(300000, 232448, "shared memory")]


@pytest.mark.parametrize("error", _launch_failures(), ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("method, kernel", [("vefa", "scaled_gemm"), ("vefa", "scaled_gemm_backward"),
                                            ("lora", "low_rank_gemm"), ("lorfa", "low_rank_dy_grads"),
                                            ("lora", "low_rank_gemm_dx")])
def test_a_kernel_that_fails_to_launch_falls_back_to_torch_with_one_warning(
        mocked_gpu, fused_backend, table, method, kernel, error):
    kernels = Kernels(failing=(kernel,), error=error)
    fused_backend(kernels)
    table([entry(method)])
    t = inputs(method, requires_grad=True)
    expected = call_op(method, t, backend="reference")
    with pytest.warns(RuntimeWarning, match=f"fused kernel {kernel} failed to compile or launch for float32 on "
                                            f"sm_90.*run on the torch backend") as caught:
        y = call_op(method, t)
        y.sum().backward()
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    torch.testing.assert_close(y, expected)  # the failed call is still answered, correctly
    assert t["x"].grad is not None and torch.isfinite(t["x"].grad).all()

    # remembered: auto now sends the case to torch, quietly
    choice = chosen(method, t)
    assert choice.backend.name == "torch"
    assert "failed to compile or launch" in choice.why
    calls_before = len(kernels.calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call_op(method, t).sum().backward()
    assert len(kernels.calls) == calls_before

    # asked for by name, the failure is raised with its reason
    with pytest.raises(type(error), match=str(error).split(":")[0][:20]):
        call_op(method, inputs(method, requires_grad=True), backend="fused").sum().backward()


def test_an_error_that_is_not_a_launch_failure_is_raised_not_hidden(mocked_gpu, fused_backend, table):
    kernels = Kernels(failing=("scaled_gemm",), error=RuntimeError("CUDA error: an illegal memory access"))
    fused_backend(kernels)
    table([entry("vefa")])
    with pytest.raises(RuntimeError, match="illegal memory access"):
        call_op("vefa", inputs("vefa"))
    assert chosen("vefa", inputs("vefa")).backend.name == "fused"  # nothing was remembered


@pytest.mark.parametrize("name", sorted(TORCH_TWINS))
def test_each_twin_is_registered_for_the_ops_it_serves(name):
    assert set(kernel_fallback.KERNEL_OPS[name]) <= set(dispatch.OPS + dispatch.INDEXED_OPS)


# -- errors that name what and where ---------------------------------------------------


def test_an_unknown_backend_in_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "tritton")
    with pytest.raises(ValueError, match=r"environment variable FEATADAPT_BACKEND='tritton' names no backend; "
                                         r"expected one of: auto, cuda, reference, torch, triton"):
        call_op("vefa", inputs("vefa"))


def test_info_says_what_auto_picks_and_why(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (dispatch.ENV_VAR, dispatch_table.TABLE_ENV)}
    done = subprocess.run([sys.executable, "-m", "featadapt.info"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cpu: no measurement for cpu: auto picks torch for every op and dtype" in done.stdout
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": 1, "entries": [entry("lora", backend="triton", device="cpu",
                                                               tokens=[1, 64])]}))
    env[dispatch_table.TABLE_ENV] = str(path)
    done = subprocess.run([sys.executable, "-m", "featadapt.info"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cpu: lora float32 (tokens (1, 64)): triton measured 0.80x torch's time on NVIDIA H200" in done.stdout


def test_check_backends_is_public():
    assert featadapt.check_backends is featadapt.self_check.check_backends
