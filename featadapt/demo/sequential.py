"""The sequential experiment: each method adapts the encoder to task A (Rotten Tomatoes,
fresh vs rotten), then goes on adapting it to task B (convention speeches, Democrat vs
Republican), with a fresh head per task. After each task: the accuracy on every task
seen so far (each with its own head; task A's after B measures forgetting), the two
probes of pretrained knowledge (WordSim353, Google analogies) and the weight diagnostics.
An IntruderTracker watches the adapted layers during training.
"""

import copy
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import featadapt
from featadapt.analysis import DEFAULT_WATCH_EVERY, IntruderTracker

from . import sequential_report
from .data import (
    SentenceClassifier, encoder_linear_names, load_reviews, load_speeches, majority_share, read_analogies,
)
from .probe import analogy_accuracy, single_token_questions, wordsim_spearman
from .report import check_same_run, elapsed_seconds, mean_std, write_json
from .run import SPLIT_SEED, describe_run, keep_first_seed_files, prepare
from .train import (
    METHODS, accuracy, build_model, failed_to_learn, layer_diagnostics, method_for, overall_progress, steps_per_run,
    train,
)

TASKS = ("A", "B")
TASK_NAMES = {"A": "Rotten Tomatoes (fresh vs rotten)", "B": "convention speeches (Democrat vs Republican)"}
HEAD_SEED_OFFSET = 1000  # task B's head is drawn from seed + this, so it differs from task A's


@dataclass
class SequentialConfig:
    a_train_size: int
    a_test_size: int
    b_train_size: int
    b_test_size: int
    epochs: int
    batch_size: int = 32
    max_length: int = 64
    wordsim_pairs: object = None  # None: all 353
    analogy_questions: object = None  # None: every single-token question
    methods: list = field(default_factory=lambda: list(METHODS))
    seeds: int = 1
    seed: int = 0
    model: object = None
    device: str = "cpu"
    threads: object = None
    output_dir: str = "demo-output"
    watch_every: int = DEFAULT_WATCH_EVERY
    learning_rates: object = None  # {method: rate} replacing METHODS' rates (--lr)


def make_tracker(model, method, pretrained_encoder, every):
    """The adapters against their own frozen weights; for full fine-tuning, each encoder
    nn.Linear against the pretrained encoder's."""
    if method.is_adapter:
        return IntruderTracker(model, every=every)
    pretrained = {name: pretrained_encoder.get_submodule(name[len("encoder."):]).weight
                  for name in encoder_linear_names(model)}
    return IntruderTracker(model, every=every, pretrained=pretrained)


def fresh_head(model, seed):
    torch.manual_seed(seed)
    head = model.head
    return nn.Linear(head.in_features, head.out_features).to(device=head.weight.device, dtype=head.weight.dtype)


@torch.no_grad()
def accuracy_with_head(model, head, tokenizer, examples, settings, device, desc):
    """Accuracy of the encoder as it is now, read out through a task's own head."""
    current = model.head
    model.head = head
    try:
        return accuracy(model, tokenizer, examples, settings, device, desc)
    finally:
        model.head = current


def probes(model, tokenizer, pairs, questions, device):
    return {"wordsim": wordsim_spearman(model, tokenizer, pairs, device),
            "analogy": analogy_accuracy(model, tokenizer, questions, device)}


def run_sequence(method, seed, encoder, tokenizer, tasks, pairs, questions, settings, device, watch_every,
                 progress=None):
    """Task A, then task B, for one method and seed; returns (run record, model).
    progress, when given, is a bar that advances with every training step."""
    model = build_model(encoder, method, seed).to(device)
    trainable, _ = featadapt.trainable_parameters(model)
    tracker = make_tracker(model, method, encoder, watch_every)
    tracker.record(0)
    heads, stages, offset = {}, {}, 0
    train_seconds = 0.0
    for task in TASKS:
        if heads:  # a fresh head for every task after the first
            model.head = fresh_head(model, seed + HEAD_SEED_OFFSET)
        desc = f"{method.name} seed {seed} task {task}"
        def on_step(step):
            tracker.maybe_record(offset + step)
            if progress is not None:
                progress.update()

        stats = train(model, tokenizer, tasks[task].train, method, settings, device, seed, desc, on_step=on_step)
        offset += stats.steps
        train_seconds += stats.seconds
        if tracker.records[-1]["step"] != offset:
            tracker.record(offset)  # every task ends with a measurement
        heads[task] = copy.deepcopy(model.head)
        layers = layer_diagnostics(encoder, model, method)
        stages[task] = {
            "steps": stats.steps,
            "train_seconds": stats.seconds,
            "examples_per_second": stats.examples_per_second,
            "final_loss": stats.final_loss,
            "losses": list(stats.losses),
            "accuracy": {seen: accuracy_with_head(model, heads[seen], tokenizer, tasks[seen].test, settings, device,
                                                  desc) for seen in heads},
            **probes(model, tokenizer, pairs, questions, device),
            "total_intruders": sum(row["intruders"] for row in layers),
            "mean_column_space_residual": sum(row["column_space_residual"] for row in layers) / len(layers),
            "layers": layers,
        }
    run = {
        "seed": seed,
        "trainable_parameters": trainable,
        "stages": stages,
        "watch": {"every": watch_every, "checks": len(tracker.records), "seconds": tracker.seconds,
                  "train_seconds": train_seconds, "steps": offset, "records": tracker.records},
    }
    return run, model


