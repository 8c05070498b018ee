#!/usr/bin/env python
"""The CUDA extension's per-kernel resources: registers, stack frame, shared
and local memory (local memory is where ptxas spills), per kernel
instantiation and architecture — the numbers `nvcc -Xptxas -v` prints
(FEATADAPT_PTXAS_VERBOSE=1 adds that flag to the build), read back from the
built featadapt._C with cuobjdump, so they are exactly what was linked —
and the warnings ptxas printed while building it (e.g. C7510, wgmma
serialised), read from a verbose build's log.

    python tools/cuda_resources.py write [--ptxas-log LOG]   # benchmarks/results/cuda-resources.json
    python tools/cuda_resources.py check     # exit 1 if a kernel that did not spill now does

(`make cuda-resources` builds verbosely for sm_80 and sm_90a and writes both.)
CUTLASS's kernels are named by a short label (schedule, tile, dtype, the
weight's layout, the epilogue) instead of their multi-kilobyte names.

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
    """{mangled: readable}: c++filt, then llvm-cxxfilt for what c++filt gives up
    on (CUTLASS 3's kernel names are too deep for it); mangled when neither can."""
    found = dict(zip(names, names))
    for tool in ("c++filt", "llvm-cxxfilt"):
        filt = shutil.which(tool)
        left = [n for n in names if found[n] == n and n.startswith("_Z")]
        if not filt or not left:
            continue
        out = subprocess.run([filt], input="\n".join(left), capture_output=True, text=True, check=True).stdout
        found.update(zip(left, out.splitlines()))
    return found


_TUPLE = r"cute::tuple<((?:[^<>]|<[^<>]*>)*)>"  # a stride: a tuple of ints and cute::C<n>
_SM90 = re.compile(r"KernelTmaWarpSpecialized(\w*)>, cute::tuple<cute::C<(\d+)>, cute::C<(\d+)>, cute::C<(\d+)> >, "
                   rf"cutlass::(\w+), {_TUPLE}, cutlass::\w+, {_TUPLE}")
_SM80 = re.compile(r"DefaultGemmUniversal<cutlass::(\w+), cutlass::layout::RowMajor, [^,]+, \d+, cutlass::\w+, "
                   r"cutlass::layout::(\w+), [^,]+, \d+, (?:cutlass::)?(\w+),")


def label(name):
    """A short, stable name for a CUTLASS kernel instantiation; other names as they are."""
    if name.startswith("void cutlass::device_kernel<") and (match := _SM90.search(name)):
        schedule, tm, tn, tk, dtype, _, b_stride = match.groups()
        weight = "n-major" if b_stride.startswith("cute::C<1>") else "k-major"
        epilogue = ("VeFA backward tree: g*s, row-tile sums of g and g*x" if "featadapt::sm90::FirstOf" in name
                    else "LinCombPerColBias" if "LinCombPerColBias" in name else "other epilogue")
        return f"cutlass sm90 GEMM {schedule or 'Basic'} {tm}x{tn}x{tk} {dtype}, weight {weight}: {epilogue}"
    if name.startswith("void featadapt::sm80::entry<") and (match := _SM80.search(name)):
        dtype, layout_b, out = match.groups()
        weight = "k-major" if layout_b == "ColumnMajor" else "n-major"
        return f"featadapt::sm80::entry<cutlass sm80 GEMM {dtype}, weight {weight}, out {out}>"
    return name


# "ptxas warning : ..." and the numbered performance notes ptxas prints as
# info, e.g. "ptxas info : (C7510) Potential Performance Loss: wgmma.mma_async
# instructions are serialized ..."
_WARNING = re.compile(r"ptxas (?:warning\s*:|info\s*:\s*\(C\d+\)).*", re.IGNORECASE)


def ptxas_warnings(log_text):
    """The distinct ptxas warnings and performance notes in a build log (kernel names shortened)."""
    seen = []
    for line in log_text.splitlines():
        if match := _WARNING.search(line):
            text = re.sub(r"'_Z\w+'", "'<kernel>'", match.group(0).strip())
            if text not in seen:
                seen.append(text)
    return seen


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
        r["kernel"] = label(re.sub(r"\(anonymous namespace\)::", "", names[r.pop("mangled")]))
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
    parser.add_argument("--ptxas-log", default=None,
                        help="a verbose build's log (FEATADAPT_PTXAS_VERBOSE=1): its ptxas warnings go in the report")
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

        report = {"source": "cuobjdump --dump-resource-usage featadapt/_C", "kernels": current}
        if options.ptxas_log:
            with open(options.ptxas_log) as f:
                report["ptxas_warnings"] = ptxas_warnings(f.read())
            report["ptxas_warnings_source"] = "a verbose build's log (make cuda-resources)"

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(report, f, indent=1)
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
