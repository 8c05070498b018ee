"""Backend registry and selection.

A backend declares what it is, whether it can run on this machine at all
(`unavailable_reason`) and why it cannot run a given call
(`not_supported_reasons`); the kernel backends register themselves here.

Selection: the `backend=` argument, else the FEATADAPT_BACKEND environment
variable, else "auto". A backend asked for by name that cannot run the call
raises BackendUnavailableError saying why.

Auto runs a fused backend (one that `needs_measurement`: triton, cuda) only
where the dispatch table (dispatch_table.py) lists the case, the backend can
run the call, and its kernels have not failed to compile or launch for that
case in this process; there it runs the backend's `auto_ops`, whose kernels
fall back to torch ops on such a failure (kernel_fallback.py). Every other
case runs on the highest-priority backend that needs no measurement: `torch`.
"""

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from . import dispatch_table, kernel_fallback, reference, torch_backend, torch_indexed

ENV_VAR = "FEATADAPT_BACKEND"
AUTO = "auto"
OPS = ("vefa", "lorfa", "lora")
# Many adapters in one batch (adapter_index=): a backend without these ops
# reports so, and auto passes it over.
INDEXED_OPS = ("vefa_indexed", "lorfa_indexed", "lora_indexed")


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run this call (or this machine)."""


def _always_available():
    return None


def _supports_everything(op, tensors):
    return []


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    # op name -> implementation taking x flattened to (M, K); see reference.py
    ops: Dict[str, Callable]
    # higher runs first under "auto"; None: only when asked for by name
    auto_priority: Optional[int] = None
    # () -> why this backend cannot run on this machine, or None
    unavailable_reason: Callable[[], Optional[str]] = field(default=_always_available)
    # (op, tensors of the call) -> reasons it cannot run this call; [] when it can
    not_supported_reasons: Callable[[str, tuple], List[str]] = field(default=_supports_everything)
    # (op, tensors of a call it can run) -> reasons "auto" should pass it over
    # (it still runs when asked for by name); [] when auto may pick it
    auto_skip_reasons: Callable[[str, tuple], List[str]] = field(default=_supports_everything)
    # True for fused backends: auto picks them only where the dispatch table says so
    needs_measurement: bool = False
    # the ops run when auto picked it (kernels that fall back to torch ops on a
    # compile or launch failure); None: the same as `ops`
    auto_ops: Optional[Dict[str, Callable]] = None

    def reasons_against(self, op, tensors, auto=False):
        why = self.unavailable_reason()
        if why is not None:
            return [why]
        if op not in self.ops:
            return [f"it does not implement {op}"]
        reasons = list(self.not_supported_reasons(op, tensors))
        if auto and not reasons:
            reasons = list(self.auto_skip_reasons(op, tensors))
        return reasons


_BACKENDS: Dict[str, Backend] = {}


def register_backend(backend):
    if backend.name == AUTO or not backend.name.islower():
        raise ValueError(f"backend name must be lower-case and not {AUTO!r}, got {backend.name!r}")
    _BACKENDS[backend.name] = backend


def backends():
    """Every registered backend, in auto-selection order, then the by-name-only ones."""
    return sorted(_BACKENDS.values(), key=lambda b: (b.auto_priority is None, -(b.auto_priority or 0), b.name))


def get_backend(name):
    try:
        return _BACKENDS[name]
    except KeyError:
        known = ", ".join([AUTO] + sorted(_BACKENDS))
        raise ValueError(f"unknown backend {name!r}; expected one of: {known}") from None


def requested_backend_name(backend=None):
    """The backend name in force for a call: the argument, else the environment, else auto."""
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
        return backend.strip().lower()
    value = os.environ.get(ENV_VAR, "").strip().lower() or AUTO
    if value != AUTO and value not in _BACKENDS:
        known = ", ".join([AUTO] + sorted(_BACKENDS))
        raise ValueError(f"environment variable {ENV_VAR}={os.environ[ENV_VAR]!r} names no backend; "
                         f"expected one of: {known}")
    return value


@dataclass(frozen=True)
class Choice:
    """The backend a call runs on, the ops it runs, and why it was picked."""

    backend: Backend
    ops: Dict[str, Callable]
    explain: Callable[[], str]  # the reason, written only when asked for (not on every op call)

    @property
    def why(self):
        return self.explain()


def _auto_choice(op, tensors):
    entry, case = dispatch_table.lookup(op, tensors)
    passed_over = ""
    if entry is not None:
        measured = _BACKENDS.get(entry.backend)
        if measured is None or measured.auto_priority is None:
            reasons = [f"no backend {entry.backend!r} that auto may pick is registered"]
        else:
            reasons = measured.reasons_against(op, tensors, auto=True)
            failed = kernel_fallback.failure_reason(measured.name, *case[:3])
            reasons += [failed] if failed else []
        if not reasons:
            return Choice(measured, measured.auto_ops or measured.ops,
                          lambda: f"the dispatch table: {entry.describe()}")
        passed_over = f"; the table's {entry.backend} passed over: {'; '.join(reasons)}"
    rejected = []
    for candidate in backends():
        if candidate.auto_priority is None or candidate.needs_measurement:
            continue
        reasons = candidate.reasons_against(op, tensors, auto=True)
        if not reasons:
            def explain(name=candidate.name):
                measured_case = case or dispatch_table.case_of(op, tensors)
                why = "no measurement" if entry is None else "measured"
                return f"{why} for {dispatch_table.describe_case(measured_case)}{passed_over}: {name}"
            return Choice(candidate, candidate.ops, explain)
        rejected.append(f"{candidate.name}: {'; '.join(reasons)}")
    raise BackendUnavailableError(f"no backend can run {op}: " + " | ".join(rejected))


def choose(op, tensors, backend=None):
    """The Choice for a call: `backend` by name, else FEATADAPT_BACKEND, else auto."""
    name = requested_backend_name(backend)
    if name == AUTO:
        return _auto_choice(op, tensors)
    chosen = get_backend(name)
    reasons = chosen.reasons_against(op, tensors)
    source = "backend=" if backend is not None else ENV_VAR
    if reasons:
        raise BackendUnavailableError(
            f"backend {name!r} (from {source}) cannot run {op}: {'; '.join(reasons)}"
        )
    return Choice(chosen, chosen.ops, lambda: f"asked for by name ({source})")


def select_backend(op, tensors, backend=None):
    """The Backend a call runs on (see choose)."""
    return choose(op, tensors, backend).backend


register_backend(
    Backend(
        name="reference",
        summary="plain differentiable torch expressions; the test oracle",
        ops={
            "vefa": reference.vefa_linear,
            "lorfa": reference.lorfa_linear,
            "lora": reference.lora_linear,
            "vefa_indexed": reference.vefa_linear_indexed,
            "lorfa_indexed": reference.lorfa_linear_indexed,
            "lora_indexed": reference.lora_linear_indexed,
        },
    )
)
register_backend(
    Backend(
        name="torch",
        summary="memory-lean autograd Functions on torch ops; any device",
        ops={
            "vefa": torch_backend.vefa_linear,
            "lorfa": torch_backend.lorfa_linear,
            "lora": torch_backend.lora_linear,
            "vefa_indexed": torch_indexed.vefa_linear_indexed,
            "lorfa_indexed": torch_indexed.lorfa_linear_indexed,
            "lora_indexed": torch_indexed.lora_linear_indexed,
        },
        auto_priority=0,
    )
)

# Last: each builds a Backend, and neither fails when its kernels are missing.
from . import cuda_backend, triton_backend  # noqa: E402

register_backend(triton_backend.BACKEND)
register_backend(cuda_backend.BACKEND)

# Read the table now, outside any torch.compile trace (which cannot open a
# file); a malformed table named by the environment raises at the first call.
try:
    dispatch_table.entries()
except dispatch_table.DispatchTableError:
    pass
