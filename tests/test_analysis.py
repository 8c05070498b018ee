"""featadapt.analysis: intruder dimensions, column-space residual, model report."""

import copy
import json
import math

import pytest
import torch
from torch import nn

import featadapt
from featadapt.analysis import (
    IntruderReport,
    column_space_residual,
    intruder_dimensions,
    model_report,
    scale_intruders,
)
from featadapt.model import trainable_parameters

F64 = torch.float64


# -- constructed weights ----------------------------------------------------------


def tall_weight(n=64, k=32):
    """A full-rank (n, k) weight, n > k, with well-separated singular values
    10·0.85^i; also returns an orthonormal basis of its column space."""
    qu, _ = torch.linalg.qr(torch.randn(n, k, dtype=F64))
    qv, _ = torch.linalg.qr(torch.randn(k, k, dtype=F64))
    sigma = 10 * 0.85 ** torch.arange(k, dtype=F64)
    return (qu * sigma) @ qv.T, qu


def unit_outside(basis):
    """A random unit vector orthogonal to the span of basis's columns."""
    u = torch.randn(basis.shape[0], dtype=F64)
    u -= basis @ (basis.T @ u)
    return u / u.norm()


def with_intruder(strength=20.0):
    """w_pre and w_pre + strength·u vᵀ with u outside w_pre's column space."""
    w_pre, basis = tall_weight()
    u = unit_outside(basis)
    v = torch.randn(w_pre.shape[1], dtype=F64)
    return w_pre, w_pre + strength * torch.outer(u, v / v.norm()), u


def loop_intruders(w_pre, w_ft, k, epsilon):
    """The paper's algorithm written out directly: numpy's SVD and explicit loops."""
    np = pytest.importorskip("numpy")
    u_pre = np.linalg.svd(w_pre.numpy(), full_matrices=False)[0]
    u_ft, s_ft, _ = np.linalg.svd(w_ft.numpy(), full_matrices=False)
    indices, values, sims = [], [], []
    for i in range(k):
        row = []
        for j in range(u_pre.shape[1]):
            a, b = u_ft[:, i], u_pre[:, j]
            row.append(abs(float(a @ b)) / (np.linalg.norm(a) * np.linalg.norm(b)))
        sims.append(row)
        if max(row) < epsilon:
            indices.append(i)
            values.append(float(s_ft[i]))
    return indices, values, torch.tensor(sims, dtype=F64)


# -- intruder_dimensions ----------------------------------------------------------


def test_new_orthogonal_direction_is_an_intruder():
    w_pre, w_ft, u = with_intruder()
    report = intruder_dimensions(w_pre, w_ft, k=10, epsilon=0.5)
    assert isinstance(report, IntruderReport)
    assert report.count == 1
    assert report.indices == (0,)
    assert report.singular_values[0] == pytest.approx(torch.linalg.matrix_norm(w_ft, ord=2).item(), rel=1e-12)
    assert report.similarity.shape == (10, 32)
    assert report.max_similarity[0] < 0.5
    assert (report.max_similarity[1:] >= 0.5).all()
    # The intruder is the added direction (up to sign).
    top_u = torch.linalg.svd(w_ft, full_matrices=False)[0][:, 0]
    assert abs(float(top_u @ u)) > 0.95


def test_column_rescaling_has_no_intruders():
    w_pre, _ = tall_weight()
    scale = 1 + 0.05 * torch.randn(w_pre.shape[1], dtype=F64)
    report = intruder_dimensions(w_pre, w_pre * scale, k=10, epsilon=0.5)
    assert report.count == 0 and report.indices == () and report.singular_values == ()
    assert report.max_similarity.min() > 0.9


def test_identical_weights_match_themselves():
    w, _ = tall_weight()
    report = intruder_dimensions(w, w.clone(), k=5)
    assert report.count == 0
    torch.testing.assert_close(report.similarity[:, :5], torch.eye(5, dtype=F64), atol=1e-12, rtol=0)


def test_float32_weights_are_analysed_in_float64():
    w_pre, w_ft, _ = with_intruder()
    report = intruder_dimensions(w_pre.float(), w_ft.float())
    assert report.similarity.dtype == F64
    assert report.indices == (0,)


