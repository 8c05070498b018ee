"""Fine-tuning one method and measuring it: accuracy, speed, memory, layer diagnostics."""

import dataclasses
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import featadapt
from featadapt.analysis import column_space_residual, intruder_dimensions, model_report

from .data import encode, encoder_linear_names, fresh_classifier


@dataclass(frozen=True)
class Method:
    name: str
    learning_rate: float  # for the adapters (or, for "full", every encoder weight)
    adapter_options: dict  # passed to featadapt.inject; None for full fine-tuning

    @property
    def is_adapter(self):
        return self.adapter_options is not None


# Each method gets the learning rate that suits it: low-rank factors starting
# at zero (LoRA's B, LoRFA's) tolerate ~1e-3, VeFA's per-feature scales need
# larger steps to move, and updating every pretrained weight needs small ones.
METHODS = {
    "lora": Method("lora", 2e-3, {"r": 8, "alpha": 16}),
    "lorfa": Method("lorfa", 2e-3, {"r": 8, "alpha": 16}),
    "vefa": Method("vefa", 1e-2, {}),
    "full": Method("full", 3e-5, None),
}


def method_for(name, learning_rates=None):
    """METHODS[name], at the rate `learning_rates` ({name: rate}, from --lr) gives it, if any."""
    rate = (learning_rates or {}).get(name)
    return METHODS[name] if rate is None else dataclasses.replace(METHODS[name], learning_rate=rate)


HEAD_LEARNING_RATE = 2e-3  # the fresh 2-class head, the same for every method
WARMUP_SHARE = 0.1


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    max_length: int


def build_model(pretrained_encoder, method, seed):
    """A fresh copy of the pretrained encoder with `method` applied, and a new head."""
    model = fresh_classifier(pretrained_encoder, seed)
    if method.is_adapter:
        # inject freezes everything that is not an adapter, the new head included.
        featadapt.inject(model, method.name, encoder_linear_names(model), **method.adapter_options)
        model.head.requires_grad_(True)
    return model


def make_optimizer(model, method, total_steps):
    head = [p for p in model.head.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    # No weight decay: it would pull VeFA's scales (initialised at 1) towards 0.
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": method.learning_rate}, {"params": head, "lr": HEAD_LEARNING_RATE}], weight_decay=0.0
    )
    warmup = max(1, int(WARMUP_SHARE * total_steps))

    def warmup_then_linear_decay(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear_decay)


def batches(examples, batch_size, rng):
    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        yield [text for text, _ in chunk], torch.tensor([label for _, label in chunk])


@dataclass(frozen=True)
class TrainStats:
    steps: int
    seconds: float
    examples_per_second: float
    peak_memory_bytes: object  # int on CUDA, None where it is not measured (CPU)
    final_loss: float
    losses: tuple = ()  # every step's training loss: how a run that failed went wrong


def _reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return None  # CPU: no per-run allocator peak to read that would be honest


def train(model, tokenizer, examples, method, settings, device, seed, desc="", on_step=None):
    """Fine-tune in place; returns TrainStats (time counts training steps only).

    on_step(step), when given, is called after each optimizer step (step = 1, 2, ...),
    outside the timed part: the intruder watch runs there and times itself.
    """
    total_steps = steps_per_run(len(examples), settings)
    optimizer, schedule = make_optimizer(model, method, total_steps)
    rng = random.Random(seed)
    model.train()
    _reset_peak_memory(device)
    step, seen, seconds, losses = 0, 0, 0.0, []
    with tqdm(total=total_steps, desc=f"train {desc}", unit="step", leave=False) as bar:
        for _ in range(settings.epochs):
            for texts, labels in batches(examples, settings.batch_size, rng):
                start = time.perf_counter()
                inputs = encode(tokenizer, texts, settings.max_length, device)
                loss = F.cross_entropy(model(**inputs), labels.to(device))
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds += time.perf_counter() - start
                step += 1
                seen += len(texts)
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update()
                if on_step is not None:
                    on_step(step)
    model.eval()
    final_loss = losses[-1] if losses else float("nan")
    return TrainStats(total_steps, seconds, seen / seconds, _peak_memory(device), final_loss, tuple(losses))


# A run failed to learn its task when it ends no better than a constant answer: a training
# loss (over its last tenth of steps) above ln 2, the loss of answering 50/50, or a test
# accuracy within CHANCE_MARGIN of always answering the commoner label. The second catches
# a run whose encoder collapsed: its loss sits just under ln 2 while it predicts one label.
CHANCE_LOSS = math.log(2)
CHANCE_MARGIN = 0.05


def failed_to_learn(losses, test_accuracy, majority_share):
    """Whether a run failed to learn its task (see CHANCE_LOSS and CHANCE_MARGIN); a loss that is
    not finite counts as failing."""
    if not all(math.isfinite(loss) for loss in losses):
        return True
    tail = losses[-max(1, len(losses) // 10):]
    return (bool(tail) and sum(tail) / len(tail) > CHANCE_LOSS) or test_accuracy <= majority_share + CHANCE_MARGIN


def steps_per_run(train_size, settings):
    return settings.epochs * -(-train_size // settings.batch_size)


def overall_progress(total_steps, desc):
    """The bar over a whole experiment (every method, seed and task), with its ETA; each
    training run's own bar shows beneath it and goes when the run ends."""
    return tqdm(total=total_steps, desc=desc, unit="step", position=0, leave=True, smoothing=0.05)


@torch.no_grad()
def accuracy(model, tokenizer, examples, settings, device, desc=""):
    model.eval()
    correct = 0
    starts = range(0, len(examples), settings.batch_size)
    for start in tqdm(starts, desc=f"eval {desc}", unit="batch", leave=False):
        chunk = examples[start:start + settings.batch_size]
        inputs = encode(tokenizer, [text for text, _ in chunk], settings.max_length, device)
        predicted = model(**inputs).argmax(dim=-1).cpu()
        labels = torch.tensor([label for _, label in chunk])
        correct += int((predicted == labels).sum())
    return correct / len(examples)


# -- weight diagnostics ------------------------------------------------------------


def adapter_diagnostics(model):
    """Intruders and column-space residual of every adapted layer (featadapt.analysis.model_report)."""
    report = model_report(model)
    return [{"name": row["name"], "intruders": row["intruders"],
             "column_space_residual": row["column_space_residual"], "relative_update": row["relative_update"]}
            for row in report.rows]


@torch.no_grad()
def full_finetune_diagnostics(pretrained_encoder, model):
    """The same measures for full fine-tuning: each encoder nn.Linear against its pretrained weight."""
    rows = []
    for name in encoder_linear_names(model):
        w_pre = pretrained_encoder.get_submodule(name[len("encoder."):]).weight
        w_ft = model.get_submodule(name).weight
        relative_update = float((w_ft.double() - w_pre.double()).norm() / w_pre.double().norm())
        rows.append({"name": name, "intruders": intruder_dimensions(w_pre, w_ft).count,
                     "column_space_residual": column_space_residual(w_pre, w_ft), "relative_update": relative_update})
    return rows


def layer_diagnostics(pretrained_encoder, model, method):
    return adapter_diagnostics(model) if method.is_adapter else full_finetune_diagnostics(pretrained_encoder, model)


def layer_to_picture(rows):
    """Name of the layer whose similarity matrix is most telling: most intruders, then largest update."""
    return max(rows, key=lambda row: (row["intruders"], row["relative_update"]))["name"]


def intruder_report(model, name):
    layer = model.get_submodule(name)
    return intruder_dimensions(layer.original_weight(), layer.effective_weight())
