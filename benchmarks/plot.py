"""Turn a benchmark results file into PNG charts.

    python benchmarks/plot.py benchmarks/results/<device>.json [--output-dir DIR]

Writes <name>-time.png (forward+backward time as a ratio to the frozen floor,
per method and implementation, one panel per dtype) and <name>-saved.png
(saved-activation bytes per layer as a multiple of bytes(x)).
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODE = "forward+backward"
COLORS = {"featadapt": "tab:blue", "peer": "tab:orange", "floor": "tab:gray"}


def load(path):
    with open(path) as f:
        return json.load(f)


def _main_rank(rows):
    """The rank most rows use (the sweep adds others)."""
    ranks = [r["rank"] for r in rows]
    return max(set(ranks), key=ranks.count)


def _panels(rows):
    """{(shape, dtype): rows} for the forward+backward rows of the main rank."""
    rank = _main_rank(rows)
    panels = {}
    for row in rows:
        if row["mode"] == MODE and row["rank"] == rank:
            key = ("M{} K{} N{}".format(*row["shape"]), row["dtype"])
            panels.setdefault(key, []).append(row)
    return panels


def _bar_chart(panels, value, ylabel, title, path, reference_line=None):
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for ax, ((shape, dtype), rows) in zip(axes[:, 0], sorted(panels.items())):
        rows = [r for r in rows if value(r) is not None]
        ax.bar(range(len(rows)), [value(r) for r in rows], color=[COLORS[r["kind"]] for r in rows])
        ax.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=40, ha="right", fontsize=8)
        if reference_line is not None:
            ax.axhline(reference_line, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{shape}, {dtype}", fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(results, output_dir, name):
    env = results["environment"]
    panels = _panels(results["layers"])
    written = []
    time_path = os.path.join(output_dir, f"{name}-time.png")
    _bar_chart(
        panels, lambda r: r.get("ratio_to_floor"), "time / frozen nn.Linear",
        f"{MODE} time relative to the frozen layer — {env['device']} (blue: featadapt, orange: peers)",
        time_path, reference_line=1.0,
    )
    written.append(time_path)
    saved_path = os.path.join(output_dir, f"{name}-saved.png")
    _bar_chart(
        panels, lambda r: r["saved_bytes"] / r["x_bytes"], "saved bytes / bytes(x)",
        "activation memory saved for backward, per layer (parameters excluded)", saved_path, reference_line=1.0,
    )
    written.append(saved_path)
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a benchmarks/results/<device>.json file")
    parser.add_argument("--output-dir", help="where to write the PNGs (default: next to the results file)")
    args = parser.parse_args()
    output_dir = args.output_dir or os.path.dirname(os.path.abspath(args.results))
    os.makedirs(output_dir, exist_ok=True)
    name = os.path.splitext(os.path.basename(args.results))[0]
    for path in plot(load(args.results), output_dir, name):
        print(path)


if __name__ == "__main__":
    main()
