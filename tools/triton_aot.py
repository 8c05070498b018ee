#!/usr/bin/env python
"""Compile every Triton kernel ahead of time for GPU targets, without a GPU.

    python tools/triton_aot.py check                 # CI: each kernel's representative config,
                                                     # every dtype/flag case, sm_90 and sm_80
    python tools/triton_aot.py sweep --report FILE   # every autotune config the pruning rule keeps

Each compile runs triton's whole pipeline to a cubin with the ptxas triton
ships: triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", arch, 32)). The signature comes from the kernel's
launch-argument builder — the function the launcher calls — through
triton's own argument specialization, so what compiles here is what a
launch would compile. A compile error makes the exit status 1.

Imports only triton: the kernels are loaded from featadapt/kernels/triton/jit
as a package of their own (never featadapt, which needs torch), so
`PYTHONPATH=DIR python tools/triton_aot.py ...` checks them under the triton
installed in DIR (e.g. the GPU machine's 3.6). Run it with TRITON_INTERPRET
unset: under the interpreter triton.jit makes no compilable functions.
"""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import pkgutil
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JIT_DIR = os.path.join(ROOT, "featadapt", "kernels", "triton", "jit")
JIT_PACKAGE = "featadapt_triton_jit"  # the name jit/ is loaded under, apart from featadapt
ARCHS = (90, 80)


def _load(name, path, package_dir=None):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[package_dir] if package_dir else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_jit_package():
    """featadapt/kernels/triton/jit as the package JIT_PACKAGE, and its kernel modules."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("tools/triton_aot.py: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)")
    package = sys.modules.get(JIT_PACKAGE) or _load(JIT_PACKAGE, os.path.join(JIT_DIR, "__init__.py"), JIT_DIR)
    modules = [importlib.import_module(f"{JIT_PACKAGE}.{m.name}") for m in pkgutil.iter_modules([JIT_DIR])]
    return package, modules


def kernel_specs():
    """Every KernelSpec declared by a module in jit/ (its AOT_KERNELS)."""
    _, modules = load_jit_package()
    return [spec for module in modules for spec in getattr(module, "AOT_KERNELS", [])]


def write_atomically(path, text):
    fileio = _load("featadapt_fileio", os.path.join(ROOT, "featadapt", "fileio.py"))

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    fileio.write_atomically(path, write)


# -- from launch arguments to a compile ---------------------------------------------


def specialize(kernel, args):
    """(signature, constexprs, attrs) for ASTSource, as triton's launcher would
    derive them from these argument values (tensors as TensorSpecs)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.backends.nvidia.compiler import CUDABackend

    missing = [p.name for p in kernel.params if p.name not in args and not p.is_constexpr]
    unknown = sorted(set(args) - set(kernel.arg_names))
    if missing or unknown:
        raise ValueError(f"{kernel.__name__}: launch arguments missing {missing}, unknown {unknown}")
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        if param.is_constexpr:
            if param.name in args:
                signature[param.name] = "constexpr"
                constexprs[param.name] = args[param.name]
            continue  # a configuration parameter, set per config
        kind, attr = native_specialize_impl(BaseBackend, args[param.name], False, True, True)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = attr
        elif attr:
            attrs[(index,)] = CUDABackend.parse_attr(attr)
    return signature, constexprs, attrs


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_WARNING = re.compile(r"ptxas (?:info|warning)\s*:\s*\((C\d+)\)")  # e.g. (C7515) wgmma serialised


def parse_ptxas_log(log):
    """Registers, stack frame, spill stores/loads and warning codes from `ptxas -v`."""
    used = _PTXAS_USED.findall(log)
    spills = _PTXAS_SPILLS.findall(log)
    stack, stores, loads = (int(v) for v in spills[-1]) if spills else (0, 0, 0)
    return {
        "registers": int(used[-1]) if used else None,
        "stack_bytes": stack, "spill_store_bytes": stores, "spill_load_bytes": loads,
        "ptxas_warnings": sorted(set(_PTXAS_WARNING.findall(log))),
    }


