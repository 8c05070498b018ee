"""`python -m featadapt.info`: versions, devices, which backends can run here
and what automatic dispatch picks on each device and why.

`python -m featadapt.info --check` runs the on-device self-check
(featadapt.check_backends) and exits non-zero when anything fails.
"""

import argparse
import os
import platform
import sys

import torch

from . import self_check
from .kernels import cpu as cpu_kernels
from .kernels import cuda as cuda_kernels
from .ops import dispatch_table
from .ops.dispatch import ENV_VAR, backends, requested_backend_name
from .version import __version__


def _module_version(name):
    try:
        module = __import__(name)
    except ImportError:
        return "not installed"
    return getattr(module, "__version__", "unknown")


def _devices():
    lines = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        lines.append("no CUDA device visible")
    return lines


def _extension():
    if cuda_kernels.IMPORT_ERROR is not None:
        return cuda_kernels.IMPORT_ERROR
    built = cuda_kernels.CUDA_ARCHS
    archs = ", ".join(f"{a // 10}.{a % 10}" for a in built)
    kinds = []
    if any(80 <= a < 90 for a in built):
        kinds.append("CUTLASS sm_80 kernels, PTX for later GPUs")
    if 90 in built:
        kinds.append("CUTLASS sm_90a kernels for 9.0")
    return f"built for compute capabilities {archs} ({'; '.join(kinds)})"


def _cpu_kernel():
    if not cpu_kernels.BUILT:
        return "not built (the torch backend uses torch ops)"
    try:
        return f"{cpu_kernels.capability()} loops ({cpu_kernels.CAPABILITY_ENV_VAR} caps the choice)"
    except ValueError as error:
        return str(error)


def _auto_lines():
    """What auto picks on each device class here, from the dispatch table."""
    try:
        table = dispatch_table.entries()
    except dispatch_table.DispatchTableError as error:
        return [f"  the dispatch table cannot be read: {error}"]
    source = dispatch_table.table_path()
    shipped = "shipped with featadapt" if source == dispatch_table.SHIPPED_TABLE else f"from {dispatch_table.TABLE_ENV}"
    lines = [f"  dispatch table: {len(table)} entries ({shipped})"]
    classes = ["cpu"] + sorted({dispatch_table.device_class(f"cuda:{i}") for i in range(torch.cuda.device_count())}
                               if torch.cuda.is_available() else [])
    for device in classes:
        here = [e for e in table if e.device == device]
        if not here:
            lines.append(f"  {device}: no measurement for {device}: auto picks torch for every op and dtype")
            continue
        for e in here:
            ranges = f"tokens {e.tokens or 'any'}" + ("" if e.rank is None else f", rank {e.rank}")
            lines.append(f"  {device}: {e.op} {e.dtype} ({ranges}): {e.describe()}; torch elsewhere")
    return lines


def report():
    """The report as text."""
    lines = [
        f"featadapt {__version__}",
        f"python    {platform.python_version()}",
        f"torch     {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton    {_module_version('triton')}",
        f"featadapt._C {_extension()}",
        f"CPU kernel   {_cpu_kernel()}",
        "devices:",
    ]
    lines += [f"  {d}" for d in _devices()]
    lines.append(f"backends ({ENV_VAR}={requested_backend_name()}; auto tries them in this order):")
    for backend in backends():
        why = backend.unavailable_reason()
        status = "usable" if why is None else f"unavailable: {why}"
        auto = "auto" if backend.auto_priority is not None else "by name only"
        lines.append(f"  {backend.name:<10} {status:<12} [{auto}] {backend.summary}")
    lines.append("what auto picks (fused backends only where a committed measurement shows them correct and faster):")
    lines += _auto_lines()
    return "\n".join(lines)


def _dtype(name):
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise argparse.ArgumentTypeError(f"--dtypes takes float32, float16 and bfloat16, got {name!r}") from None


def _shape(text):
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shapes takes M,K,N,r of positive integers, got {text!r}")
    return shape


def _parser():
    parser = argparse.ArgumentParser(prog="python -m featadapt.info", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="run the self-check: every usable backend against the float64 reference")
    parser.add_argument("--device", help="device to check (default: the current GPU, else the CPU)")
    parser.add_argument("--backends", help="comma-separated backend names to check (default: all usable)")
    parser.add_argument("--dtypes", help="comma-separated dtypes (default: float32,float16,bfloat16)")
    parser.add_argument("--ops", help="comma-separated ops, e.g. vefa,lora_indexed (default: all)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--production", dest="production", action="store_true", default=None,
                      help=f"also check the production shape {self_check.PRODUCTION_SHAPE} (default on a GPU)")
    size.add_argument("--odd-shapes-only", dest="production", action="store_false",
                      help="check the odd shapes only")
    parser.add_argument("--shapes", metavar="M,K,N,r[;...]",
                        help="check these shapes instead of the default odd ones (e.g. '2048,4096,4096,16')")
    parser.add_argument("--fixed-configs", action="store_true",
                        help="run the Triton kernels as auto-tuning would, not every kept configuration")
    parser.add_argument("--json", metavar="PATH", help="also write the self-check's rows as JSON to PATH")
    return parser


def _split(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        dtypes = [_dtype(d) for d in _split(args.dtypes)] if args.dtypes else None
        shapes = [_shape(s) for s in args.shapes.split(";") if s.strip()] if args.shapes else None
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    print(report())
    if not args.check:
        return 0
    print()
    result = self_check.check_backends(
        args.device, backends_to_check=_split(args.backends), dtypes=dtypes, ops=_split(args.ops),
        shapes=shapes, production=args.production, all_configs=not args.fixed_configs,
    )
    print(result.table())
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            handle.write(result.to_json())
    if not result.passed:
        print(f"self-check FAILED: {len(result.failures)} failing rows" if result.failures
              else "self-check ran nothing", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
