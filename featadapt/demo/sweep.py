"""The learning-rate sweep: each method at a few learning rates around its default, on
task A (Rotten Tomatoes), so that methods can be compared at equal accuracy rather than
at one learning rate each: test accuracy against retained WordSim353, one curve per method,
mean ± std over seeds. Seeds (or extra learning rates) run as separate processes merge into
one results file (merge_sweep_results).
"""

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import featadapt

from .data import SentenceClassifier, load_reviews, majority_share
from .probe import wordsim_spearman
from .report import (
    check_same_run, elapsed_seconds, format_columns, format_stat, markdown_columns, mean_std, save_figure, write_json,
)
from .run import SPLIT_SEED, describe_run, prepare
from .train import (
    accuracy, build_model, failed_to_learn, layer_diagnostics, method_for, overall_progress, steps_per_run, train,
)

# Multiples of each method's default learning rate (METHODS): a factor of 3 either way.
LR_FACTORS = (1 / 3, 1.0, 3.0)
ZOOM_WORDSIM_DROP = 0.2  # the frontier plot's zoomed panel shows points that lost less than this
SUMMARISED = ("test_accuracy", "wordsim_after", "total_intruders")


@dataclass
class SweepConfig:
    train_size: int
    test_size: int
    epochs: int
    batch_size: int = 32
    max_length: int = 64
    wordsim_pairs: object = None
    methods: list = field(default_factory=lambda: list(METHODS))
    lr_factors: tuple = LR_FACTORS
    seed: int = 0
    seeds: int = 1
    model: object = None
    device: str = "cpu"
    threads: object = None
    output_dir: str = "demo-output"
    learning_rates: object = None  # {method: rate} for the factors to multiply, instead of METHODS' (--lr)


def run_once(method, seed, encoder, tokenizer, split, pairs, settings, device, progress=None):
    """One method at one learning rate and seed: the run's record."""
    model = build_model(encoder, method, seed).to(device)
    desc = f"{method.name} lr {method.learning_rate:.1e} seed {seed}"
    stats = train(model, tokenizer, split.train, method, settings, device, seed, desc,
                  on_step=None if progress is None else lambda step: progress.update())
    layers = layer_diagnostics(encoder, model, method)
    return {
        "seed": seed,
        "steps": stats.steps,
        "train_seconds": stats.seconds,
        "final_loss": stats.final_loss,
        "losses": list(stats.losses),
        "test_accuracy": accuracy(model, tokenizer, split.test, settings, device, desc),
        "wordsim_after": wordsim_spearman(model, tokenizer, pairs, device),
        "total_intruders": sum(row["intruders"] for row in layers),
        "trainable_parameters": featadapt.trainable_parameters(model)[0],
    }


def make_point(learning_rate, default_learning_rate, runs, majority_share):
    """One learning rate of one method: its runs (one per seed), their mean ± std and how many
    failed to learn the task (train.failed_to_learn)."""
    runs = sorted(runs, key=lambda run: run["seed"])
    return {
        "learning_rate": learning_rate,
        "factor": learning_rate / default_learning_rate,
        "seeds": [run["seed"] for run in runs],
        "failed": sum(failed_to_learn(run["losses"], run["test_accuracy"], majority_share) for run in runs),
        "summary": {key: mean_std([run[key] for run in runs]) for key in SUMMARISED},
        "runs": runs,
    }


