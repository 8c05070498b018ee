"""The sequential experiment's table and plots."""

from .report import format_columns, format_stat, markdown_columns, save_figure

HEADER = ["method", "lr", "task A acc: after A → after B", "task B acc", "WordSim353: after A → after B",
          "analogies: after A → after B", "intruders: after A → after B", "col-space resid.: A → B",
          "failed to learn: A, B"]


def _pair(summary, key, fmt, with_std):
    return f"{format_stat(summary['after_A'][key], fmt, False)} → {format_stat(summary['after_B'][key], fmt, with_std)}"


def table_rows(results):
    with_std = results["config"]["seeds"] > 1
    rows = []
    for name, entry in results["methods"].items():
        s = entry["summary"]
        a_after_a = format_stat(s["after_A"]["accuracy"]["A"], ".3f", False)
        rows.append([
            name,
            f"{entry['learning_rate']:.1e}",
            f"{a_after_a} → {format_stat(s['after_B']['accuracy']['A'], '.3f', with_std)}",
            format_stat(s["after_B"]["accuracy"]["B"], ".3f", with_std),
            _pair(s, "wordsim", ".3f", with_std),
            _pair(s, "analogy", ".3f", with_std),
            _pair(s, "total_intruders", ".1f" if with_std else ".0f", with_std),
            _pair(s, "mean_column_space_residual", ".1e", False),
            f"{s['after_A']['failed']}, {s['after_B']['failed']} of {len(entry['runs'])}",
        ])
    return rows


def format_table(results):
    config, tasks, pretrained = results["config"], results["tasks"], results["pretrained"]
    seeds = f"mean ± std over {config['seeds']} seeds (± on the after-B value)" if config["seeds"] > 1 \
        else f"seed {config['seed']}"
    notes = [
        f"task A: {tasks['A']['name']}, {tasks['A']['train_examples']} train / {tasks['A']['test_examples']} test; "
        f"task B: {tasks['B']['name']}, {tasks['B']['train_examples']} train / {tasks['B']['test_examples']} test "
        f"(majority class {tasks['B']['test_majority_share']:.3f}); {config['epochs']} epoch(s) each, batch "
        f"{config['batch_size']}, {config['max_length']} tokens; {seeds}; device {config['device']} "
        f"({config['threads']} threads).",
        f"pretrained: WordSim353 {pretrained['wordsim']:.3f} ({results['probes']['wordsim_pairs']} pairs), "
        f"analogies {pretrained['analogy']:.3f} ({results['probes']['analogy_questions']} single-token questions).",
        "failed to learn: runs whose accuracy on the task just trained came within 0.05 of always answering the "
        "commoner label, or whose training loss on it ended above ln 2 (worse than answering 50/50) or was not "
        "finite.",
    ]
    return format_columns(HEADER, table_rows(results), notes)


def plot_forgetting(results, output_dir):
    """Task A accuracy against WordSim353, after A (open) and after B (filled), one arrow per method."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4.8))
    axes = figure.add_subplot()
    for index, (name, entry) in enumerate(results["methods"].items()):
        color = f"C{index}"
        s = entry["summary"]
        before = (s["after_A"]["wordsim"]["mean"], s["after_A"]["accuracy"]["A"]["mean"])
        after = (s["after_B"]["wordsim"]["mean"], s["after_B"]["accuracy"]["A"]["mean"])
        axes.plot(*before, "o", mfc="none", color=color)
        axes.errorbar(*after, xerr=s["after_B"]["wordsim"]["std"], yerr=s["after_B"]["accuracy"]["A"]["std"],
                      fmt="o", color=color, capsize=3, label=name)
        axes.annotate("", after, before, arrowprops={"arrowstyle": "->", "color": color})
    axes.axvline(results["pretrained"]["wordsim"], color="gray", linestyle="--", label="pretrained WordSim353")
    axes.set_xlabel("WordSim353 Spearman (higher = less forgotten)")
    axes.set_ylabel("task A (Rotten Tomatoes) test accuracy")
    axes.set_title("After task A (open) → after task B (filled)")
    axes.legend(fontsize="small")
    path = output_dir / "sequential_forgetting.png"
    save_figure(figure, path)
    return path


def plot_intruders_over_steps(results, output_dir):
    """Intruder count over training steps per method: every seed (thin) and their mean (bold);
    dotted: task A ends."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4))
    axes = figure.add_subplot()
    for index, (name, entry) in enumerate(results["methods"].items()):
        counts = []
        for run in entry["runs"]:
            records = run["watch"]["records"]
            steps = [r["step"] for r in records]
            counts.append([r["total_intruders"] for r in records])
            axes.plot(steps, counts[-1], "-", linewidth=0.6, alpha=0.5, color=f"C{index}")
        mean = [sum(column) / len(column) for column in zip(*counts)]
        axes.plot(steps[:len(mean)], mean, "-o", markersize=3, color=f"C{index}", label=name)
    first = next(iter(results["methods"].values()))["runs"][0]
    axes.axvline(first["stages"]["A"]["steps"], color="gray", linestyle=":", label="task A → task B")
    axes.set_xlabel("training step")
    axes.set_ylabel("intruder dimensions (all adapted layers)")
    seeds = len(next(iter(results["methods"].values()))["runs"])
    axes.set_title(f"Intruders while training (every {first['watch']['every']} steps; "
                   f"{seeds} seed{'s' if seeds > 1 else ''}, bold: mean)", fontsize="medium")
    axes.legend(fontsize="small")
    path = output_dir / "intruders_over_steps.png"
    save_figure(figure, path)
    return path


def plot_training_loss(results, output_dir):
    """Each method's training loss over the steps of task A and then task B, one line per seed
    (a running mean over 5 steps); dashed: ln 2, the loss of answering 50/50."""
    from matplotlib.figure import Figure

    from .train import CHANCE_LOSS

    methods = results["methods"]
    columns = min(2, len(methods))
    rows = -(-len(methods) // columns)
    figure = Figure(figsize=(4.6 * columns, 3.4 * rows), layout="constrained")
    panels = figure.subplots(rows, columns, sharey=True, squeeze=False).flatten()
    for unused in panels[len(methods):]:
        unused.set_visible(False)
    for axes, (name, entry) in zip(panels, methods.items()):
        for index, run in enumerate(entry["runs"]):
            losses = [loss for task in ("A", "B") for loss in run["stages"][task].get("losses", ())]
            smooth = [sum(losses[max(0, i - 4):i + 1]) / len(losses[max(0, i - 4):i + 1]) for i in range(len(losses))]
            axes.plot(range(1, len(smooth) + 1), smooth, linewidth=0.9, color=f"C{index}", label=f"seed {run['seed']}")
        axes.axvline(entry["runs"][0]["stages"]["A"]["steps"], color="gray", linestyle=":")
        axes.axhline(CHANCE_LOSS, color="gray", linestyle="--", linewidth=0.8)
        axes.set_title(f"{name} (lr {entry['learning_rate']:.1e})", fontsize="medium")
        axes.set_xlabel("step (dotted: task A → B)")
        axes.set_ylabel("training loss (running mean of 5)")
    panels[0].legend(fontsize="x-small")
    path = output_dir / "training_loss.png"
    save_figure(figure, path)
    return path


def markdown_table(results):
    """The README's table: the same cells as format_table, as Markdown."""
    return markdown_columns(HEADER, table_rows(results))
