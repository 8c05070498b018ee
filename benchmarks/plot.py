"""Turn a benchmark results file into PNG charts, or into the README's tables.

    python benchmarks/plot.py benchmarks/results/<device>.json [--output-dir DIR]
    python benchmarks/plot.py benchmarks/results/<device>.json --markdown

Writes <name>-time.png (forward+backward time as a ratio to the frozen floor,
per method and implementation, one panel per dtype) and <name>-saved.png
(saved-activation bytes per layer as a multiple of bytes(x)). --markdown
prints the tables the README quotes instead (a test keeps them in step).
"""

import argparse
import json
import os


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


def _header(env):
    """The lines that say where and when a results file was measured."""
    lines = [
        f"Device: {env['device']}; torch {env['torch']}, peft {env['peft']}; "
        f"{env['date'][:10]}, featadapt {env['featadapt_revision'][:12]}.",
    ]
    if env.get("machine_load"):
        one, five, fifteen = env["machine_load"]
        lines.append(f"Load average at the end of the run (the benchmark's own threads included): "
                     f"{one:.1f} (1 min), {five:.1f} (5 min), {fifteen:.1f} (15 min).")
    return lines


def markdown(results):
    """The README's tables: forward+backward per layer, and end to end."""
    lines = _header(results["environment"])
    lines += [
        "",
        "| layer | dtype | shape (M, K, N) | time / floor | time / peer | saved bytes / bytes(x) |",
        "|---|---|---|---|---|---|",
    ]
    rank = _main_rank(results["layers"])
    for row in results["layers"]:
        if row["mode"] != MODE or row["rank"] != rank or row["layer"] == "floor":
            continue
        peer = f"{row['ratio_to_peer']:.2f} ({row['peer']})" if row.get("ratio_to_peer") is not None else ""
        lines.append(
            f"| {row['layer']} | {row['dtype']} | {', '.join(map(str, row['shape']))} | "
            f"{row['ratio_to_floor']:.2f} | {peer} | {row['saved_bytes'] / row['x_bytes']:.2f} |"
        )
    # rows on a quantized base compare with the same adapter on the full-precision base instead
    full_precision = [r for r in results["end_to_end"] if "time_vs_full_precision" not in r]
    quantized = [r for r in results["end_to_end"] if "time_vs_full_precision" in r]
    if full_precision:
        lines += [
            "",
            "| model | method | trainable parameters | tokens/s | speed / full fine-tuning |",
            "|---|---|---|---|---|",
        ]
        for row in full_precision:
            lines.append(
                f"| {row['model']} ({row['dtype']}, {row['batch']}×{row['seq']}) | {row['method']} | "
                f"{row['trainable_params']:,} | {row['tokens_per_s']:.0f} | {row['speed_vs_full']:.2f} |"
            )
    if quantized:
        lines += [
            "",
            "| model | method | tokens/s | time / same method, full-precision base | peak memory (MB) | "
            "peak / full-precision base |",
            "|---|---|---|---|---|---|",
        ]
        for row in quantized:
            lines.append(
                f"| {row['model']} ({row['dtype']}, {row['batch']}×{row['seq']}) | {row['method']} | "
                f"{row['tokens_per_s']:.0f} | {row['time_vs_full_precision']:.2f} | "
                f"{row['peak_bytes'] / 1e6:.0f} | {row['peak_bytes'] / row['peak_bytes_full_precision']:.2f} |"
            )
    return "\n".join(lines)


def multi_adapter_markdown(results):
    """The README's tables of a mixed-adapter results file (benchmarks/test_multi_adapter.py):
    time as a multiple of the frozen layer's (model: the plain model's), per variant and n."""
    case = results["environment"]["case"]
    lines = _header(results["environment"])
    titles = {
        "layer": f"one layer, K = N = {case['features']}, r = {case['rank']}",
        "model": f"GPT-2 from a config, {case['model_layers']} layers, width {case['model_width']}, r = {case['rank']}",
    }
    for kind in ("layer", "model"):
        rows = [r for r in results[kind] if r["variant"] != "floor"]
        counts = sorted({r["adapters"] for r in rows})
        lines += ["", f"| {titles[kind]} | " + " | ".join(f"n = {n}" for n in counts) + " |",
                  "|---|" + "---:|" * len(counts)]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            ratio = {r["adapters"]: r["ratio_to_floor"] for r in rows if r["variant"] == variant}
            lines.append(f"| `{variant}` | " + " | ".join(f"{ratio[n]:.2f}" if n in ratio else "" for n in counts)
                         + " |")
    met = sum(t["met"] for t in results["targets"])
    lines += ["", f"Targets: {met} of {len(results['targets'])} met."]
    lines += [f"- {'met' if t['met'] else 'MISSED'}: {t['target']} ({t['ratio']:.2f})" for t in results["targets"]
              if not t["met"]]
    return "\n".join(lines)


def tables(results):
    """The README's tables for any results file this module knows."""
    return markdown(results) if "layers" in results else multi_adapter_markdown(results)


def _bar_chart(panels, value, ylabel, title, path, reference_line=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    parser.add_argument("--markdown", action="store_true", help="print the README's tables instead of drawing")
    args = parser.parse_args()
    if args.markdown:
        print(tables(load(args.results)))
        return
    output_dir = args.output_dir or os.path.dirname(os.path.abspath(args.results))
    os.makedirs(output_dir, exist_ok=True)
    name = os.path.splitext(os.path.basename(args.results))[0]
    for path in plot(load(args.results), output_dir, name):
        print(path)


if __name__ == "__main__":
    main()
