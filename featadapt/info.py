"""`python -m featadapt.info`: versions, devices, and which backends can run here."""

import platform

import torch

from .kernels import cpu as cpu_kernels
from .kernels import cuda as cuda_kernels
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
    archs = ", ".join(f"{a // 10}.{a % 10}" for a in cuda_kernels.CUDA_ARCHS)
    return f"built for compute capabilities {archs} (PTX for the newest)"


def _cpu_kernel():
    if not cpu_kernels.BUILT:
        return "not built (the torch backend uses torch ops)"
    try:
        return f"{cpu_kernels.capability()} loops ({cpu_kernels.CAPABILITY_ENV_VAR} caps the choice)"
    except ValueError as error:
        return str(error)


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
    return "\n".join(lines)


def main():
    print(report())


if __name__ == "__main__":
    main()