def watch_cost(runs):
    """What the intruder watch costs next to training, over every run: seconds per check and
    per training step, and the share it adds at the default interval (DEFAULT_WATCH_EVERY)."""
    watches = [run["watch"] for entry in runs.values() for run in entry]
    per_check = sum(w["seconds"] for w in watches) / sum(w["checks"] for w in watches)
    per_step = sum(w["train_seconds"] for w in watches) / sum(w["steps"] for w in watches)
    every = watches[0]["every"]
    return {
        "seconds_per_check": per_check,
        "seconds_per_step": per_step,
        "interval_in_this_run": every,
        "overhead_in_this_run": per_check / (every * per_step),
        "default_interval": DEFAULT_WATCH_EVERY,
        "overhead_at_default_interval": per_check / (DEFAULT_WATCH_EVERY * per_step),
    }


def summarise(runs, majority_shares):
    """Mean ± std over seeds of the numbers the table shows, and per task how many runs failed to
    learn it (train.failed_to_learn; majority_shares: {task: its test set's commoner-label share})."""
    def stat(pick):
        return mean_std([pick(run) for run in runs])

    summary = {"trainable_parameters": stat(lambda r: r["trainable_parameters"])}
    for task in TASKS:
        stage = lambda r, t=task: r["stages"][t]  # noqa: E731 (a tiny selector)
        summary[f"after_{task}"] = {
            "accuracy": {seen: stat(lambda r, t=task, s=seen: stage(r, t)["accuracy"][s])
                         for seen in runs[0]["stages"][task]["accuracy"]},
            **{key: stat(lambda r, t=task, k=key: stage(r, t)[k])
               for key in ("wordsim", "analogy", "total_intruders", "mean_column_space_residual",
                           "examples_per_second")},
            "failed": sum(failed_to_learn(stage(r).get("losses", ()), stage(r)["accuracy"][task],
                                          majority_shares[task]) for r in runs),
        }
    return summary


def run_sequential(config, log=print):
    """Every method, every seed, task A then task B; writes sequential.json and the plots."""
    started = time.perf_counter()
    setup = prepare(config)
    device, output_dir, tokenizer, encoder, settings, pairs = (
        setup.device, setup.output_dir, setup.tokenizer, setup.encoder, setup.settings, setup.pairs)
    tasks = {"A": load_reviews(config.a_train_size, config.a_test_size, seed=SPLIT_SEED),
             "B": load_speeches(config.b_train_size, config.b_test_size, seed=SPLIT_SEED)}
    questions = spread(single_token_questions(tokenizer, read_analogies()), config.analogy_questions)
    pretrained = probes(SentenceClassifier(encoder).to(device), tokenizer, pairs, questions, device)
    log(f"pretrained: WordSim353 {pretrained['wordsim']:.3f}, analogies {pretrained['analogy']:.3f} "
        f"({len(questions)} questions)")

    runs = {name: [] for name in config.methods}
    files = {"results": str(output_dir / "sequential.json"), "plots": [], "adapters": {}}
    seeds = [config.seed + i for i in range(config.seeds)]
    steps = sum(steps_per_run(len(split.train), settings) for split in tasks.values())
    progress = overall_progress(len(seeds) * len(config.methods) * steps, "sequential")
    for seed in seeds:
        for name in config.methods:
            run, model = run_sequence(method_for(name, config.learning_rates), seed, encoder, tokenizer, tasks, pairs, questions, settings,
                                      device, config.watch_every, progress)
            runs[name].append(run)
            a, b = run["stages"]["A"], run["stages"]["B"]
            log(f"{name} seed {seed}: task A {a['accuracy']['A']:.3f} → {b['accuracy']['A']:.3f}, "
                f"task B {b['accuracy']['B']:.3f}, WordSim353 {a['wordsim']:.3f} → {b['wordsim']:.3f}, "
                f"intruders {a['total_intruders']} → {b['total_intruders']}")
            if seed == seeds[0]:
                keep_first_seed_files(name, {"layers": b["layers"]}, model, output_dir, files)
            del model
    progress.close()

    majority = {task: majority_share(split.test) for task, split in tasks.items()}
    results = {
        "experiment": "sequential",
        "config": describe_run(config),
        "tasks": {task: {"name": TASK_NAMES[task], "train_examples": len(split.train),
                         "test_examples": len(split.test),
                         "test_majority_share": majority[task]} for task, split in tasks.items()},
        "probes": {"wordsim_pairs": len(pairs), "analogy_questions": len(questions)},
        "pretrained": pretrained,
        "methods": {
            name: {"learning_rate": method_for(name, config.learning_rates).learning_rate,
                   "adapter_options": METHODS[name].adapter_options,
                   "summary": summarise(runs[name], majority), "runs": runs[name]}
            for name in config.methods
        },
        "watch_cost": watch_cost(runs),
        "files": files,
    }
    write_plots(results, output_dir)
    results["wall_seconds"] = time.perf_counter() - started
    write_json(output_dir / "sequential.json", results)
    return results


