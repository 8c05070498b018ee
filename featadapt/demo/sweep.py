"""The learning-rate sweep: each method at a few learning rates around its default, on
task A (Rotten Tomatoes), so that methods can be compared at equal accuracy rather than
at one learning rate each: test accuracy against retained WordSim353, one curve per method.
"""

import dataclasses
import time
from dataclasses import dataclass, field

import featadapt

from .data import SentenceClassifier, load_reviews
from .probe import wordsim_spearman
from .report import format_columns, markdown_columns, save_figure, write_json
from .run import SPLIT_SEED, describe_run, prepare
from .train import METHODS, accuracy, build_model, layer_diagnostics, train

# Multiples of each method's default learning rate (METHODS): a factor of 3 either way.
LR_FACTORS = (1 / 3, 1.0, 3.0)
ZOOM_WORDSIM_DROP = 0.2  # the frontier plot's zoomed panel shows runs that lost less than this


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
    seeds: int = 1  # the sweep runs one seed; recorded so the report reads like the others
    model: object = None
    device: str = "cpu"
    threads: object = None
    output_dir: str = "demo-output"


def run_point(method, seed, encoder, tokenizer, split, pairs, settings, device):
    model = build_model(encoder, method, seed).to(device)
    desc = f"{method.name} lr {method.learning_rate:.1e}"
    stats = train(model, tokenizer, split.train, method, settings, device, seed, desc)
    layers = layer_diagnostics(encoder, model, method)
    return {
        "learning_rate": method.learning_rate,
        "steps": stats.steps,
        "train_seconds": stats.seconds,
        "final_loss": stats.final_loss,
        "test_accuracy": accuracy(model, tokenizer, split.test, settings, device, desc),
        "wordsim_after": wordsim_spearman(model, tokenizer, pairs, device),
        "total_intruders": sum(row["intruders"] for row in layers),
        "trainable_parameters": featadapt.trainable_parameters(model)[0],
    }


def run_lr_sweep(config, log=print):
    """Every method at every learning rate of the grid; writes lr_sweep.json and the frontier plot."""
    started = time.perf_counter()
    setup = prepare(config)
    device, output_dir, tokenizer, encoder, settings, pairs = (
        setup.device, setup.output_dir, setup.tokenizer, setup.encoder, setup.settings, setup.pairs)
    split = load_reviews(config.train_size, config.test_size, seed=SPLIT_SEED)
    wordsim_pretrained = wordsim_spearman(SentenceClassifier(encoder).to(device), tokenizer, pairs, device)
    log(f"pretrained WordSim353 Spearman: {wordsim_pretrained:.3f}")
    methods = {}
    for name in config.methods:
        default = METHODS[name]
        points = []
        for factor in config.lr_factors:
            method = dataclasses.replace(default, learning_rate=default.learning_rate * factor)
            point = run_point(method, config.seed, encoder, tokenizer, split, pairs, settings, device)
            points.append(point)
            log(f"{name} lr {method.learning_rate:.1e}: accuracy {point['test_accuracy']:.3f}, "
                f"WordSim353 {point['wordsim_after']:.3f}")
        methods[name] = {"default_learning_rate": default.learning_rate, "points": points}
    results = {
        "experiment": "lr-sweep",
        "config": describe_run(config),
        "data": {"train_examples": len(split.train), "test_examples": len(split.test), "wordsim_pairs": len(pairs)},
        "wordsim_pretrained": wordsim_pretrained,
        "methods": methods,
        "files": {"results": str(output_dir / "lr_sweep.json"), "plots": [str(output_dir / "lr_frontier.png")]},
    }
    plot_frontier(results, output_dir / "lr_frontier.png")
    results["wall_seconds"] = time.perf_counter() - started
    write_json(output_dir / "lr_sweep.json", results)
    return results


HEADER = ["method", "lr", "test acc", "WordSim353 after", "intruders"]


def table_rows(results):
    return [[name, f"{p['learning_rate']:.1e}" + (" (default)" if p["learning_rate"] == entry["default_learning_rate"]
                                                  else ""),
             f"{p['test_accuracy']:.3f}", f"{p['wordsim_after']:.3f}", str(p["total_intruders"])]
            for name, entry in results["methods"].items() for p in entry["points"]]


def format_table(results):
    config, data = results["config"], results["data"]
    notes = [f"{data['train_examples']} training examples × {config['epochs']} epoch(s) (batch {config['batch_size']}, "
             f"{config['max_length']} tokens), {data['test_examples']} test examples, seed {config['seed']}; "
             f"pretrained WordSim353 {results['wordsim_pretrained']:.3f}; device {config['device']} "
             f"({config['threads']} threads)."]
    return format_columns(HEADER, table_rows(results), notes)


def markdown_table(results):
    """The README's table: the same cells as format_table, as Markdown."""
    return markdown_columns(HEADER, table_rows(results))


def plot_frontier(results, path):
    """Test accuracy against retained WordSim353: one curve per method through its learning rates;
    on the right, the same zoomed to the runs that kept most of WordSim353 (a diverged run
    would otherwise squeeze the rest into a corner)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.8))
    whole, zoom = figure.subplots(1, 2)
    kept = results["wordsim_pretrained"] - ZOOM_WORDSIM_DROP
    for axes in (whole, zoom):
        for index, (name, entry) in enumerate(results["methods"].items()):
            points = entry["points"] if axes is whole else [p for p in entry["points"] if p["wordsim_after"] >= kept]
            xs = [p["wordsim_after"] for p in points]
            ys = [p["test_accuracy"] for p in points]
            axes.plot(xs, ys, "-o", color=f"C{index}", label=name)
            for p, x, y in zip(points, xs, ys):
                marker = "*" if p["learning_rate"] == entry["default_learning_rate"] else ""
                axes.annotate(f"{p['learning_rate']:.0e}{marker}", (x, y), textcoords="offset points",
                              xytext=(4, 3), fontsize="x-small", color=f"C{index}")
        axes.axvline(results["wordsim_pretrained"], color="gray", linestyle="--", label="pretrained WordSim353")
        axes.set_xlabel("WordSim353 Spearman after fine-tuning (higher = less forgotten)")
        axes.set_ylabel("Rotten Tomatoes test accuracy")
    whole.set_title("Accuracy vs retained word similarity over learning rates (* = default)", fontsize="medium")
    zoom.set_title(f"zoomed: runs within {ZOOM_WORDSIM_DROP} of the pretrained WordSim353", fontsize="medium")
    whole.legend(fontsize="small")
    save_figure(figure, path)