def compile_one(job):
    """Compile one (kernel, arguments, config, arch); returns its resource record."""
    spec_name, case_index, shape_index, config_index, arch, mode = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec, args, config = _job_parts(spec_name, case_index, shape_index, config_index, mode)
    signature, constexprs, attrs = specialize(spec.kernel, args)
    for name, value in config.kwargs.items():
        signature[name] = "constexpr"
        constexprs[name] = value
    record = _describe(spec, args, config, arch)
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(spec.kernel, signature, constexprs, attrs),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": config.num_warps, "num_stages": config.num_stages},
            )
    except Exception as error:  # a compile error is the finding: report it, go on
        record["error"] = f"{type(error).__name__}: {str(error).strip()[-2000:]}"
        return record
    record["seconds"] = round(time.perf_counter() - start, 2)
    record["shared_bytes"] = compiled.metadata.shared
    record.update(parse_ptxas_log(log.getvalue()))
    return record


_CASES = {}


def _cases(spec, shape):
    key = (spec.name, shape)
    if key not in _CASES:
        # cases that give the same compile are compiled once
        unique = {}
        for case in spec.cases(shape):
            args = spec.launch_args(**case)
            signature, constexprs, attrs = specialize(spec.kernel, args)
            unique.setdefault(repr((signature, sorted(constexprs.items()), sorted(attrs.items()))), args)
        _CASES[key] = list(unique.values())
    return _CASES[key]


def heaviest_cases(spec, cases):
    """The sweep's cases: for each operand dtype, precision and launch-fixed
    block size, the case with the most optional tensors present and flags on
    (the most code, registers and shared memory)."""
    groups = {}
    for args in cases:
        key = (operand_dtype(spec, args), args.get("INPUT_PRECISION"),
               tuple((n, args.get(n)) for n in ("BLOCK_R", "BLOCK_N", "BLOCK_M", "HAS_DROPOUT")))
        weight = sum(v is not None for v in args.values()) + sum(v is True for v in args.values())
        if key not in groups or weight > groups[key][0]:
            groups[key] = (weight, args)
    return [args for _, args in groups.values()]


def _shapes(mode):
    specs = sys.modules[f"{JIT_PACKAGE}.specs"]
    return (specs.REPRESENTATIVE_SHAPE,) if mode == "check" else specs.SWEEP_SHAPES


def _job_parts(spec_name, case_index, shape_index, config_index, mode):
    spec = next(s for s in kernel_specs() if s.name == spec_name)
    args = _mode_cases(spec, mode, shape_index)[case_index]
    return spec, args, spec.configs()[config_index]


def _mode_cases(spec, mode, shape_index):
    cases = _cases(spec, _shapes(mode)[shape_index])
    return cases if mode == "check" else heaviest_cases(spec, cases)


def operand_dtype(spec, args):
    specs = sys.modules[f"{JIT_PACKAGE}.specs"]
    return specs.SHORT_NAMES[args[spec.operand_dtype + "_ptr"].dtype.name]


def _describe(spec, args, config, arch):
    configs = sys.modules[f"{JIT_PACKAGE}.configs"]
    meta = {**args, **config.kwargs}
    dtype = operand_dtype(spec, args)
    element_bytes = configs.ELEMENT_BYTES[dtype]
    return {
        "kernel": spec.name, "arch": f"sm_{arch}", "dtype": dtype,
        "case": case_label(spec, args), "config": configs.config_label(config),
        "shared_estimate_bytes": configs.shared_memory_estimate(spec.name, meta, config.num_stages, element_bytes),
        "pruned": configs.prune_reasons(spec.name, meta, config.num_warps, config.num_stages, dtype, arch),
    }


