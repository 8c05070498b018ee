"""Diagnostics: intruder dimensions, column-space residual and a per-layer report.

Notation follows DESIGN.md: a weight is ``W (N, K)`` (out_features × in_features),
so its *left* singular vectors live in the N-dimensional output space. An
adapter that changes the layer's output directions shows up there.

* **Intruder dimensions** (Shuttleworth et al., "LoRA vs Full Fine-tuning: An
  Illusion of Equivalence", arXiv 2410.21228): with ``W_pre = U₀ Σ₀ V₀ᵀ`` and
  ``W_ft = U Σ Vᵀ``, the i-th of the top-k left singular vectors of the
  fine-tuned weight is an intruder when

      max_j |cos(U[:, i], U₀[:, j])| < ε       over *all* pretrained vectors j.

* **Column-space residual**: the share of the update ``Δ = W_ft − W_pre`` that
  falls outside the column space of ``W_pre``,

      ‖(I − P) Δ‖_F / ‖Δ‖_F,   P = U₀,ᵣ U₀,ᵣᵀ,

  with ``U₀,ᵣ`` the left singular vectors of ``W_pre`` above a numerical rank
  cut-off. VeFA (``W0 diag(s)``) and LoRFA (``W0 (I + γBA)``) keep the
  effective weight ``W0 · T`` inside W0's column space, so their residual is 0
  up to rounding; LoRA (``W0 + γBA``) in general is not. A square weight of
  full rank spans its whole output space: there every update has residual 0,
  LoRA's included — the measure tells something only where W0's column space
  is smaller than the output space (tall or rank-deficient weights).

All decompositions run in float64 on the weights' device.
"""

import math
import numbers
import time
from dataclasses import dataclass

import torch

from .model import adapter_layers

# The default rank cut-off's floor, in units of eps of W_pre's dtype. Rounding
# a rank-r matrix to a floating dtype adds singular values up to about
# 0.5·eps·σ_max (a random-matrix estimate; measured ≈ 0.05–0.15·eps for
# float32, float16 and bfloat16 low-rank products), so 2·eps sits above that
# noise floor while staying far below the real spectrum of trained weights.
_RTOL_EPS_FACTOR = 2.0


# -- argument checks -------------------------------------------------------------


def _check_weight(fn, name, w):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{fn}: {name} must have a floating dtype, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"{fn}: {name} must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"{fn}: {name} must not be empty, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{fn}: {name} must be finite, got NaN or Inf entries")


def _check_pair(fn, w_pre, w_ft):
    _check_weight(fn, "w_pre", w_pre)
    _check_weight(fn, "w_ft", w_ft)
    if w_ft.shape != w_pre.shape:
        raise ValueError(
            f"{fn}: w_ft must have w_pre's shape {tuple(w_pre.shape)}, got {tuple(w_ft.shape)}"
        )
    if w_ft.device != w_pre.device:
        raise ValueError(f"{fn}: w_ft must be on w_pre's device {w_pre.device}, got {w_ft.device}")


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_k(fn, k):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"{fn}: k must be an integer >= 1, got {k!r}")
    return int(k)


def _check_epsilon(fn, epsilon):
    if not _is_real(epsilon) or not (0.0 < epsilon <= 1.0):
        raise ValueError(f"{fn}: epsilon must be a real number in (0, 1], got {epsilon!r}")
    return float(epsilon)


def _check_rtol(fn, rtol):
    if rtol is None:
        return None
    if not _is_real(rtol) or not math.isfinite(rtol) or rtol < 0:
        raise ValueError(f"{fn}: rtol must be None or a finite real number >= 0, got {rtol!r}")
    return float(rtol)


def _check_lam(fn, lam):
    if not _is_real(lam) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"{fn}: lam must be a finite real number >= 0, got {lam!r}")
    return float(lam)


# -- shared pieces ---------------------------------------------------------------


def _svd64(w):
    """Thin SVD in float64: U (N, p), S (p,), Vh (p, K) with p = min(N, K)."""
    return torch.linalg.svd(w.detach().to(torch.float64), full_matrices=False)