def run_lr_sweep(config, log=print):
    """Every method at every learning rate of the grid, for every seed; writes lr_sweep.json and
    the frontier plot."""
    started = time.perf_counter()
    setup = prepare(config)
    device, output_dir, tokenizer, encoder, settings, pairs = (
        setup.device, setup.output_dir, setup.tokenizer, setup.encoder, setup.settings, setup.pairs)
    split = load_reviews(config.train_size, config.test_size, seed=SPLIT_SEED)
    wordsim_pretrained = wordsim_spearman(SentenceClassifier(encoder).to(device), tokenizer, pairs, device)
    log(f"pretrained WordSim353 Spearman: {wordsim_pretrained:.3f}")
    seeds = [config.seed + i for i in range(config.seeds)]
    defaults = {name: method_for(name, config.learning_rates) for name in config.methods}
    grid = [(name, defaults[name].learning_rate * factor) for name in config.methods for factor in config.lr_factors]
    progress = overall_progress(len(seeds) * len(grid) * steps_per_run(len(split.train), settings), "lr sweep")
    runs = {point: [] for point in grid}
    for seed in seeds:
        for name, learning_rate in grid:
            method = dataclasses.replace(defaults[name], learning_rate=learning_rate)
            run = run_once(method, seed, encoder, tokenizer, split, pairs, settings, device, progress)
            runs[name, learning_rate].append(run)
            log(f"{name} lr {learning_rate:.1e} seed {seed}: accuracy {run['test_accuracy']:.3f}, "
                f"WordSim353 {run['wordsim_after']:.3f}")
    progress.close()
    majority = majority_share(split.test)
    methods = {name: {"default_learning_rate": defaults[name].learning_rate,
                      "points": [make_point(lr, defaults[name].learning_rate, runs[name, lr], majority)
                                 for point_name, lr in grid if point_name == name]}
               for name in config.methods}
    results = {
        "experiment": "lr-sweep",
        "config": describe_run(config),
        "data": {"train_examples": len(split.train), "test_examples": len(split.test),
                 "test_majority_share": majority, "wordsim_pairs": len(pairs)},
        "wordsim_pretrained": wordsim_pretrained,
        "methods": methods,
        "files": {"results": str(output_dir / "lr_sweep.json"), "plots": [str(output_dir / "lr_frontier.png")]},
    }
    plot_frontier(results, output_dir / "lr_frontier.png")
    results["wall_seconds"] = time.perf_counter() - started
    write_json(output_dir / "lr_sweep.json", results)
    return results


# Settings that must agree between the runs merge_sweep_results puts together (seeds and
# learning rates may differ: they are what the parts add).
_SAME_RUN = ("train_size", "test_size", "epochs", "batch_size", "max_length", "wordsim_pairs", "model", "device",
             "threads", "torch", "featadapt", "split_seed", "learning_rates")


def merge_sweep_results(parts, output_dir):
    """One results file from sweeps of one configuration run as separate processes: with other
    seeds (each `--seeds 1`, side by side) or other learning rates (`--lr-factors`). The runs of
    each (method, learning rate) are pooled; a (method, learning rate, seed) given twice is an error.
    Writes output_dir/lr_sweep.json and the plot, and returns the merged results."""
    parts = sorted(parts, key=lambda part: part["config"]["seed"])
    check_same_run(parts, _SAME_RUN, "merge_sweep_results")
    first = parts[0]
    pooled = {}  # method -> learning rate -> runs
    for part in parts:
        for name, entry in part["methods"].items():
            for point in entry["points"]:
                runs = pooled.setdefault(name, {}).setdefault(point["learning_rate"], [])
                seeds = {run["seed"] for run in runs}
                repeated = sorted(seeds & set(point["seeds"]))
                if repeated:
                    raise ValueError(f"merge_sweep_results: {name} at lr {point['learning_rate']:.3g} has seed(s) "
                                     f"{repeated} in more than one part")
                runs.extend(point["runs"])
    methods = {}
    for name, by_rate in pooled.items():
        default = next(part["methods"][name]["default_learning_rate"] for part in parts if name in part["methods"])
        majority = first["data"]["test_majority_share"]
        methods[name] = {"default_learning_rate": default,
                         "points": [make_point(lr, default, runs, majority) for lr, runs in sorted(by_rate.items())]}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    seeds = sorted({seed for entry in methods.values() for point in entry["points"] for seed in point["seeds"]})
    records = [{"seed": part["config"]["seed"], "seeds": part["config"]["seeds"],
                "lr_factors": part["config"]["lr_factors"], "methods": list(part["methods"]),
                "date": part["config"]["date"], "wall_seconds": part["wall_seconds"]} for part in parts]
    results = {
        **first,
        "config": {**first["config"], "seed": seeds[0], "seeds": len(seeds), "output_dir": str(output_dir),
                   "lr_factors": sorted({round(p["factor"], 6) for e in methods.values() for p in e["points"]}),
                   "parts": records},
        "methods": methods,
        "wall_seconds": elapsed_seconds(records),
        "files": {"results": str(output_dir / "lr_sweep.json"), "plots": [str(output_dir / "lr_frontier.png")]},
    }
    plot_frontier(results, output_dir / "lr_frontier.png")
    write_json(output_dir / "lr_sweep.json", results)
    return results


