"""The on-device self-check: `featadapt.check_backends()`, and
`python -m featadapt.info --check`.

Every usable backend × op (plain and indexed) × dtype runs forward and
backward through the public functional API and is compared with the
`reference` backend evaluated in float64 on the same device (DESIGN.md §4):
on odd shapes, and on CUDA at one production-size shape too. On a GPU the
Triton kernels run every configuration the pruning rule keeps for each case,
one after another (not only the one autotuning would pick), so a
configuration that is wrong on this GPU cannot hide. A user runs it once on
a new GPU; the GPU check (tools/gpu-check.sh) runs it first.
"""

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch

from .ops import functional
from .ops.dispatch import INDEXED_OPS, OPS, backends, get_backend

# Relative error ‖out − ref‖ / ‖ref‖ allowed per dtype (DESIGN.md §4; float32 with TF32 off).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}
# (M, K, N, r): no dimension a multiple of 16, a single row, rank 1 and 7;
# the last one with K and N multiples of 8 (what the cuda backend's CUTLASS
# kernels need) but off their tiles: M past 8 tiles of 128, K off 64, N off 256.
ODD_SHAPES = ((1, 17, 33, 1), (97, 257, 17, 7), (130, 48, 257, 16), (1025, 264, 136, 7))
PRODUCTION_SHAPE = (2048, 4096, 4096, 16)
N_ADAPTERS = 3  # the indexed ops' stacked adapters
DROPOUT_P = 0.1  # one low-rank variant runs with dropout (the same seed for the backend and the reference)


@dataclass
class CheckRow:
    backend: str
    op: str
    dtype: str
    shape: str  # "M×K×N r"
    config: str  # "-", or "kept i of n" for a pinned Triton configuration
    status: str  # "pass", "FAIL", or "skip" (with the reason in detail)
    forward_error: Optional[float] = None
    backward_error: Optional[float] = None
    seconds: Optional[float] = None  # one forward+backward after the checked one
    detail: str = ""


@dataclass
class CheckReport:
    device: str
    rows: List[CheckRow]

    @property
    def failures(self):
        return [r for r in self.rows if r.status == "FAIL"]

    @property
    def passed(self):
        """True when nothing failed and something ran."""
        return not self.failures and any(r.status == "pass" for r in self.rows)

    def table(self):
        lines = [f"featadapt self-check on {self.device}",
                 f"{'backend':<10} {'op':<14} {'dtype':<9} {'shape':<18} {'config':<12} {'status':<6} "
                 f"{'fwd err':>9} {'bwd err':>9} {'ms':>9}  detail"]
        for r in self.rows:
            ms = "" if r.seconds is None else f"{r.seconds * 1e3:.3f}"
            lines.append(f"{r.backend:<10} {r.op:<14} {r.dtype:<9} {r.shape:<18} {r.config:<12} {r.status:<6} "
                         f"{_fmt(r.forward_error):>9} {_fmt(r.backward_error):>9} {ms:>9}  {r.detail}")
        counts = {s: sum(r.status == s for r in self.rows) for s in ("pass", "FAIL", "skip")}
        lines.append(f"{counts['pass']} passed, {counts['FAIL']} failed, {counts['skip']} skipped")
        return "\n".join(lines)

    def to_json(self):
        return json.dumps({"device": self.device, "passed": self.passed,
                           "rows": [asdict(r) for r in self.rows]}, indent=1)


def _fmt(error):
    return "" if error is None else f"{error:.2e}"