def write_plots(results, output_dir):
    for plot in (sequential_report.plot_forgetting, sequential_report.plot_intruders_over_steps,
                 sequential_report.plot_training_loss):
        path = str(plot(results, output_dir))
        if path not in results["files"]["plots"]:
            results["files"]["plots"].append(path)


# Settings that must agree between the runs merge_seed_results puts together.
_SAME_RUN = ("a_train_size", "a_test_size", "b_train_size", "b_test_size", "epochs", "batch_size", "max_length",
             "wordsim_pairs", "analogy_questions", "methods", "model", "device", "threads", "watch_every", "torch",
             "featadapt", "split_seed", "learning_rates")


def merge_seed_results(parts, output_dir):
    """One results file from runs of one configuration with different seeds, run as parallel
    processes (each `--seeds 1`): the runs side by side, summaries, watch cost and plots
    recomputed; the first part's files (adapters, similarity plot) are the first seed's.
    Writes output_dir/sequential.json and returns the merged results."""
    parts = sorted(parts, key=lambda part: part["config"]["seed"])
    check_same_run(parts, _SAME_RUN, "merge_seed_results")
    first = parts[0]
    seeds = [run["seed"] for part in parts for run in next(iter(part["methods"].values()))["runs"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"merge_seed_results: seeds repeat: {seeds}")
    methods = {}
    for name, entry in first["methods"].items():
        runs = [run for part in parts for run in part["methods"][name]["runs"]]
        majority = {task: entry["test_majority_share"] for task, entry in first["tasks"].items()}
        methods[name] = {**entry, "summary": summarise(runs, majority), "runs": runs}
    runs = {name: entry["runs"] for name, entry in methods.items()}
    records = [{"seed": part["config"]["seed"], "date": part["config"]["date"], "wall_seconds": part["wall_seconds"]}
               for part in parts]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = {
        **first,
        "config": {**first["config"], "seeds": len(seeds), "output_dir": str(output_dir),
                   "parallel_seed_processes": records},
        "methods": methods,
        "watch_cost": watch_cost(runs),
        "wall_seconds": elapsed_seconds(records),
        "files": {**copy_first_seed_files(first["files"], output_dir), "results": str(output_dir / "sequential.json")},
    }
    write_plots(results, output_dir)
    write_json(output_dir / "sequential.json", results)
    return results


def copy_first_seed_files(files, output_dir):
    """The first seed's adapters and pictures, copied into the merged folder (where they are not
    there already), and the files record pointing at the copies."""
    def adopt(path):
        source, target = Path(path), output_dir / Path(path).name
        if source.resolve() != target.resolve():
            if source.is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                shutil.copy2(source, target)
        return str(target)

    return {**files, "adapters": {name: adopt(path) for name, path in files["adapters"].items()},
            "plots": [adopt(path) for path in files["plots"]]}


def spread(items, count):
    """`count` items evenly spaced through `items` (all of them for None): the analogy file is
    sorted by relation (capitals first), so a prefix would test one relation only."""
    if count is None or count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]
