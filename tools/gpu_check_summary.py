#!/usr/bin/env python
"""The compact summary tools/gpu-check.sh prints last: per stage its exit
status, time and passed/failed/skipped (from its junit XML), then the headline
benchmark's forward+backward ratios to the floor and to the PEFT peer.

    python tools/gpu_check_summary.py RESULTS_DIR
"""

import json
import os
import sys
import xml.etree.ElementTree as ET

JUNIT = {"gpu-tests": "gpu-tests.xml", "headline": "headline.xml", "cuda-bench": "cuda-bench.xml"}
EXIT_MEANING = {0: "ok", 1: "failures", 5: "no tests ran", 124: "cut off by its cap", 137: "killed"}


def junit_counts(path):
    """(passed, failed, skipped) from a junit XML file; None when there is none."""
    if not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    tests = failed = skipped = 0
    for suite in suites:
        tests += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    return tests - failed - skipped, failed, skipped


def stage_lines(results):
    lines = ["stage       exit  seconds  passed failed skipped"]
    path = os.path.join(results, "stages.txt")
    for line in open(path).read().split("\n") if os.path.exists(path) else []:
        if not line.strip():
            continue
        name, rc, seconds = line.split()
        counts = junit_counts(os.path.join(results, JUNIT.get(name, "-")))
        counted = "%6d %6d %7d" % counts if counts else "     -      -       -"
        meaning = EXIT_MEANING.get(int(rc), "error")
        lines.append(f"{name:<11} {rc:>4} {seconds:>8}  {counted}   {meaning}")
    return lines


def headline_lines(results, name="bench-headline.json"):
    path = os.path.join(results, name)
    if not os.path.exists(path):
        return [f"{name}: no results (missing)"]
    data = json.load(open(path))
    device = data.get("environment", {}).get("device", "?")
    lines = [f"{name} forward+backward on {device}: time / floor, time / peer"]
    for row in data.get("layers", []):
        if row.get("mode") != "forward+backward" or row.get("kind") == "floor":
            continue
        shape = "x".join(map(str, row["shape"]))
        floor = row.get("ratio_to_floor")
        peer = row.get("ratio_to_peer")
        lines.append(f"  {shape} {row['dtype']:<9} r{row['rank']:<3} {row['layer']:<22} "
                     f"{floor if floor is None else round(floor, 3)!s:>7} "
                     f"{'' if peer is None else f'{peer:.3f} x ' + str(row.get('peer'))}")
    return lines


def self_check_lines(results):
    lines = []
    for name in ("self-check.json", "self-check-cuda.json"):
        path = os.path.join(results, name)
        if not os.path.exists(path):
            lines.append(f"{name}: missing")
            continue
        rows = json.load(open(path))["rows"]
        count = {s: sum(r["status"] == s for r in rows) for s in ("pass", "FAIL", "skip")}
        lines.append(f"{name}: {count['pass']} passed, {count['FAIL']} failed, {count['skip']} skipped")
        lines += [f"  FAIL {r['backend']} {r['op']} {r['dtype']} {r['shape']} {r['config']}: {r['detail']}"
                  for r in rows if r["status"] == "FAIL"][:20]
    return lines


def table_lines(results):
    path = os.path.join(results, "dispatch_table.json")
    if not os.path.exists(path):
        return ["dispatch table: not written (see dispatch-table.log)"]
    entries = json.load(open(path))["entries"]
    lines = [f"dispatch table: {len(entries)} entries (auto picks torch everywhere else)"]
    lines += [f"  {e['device']} {e['op']} {e['dtype']} tokens {e['tokens']}: {e['backend']} {e['ratio']}x torch"
              for e in entries]
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit(__doc__)
    results = argv[0]
    print("\n".join(["== featadapt gpu-check summary", *stage_lines(results), *self_check_lines(results),
                     *table_lines(results), *headline_lines(results),
                     *headline_lines(results, "bench-cuda.json")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