@dataclass(frozen=True, eq=False)
class IntruderReport:
    """What `intruder_dimensions` found.

    count            number of intruders among the top-k fine-tuned vectors
    indices          their positions among the top-k (0 = largest singular value)
    singular_values  the fine-tuned singular values at those positions
    similarity       (k, p) float64: |cos| between the top-k fine-tuned left
                     singular vectors (rows) and all p = min(N, K) pretrained
                     ones (columns, in decreasing singular-value order)
    k, epsilon       the values used (k after clipping to min(N, K))
    """

    count: int
    indices: tuple
    singular_values: tuple
    similarity: torch.Tensor
    k: int
    epsilon: float

    @property
    def max_similarity(self):
        """(k,): each top-k vector's best match among the pretrained vectors."""
        return self.similarity.max(dim=1).values


def _intruders(u_pre, u_ft, s_ft, k, epsilon):
    # Both bases are orthonormal, so the cosines are plain dot products.
    similarity = (u_ft[:, :k].transpose(0, 1) @ u_pre).abs()
    is_intruder = similarity.max(dim=1).values < epsilon
    indices = tuple(int(i) for i in torch.nonzero(is_intruder).flatten().tolist())
    return IntruderReport(
        count=len(indices),
        indices=indices,
        singular_values=tuple(float(s_ft[i]) for i in indices),
        similarity=similarity,
        k=k,
        epsilon=epsilon,
    )


def _default_rtol(w_pre):
    # numpy.linalg.matrix_rank's cut-off is max(shape)·eps(float64): it allows
    # for the SVD's own error. The weight itself, though, is only known to its
    # dtype's precision: a rank-deficient float32/bfloat16 weight has "zero"
    # singular values at about eps(dtype)·σ_max, and counting those as rank
    # would let P cover noise directions (all of a square matrix) and hide
    # LoRA's new directions. So the cut-off is the larger of the two.
    return max(max(w_pre.shape) * torch.finfo(torch.float64).eps, _RTOL_EPS_FACTOR * torch.finfo(w_pre.dtype).eps)


def _column_space_residual(w_pre, w_ft, u_pre, s_pre, rtol):
    delta = w_ft.detach().to(torch.float64) - w_pre.detach().to(torch.float64)
    delta_norm = torch.linalg.matrix_norm(delta)
    if delta_norm == 0:
        return 0.0
    if rtol is None:
        rtol = _default_rtol(w_pre)
    basis = u_pre[:, s_pre > rtol * s_pre.max()]  # orthonormal basis of the numerical column space
    # (I − P) Δ without forming the N×N projector.
    outside = delta - basis @ (basis.transpose(0, 1) @ delta)
    return min(1.0, float(torch.linalg.matrix_norm(outside) / delta_norm))  # rounding can give 1 + 1e-16


# -- public API ------------------------------------------------------------------


def intruder_dimensions(w_pre, w_ft, k=10, epsilon=0.5):
    """Intruder dimensions of a fine-tuned weight (Shuttleworth et al., 2410.21228).

    With thin SVDs ``w_pre = U₀ Σ₀ V₀ᵀ`` and ``w_ft = U Σ Vᵀ`` (float64, singular
    values in decreasing order), the similarity matrix is
    ``S[i, j] = |U[:, i] · U₀[:, j]|`` for i < k and every pretrained j; vector
    i is an intruder when ``max_j S[i, j] < epsilon``.

    "All pretrained vectors" means the min(N, K) of the thin SVD, as in the
    paper: a full SVD would add an arbitrary basis of the orthogonal
    complement, which no pretrained weight direction stands behind. (When
    w_pre is rank-deficient, its vectors for zero singular values are just as
    arbitrary; the paper's algorithm counts them all the same.)

    k larger than min(N, K) is clipped to min(N, K) (there are no more
    singular vectors), so one k serves layers of every size; the report's
    `.k` holds the value used. Returns an `IntruderReport`.
    """
    fn = "intruder_dimensions"
    _check_pair(fn, w_pre, w_ft)
    k = min(_check_k(fn, k), min(w_pre.shape))
    epsilon = _check_epsilon(fn, epsilon)
    u_pre, _, _ = _svd64(w_pre)
    u_ft, s_ft, _ = _svd64(w_ft)
    return _intruders(u_pre, u_ft, s_ft, k, epsilon)


