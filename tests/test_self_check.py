"""The on-device self-check (featadapt.check_backends, python -m featadapt.info --check):
on the CPU it checks torch, reference and triton under the interpreter, and
it must report a wrong backend as failing."""

import json

import pytest
import torch

from featadapt import check_backends, info, self_check
from featadapt.ops import dispatch, reference

SMALL = ((7, 17, 13, 3),)

gpu = pytest.mark.gpu


@pytest.fixture
def broken_backend(monkeypatch):
    """broken_backend(name, fault): a backend whose ops are the reference's with `fault` applied to y."""
    def make(name, fault):
        def wrap(op):
            def run(*args):
                return fault(getattr(reference, {"vefa": "vefa_linear", "lora": "lora_linear",
                                                 "lorfa": "lorfa_linear"}[op])(*args))
            return run
        backend = dispatch.Backend(name=name, summary="test: wrong on purpose",
                                   ops={op: wrap(op) for op in dispatch.OPS})
        monkeypatch.setitem(dispatch._BACKENDS, name, backend)
        return backend
    return make


def test_cpu_backends_pass_on_odd_shapes():
    report = check_backends("cpu", backends_to_check=["torch", "reference", "triton"],
                            dtypes=[torch.float32, torch.float16, torch.bfloat16], shapes=SMALL)
    assert report.passed, report.table()
    ran = {(r.backend, r.op, r.dtype) for r in report.rows if r.status == "pass"}
    for op in dispatch.OPS + dispatch.INDEXED_OPS:
        assert ("torch", op, "bfloat16") in ran and ("triton", op, "float32") in ran, op
    # bfloat16 arithmetic is wrong in Triton's interpreter: skipped with the reason, not passed
    skipped = [r for r in report.rows if r.backend == "triton" and r.dtype == "bfloat16"]
    assert skipped and all(r.status == "skip" and "interpreter" in r.detail for r in skipped)
    for row in report.rows:
        if row.status == "pass":
            assert 0 <= row.forward_error <= self_check.TOLERANCE[getattr(torch, row.dtype)]
            assert row.seconds is not None and row.seconds >= 0


def test_the_default_shapes_are_odd_and_the_production_shape_is_added_on_a_gpu_only():
    for m, k, n, r in self_check.ODD_SHAPES:
        assert m % 16 and (k % 16 or n % 16)
    assert {shape[0] for shape in self_check.ODD_SHAPES} >= {1, 97}
    assert {shape[3] for shape in self_check.ODD_SHAPES} >= {1, 7, 16}
    report = check_backends("cpu", backends_to_check=["torch"], dtypes=[torch.float32], ops=["vefa"])
    assert {r.shape for r in report.rows} == {f"{m}x{k}x{n}" for m, k, n, _ in self_check.ODD_SHAPES}


@pytest.mark.parametrize("fault, detail", [
    (lambda y: y * 1.01, "tolerance"),
    (lambda y: y + float("nan"), "tolerance"),
    (lambda y: y.detach(), "element 0 of tensors does not require grad"),
])
def test_a_wrong_backend_is_reported_failing(broken_backend, fault, detail):
    broken_backend("broken", fault)
    report = check_backends("cpu", backends_to_check=["broken", "torch"], dtypes=[torch.float32],
                            ops=["vefa", "lora"], shapes=SMALL)
    assert not report.passed
    failing = report.failures
    assert failing and all(r.backend == "broken" for r in failing)
    assert all(detail in r.detail for r in failing), [r.detail for r in failing]
    assert "FAIL" in report.table()
    data = json.loads(report.to_json())
    assert data["passed"] is False and len(data["rows"]) == len(report.rows)


def test_nothing_run_is_not_a_pass():
    report = check_backends("cpu", backends_to_check=["triton"], dtypes=[torch.bfloat16], ops=["vefa"],
                            shapes=SMALL)
    assert all(r.status == "skip" for r in report.rows)
    assert not report.passed


def test_the_check_leaves_the_callers_random_state_and_tf32_flag():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_backends("cpu", backends_to_check=["torch"], dtypes=[torch.float32], ops=["lora"], shapes=SMALL)
    assert torch.equal(torch.rand(3), expected)


def test_the_command_line_exits_non_zero_on_a_failure(broken_backend, tmp_path, capsys):
    path = tmp_path / "results" / "self-check.json"
    assert info.main(["--check", "--backends", "torch", "--dtypes", "float32", "--ops", "vefa",
                      "--odd-shapes-only", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["passed"] is True
    assert "0 failed" in capsys.readouterr().out

    broken_backend("broken", lambda y: y * 2)
    assert info.main(["--check", "--backends", "broken", "--dtypes", "float32", "--ops", "vefa",
                      "--odd-shapes-only"]) == 1
    captured = capsys.readouterr()
    assert "self-check FAILED" in captured.err


def test_the_command_line_names_a_bad_dtype(capsys):
    with pytest.raises(SystemExit) as raised:
        info.main(["--check", "--dtypes", "float8"])
    assert raised.value.code == 2
    assert "--dtypes takes float32, float16 and bfloat16, got 'float8'" in capsys.readouterr().err


@gpu
def test_gpu_self_check_runs_every_kept_triton_configuration():
    report = check_backends(backends_to_check=["triton"], dtypes=[torch.bfloat16], ops=["vefa", "lora"],
                            shapes=((1025, 257, 4096, 16),))
    assert report.passed, report.table()
    configs = {r.config for r in report.rows if r.op == "vefa"}
    assert len(configs) > 1, configs  # several kept configurations ran, not only the fixed one
