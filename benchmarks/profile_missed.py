"""Profile every case of a results file that missed its target, and store
where the time goes in the file (under "profiles"), next to the figures.

    python benchmarks/profile_missed.py benchmarks/results/<device>.json [--steps N]

Each missed forward+backward case and its floor are run `steps` times under
torch.profiler on this machine (which must be the file's device); the ops
that take most of the time are kept, per step, with their share of it.
"""

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from bench_cases import Shape, bench_device, build_layer
from bench_report import case_label
from featadapt.fileio import write_atomically

TOP_OPS = 10


def _fwd_bwd(layer, x, dy):
    trainable = [p for p in layer.parameters if p.requires_grad]

    def step():
        x.grad = None
        for p in trainable:
            p.grad = None
        layer.forward(x).backward(dy)

    return step


def top_ops(step, steps):
    """The ops (by name and input shapes) with the most self time per step."""
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "step_ms": total / steps / 1e3,
        "ops": [
            {"op": e.key, "input_shapes": str(e.input_shapes), "calls_per_step": e.count / steps, "self_ms": e.self_cpu_time_total / steps / 1e3,
             "share": e.self_cpu_time_total / total}
            for e in events[:TOP_OPS]
        ],
    }


def profile_row(row, steps):
    """The profiles of one results row's layer and of its floor."""
    device = bench_device()
    shape = Shape(*row["shape"])
    dtype = getattr(torch, row["dtype"])
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape.tokens, shape.k, device=device, generator=generator).to(dtype).requires_grad_(True)
    dy = torch.randn(shape.tokens, shape.n, device=device, generator=generator).to(dtype)
    out = {}
    for name in (row["layer"], "floor"):
        layer = build_layer(name, shape, dtype, row["rank"], device)
        out["floor" if name == "floor" else "layer"] = top_ops(_fwd_bwd(layer, x, dy), steps)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a benchmarks/results/<device>.json file")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with open(args.results) as f:
        results = json.load(f)
    missed = {t["case"] for t in results["targets"] if not t["met"]}
    rows = [r for r in results["layers"] if case_label(r) in missed]
    results["profiles"] = {case_label(r): profile_row(r, args.steps) for r in rows}

    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")

    write_atomically(args.results, dump)
    for case, prof in results["profiles"].items():
        print(f"{case}: {prof['layer']['step_ms']:.2f} ms a step (floor {prof['floor']['step_ms']:.2f} ms)")
        for op in prof["layer"]["ops"]:
            print(f"  {op['op']:<32} {op['input_shapes'][:60]:<60} {op['self_ms']:8.3f} ms {100 * op['share']:5.1f} %")


if __name__ == "__main__":
    main()