@pytest.mark.parametrize("shape", [(48, 48), (64, 32), (32, 64)])
def test_matches_a_direct_loop_implementation(shape):
    n, m = shape
    w_pre = torch.randn(n, m, dtype=F64)
    # A LoRA-like update, strong enough to create some intruders but not only intruders.
    w_ft = w_pre + 1.5 * torch.randn(n, 4, dtype=F64) @ torch.randn(4, m, dtype=F64)
    k, epsilon = 10, 0.5
    report = intruder_dimensions(w_pre, w_ft, k=k, epsilon=epsilon)
    indices, values, sims = loop_intruders(w_pre, w_ft, k, epsilon)
    assert 0 < len(indices) < k, "the case must contain intruders and non-intruders"
    assert (sims.max(dim=1).values - epsilon).abs().min() > 1e-6, "no borderline vector"
    assert report.count == len(indices)
    assert list(report.indices) == indices
    assert report.singular_values == pytest.approx(values, rel=1e-12)
    torch.testing.assert_close(report.similarity, sims, atol=1e-10, rtol=0)


def test_k_is_clipped_to_the_number_of_singular_vectors():
    w_pre, w_ft, _ = with_intruder()  # (64, 32): 32 singular vectors
    report = intruder_dimensions(w_pre, w_ft, k=100)
    assert report.k == 32
    assert report.similarity.shape == (32, 32)


# -- column_space_residual --------------------------------------------------------


def test_residual_of_a_known_split():
    w_pre, basis = tall_weight()
    inside = basis @ torch.randn(32, 32, dtype=F64)
    outside = torch.outer(unit_outside(basis), torch.randn(32, dtype=F64))
    inside *= 3 / inside.norm()
    outside *= 4 / outside.norm()
    assert column_space_residual(w_pre, w_pre + inside + outside) == pytest.approx(4 / 5, rel=1e-10)
    assert column_space_residual(w_pre, w_pre + inside) < 1e-12
    assert column_space_residual(w_pre, w_pre + outside) == pytest.approx(1.0, rel=1e-12)
    assert column_space_residual(w_pre, w_pre.clone()) == 0.0


def _base_layer(shape, dtype):
    """nn.Linear with weight (out, in) = shape: tall full-rank, or rank 8 when square."""
    out_features, in_features = shape
    layer = nn.Linear(in_features, out_features, dtype=dtype)
    if out_features == in_features:
        with torch.no_grad():
            low_rank = torch.randn(out_features, 8, dtype=dtype) @ torch.randn(8, in_features, dtype=dtype)
            layer.weight.copy_(low_rank / 8)
    return layer


def _randomised(layer):
    with torch.no_grad():
        for param in layer.parameters(recurse=False):
            param.copy_(torch.randn_like(param))
    return layer


ADAPTERS = {
    "vefa": lambda base: featadapt.VeFALinear(base, shift=True),
    "lorfa": lambda base: featadapt.LoRFALinear(base, r=4),
    "lora": lambda base: featadapt.LoRALinear(base, r=4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(64, 32), (32, 32)], ids=["tall", "square-rank8"])
def test_feature_space_adapters_stay_in_the_column_space(shape, dtype):
    base = _base_layer(shape, dtype)
    for method in ("vefa", "lorfa"):
        layer = _randomised(ADAPTERS[method](copy.deepcopy(base)))
        w0 = layer.original_weight()
        assert torch.linalg.matrix_norm(layer.delta_weight()) > 0.1 * torch.linalg.matrix_norm(w0)
        assert column_space_residual(w0, layer.effective_weight()) < 1e-6, method
        layer.merge()
        assert column_space_residual(layer.original_weight(), layer.base_layer.weight) < 1e-6, method
        assert column_space_residual(layer.original_weight(), layer.effective_weight()) < 1e-6, method


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(64, 32), (32, 32)], ids=["tall", "square-rank8"])
def test_lora_leaves_the_column_space(shape, dtype):
    layer = _randomised(ADAPTERS["lora"](_base_layer(shape, dtype)))
    assert column_space_residual(layer.original_weight(), layer.effective_weight()) > 0.5
    layer.merge()
    assert column_space_residual(layer.original_weight(), layer.base_layer.weight) > 0.5


def test_default_cutoff_ignores_float32_rounding_directions():
    # A float32 rank-8 square weight has 24 singular values at rounding level;
    # rtol=0 counts them as rank, so its "column space" is everything and
    # LoRA's new directions vanish. The dtype-relative default does not.
    layer = _randomised(ADAPTERS["lora"](_base_layer((32, 32), torch.float32)))
    w0, w_ft = layer.original_weight(), layer.effective_weight()
    assert column_space_residual(w0, w_ft) > 0.5
    assert column_space_residual(w0, w_ft, rtol=0) < 1e-6
    assert column_space_residual(w0, w_ft, rtol=1e-3) == pytest.approx(column_space_residual(w0, w_ft), rel=1e-9)


