"""Summaries over seeds, the printed table, results.json and the two plots."""

import datetime
import json
import math

from featadapt.fileio import write_atomically

# Per-run numbers that get a mean ± std over seeds.
SUMMARISED = (
    "trainable_parameters", "examples_per_second", "peak_memory_bytes", "test_accuracy",
    "wordsim_before", "wordsim_after", "total_intruders", "mean_column_space_residual",
)


def mean_std(values):
    """Mean and sample standard deviation (0 for one value); None when nothing was measured."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return {"mean": mean, "std": 0.0}
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return {"mean": mean, "std": math.sqrt(variance)}


def summarise(runs):
    return {key: mean_std([run[key] for run in runs]) for key in SUMMARISED}


# -- the text table ----------------------------------------------------------------


def format_stat(stat, fmt, with_std):
    if stat is None:
        return "n/a"
    text = format(stat["mean"], fmt)
    return f"{text} ± {format(stat['std'], fmt)}" if with_std else text


def _memory(stat, with_std):
    if stat is None:
        return "n/a (CPU)"
    return format_stat({k: v / 2**20 for k, v in stat.items()}, ".0f", with_std) + " MiB"


def method_cells(results, name):
    """Each cell of one method's row, by column name: the printed table and the headline table
    pick theirs."""
    with_std = results["config"]["seeds"] > 1
    entry = results["methods"][name]
    s = entry["summary"]
    trainable, total = s["trainable_parameters"]["mean"], results["model"]["parameters"]
    return {
        "method": name,
        "lr": f"{entry['learning_rate']:.0e}",
        "trainable": f"{trainable:,.0f} ({100 * trainable / total:.2f}%)" if trainable < total
        else f"{trainable:,.0f} (100%)",
        "speed": format_stat(s["examples_per_second"], ".1f", with_std),
        "memory": _memory(s["peak_memory_bytes"], with_std),
        "accuracy": format_stat(s["test_accuracy"], ".3f", with_std),
        "wordsim": f"{format_stat(s['wordsim_before'], '.3f', False)} → "
                   f"{format_stat(s['wordsim_after'], '.3f', with_std)}",
        "intruders": format_stat(s["total_intruders"], ".1f" if with_std else ".0f", with_std),
        "residual": format_stat(s["mean_column_space_residual"], ".1e", with_std),
    }


def table_rows(results):
    columns = ("method", "lr", "trainable", "speed", "memory", "accuracy", "wordsim", "intruders", "residual")
    return [[method_cells(results, name)[column] for column in columns] for name in results["methods"]]


HEADER = ["method", "lr", "trainable params", "train ex/s", "peak memory", "test acc",
          "WordSim353 before → after", "intruders", "col-space resid."]


def format_columns(header, body, notes):
    """A fixed-width table (header, rule, rows), a blank line and the notes."""
    rows = [header, *body]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join([*lines, "", *notes])


def markdown_columns(header, body):
    """The same table as Markdown, for the README."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


# The headline table's method names (the README and the docs' demo page).
DISPLAY_NAMES = {"lora": "LoRA r={r}", "lorfa": "LoRFA r={r}", "vefa": "VeFA", "full": "full fine-tuning"}
HEADLINE_HEADER = ["method", "trainable parameters", "train examples/s", "test accuracy", "WordSim353 before → after",
                   "intruders", "column-space residual"]


def markdown_table(results):
    """The default experiment's headline table, as Markdown: the README's and the demo page's."""
    rows = []
    for name, entry in results["methods"].items():
        cells = method_cells(results, name)
        rows.append([DISPLAY_NAMES[name].format(**(entry["adapter_options"] or {})), cells["trainable"],
                     cells["speed"], cells["accuracy"], cells["wordsim"], cells["intruders"],
                     format_stat(entry["summary"]["mean_column_space_residual"], ".1e", False)])
    return markdown_columns(HEADLINE_HEADER, rows)


def format_table(results):
    config = results["config"]
    seeds = f"mean ± std over {config['seeds']} seeds" if config["seeds"] > 1 else f"seed {config['seed']}"
    data = results["data"]
    notes = [
        f"{data['train_examples']} training examples × {config['epochs']} epochs (batch {config['batch_size']}), "
        f"{data['test_examples']} test examples, {data['wordsim_pairs']} WordSim353 pairs; {seeds}; "
        f"device {config['device']} ({config['threads']} threads).",
        "intruders: total over the adapted layers (top k=10, epsilon=0.5). col-space resid.: mean over them of the "
        "update's share outside W0's column space; only tall weights (MiniLM's 1536x384 FFN-up layers) leave room "
        "for it, a square or wide full-rank weight gives 0 for every method.",
    ]
    return format_columns(HEADER, table_rows(results), notes)


def check_same_run(parts, keys, caller):
    """Results merged into one file must come from one configuration: ValueError naming the
    settings in which a part differs from the first."""
    first = parts[0]["config"]
    for part in parts[1:]:
        differ = [key for key in keys if part["config"].get(key) != first.get(key)]
        if differ:
            raise ValueError(f"{caller}: the runs differ in {', '.join(differ)}")


def elapsed_seconds(parts):
    """The wall-clock time a merged experiment took: the union of its parts' spans, each ending
    at its "date" and lasting its "wall_seconds". Parts run side by side count once (the
    slowest), parts run one after another add up."""
    spans = []
    for part in parts:
        end = datetime.datetime.fromisoformat(part["date"]).timestamp()
        spans.append((end - part["wall_seconds"], end))
    total, covered_until = 0.0, -math.inf
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, covered_until))
        covered_until = max(covered_until, end)
    return total


# -- files -------------------------------------------------------------------------


def write_json(path, data):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    write_atomically(path, write)


def save_figure(figure, path):
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_accuracy_vs_wordsim(results, path):
    """Test accuracy against the WordSim353 correlation left after fine-tuning, one point per method."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend is ever needed

    figure = Figure(figsize=(6, 4.5))
    axes = figure.add_subplot()
    for name, entry in results["methods"].items():
        s = entry["summary"]
        x, y = s["wordsim_after"], s["test_accuracy"]
        axes.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt="o", capsize=3, label=name)
        axes.annotate(name, (x["mean"], y["mean"]), textcoords="offset points", xytext=(6, 4))
    axes.axvline(results["wordsim_pretrained"], color="gray", linestyle="--", label="pretrained WordSim353")
    axes.set_xlabel("WordSim353 Spearman after fine-tuning (higher = less forgotten)")
    axes.set_ylabel("Rotten Tomatoes test accuracy")
    axes.set_title("Task accuracy vs retained word similarity")
    axes.legend(fontsize="small")
    save_figure(figure, path)


def plot_similarity_matrix(report, layer_name, path):
    """|cos| between a LoRA layer's top-k fine-tuned and all pretrained left singular vectors."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.2))
    axes = figure.add_subplot()
    image = axes.imshow(report.similarity.cpu().numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                        interpolation="nearest")
    figure.colorbar(image, ax=axes, label="|cosine similarity|")
    for index in report.indices:  # intruders: no pretrained vector within epsilon
        axes.axhline(index, color="red", linewidth=0.8, alpha=0.7)
    axes.set_xlabel("pretrained left singular vector (by decreasing singular value)")
    axes.set_ylabel(f"fine-tuned, top {report.k}")
    axes.set_title(f"LoRA, {layer_name}: {report.count} intruder(s) at epsilon={report.epsilon} (red)")
    save_figure(figure, path)
