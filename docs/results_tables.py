"""Tables of measured numbers, made from the committed results files.

A page says ``<!-- results-table: NAME -->`` on a line of its own; the docs
build replaces that line with ``TABLES[NAME]()`` (docs/conf.py), and an unknown
NAME fails the build. The README, which no build touches, keeps each table
right after its marker line, and tests/test_readme.py checks it against the
same function. Adding a table is one line in TABLES.
"""

import importlib
import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"^<!-- results-table: (\S+) -->$", re.M)


def _plot():
    """benchmarks/plot.py, which also draws the charts (not a package: loaded by path)."""
    spec = importlib.util.spec_from_file_location("plot", ROOT / "benchmarks" / "plot.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    return plot


def _results(name):
    return json.loads((RESULTS / f"{name}.json").read_text())


def benchmark(name):
    """Every table of one benchmark results file (benchmarks/results/NAME.json)."""
    return lambda: _plot().tables(_results(name))


def targets(name):
    """The file's targets: each case's time against its frozen floor, the target, and its peer."""
    def table():
        lines = ["| case | time / floor | target | met | time / peer |", "|---|---:|---:|---|---|"]
        for t in _results(name)["targets"]:
            lines.append(f"| {t['case']} | {t['ratio_to_floor']:.2f} | ≤ {t['target_ratio_to_floor']:.2f} | "
                         f"{'yes' if t['met'] else 'no'} | {t['ratio_to_peer']:.2f} ({t['peer']}) |")
        return "\n".join(lines)
    return table


def headline():
    """The README's performance ratios, on the Intel Xeon: a layer's forward+backward at
    2048×1024×1024, r = 16 (lower is faster), and a MiniLM-L6 training step (higher is faster)."""
    results = _results(XEON)
    ratio = {(t["case"].split("/")[0], t["case"].split()[2]): t for t in results["targets"]}
    speed = {(r["model"], r["method"]): r["speed_vs_full"] for r in results["end_to_end"]}
    lines = ["| method | layer: time / frozen layer | layer: time / peer | training step: speed / full fine-tuning |",
             "|---|---|---|---|"]
    for method, label in (("vefa", "VeFA"), ("lora", "LoRA"), ("lorfa", "LoRFA")):
        f32, bf16 = ratio[method, "float32"], ratio[method, "bfloat16"]
        lines.append(f"| {label} | {f32['ratio_to_floor']:.2f} · {bf16['ratio_to_floor']:.2f} | "
                     f"{f32['ratio_to_peer']:.2f} · {bf16['ratio_to_peer']:.2f} ({f32['peer']}) | "
                     f"{speed['minilm-l6', method]:.2f} · {speed['minilm-l6-bf16', method]:.2f} |")
    return "\n".join(lines)


def demo(module, path):
    """A demo table: featadapt.demo.MODULE's markdown_table of a results file under docs/demo/."""
    def table():
        renderer = importlib.import_module(f"featadapt.demo.{module}")
        return renderer.markdown_table(json.loads((ROOT / "docs" / "demo" / path).read_text()))
    return table


XEON = "intel-xeon-2-cores-avx2-avx512-avx512-bf16-amx"
EPYC = "amd-epyc-2-cores"
MULTI_ADAPTER = "intel-xeon-2-cores-avx2-avx512-avx512-bf16-amx-multi-adapter"

TABLES = {
    "performance-headline": headline,
    EPYC: benchmark(EPYC),
    XEON: benchmark(XEON),
    MULTI_ADAPTER: benchmark(MULTI_ADAPTER),
    f"{XEON}-targets": targets(XEON),
    f"{EPYC}-targets": targets(EPYC),
    "demo-default": demo("report", "results.json"),
    "demo-sequential": demo("sequential_report", "sequential/sequential.json"),
    "demo-sequential-lorfa-lr": demo("sequential_report", "sequential-lorfa-lr/sequential.json"),
    "demo-lr-sweep": demo("sweep", "lr-sweep/lr_sweep.json"),
}


def table(name):
    """TABLES[name]()'s Markdown; an unknown name is an error that lists the known ones."""
    if name not in TABLES:
        raise KeyError(f"no results table {name!r} in docs/results_tables.py (known: {', '.join(sorted(TABLES))})")
    return TABLES[name]().strip()


def expand(text):
    """`text` with every marker line replaced by its table."""
    return MARKER.sub(lambda match: table(match.group(1)), text)