# -- scale_intruders --------------------------------------------------------------


def test_scale_intruders_lam0_removes_the_intruder():
    w_pre, w_ft, _ = with_intruder()
    sigma = intruder_dimensions(w_pre, w_ft).singular_values[0]
    cleaned = scale_intruders(w_pre, w_ft, lam=0.0)
    assert cleaned.dtype == w_ft.dtype and cleaned.shape == w_ft.shape
    assert intruder_dimensions(w_pre, cleaned).count == 0
    # Exactly one rank-1 component of size sigma was taken out.
    assert torch.linalg.matrix_norm(cleaned - w_ft).item() == pytest.approx(sigma, rel=1e-10)


def test_scale_intruders_lam_half_halves_the_singular_value():
    w_pre, w_ft, _ = with_intruder()
    sigma = intruder_dimensions(w_pre, w_ft).singular_values[0]
    halved = scale_intruders(w_pre, w_ft, lam=0.5)
    report = intruder_dimensions(w_pre, halved)
    assert report.indices == (0,)
    assert report.singular_values[0] == pytest.approx(sigma / 2, rel=1e-10)
    # The other singular values are untouched.
    torch.testing.assert_close(torch.linalg.svdvals(halved)[1:], torch.linalg.svdvals(w_ft)[1:], rtol=1e-10, atol=0)


def test_scale_intruders_lam1_returns_w_ft_unchanged():
    w_pre, w_ft, _ = with_intruder()
    for dtype in (F64, torch.float32):
        out = scale_intruders(w_pre.to(dtype), w_ft.to(dtype), lam=1.0)
        assert out.dtype == dtype
        assert torch.equal(out, w_ft.to(dtype))


def test_scale_intruders_keeps_float32():
    w_pre, w_ft, _ = with_intruder()
    out = scale_intruders(w_pre.float(), w_ft.float(), lam=0.0)
    assert out.dtype == torch.float32
    assert intruder_dimensions(w_pre.float(), out).count == 0


# -- model_report -----------------------------------------------------------------


def small_adapted_model():
    model = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 24))
    featadapt.inject(model, "lora", target_modules=["0"], r=4)
    featadapt.inject(model, "vefa", target_modules=["2"], shift=True)
    featadapt.inject(model, "lorfa", target_modules=["4"], r=2)
    return model


def test_model_report_rows_at_init():
    model = small_adapted_model()
    report = model_report(model)
    rows = {row["name"]: row for row in report.rows}
    assert list(rows) == ["0", "2", "4"]
    assert [rows[n]["method"] for n in rows] == ["lora", "vefa", "lorfa"]
    assert [rows[n]["rank"] for n in rows] == [4, None, 2]
    assert [rows[n]["shape"] for n in rows] == [[48, 16], [48, 48], [24, 48]]
    # lora: A (4, 16) + B (48, 4); vefa: scale + shift (48 each); lorfa: A (2, 48) + B (48, 2).
    assert [rows[n]["params"] for n in rows] == [4 * 16 + 48 * 4, 2 * 48, 2 * 48 + 48 * 2]
    assert report.adapter_parameters == trainable_parameters(model)[0]
    # Adapters start as the identity: no update, so nothing to find.
    for row in report.rows:
        assert row["intruders"] == 0
        assert row["column_space_residual"] == 0.0
        assert row["relative_update"] == 0.0


def test_model_report_after_training_like_changes():
    model = small_adapted_model()
    for _, layer in featadapt.model.adapter_layers(model):
        _randomised(layer)
    report = model_report(model, k=10, epsilon=0.5)
    rows = {row["name"]: row for row in report.rows}
    assert rows["0"]["column_space_residual"] > 0.3  # LoRA on a tall layer
    assert rows["0"]["intruders"] >= 1
    assert rows["2"]["column_space_residual"] < 1e-6
    assert rows["4"]["column_space_residual"] < 1e-6
    assert all(row["relative_update"] > 0 for row in report.rows)
    assert report.total_intruders == sum(row["intruders"] for row in report.rows)
    assert report.mean_column_space_residual == pytest.approx(
        sum(row["column_space_residual"] for row in report.rows) / 3
    )
    # Merging does not change what is measured.
    featadapt.merge_adapters(model)
    merged = model_report(model, k=10, epsilon=0.5)
    for before, after in zip(report.rows, merged.rows):
        assert after["intruders"] == before["intruders"]
        assert after["column_space_residual"] == pytest.approx(before["column_space_residual"], abs=1e-9)