def column_space_residual(w_pre, w_ft, rtol=None):
    """Share of the update outside w_pre's column space: ‖(I − P) Δ‖_F / ‖Δ‖_F.

    ``Δ = w_ft − w_pre`` (float64) and ``P = U₀,ᵣ U₀,ᵣᵀ`` projects onto the left
    singular vectors of w_pre whose singular values exceed ``rtol · σ_max``.
    Returns a float in [0, 1]; 0.0 when Δ = 0.

    rtol=None uses ``max(max(N, K) · eps(float64), 2 · eps(w_pre.dtype))``:
    numpy's matrix_rank cut-off, raised to the precision the weight is stored
    in (about 2.4e-7 for float32, 2e-3 for float16, 1.6e-2 for bfloat16),
    because rounding to that dtype already leaves singular values near
    eps·σ_max that belong to no real direction. Pass rtol=0 to keep every
    nonzero singular value.

    Read "~0" relative to the dtypes: VeFA and LoRFA measure about 1e-7 on
    float32 layers and up to about 1e-3 on bfloat16 ones (rounding of the
    merged weight, and a rank-deficient W0's content below the cut-off);
    LoRA's residual is of order one wherever W0's column space leaves room.
    """
    fn = "column_space_residual"
    _check_pair(fn, w_pre, w_ft)
    rtol = _check_rtol(fn, rtol)
    u_pre, s_pre, _ = _svd64(w_pre)
    return _column_space_residual(w_pre, w_ft, u_pre, s_pre, rtol)


def scale_intruders(w_pre, w_ft, lam, k=10, epsilon=0.5):
    """The paper's mitigation: shrink the intruder singular values of w_ft by lam.

    With ``w_ft = U Σ Vᵀ`` and I the intruder indices from
    ``intruder_dimensions(w_pre, w_ft, k, epsilon)``, returns

        w_ft + Σ_{i∈I} (lam − 1) σᵢ uᵢ vᵢᵀ      (σᵢ ← lam·σᵢ, the rest untouched)

    in w_ft's dtype and device. Adding the correction, rather than rebuilding
    U Σ Vᵀ, leaves every other component of w_ft exactly as it was; lam=1 (or
    no intruders) returns a copy of w_ft, lam=0 removes the intruders.
    """
    fn = "scale_intruders"
    _check_pair(fn, w_pre, w_ft)
    lam = _check_lam(fn, lam)
    k = min(_check_k(fn, k), min(w_pre.shape))
    epsilon = _check_epsilon(fn, epsilon)
    u_pre, _, _ = _svd64(w_pre)
    u_ft, s_ft, vh_ft = _svd64(w_ft)
    report = _intruders(u_pre, u_ft, s_ft, k, epsilon)
    if lam == 1.0 or report.count == 0:
        return w_ft.detach().clone()
    idx = torch.tensor(report.indices, device=u_ft.device)
    correction = (u_ft[:, idx] * ((lam - 1.0) * s_ft[idx])) @ vh_ft[idx]
    return (w_ft.detach().to(torch.float64) + correction).to(w_ft.dtype)


# -- model-level report ----------------------------------------------------------

_COLUMNS = (
    # (row key, header, formatter)
    ("name", "layer", str),
    ("method", "method", str),
    ("shape", "shape", lambda s: f"{s[0]}x{s[1]}"),
    ("rank", "rank", lambda r: "-" if r is None else str(r)),
    ("params", "params", lambda p: f"{p:,}"),
    ("intruders", "intruders", str),
    ("column_space_residual", "col-space resid.", lambda x: f"{x:.2e}"),
    ("relative_update", "|dW|/|W0|", lambda x: f"{x:.2e}"),
)


