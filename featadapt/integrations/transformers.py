"""transformers.Trainer: watch intruder dimensions while a model trains.

`IntruderDimensionsCallback` counts, every `every` optimizer steps, the intruder
dimensions and the column-space residual of the model's adapted layers
(`featadapt.analysis.IntruderTracker`) and logs them with `trainer.log`, so they
reach the Trainer's log history and every reporting integration it has
(TensorBoard, W&B, ... as `report_to` configures). Its `history` keeps each
measurement for plotting. Outside a Trainer, use `IntruderTracker` directly.
"""

from transformers import TrainerCallback

from featadapt.analysis import DEFAULT_WATCH_EVERY, IntruderTracker

LOG_KEYS = {"total_intruders": "intruders/total", "mean_column_space_residual": "intruders/column_space_residual"}


class IntruderDimensionsCallback(TrainerCallback):
    """Logs "intruders/total" and "intruders/column_space_residual" every `every` steps.

    trainer: the Trainer to log through (the callback's events do not carry it):
        trainer.add_callback(IntruderDimensionsCallback(trainer, every=100))
    k, epsilon, rtol: as in featadapt.analysis.intruder_dimensions / column_space_residual.
    pretrained: {module name: pretrained weight} to watch plain layers (full
        fine-tuning); by default, every adapter layer against its frozen weight.
    One measurement is taken when training begins (step 0), then one every `every` steps.
    """

    def __init__(self, trainer, every=DEFAULT_WATCH_EVERY, k=10, epsilon=0.5, rtol=None, pretrained=None):
        if not callable(getattr(trainer, "log", None)):
            raise TypeError(f"IntruderDimensionsCallback: trainer must be a transformers.Trainer, "
                            f"got {type(trainer).__name__}")
        self.trainer = trainer
        self.options = {"every": every, "k": k, "epsilon": epsilon, "rtol": rtol, "pretrained": pretrained}
        IntruderTracker.check_every(every)  # a bad interval fails here, not at the first step
        self.tracker = None

    @property
    def history(self):
        """[{"step", "total_intruders", "mean_column_space_residual", "intruders": {layer: count}}, ...]"""
        return [] if self.tracker is None else self.tracker.records

    @property
    def seconds(self):
        """Time spent measuring so far."""
        return 0.0 if self.tracker is None else self.tracker.seconds

    def _log(self, entry):
        self.trainer.log({LOG_KEYS[key]: float(entry[key]) for key in LOG_KEYS})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # Built here, not in __init__: the adapters may be injected after the callback is made.
        self.tracker = IntruderTracker(model, **self.options)
        if state.is_world_process_zero:
            self._log(self.tracker.record(state.global_step))

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            entry = self.tracker.maybe_record(state.global_step)
            if entry is not None:
                self._log(entry)
