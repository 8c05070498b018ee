"""Watching intruder dimensions while training: featadapt.analysis.IntruderTracker (for any
loop) and featadapt.integrations.transformers.IntruderDimensionsCallback (for Trainer)."""

import pytest
import torch
from torch import nn

import featadapt
from featadapt.analysis import IntruderTracker, _top_left_singular, column_space_residual, model_report
from helpers import tiny_gpt2


def trained_like(method, seed=0, size=0.3):
    """An MLP with tall, square and wide layers whose adapters have moved, as training moves them."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 96), nn.GELU(), nn.Linear(96, 96), nn.GELU(), nn.Linear(96, 24),
                          nn.GELU(), nn.Linear(24, 2))
    featadapt.inject(model, method, ["0", "2", "4"], **({} if method == "vefa" else {"r": 4, "alpha": 8}))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(size * torch.randn_like(param))
    return model


@pytest.mark.parametrize("shape", [(40, 40), (90, 30), (30, 90)])
def test_top_left_singular_vectors_match_the_svd(shape):
    torch.manual_seed(1)
    w = torch.randn(*shape, dtype=torch.float64)
    u, s = _top_left_singular(w, 5)
    u_ref, s_ref, _ = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(s, s_ref[:5], rtol=1e-10, atol=0)
    # Singular vectors are defined up to sign.
    torch.testing.assert_close((u * u_ref[:, :5]).sum(0).abs(), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-8)


@pytest.mark.parametrize("method", ["lora", "lorfa", "vefa"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tracker_agrees_with_model_report(method, seed):
    model = trained_like(method, seed)
    report = model_report(model, k=10, epsilon=0.5)
    measured = IntruderTracker(model, k=10, epsilon=0.5).measure()
    assert measured["intruders"] == {row["name"]: row["intruders"] for row in report.rows}
    assert measured["total_intruders"] == report.total_intruders
    assert measured["mean_column_space_residual"] == pytest.approx(report.mean_column_space_residual, abs=1e-12)
    if method == "lora":
        assert measured["total_intruders"] > 0  # the constructed update does rotate directions out
        assert measured["mean_column_space_residual"] > 0.1  # the tall layer leaves room outside W0's columns


def test_tracker_records_every_n_steps_and_times_itself():
    model = trained_like("lora")
    tracker = IntruderTracker(model, every=3)
    recorded = [step for step in range(1, 11) if tracker.maybe_record(step) is not None]
    assert recorded == [3, 6, 9]
    assert [entry["step"] for entry in tracker.records] == [3, 6, 9]
    assert tracker.seconds > 0
    assert tracker.record(10)["step"] == 10 and len(tracker.records) == 4


def test_tracker_follows_the_model_as_it_trains():
    model = trained_like("lora", size=0.0)  # LoRA starts at W0: nothing has moved
    tracker = IntruderTracker(model)
    start = tracker.record(0)
    assert start["total_intruders"] == 0 and start["mean_column_space_residual"] == 0.0
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    assert tracker.record(1)["mean_column_space_residual"] > 0


def test_tracker_watches_plain_layers_against_given_pretrained_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 4))
    pretrained = {"0": model[0].weight.detach().clone()}
    with torch.no_grad():
        model[0].weight.add_(0.5 * torch.randn_like(model[0].weight))
    measured = IntruderTracker(model, pretrained=pretrained).measure()
    assert list(measured["intruders"]) == ["0"]
    assert measured["mean_column_space_residual"] == pytest.approx(
        column_space_residual(pretrained["0"], model[0].weight), abs=1e-12)


def test_tracker_arguments_are_checked():
    with pytest.raises(ValueError, match="no adapter layers"):
        IntruderTracker(nn.Linear(3, 3))
    model = trained_like("vefa")
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="every must be None or an integer >= 1"):
            IntruderTracker(model, every=bad)
    with pytest.raises(ValueError, match="epsilon"):
        IntruderTracker(model, epsilon=2.0)
    assert IntruderTracker(model, every=None).maybe_record(5) is None


# -- the Trainer callback ----------------------------------------------------------


def test_callback_logs_through_the_trainer_and_keeps_a_history(tmp_path):
    transformers = pytest.importorskip("transformers")
    from featadapt.integrations.transformers import IntruderDimensionsCallback

    model = tiny_gpt2()
    featadapt.inject(model, "lora", r=4, alpha=8)
    ids = torch.randint(0, 100, (24, 12), generator=torch.Generator().manual_seed(0))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                                          learning_rate=3e-2, save_strategy="no", report_to=[], use_cpu=True,
                                          logging_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids])
    callback = IntruderDimensionsCallback(trainer, every=2)
    trainer.add_callback(callback)
    trainer.train()

    assert [entry["step"] for entry in callback.history] == [0, 2, 4, 6]
    logged = [entry for entry in trainer.state.log_history if "intruders/total" in entry]
    assert [entry["step"] for entry in logged] == [0, 2, 4, 6]
    assert [entry["intruders/total"] for entry in logged] == [entry["total_intruders"] for entry in callback.history]
    assert logged[0]["intruders/column_space_residual"] == 0.0  # LoRA starts at W0
    assert logged[-1]["intruders/column_space_residual"] > 0  # 6 steps at a large rate moved it
    # The last entry describes the trained model as it is.
    assert callback.history[-1]["intruders"] == IntruderTracker(model).measure()["intruders"]
    assert 0 < callback.seconds


def test_callback_needs_a_trainer():
    pytest.importorskip("transformers")
    from featadapt.integrations.transformers import IntruderDimensionsCallback

    with pytest.raises(TypeError, match="trainer must be a transformers.Trainer, got NoneType"):
        IntruderDimensionsCallback(None)
    with pytest.raises(ValueError, match="every must be"):
        IntruderDimensionsCallback(type("T", (), {"log": lambda self, logs: None})(), every=0)