def relative_error(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64; inf when out has a NaN or an Inf (they never pass)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    scale = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / scale if scale > 0 else diff


# -- the cases --------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    op: str  # one of OPS or INDEXED_OPS
    m: int
    k: int
    n: int
    r: int
    dropout_p: float = 0.0

    @property
    def method(self):
        return self.op.removesuffix("_indexed")

    @property
    def label(self):
        rank = "" if self.method == "vefa" else f" r{self.r}"
        drop = f" p{self.dropout_p}" if self.dropout_p else ""
        return f"{self.m}x{self.k}x{self.n}{rank}{drop}"


def cases(shapes):
    """The ops at each shape: VeFA with a shift, LoRA and LoRFA (LoRA also with
    dropout), and each of them with several adapters in one batch."""
    found = []
    for m, k, n, r in shapes:
        for op in OPS + INDEXED_OPS:
            found.append(Case(op, m, k, n, r))
            if op == "lora":
                found.append(Case(op, m, k, n, r, DROPOUT_P))
    return found


def _inputs(case, dtype, device, generator):
    """Fresh random inputs (never zeros) for one case, as a dict of leaves."""
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(device, dtype)

    m, k, n, r = case.m, case.k, case.n, case.r
    stacked = (N_ADAPTERS,) if case.op in INDEXED_OPS else ()
    t = {"x": rand(m, k), "weight": rand(n, k, scale=k ** -0.5), "bias": rand(n)}
    if case.method == "vefa":
        t["scale"] = 1 + rand(*stacked, k, scale=0.1)
        t["shift"] = rand(*stacked, k, scale=0.1)
    else:
        t["lora_A"] = rand(*stacked, r, k, scale=k ** -0.5)
        t["lora_B"] = rand(*stacked, k if case.method == "lorfa" else n, r, scale=r ** -0.5)
    if case.op in INDEXED_OPS:  # every adapter and the base (-1) in one batch
        t["ids"] = torch.randint(-1, N_ADAPTERS, (m,), generator=generator).to(device)
    t["dy"] = rand(m, n)
    return t


def _call(case, t, backend):
    ids = t.get("ids")
    if case.method == "vefa":
        return functional.vefa_linear(t["x"], t["weight"], t["scale"], t["bias"], t["shift"],
                                      adapter_index=ids, backend=backend)
    fn = functional.lorfa_linear if case.method == "lorfa" else functional.lora_linear
    return fn(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], scaling=2.0,
              dropout_p=case.dropout_p, adapter_index=ids, backend=backend)


def _trainable(case):
    return ("x", "scale", "shift") if case.method == "vefa" else ("x", "lora_A", "lora_B")


def _run(case, inputs, dtype, backend, seed):
    """(y, grads) of one forward and backward; the dropout seed drawn from `seed`."""
    t = {name: v.detach().to(dtype) if v.is_floating_point() else v for name, v in inputs.items()}
    for name in _trainable(case):
        t[name].requires_grad_(True)
    torch.manual_seed(seed)
    y = _call(case, t, backend)
    y.backward(t["dy"])
    # an adapter no row used may get no gradient at all: that is a zero one
    return y.detach(), [torch.zeros_like(t[n]) if t[n].grad is None else t[n].grad for n in _trainable(case)]


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_one(case, inputs, expected, dtype, backend, device, seed):
    """One row: `backend` in `dtype` against `expected`, the float64 reference's (y, grads)."""
    row = CheckRow(backend, case.op, str(dtype).removeprefix("torch."), case.label, "-", "FAIL")
    y_ref, grads_ref = expected
    try:
        y, grads = _run(case, inputs, dtype, backend, seed)
        _synchronize(device)
        start = time.perf_counter()
        _run(case, inputs, dtype, backend, seed)
        _synchronize(device)
        row.seconds = time.perf_counter() - start
    except Exception as error:  # a failing backend is a row of the report, not the end of it
        row.detail = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        return row
    row.forward_error = relative_error(y, y_ref)
    row.backward_error = max(relative_error(g, g_ref) for g, g_ref in zip(grads, grads_ref))
    tolerance = TOLERANCE[dtype]
    if row.forward_error <= tolerance and row.backward_error <= tolerance:
        row.status = "pass"
    else:
        row.detail = f"error above the {dtype} tolerance {tolerance:g}"
    return row


def _skip_reason(backend, case, inputs, dtype):
    tensors = [inputs["x"].to(dtype), inputs["weight"].to(dtype), inputs["bias"].to(dtype)]
    tensors += [inputs[name].to(dtype) for name in _trainable(case)[1:]]
    reasons = backend.reasons_against(case.op, tuple(tensors))
    return "; ".join(reasons) if reasons else None


