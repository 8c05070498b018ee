#!/usr/bin/env python
"""The self-check (python -m featadapt.info --check) split over processes side
by side, for tools/gpu-check.sh: Triton compiles one kernel at a time within
a process, so the cases are spread over dtypes × op groups.

    python tools/gpu_self_check.py RESULTS_DIR [--dry-run] [--backends torch,triton]

Writes RESULTS_DIR/self-check-<part>.{json,txt}, then RESULTS_DIR/self-check.json
with every row; exits 1 when any row failed or a process did not finish.
"""

import argparse
import json
import os
import subprocess
import sys

OP_GROUPS = ("vefa,vefa_indexed", "lora,lorfa,lora_indexed,lorfa_indexed")


def parts(dry_run):
    # the interpreter's bfloat16 arithmetic is wrong: the dry run checks float32 instead
    dtypes = ("float32", "float16") if dry_run else ("bfloat16", "float16")
    return [(dtype, ops) for dtype in dtypes for ops in OP_GROUPS]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: odd shapes, Triton's interpreter")
    parser.add_argument("--backends", default="torch,triton")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    # the dry run's interpreter is slow: one small odd shape stands in for the GPU's set
    size = ["--shapes", "7,17,13,3"] if args.dry_run else ["--production"]
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    running = []
    for i, (dtype, ops) in enumerate(parts(args.dry_run)):
        out = open(os.path.join(args.results, f"self-check-{i}.txt"), "w")
        command = [sys.executable, "-m", "featadapt.info", "--check", "--backends", args.backends, "--dtypes",
                   dtype, "--ops", ops, *size, "--json", os.path.join(args.results, f"self-check-{i}.json")]
        running.append((i, subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env), out))
    status = 0
    rows = []
    for i, process, out in running:
        code = process.wait()
        out.close()
        print(open(out.name).read())
        path = os.path.join(args.results, f"self-check-{i}.json")
        if code != 0:
            status = 1
        if os.path.exists(path):
            rows += json.load(open(path))["rows"]
        else:
            status = 1
            print(f"self-check part {i} wrote no results (exit {code})")
    failed = [r for r in rows if r["status"] == "FAIL"]
    merged = {"passed": status == 0 and not failed and any(r["status"] == "pass" for r in rows), "rows": rows}
    with open(os.path.join(args.results, "self-check.json"), "w") as f:
        json.dump(merged, f, indent=1)
    print(f"self-check: {sum(r['status'] == 'pass' for r in rows)} passed, {len(failed)} failed, "
          f"{sum(r['status'] == 'skip' for r in rows)} skipped")
    return 0 if merged["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