def case_label(spec, args):
    """The case's dtypes and flags, e.g. 'x=fp16 scale=fp32 shift=- HAS_BIAS=1 ieee'."""
    specs = sys.modules[f"{JIT_PACKAGE}.specs"]
    parts = []
    for param in spec.kernel.params:
        value = args.get(param.name)
        if param.name.endswith("_ptr"):
            name = param.name[:-4]
            parts.append(f"{name}={specs.SHORT_NAMES[value.dtype.name] if value is not None else '-'}")
        elif param.is_constexpr and param.name in args and param.name != "INPUT_PRECISION":
            parts.append(f"{param.name}={int(value) if isinstance(value, bool) else value}")
    parts.append(args.get("INPUT_PRECISION", "no-dot"))  # kernels without tl.dot have none
    return " ".join(parts)


def plan(mode, archs, kernels=None):
    """The jobs: (spec, case, shape, config, arch) indices. check: each case's
    representative config; sweep: each heaviest case (heaviest_cases) in every
    config the pruning rule keeps (the others are listed in the report without
    compiling)."""
    configs_module = sys.modules[f"{JIT_PACKAGE}.configs"]
    jobs, skipped, seen = [], [], set()
    for spec in kernel_specs():
        if kernels and spec.name not in kernels:
            continue
        configs = spec.configs()
        labels = [configs_module.config_label(c) for c in configs]
        for shape_index, shape in enumerate(_shapes(mode)):
            for case_index, args in enumerate(_mode_cases(spec, mode, shape_index)):
                identity = repr(specialize(spec.kernel, args))
                if (spec.name, identity) in seen:
                    continue  # a kernel without a rank block compiles the same at every rank
                seen.add((spec.name, identity))
                dtype = operand_dtype(spec, args)
                for arch in archs:
                    if mode == "check":
                        chosen = spec.representative_config(args, dtype, arch)
                        jobs.append((spec.name, case_index, shape_index, labels.index(
                            configs_module.config_label(chosen)), arch, mode))
                        continue
                    for config_index, config in enumerate(configs):
                        record = _describe(spec, args, config, arch)
                        if record["pruned"]:
                            skipped.append(record)
                        else:
                            jobs.append((spec.name, case_index, shape_index, config_index, arch, mode))
    return jobs, skipped


def _priority(job):
    """Sweep order: sm_90 before sm_80 (the GPU machine is an H200), half
    precision before float32, so a sweep cut short has measured what matters first."""
    spec_name, case_index, shape_index, _, arch, mode = job
    spec = next(s for s in kernel_specs() if s.name == spec_name)
    dtype = operand_dtype(spec, _mode_cases(spec, mode, shape_index)[case_index])
    return (-arch, {"bf16": 0, "fp16": 1, "fp32": 2}[dtype])


