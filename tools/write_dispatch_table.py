#!/usr/bin/env python
"""The dispatch table from what a GPU check measured (featadapt/ops/dispatch_table.py).

    python tools/write_dispatch_table.py RESULTS_DIR [--out PATH]

Reads RESULTS_DIR/bench-headline.json (the benchmark: forward+backward time of
every method on every backend, same process, same inputs) and
RESULTS_DIR/self-check.json (python -m featadapt.info --check --json), and
where present bench-cuda.json and self-check-cuda.json (the cuda backend,
measured once the extension is built, with its own torch baseline). A fused
backend gets an entry for (GPU, method, dtype) only where
  - the self-check ran it for that op and dtype and no row of it failed, and
  - it was at least MARGIN faster than `torch` at a measured token count;
its `tokens` range spans the contiguous run of measured token counts where
both hold (nothing is extrapolated past what was measured). Writes
RESULTS_DIR/dispatch_table.json (or --out): commit it as
featadapt/ops/dispatch_table.json to make it the shipped table.
"""

import argparse
import json
import os
import sys
from collections import defaultdict

MARGIN = 0.97  # a fused backend must take at most 97 % of torch's time: noise does not flip the default
MODE = "forward+backward"
FUSED = ("triton", "cuda")


def device_class(environment):
    """The table's device class: "sm_90" for compute capability 9.0, else the device type."""
    capability = environment.get("compute_capability")
    if capability:
        return "sm_" + str(capability).replace(".", "")
    return environment.get("device_type") or "cpu"


def self_check_verdicts(rows):
    """{(backend, op, dtype): True when it ran and nothing failed}."""
    verdict = {}
    for row in rows:
        key = (row["backend"], row["op"], row["dtype"])
        ok = row["status"] != "FAIL"
        ran = row["status"] == "pass"
        previous = verdict.get(key, (True, False))
        verdict[key] = (previous[0] and ok, previous[1] or ran)
    return {key: ok and ran for key, (ok, ran) in verdict.items()}


def measured_ratios(layers):
    """{(backend, method, dtype, rank): {tokens: fused time / torch time}} at the forward+backward mode."""
    times = {}
    for row in layers:
        if row.get("mode") != MODE or "/" not in row.get("layer", "") or not row.get("median_s"):
            continue  # another mode, a peer, or not timed (--benchmark-disable)
        method, backend = row["layer"].split("/")
        tokens = row["shape"][0]
        times[(backend, method, row["dtype"], row["rank"], tuple(row["shape"]))] = row["median_s"]
    ratios = defaultdict(dict)
    for (backend, method, dtype, rank, shape), seconds in times.items():
        base = times.get(("torch", method, dtype, rank, shape))
        if backend in FUSED and base:
            ratios[(backend, method, dtype, rank)].setdefault(shape[0], []).append(seconds / base)
    # several shapes at one token count (K, N differ): the worst ratio decides
    return {key: {tokens: max(values) for tokens, values in by_tokens.items()} for key, by_tokens in ratios.items()}


def entries(bench, check):
    environment = bench["environment"]
    device = device_class(environment)
    verdicts = self_check_verdicts(check["rows"])
    measured = {"device_name": environment.get("device"), "date": environment.get("date"),
                "torch": environment.get("torch"), "triton": environment.get("triton"),
                "cuda": environment.get("cuda"), "featadapt_revision": environment.get("featadapt_revision")}
    found = []
    for (backend, method, dtype, rank), by_tokens in sorted(measured_ratios(bench["layers"]).items()):
        if not verdicts.get((backend, method, dtype), False):
            continue
        run = []  # contiguous measured token counts where the backend wins
        for tokens in sorted(by_tokens) + [None]:
            if tokens is not None and by_tokens[tokens] <= MARGIN:
                run.append(tokens)
                continue
            if run:
                ratio = max(by_tokens[t] for t in run)
                found.append({"device": device, "op": method, "dtype": dtype, "tokens": [run[0], run[-1]],
                              "rank": None if method == "vefa" else [rank, rank], "backend": backend,
                              "ratio": round(ratio, 4), "measured": measured})
            run = []
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="the GPU check's results folder")
    parser.add_argument("--out", help="where to write the table (default: RESULTS/dispatch_table.json)")
    args = parser.parse_args(argv)
    paths = {name: os.path.join(args.results, name) for name in ("bench-headline.json", "self-check.json")}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        print(f"write_dispatch_table: missing {missing}: no table written", file=sys.stderr)
        return 1
    # The cuda backend is measured once the extension is built, in files of its
    # own (each benchmark file holds its own torch baseline): read them when there.
    benches, rows = [], []
    for name in ("bench-headline.json", "bench-cuda.json"):
        path = os.path.join(args.results, name)
        if os.path.exists(path):
            with open(path) as f:
                benches.append(json.load(f))
    for name in ("self-check.json", "self-check-cuda.json"):
        path = os.path.join(args.results, name)
        if os.path.exists(path):
            with open(path) as f:
                rows += json.load(f)["rows"]
    found = []
    for bench in benches:
        found += [e for e in entries(bench, {"rows": rows}) if e not in found]
    table = {"format": 1,
             "comment": "Written by tools/write_dispatch_table.py from a GPU check's benchmark and self-check.",
             "entries": found}
    out = args.out or os.path.join(args.results, "dispatch_table.json")
    with open(out, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    print(f"{out}: {len(table['entries'])} entries")
    for e in table["entries"]:
        print(f"  {e['device']} {e['op']} {e['dtype']} tokens {e['tokens']}: {e['backend']} {e['ratio']:.3f}x torch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