@dataclass(frozen=True, eq=False)
class ModelReport:
    """Per-adapter-layer diagnostics from `model_report`.

    rows: one dict per adapter layer with name, method, shape [N, K], rank
    (None for VeFA), params (the adapter's own parameters), intruders,
    column_space_residual and relative_update (‖Δ‖_F / ‖W0‖_F).
    """

    rows: list
    k: int
    epsilon: float

    @property
    def total_intruders(self):
        return sum(row["intruders"] for row in self.rows)

    @property
    def mean_column_space_residual(self):
        return sum(row["column_space_residual"] for row in self.rows) / len(self.rows)

    @property
    def adapter_parameters(self):
        return sum(row["params"] for row in self.rows)

    def as_dict(self):
        """Plain, JSON-serialisable summary."""
        return {
            "k": self.k,
            "epsilon": self.epsilon,
            "layers": [dict(row) for row in self.rows],
            "adapter_parameters": self.adapter_parameters,
            "total_intruders": self.total_intruders,
            "mean_column_space_residual": self.mean_column_space_residual,
        }

    def table(self):
        """A fixed-width text table, one line per layer and a total line."""
        header = [title for _, title, _ in _COLUMNS]
        body = [[fmt(row[key]) for key, _, fmt in _COLUMNS] for row in self.rows]
        total = ["total", "", "", "", f"{self.adapter_parameters:,}", str(self.total_intruders),
                 f"{self.mean_column_space_residual:.2e} (mean)", ""]
        widths = [max(len(line[i]) for line in [header, *body, total]) for i in range(len(header))]

        def fmt_line(cells):
            # Text columns left-aligned, numbers right-aligned.
            return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        rule = "-" * len(fmt_line(header))
        title = f"intruder dimensions: top k={self.k}, epsilon={self.epsilon}"
        return "\n".join([title, fmt_line(header), rule, *map(fmt_line, body), rule, fmt_line(total)])

    def __str__(self):
        return self.table()


@torch.no_grad()
def model_report(model, k=10, epsilon=0.5, rtol=None):
    """Diagnostics for every adapter layer of `model` (see `adapter_layers`).

    For each layer, pretrained = ``layer.original_weight()`` and fine-tuned =
    ``layer.effective_weight()`` (merged or not): intruder count as in
    `intruder_dimensions` (k clipped per layer), `column_space_residual` with
    `rtol`, and the relative update size. Returns a `ModelReport`; raises
    ValueError when the model has no adapter layers.
    """
    fn = "model_report"
    k = _check_k(fn, k)
    epsilon = _check_epsilon(fn, epsilon)
    rtol = _check_rtol(fn, rtol)
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{fn}: the model has no adapter layers (add some with featadapt.inject)")
    rows = []
    for name, layer in layers:
        # (out, in); a convolution's (out, in, *kernel) weight as (out, in·kernel)
        w_pre = layer.original_weight().flatten(1)
        w_ft = layer.effective_weight().flatten(1)
        # One SVD of each weight serves both measures.
        u_pre, s_pre, _ = _svd64(w_pre)
        u_ft, s_ft, _ = _svd64(w_ft)
        intruders = _intruders(u_pre, u_ft, s_ft, min(k, min(w_pre.shape)), epsilon)
        pre_norm = torch.linalg.matrix_norm(w_pre.to(torch.float64))
        delta_norm = torch.linalg.matrix_norm(w_ft.to(torch.float64) - w_pre.to(torch.float64))
        rows.append({
            "name": name or "(model)",
            "method": layer.method,
            "shape": [int(w_pre.shape[0]), int(w_pre.shape[1])],
            "rank": getattr(layer, "r", None),
            "params": sum(p.numel() for p in layer.parameters(recurse=False)),
            "intruders": intruders.count,
            "column_space_residual": _column_space_residual(w_pre, w_ft, u_pre, s_pre, rtol),
            "relative_update": float(delta_norm / pre_norm) if pre_norm > 0 else (0.0 if delta_norm == 0 else math.inf),
        })
    return ModelReport(rows=rows, k=k, epsilon=epsilon)


# -- watching a model while it trains --------------------------------------------

# Every 100 steps: on the demo's model (MiniLM-L6, 36 adapted layers) at batch 16 x 32
# tokens one check cost 2.6 training steps (docs/demo/sequential/sequential.json,
# "watch_cost"), so the watch adds about 2.6 % (every 50 steps would add 5.1 %).
DEFAULT_WATCH_EVERY = 100