def run(mode, archs, jobs_count, kernels=None, progress=None, checkpoint=None):
    """Compile the plan's jobs; checkpoint(records, skipped, planned, seconds) is
    called every few compiles (a report written as the run goes)."""
    jobs, skipped = plan(mode, archs, kernels)
    jobs.sort(key=_priority)
    records = []
    start = time.perf_counter()

    def done(record):
        records.append(record)
        if progress:
            progress(record, len(records), len(jobs))
        if checkpoint and len(records) % 10 == 0:
            checkpoint(records, skipped, len(jobs), time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as cache:
        # a fresh cache: every compile runs ptxas (a cached one prints no log)
        os.environ["TRITON_CACHE_DIR"] = cache
        if jobs_count > 1:
            with ProcessPoolExecutor(jobs_count) as pool:
                for record in pool.map(compile_one, jobs, chunksize=1):
                    done(record)
        else:
            for job in jobs:
                done(compile_one(job))
    return records, skipped, len(jobs), time.perf_counter() - start


def summary(records, skipped):
    """Per kernel and arch: compiles, errors, the largest registers, spills and shared memory."""
    rows = {}

    def row_of(record):
        return rows.setdefault((record["kernel"], record["arch"]), {
            "compiles": 0, "errors": 0, "registers": 0, "spill_store_bytes": 0, "shared_bytes": 0,
            "warnings": set(), "pruned": 0})

    for r in records:
        row = row_of(r)
        row["compiles"] += 1
        if "error" in r:
            row["errors"] += 1
            continue
        for key in ("registers", "spill_store_bytes", "shared_bytes"):
            row[key] = max(row[key], r[key] or 0)
        row["warnings"] |= set(r["ptxas_warnings"])
    for r in skipped:
        row_of(r)["pruned"] += 1
    lines = ["| kernel | arch | compiles | errors | max registers | max spill stores (B) | max shared (B) "
             "| ptxas warnings | pruned, not compiled |", "|---|---|---|---|---|---|---|---|---|"]
    for (kernel, arch), row in sorted(rows.items()):
        lines.append(f"| {kernel} | {arch} | {row['compiles']} | {row['errors']} | {row['registers']} "
                     f"| {row['spill_store_bytes']} | {row['shared_bytes']} "
                     f"| {' '.join(sorted(row['warnings'])) or '-'} | {row['pruned']} |")
    return "\n".join(lines)


def rule_disagreements(records):
    """Kept configurations whose measured shared memory exceeds the target's limit
    (the estimate was too low), or that spill although the rule kept them."""
    configs = sys.modules[f"{JIT_PACKAGE}.configs"]
    found = []
    for r in records:
        if "error" in r or r["pruned"]:
            continue
        limit = configs.SHARED_MEMORY_BYTES[int(r["arch"][3:])]
        if r["shared_bytes"] > limit:
            found.append(f"{r['kernel']} {r['arch']} {r['dtype']} {r['config']}: {r['shared_bytes']} B shared > {limit}")
        elif r["spill_store_bytes"] > 0:
            found.append(f"{r['kernel']} {r['arch']} {r['case']} {r['config']}: spills {r['spill_store_bytes']} B")
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("check", "sweep", "list"))
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (default: 90 and 80)")
    parser.add_argument("--kernel", action="append", help="only these kernels (by spec name)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compiles")
    parser.add_argument("--report", help="write the records as JSON here")
    parser.add_argument("--verbose", action="store_true", help="print every compile")
    options = parser.parse_args(argv)
    import triton

    load_jit_package()
    archs = tuple(options.arch or ARCHS)
    if options.mode == "list":
        jobs, skipped = plan("check", archs, options.kernel)
        print(f"{len(jobs)} representative compiles")
        for spec in kernel_specs():
            print(spec.name, len(_cases(spec, _shapes('check')[0])), "cases")
        return 0

    def progress(record, done, total):
        if options.verbose or "error" in record:
            status = record.get("error") or f"{record['seconds']}s regs={record['registers']} " \
                                             f"spills={record['spill_store_bytes']} smem={record['shared_bytes']}"
            print(f"[{done}/{total}] {record['kernel']} {record['arch']} {record['case']} {record['config']}: {status}",
                  flush=True)

    def write_report(records, skipped, planned, seconds):
        report = {
            "triton": triton.__version__, "mode": options.mode, "archs": [f"sm_{a}" for a in archs],
            "date": time.strftime("%Y-%m-%d"), "seconds": round(seconds), "processes": options.jobs,
            "planned_compiles": planned, "complete": len(records) == planned,
            "summary": summary(records, skipped).splitlines(),
            "rule_disagreements": rule_disagreements(records),
            "compiled": records, "pruned_not_compiled": skipped,
        }
        write_atomically(options.report, json.dumps(report, indent=1) + "\n")

    checkpoint = write_report if options.report else None
    records, skipped, planned, seconds = run(options.mode, archs, options.jobs, options.kernel, progress, checkpoint)
    errors = [r for r in records if "error" in r]
    print(summary(records, skipped))
    print(f"\ntriton {triton.__version__}: {len(records)} compiles ({len(errors)} failed) in {seconds:.0f} s "
          f"with {options.jobs} processes; {len(skipped)} configurations pruned by the rule, not compiled")
    for line in rule_disagreements(records):
        print("rule and measurement disagree:", line)
    if options.report:
        write_report(records, skipped, planned, seconds)
        print("report written to", options.report)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
