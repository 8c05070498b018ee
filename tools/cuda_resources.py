#!/usr/bin/env python
"""The CUDA extension's per-kernel resources: registers, stack frame, shared
and local memory (local memory is where ptxas spills), per kernel
instantiation and architecture — the numbers `nvcc -Xptxas -v` prints
(FEATADAPT_PTXAS_VERBOSE=1 adds that flag to the build), read back from the
built featadapt._C with cuobjdump, so they are exactly what was linked.

    python tools/cuda_resources.py write     # benchmarks/results/cuda-resources.json
    python tools/cuda_resources.py check     # exit 1 if a kernel that did not spill now does

Needs no GPU and no torch: cuobjdump comes with the CUDA toolkit (or with
triton's own NVIDIA tools).
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(ROOT, "benchmarks", "results", "cuda-resources.json")
_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_ARCH = re.compile(r"^arch = (sm_\d+)")


def cuobjdump():
    """cuobjdump from CUDA_HOME, PATH or triton's NVIDIA tools; None if there is none."""
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
                  shutil.which("cuobjdump")]
    try:
        import triton  # noqa: F401  (only for the cuobjdump it ships)
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def extension_path():
    found = sorted(glob.glob(os.path.join(ROOT, "featadapt", "_C*.so")))
    return found[0] if found else None


def demangle(names):
    filt = shutil.which("c++filt")
    if not filt or not names:
        return dict(zip(names, names))
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def parse_resource_usage(text):
    """[{arch, kernel, registers, stack_bytes, shared_bytes, local_bytes}] from cuobjdump --dump-resource-usage."""
    records, arch, function = [], None, None
    for line in text.splitlines():
        if match := _ARCH.match(line.strip()):
            arch = match.group(1)
        elif match := _FUNCTION.match(line):
            function = match.group(1)
        elif (match := _USAGE.search(line)) and function:
            reg, stack, shared, local = (int(v) for v in match.groups())
            records.append({"arch": arch, "mangled": function, "registers": reg, "stack_bytes": stack,
                            "shared_bytes": shared, "local_bytes": local})
            function = None
    names = demangle(sorted({r["mangled"] for r in records}))
    for r in records:
        # the anonymous-namespace hash differs between builds: keep the readable, stable part
        r["kernel"] = re.sub(r"\(anonymous namespace\)::", "", names[r.pop("mangled")])
    return sorted(records, key=lambda r: (r["arch"], r["kernel"]))


def measure(path):
    tool = cuobjdump()
    if tool is None:
        raise SystemExit("cuda_resources: no cuobjdump (CUDA_HOME/bin, PATH or triton's)")
    out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    return parse_resource_usage(out)


def spills(record):
    return record["local_bytes"] > 0 or record["stack_bytes"] > 0


def regressions(committed, current):
    """Kernels (per arch) that used no local memory or stack in the committed
    report and do now."""
    clean = {(r["arch"], r["kernel"]) for r in committed if not spills(r)}
    return [r for r in current if (r["arch"], r["kernel"]) in clean and spills(r)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("write", "check", "show"))
    parser.add_argument("--extension", default=None, help="the built featadapt._C (default: the in-tree one)")
    parser.add_argument("--report", default=REPORT)
    options = parser.parse_args(argv)
    path = options.extension or extension_path()
    if path is None:
        raise SystemExit("cuda_resources: featadapt._C is not built (make setup)")
    current = measure(path)
    if options.mode == "show":
        for r in current:
            print(f"{r['arch']} REG:{r['registers']} STACK:{r['stack_bytes']} SHARED:{r['shared_bytes']} "
                  f"LOCAL:{r['local_bytes']}  {r['kernel']}")
        return 0
    if options.mode == "write":
        sys.path.insert(0, os.path.join(ROOT, "featadapt"))
        from fileio import write_atomically

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump({"source": "cuobjdump --dump-resource-usage featadapt/_C", "kernels": current}, f, indent=1)
                f.write("\n")

        write_atomically(options.report, write)
        print(f"{len(current)} kernel instantiations written to {options.report}")
        return 0
    with open(options.report) as f:
        committed = json.load(f)["kernels"]
    worse = regressions(committed, current)
    for r in worse:
        print(f"{r['arch']} {r['kernel']}: now LOCAL {r['local_bytes']} B, STACK {r['stack_bytes']} B (had none)")
    print(f"{len(current)} kernel instantiations, {len(worse)} newly spilling")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