def _top_left_singular(w, k):
    """The top-k left singular vectors and values of w, from the eigenvectors of the smaller
    Gram matrix (w wᵀ or wᵀ w): a fraction of a full SVD's cost for the top few directions,
    which the eigen-decomposition in float64 resolves to ~1e-8 while they stand clear of
    the rest of the spectrum (the directions intruders are about)."""
    w = w.detach().to(torch.float64)
    if w.shape[0] <= w.shape[1]:
        values, vectors = torch.linalg.eigh(w @ w.transpose(0, 1))
        return vectors.flip(1)[:, :k], values.flip(0)[:k].clamp(min=0).sqrt()
    values, vectors = torch.linalg.eigh(w.transpose(0, 1) @ w)
    s = values.flip(0)[:k].clamp(min=0).sqrt()
    u = (w @ vectors.flip(1)[:, :k]) / s.clamp(min=torch.finfo(torch.float64).tiny)
    return u, s


class IntruderTracker:
    """Intruder dimensions and column-space residual of a model's adapted layers,
    measured during training and kept as a history (`records`).

    Call `maybe_record(step)` after every optimizer step (it measures when `step` is a
    multiple of `every`) or `record(step)` whenever you like. The pretrained side of
    each layer (its SVD and column-space basis) is computed once, here; each check
    then costs one small eigen-decomposition per layer. `pretrained` watches plain
    layers instead of adapters ({module name: pretrained weight}, e.g. for full
    fine-tuning); by default every adapter layer of `model` is watched against its
    own frozen weight. Counts follow `intruder_dimensions` (top k, epsilon) and
    `column_space_residual` (rtol).
    """

    def __init__(self, model, every=DEFAULT_WATCH_EVERY, k=10, epsilon=0.5, rtol=None, pretrained=None):
        fn = "IntruderTracker"
        self.every = self.check_every(every)
        self.k = _check_k(fn, k)
        self.epsilon = _check_epsilon(fn, epsilon)
        rtol = _check_rtol(fn, rtol)
        if pretrained is None:
            layers = adapter_layers(model)
            if not layers:
                raise ValueError(f"{fn}: the model has no adapter layers; pass pretrained={{name: weight}} "
                                 "to watch plain layers")
            self._current = {name or "(model)": layer.effective_weight for name, layer in layers}
            pretrained = {name or "(model)": layer.original_weight() for name, layer in layers}
        else:
            self._current = {name: (lambda module=model.get_submodule(name): module.weight) for name in pretrained}
        self._pretrained = {}
        with torch.no_grad():
            for name, w_pre in pretrained.items():
                u_pre, s_pre, _ = _svd64(w_pre)
                cut = _default_rtol(w_pre) if rtol is None else rtol
                self._pretrained[name] = (w_pre.detach().to(torch.float64), u_pre, u_pre[:, s_pre > cut * s_pre.max()])
        self.records = []
        self.seconds = 0.0  # time spent measuring, to compare with the training time

    @staticmethod
    def check_every(every):
        """`every` as an int (None: only explicit `record` calls); raises on anything else."""
        if every is None:
            return None
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"IntruderTracker: every must be None or an integer >= 1, got {every!r}")
        return int(every)

    @torch.no_grad()
    def measure(self):
        """{"total_intruders", "mean_column_space_residual", "intruders": {layer: count}} now."""
        intruders, residuals = {}, []
        for name, (w_pre, u_pre, basis) in self._pretrained.items():
            w_ft = self._current[name]().detach().to(torch.float64)
            u_ft, _ = _top_left_singular(w_ft, min(self.k, min(w_ft.shape)))
            best = (u_ft.transpose(0, 1) @ u_pre).abs().max(dim=1).values
            intruders[name] = int((best < self.epsilon).sum())
            delta = w_ft - w_pre
            delta_norm = torch.linalg.matrix_norm(delta)
            outside = delta - basis @ (basis.transpose(0, 1) @ delta)
            residuals.append(0.0 if delta_norm == 0 else min(1.0, float(torch.linalg.matrix_norm(outside) / delta_norm)))
        return {"total_intruders": sum(intruders.values()),
                "mean_column_space_residual": sum(residuals) / len(residuals), "intruders": intruders}

    def record(self, step):
        """Measure now and append {"step", ...measure()} to `records`; returns it."""
        started = time.perf_counter()
        entry = {"step": int(step), **self.measure()}
        self.seconds += time.perf_counter() - started
        self.records.append(entry)
        return entry

    def maybe_record(self, step):
        """`record(step)` when `step` is a positive multiple of `every`, else None."""
        if self.every is None or step <= 0 or step % self.every:
            return None
        return self.record(step)