def _pinned_runs(backend_name, device):
    """Yield (config label, context) for every kept configuration the backend's
    kernels can be pinned to on this device; one unpinned run elsewhere."""
    if backend_name == "triton" and device.type == "cuda":
        from .kernels.triton import pinned_config

        index = 0
        while True:
            with pinned_config(index) as pin:
                yield pin
                kept = pin["most_kept"]
            if index + 1 >= kept:
                return
            index += 1
    else:
        yield None


def check_backends(device=None, *, backends_to_check=None, dtypes=None, ops=None, shapes=None,
                   production=None, all_configs=True, seed=0, progress=None):
    """Check every usable backend on `device` against the float64 reference.

    Each backend × op × dtype runs forward and backward on odd shapes (and, on
    CUDA, a production shape); float32 runs with TF32 off (restored afterwards).
    ``python -m featadapt.info --check`` runs it from the command line.

    Args:
        device: a torch device; None: the current CUDA device, else the CPU.
        backends_to_check: backend names; None: every registered one usable here.
        dtypes: torch dtypes; None: float32, float16 and bfloat16.
        ops: op names from ``featadapt.ops.dispatch.OPS`` and ``INDEXED_OPS``; None: all.
        shapes: ``(M, K, N, r)`` tuples; None: the odd shapes, plus the
            production shape when `production`.
        production: also run the production shape; None: on CUDA only.
        all_configs: on CUDA, run the Triton kernels in every configuration the
            pruning rule keeps (False: the one autotuning picks).
        seed: the random inputs' seed.
        progress: called with each finished row (``print``, say).

    Returns:
        The report, a ``CheckReport``, with ``.passed``, ``.failures``, ``.table()``
        and ``.to_json()``.

    Raises:
        ValueError: an unknown backend, op or dtype name.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtypes = tuple(dtypes or (torch.float32, torch.float16, torch.bfloat16))
    production = device.type == "cuda" if production is None else production
    shapes = tuple(shapes or ODD_SHAPES + ((PRODUCTION_SHAPE,) if production else ()))
    wanted_ops = tuple(ops or OPS + INDEXED_OPS)
    unknown = [op for op in wanted_ops if op not in OPS + INDEXED_OPS]
    if unknown:
        raise ValueError(f"ops must be among {OPS + INDEXED_OPS}, got {unknown}")
    if backends_to_check is None:
        chosen = [b for b in backends() if b.unavailable_reason() is None]
    else:
        chosen = [get_backend(name) for name in backends_to_check]

    rows = []

    def add(row):
        rows.append(row)
        if progress is not None:
            progress(row)

    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    # the dropout seeds come from torch's generator: the caller's random state is left as it was
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            _check_all(chosen, cases(shapes), wanted_ops, dtypes, device, seed, all_configs, add)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    return CheckReport(str(device), rows)


def _check_all(chosen, all_cases, wanted_ops, dtypes, device, seed, all_configs, add):
    """Each case's inputs once, then every backend and dtype on them."""
    for case in [c for c in all_cases if c.op in wanted_ops]:
        generator = torch.Generator().manual_seed(seed)
        inputs = _inputs(case, torch.float64, device, generator)
        expected = _run(case, inputs, torch.float64, "reference", seed)  # once a case, for every row
        for backend in chosen:
            for dtype in dtypes:
                name = str(dtype).removeprefix("torch.")
                why = backend.unavailable_reason() or _skip_reason(backend, case, inputs, dtype)
                if why is not None:
                    add(CheckRow(backend.name, case.op, name, case.label, "-", "skip", detail=why))
                    continue
                for pin in _pinned_runs(backend.name, device) if all_configs else [None]:
                    row = _check_one(case, inputs, expected, dtype, backend.name, device, seed)
                    if pin is not None:
                        row.config = f"kept {pin['index'] + 1} of {pin['most_kept']}"
                    add(row)