def test_model_report_dict_and_table():
    model = small_adapted_model()
    for _, layer in featadapt.model.adapter_layers(model):
        _randomised(layer)
    report = model_report(model, k=4)
    data = json.loads(json.dumps(report.as_dict()))
    assert data["k"] == 4 and data["epsilon"] == 0.5
    assert [layer["name"] for layer in data["layers"]] == ["0", "2", "4"]
    assert data["total_intruders"] == report.total_intruders
    assert data["adapter_parameters"] == report.adapter_parameters
    table = report.table()
    assert str(report) == table
    lines = table.splitlines()
    assert "method" in lines[1] and "intruders" in lines[1]
    body = lines[3:6]
    assert [line.split()[:2] for line in body] == [["0", "lora"], ["2", "vefa"], ["4", "lorfa"]]
    assert body[1].split()[3] == "-"  # VeFA has no rank
    assert lines[-1].startswith("total")


def test_model_report_needs_adapters():
    with pytest.raises(ValueError, match="no adapter layers"):
        model_report(nn.Sequential(nn.Linear(4, 4)))


# -- argument checks --------------------------------------------------------------

W = torch.randn(8, 6, dtype=F64)

BAD_INPUTS = [
    (intruder_dimensions, dict(w_pre=W[0], w_ft=W), ValueError, r"w_pre must be 2-D .* got shape \(6,\)"),
    (intruder_dimensions, dict(w_pre=W, w_ft=W.T), ValueError, r"w_ft must have w_pre's shape \(8, 6\), got \(6, 8\)"),
    (intruder_dimensions, dict(w_pre=W.numpy(), w_ft=W), TypeError, r"w_pre must be a torch.Tensor, got ndarray"),
    (intruder_dimensions, dict(w_pre=W, w_ft=W.long()), TypeError, r"w_ft must have a floating dtype, got torch.int64"),
    (intruder_dimensions, dict(w_pre=W, w_ft=W.clone().fill_(math.nan)), ValueError, r"w_ft must be finite"),
    (intruder_dimensions, dict(w_pre=W[:0], w_ft=W[:0]), ValueError, r"w_pre must not be empty"),
    (intruder_dimensions, dict(w_pre=W, w_ft=W, k=0), ValueError, r"k must be an integer >= 1, got 0"),
    (intruder_dimensions, dict(w_pre=W, w_ft=W, k=2.5), ValueError, r"k must be an integer >= 1, got 2.5"),
    (intruder_dimensions, dict(w_pre=W, w_ft=W, k=True), ValueError, r"k must be an integer >= 1, got True"),
    (intruder_dimensions, dict(w_pre=W, w_ft=W, epsilon=0), ValueError, r"epsilon must be a real number in \(0, 1\], got 0"),
    (intruder_dimensions, dict(w_pre=W, w_ft=W, epsilon=1.5), ValueError, r"epsilon .* got 1.5"),
    (intruder_dimensions, dict(w_pre=W, w_ft=W, epsilon=math.nan), ValueError, r"epsilon .* got nan"),
    (column_space_residual, dict(w_pre=W, w_ft=W, rtol=-1.0), ValueError, r"rtol must be None or a finite real number >= 0, got -1.0"),
    (column_space_residual, dict(w_pre=W, w_ft=W[:, :5]), ValueError, r"w_ft must have w_pre's shape"),
    (scale_intruders, dict(w_pre=W, w_ft=W, lam=-0.5), ValueError, r"lam must be a finite real number >= 0, got -0.5"),
    (scale_intruders, dict(w_pre=W, w_ft=W, lam=math.inf), ValueError, r"lam .* got inf"),
    (scale_intruders, dict(w_pre=W, w_ft=W, lam=math.nan), ValueError, r"lam .* got nan"),
    (scale_intruders, dict(w_pre=W, w_ft=W, lam="0.5"), ValueError, r"lam .* got '0.5'"),
    (scale_intruders, dict(w_pre=W, w_ft=W, lam=0.5, k=0), ValueError, r"k must be"),
    (model_report, dict(model=small_adapted_model(), k=-1), ValueError, r"k must be an integer >= 1, got -1"),
    (model_report, dict(model=small_adapted_model(), epsilon=2), ValueError, r"epsilon .* got 2"),
]


@pytest.mark.parametrize(
    "fn, kwargs, exc, pattern", BAD_INPUTS, ids=[f"{fn.__name__}-{i}" for i, (fn, *_) in enumerate(BAD_INPUTS)]
)
def test_bad_inputs_name_the_argument(fn, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        fn(**kwargs)
    assert str(info.value).startswith(fn.__name__ + ":")