HEADER = ["method", "lr", "test acc", "WordSim353 after", "intruders", "failed to learn"]


def table_rows(results):
    with_std = results["config"]["seeds"] > 1
    rows = []
    for name, entry in results["methods"].items():
        for point in entry["points"]:
            s = point["summary"]
            default = " (default)" if point["learning_rate"] == entry["default_learning_rate"] else ""
            rows.append([name, f"{point['learning_rate']:.1e}{default}",
                         format_stat(s["test_accuracy"], ".3f", with_std),
                         format_stat(s["wordsim_after"], ".3f", with_std),
                         format_stat(s["total_intruders"], ".1f" if with_std else ".0f", with_std),
                         f"{point['failed']} of {len(point['runs'])}"])
    return rows


def format_table(results):
    config, data = results["config"], results["data"]
    seeds = f"mean ± std over {config['seeds']} seeds" if config["seeds"] > 1 else f"seed {config['seed']}"
    notes = [f"{data['train_examples']} training examples × {config['epochs']} epoch(s) (batch {config['batch_size']}, "
             f"{config['max_length']} tokens), {data['test_examples']} test examples; {seeds}; "
             f"pretrained WordSim353 {results['wordsim_pretrained']:.3f}; device {config['device']} "
             f"({config['threads']} threads).",
             "failed to learn: runs whose test accuracy came within 0.05 of always answering the commoner label "
             "(" + f"{data['test_majority_share']:.3f}" + "), or whose training loss ended above ln 2 (worse than "
             "answering 50/50) or was not finite."]
    return format_columns(HEADER, table_rows(results), notes)


def markdown_table(results):
    """The README's table: the same cells as format_table, as Markdown."""
    return markdown_columns(HEADER, table_rows(results))


def plot_frontier(results, path):
    """Test accuracy against retained WordSim353: one curve per method through its learning rates,
    mean ± std over seeds; on the right, the same zoomed to the points that kept most of
    WordSim353 (a collapsed point would otherwise squeeze the rest into a corner)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.8))
    whole, zoom = figure.subplots(1, 2)
    kept = results["wordsim_pretrained"] - ZOOM_WORDSIM_DROP
    for axes in (whole, zoom):
        for index, (name, entry) in enumerate(results["methods"].items()):
            points = [p for p in entry["points"]
                      if axes is whole or p["summary"]["wordsim_after"]["mean"] >= kept]
            x = [p["summary"]["wordsim_after"] for p in points]
            y = [p["summary"]["test_accuracy"] for p in points]
            axes.errorbar([v["mean"] for v in x], [v["mean"] for v in y], xerr=[v["std"] for v in x],
                          yerr=[v["std"] for v in y], fmt="-o", capsize=3, color=f"C{index}", label=name)
            for p, xv, yv in zip(points, x, y):
                marker = "*" if p["learning_rate"] == entry["default_learning_rate"] else ""
                axes.annotate(f"{p['learning_rate']:.0e}{marker}", (xv["mean"], yv["mean"]),
                              textcoords="offset points", xytext=(4, 3), fontsize="x-small", color=f"C{index}")
        axes.axvline(results["wordsim_pretrained"], color="gray", linestyle="--", label="pretrained WordSim353")
        axes.set_xlabel("WordSim353 Spearman after fine-tuning (higher = less forgotten)")
        axes.set_ylabel("Rotten Tomatoes test accuracy")
    seeds = results["config"]["seeds"]
    figure.suptitle(f"Test accuracy against retained word similarity, each method over its learning rates "
                    f"(* = default; mean ± std, {seeds} seed{'s' if seeds > 1 else ''})", fontsize="medium")
    whole.set_title("every learning rate", fontsize="medium")
    zoom.set_title(f"zoomed: points within {ZOOM_WORDSIM_DROP} of the pretrained WordSim353", fontsize="medium")
    whole.legend(fontsize="small")
    save_figure(figure, path)
