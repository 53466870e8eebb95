"""lightning_inspect.core.stats against a NumPy float64 reference (random and adversarial tensors)."""

from __future__ import annotations

import importlib
import math
import shutil
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lightning_inspect.core import row as row_layout
from lightning_inspect.core import stats
from lightning_inspect.core.stats import (
    ALL_STATS,
    CHUNK,
    DEFAULT_STATS,
    FIELDS,
    N_FIELDS,
    _reduce_any,
    _values,
    histogram,
    merge_rows,
    reduce_tensor,
    row_length,
    summarise,
    tensor_stats,
)

BINS = 16
F = {name: i for i, name in enumerate(FIELDS)}


#: The C kernels' own thresholds: float32 vectors up to this long are reduced in float64.
SMALL = 16384


@pytest.fixture(scope="module", autouse=True, params=["kernels", "general"])
def cpu_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs through the C kernels and through the general path that stands in for them.

    Module-scoped (set and restored by hand): Hypothesis refuses function-scoped fixtures.
    """
    built = stats._kernels
    if request.param == "kernels" and built is None:
        pytest.skip("the C kernels are not built here (no C compiler at install)")
    if request.param == "general":
        stats._kernels = None
    yield request.param
    stats._kernels = built


def test_the_c_kernels_are_built_where_a_compiler_is() -> None:
    """The build makes them optional; on a machine with a C compiler a silent failure would cost 30x."""
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler: the package installs without its kernels")
    kernels = importlib.import_module("lightning_inspect.core._kernels")
    assert callable(kernels.reduce_row)
    # the kernels write the row layout of core/row.py (else stats.py does not use them: rebuild)
    assert kernels.FIELDS == row_layout.N_FIELDS == len(row_layout.Field)


# ------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------


def as_reference_array(x: torch.Tensor) -> np.ndarray:
    """The values the library promises to summarise: float32 reading (float64 kept), complex as (re, im)."""
    x = x.detach().resolve_conj().resolve_neg()
    if x.is_complex():
        x = torch.view_as_real(x)
    if x.dtype != torch.float64:
        x = x.to(torch.float32)
    return x.reshape(-1).numpy().astype(np.float64)


def reference(a: np.ndarray) -> dict[str, float]:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    fin = a[np.isfinite(a)]
    nan = math.nan
    n = fin.size
    return {
        "mean": fin.mean() if n else nan,
        "std": fin.std() if n else nan,
        "min": fin.min() if n else nan,
        "max": fin.max() if n else nan,
        "abs_mean": np.abs(fin).mean() if n else nan,
        "rms": math.sqrt(np.mean(fin**2)) if n else nan,
        "l2_norm": math.sqrt(np.sum(fin**2)),
        "zero_fraction": float(np.sum(a == 0)) / a.size if a.size else nan,
        "nan_count": float(np.isnan(a).sum()),
        "inf_count": float(np.isinf(a).sum()),
    }


def assert_stats_close(
    got: dict[str, float], ref: dict[str, float], n: int, var_rtol: float = 1e-4
) -> None:
    """float32 reductions vs float64 reference; tolerances from float32 rounding of sums."""
    assert set(got) == set(ALL_STATS)
    for key in ("nan_count", "inf_count", "zero_fraction"):
        if math.isnan(ref[key]):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == ref[key], (key, got[key], ref[key])
    if math.isnan(ref["mean"]):  # no finite value
        for key in ("mean", "std", "min", "max", "abs_mean", "rms"):
            assert math.isnan(got[key]), (key, got[key])
        assert got["l2_norm"] == 0.0
        return
    # min/max are float32 values: exact
    assert got["min"] == ref["min"]
    assert got["max"] == ref["max"]
    log_n = max(1.0, math.log2(max(n, 2)))
    rel = 2e-6 * log_n
    assert got["abs_mean"] == pytest.approx(ref["abs_mean"], rel=rel, abs=1e-37)
    assert got["mean"] == pytest.approx(ref["mean"], rel=rel, abs=rel * ref["abs_mean"] + 1e-37)
    assert got["rms"] == pytest.approx(ref["rms"], rel=rel, abs=1e-37)
    assert got["l2_norm"] == pytest.approx(ref["l2_norm"], rel=rel, abs=1e-37)
    # std: centred sums; the mean's own rounding adds at most (mean error)^2 to the variance
    mean_err = rel * ref["abs_mean"]
    var, var_ref = got["std"] ** 2, ref["std"] ** 2
    assert abs(var - var_ref) <= var_rtol * var_ref + 4 * mean_err**2 + 1e-37, (
        got["std"],
        ref["std"],
    )


def assert_histogram_matches(row: np.ndarray, a: np.ndarray, bins: int) -> None:
    """Totals exact; per bin as np.histogram, except values within float32 rounding of an edge."""
    counts = row[N_FIELDS:]
    assert len(counts) == bins
    fin = a[np.isfinite(a)]
    assert counts.sum() == fin.size
    assert np.all(counts >= 0) and np.all(counts == np.round(counts))
    if fin.size == 0:
        assert np.all(counts == 0)
        return
    lo, hi = fin.min(), fin.max()
    assert row[F["min"]] == lo and row[F["max"]] == hi
    if lo == hi:
        assert sorted(counts)[-1] == fin.size  # one bin holds everything
        return
    ref_counts, edges = np.histogram(fin, bins=bins, range=(lo, hi))
    # a value may change sides of an interior edge only if it is within rounding of it
    slack = 1e-6 * (hi - lo)
    near = np.array([np.sum(np.abs(fin - e) <= slack) for e in edges[1:-1]])
    diff = np.abs(np.cumsum(counts)[:-1] - np.cumsum(ref_counts)[:-1])
    assert np.all(diff <= near), (counts, ref_counts)


def check_tensor(x: torch.Tensor, bins: int = BINS, var_rtol: float = 1e-4) -> np.ndarray:
    before = x.clone()
    version = x._version
    row_t = reduce_tensor(x, bins=bins)
    assert row_t.dtype == torch.float64 and row_t.shape == (row_length(bins),)
    assert row_t.device == x.device
    assert x._version == version, "reduce_tensor modified its input"
    torch.testing.assert_close(x, before, rtol=0, atol=0, equal_nan=True)
    row = row_t.numpy()
    a = as_reference_array(x)
    assert row[F["count"]] == a.size
    assert row[F["finite"]] == np.isfinite(a).sum()
    assert_stats_close(summarise(row), reference(a), a.size, var_rtol=var_rtol)
    if bins:
        assert_histogram_matches(row, a, bins)
    return row


# ------------------------------------------------------------------------------------------
# Property tests
# ------------------------------------------------------------------------------------------

# Magnitudes in [2**-40, 2**50] (and 0): squares and their sums stay inside float32's range.
# Outside it the float32 second moments overflow or underflow: see the xfail tests below.
_finite32 = st.floats(-(2.0**50), 2.0**50, width=32, allow_subnormal=False).filter(
    lambda v: v == 0 or abs(v) >= 2.0**-40
)
_special = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0])
_elements = st.one_of(_finite32, _finite32, _finite32, _special)
_shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=12)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hnp.arrays(np.float32, _shapes, elements=_elements), st.sampled_from([2, 7, 16]))
def test_reduce_matches_numpy_float32(arr: np.ndarray, bins: int) -> None:
    check_tensor(torch.from_numpy(arr.copy()), bins=bins)


_any32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(np.float32, st.integers(1, 40), elements=st.one_of(_any32, _any32, _any32, _special))
)
def test_reduce_matches_numpy_over_the_whole_float32_range(arr: np.ndarray) -> None:
    """Subnormals to float32 max: no second moment may overflow or vanish."""
    check_tensor(torch.from_numpy(arr.copy()), bins=8)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=40),
        elements=st.floats(-1e4, 1e4, width=32).filter(lambda v: v == 0 or abs(v) >= 2.0**-40),
    ),
    st.sampled_from([torch.bfloat16, torch.float16, torch.float64]),
)
def test_reduce_matches_numpy_other_float_dtypes(arr: np.ndarray, dtype: torch.dtype) -> None:
    x = torch.from_numpy(arr.copy()).to(dtype)
    check_tensor(x)
    if dtype == torch.float64:  # against the float64 values themselves, within float32 rounding
        got = summarise(reduce_tensor(x, bins=0).numpy())
        ref = reference(x.numpy())
        for key in ("mean", "abs_mean", "rms", "l2_norm", "min", "max"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-5 * ref["abs_mean"] + 1e-30)


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=16),
        elements=st.one_of(_finite32, _special),
    )
)
def test_non_contiguous_views(arr: np.ndarray) -> None:
    base = torch.from_numpy(arr.copy())
    sums = [
        row_layout.Field.SUM,
        row_layout.Field.M2,
        row_layout.Field.SUMSQ,
        row_layout.Field.ABS_SUM,
    ]
    exact = np.ones(row_layout.row_length(BINS), dtype=bool)
    exact[sums] = False
    for view in (base.t(), base[:, ::2], base.flip(0).t()):
        row = check_tensor(view)
        copy = reduce_tensor(view.contiguous(), bins=BINS).numpy()
        # A strided view may take the general path and its copy the C kernels: both sum in
        # float64, in different orders, so the sums agree to float64 rounding and the rest exactly.
        np.testing.assert_array_equal(row[exact], copy[exact])
        np.testing.assert_allclose(row[sums], copy[sums], rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "x",
    [
        torch.arange(-20, 30, dtype=torch.int64).reshape(5, 10),
        torch.tensor([[0, 3], [255, 7]], dtype=torch.uint8),
        torch.tensor([-(2**31), 2**31 - 1, 0, 5], dtype=torch.int32),
        torch.tensor([True, False, False, True, True]),
    ],
    ids=["int64", "uint8", "int32-extremes", "bool"],
)
def test_integer_and_bool(x: torch.Tensor) -> None:
    row = check_tensor(x)
    if x.dtype == torch.bool:
        s = summarise(row)
        assert s["mean"] == pytest.approx(0.6) and s["zero_fraction"] == pytest.approx(0.4)


def test_complex_is_read_as_real_and_imaginary_parts() -> None:
    z = torch.tensor([1 + 2j, 3 - 4j, 0 + 0j], dtype=torch.complex64)
    row = check_tensor(z)
    s = summarise(row)
    assert row[F["count"]] == 6
    assert s["l2_norm"] == pytest.approx(math.sqrt(30.0))  # == complex 2-norm
    assert s["mean"] == pytest.approx(2 / 6)
    assert s["zero_fraction"] == pytest.approx(2 / 6)
    nt = torch.randn(4, 3, dtype=torch.complex64).t()
    check_tensor(nt)


# ------------------------------------------------------------------------------------------
# The CPU paths: the C kernels, and the general path in blocks of CHUNK values
# ------------------------------------------------------------------------------------------

# the C kernels' block edges (256 values a float32 block, 512 histogram positions) and float64
# threshold, then the general path's blocks
_PATH_SIZES = [
    1,
    3,
    255,
    256,
    257,
    513,
    4096 + 17,
    SMALL,
    SMALL + 1,
    CHUNK,
    CHUNK + 1,
    2 * CHUNK + 777,
]


def _distribution(name: str, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    if name == "relu":  # half exact zeros, at random places
        x = x.clamp(min=0)
    elif name == "sparse-grad":  # mostly zeros, as behind a ReLU in backward
        x = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.8, 0.0, x)
    elif name == "offset":  # |mean| >> std: the centred pass
        x = 1e4 + 1e-3 * x
    elif name == "positive":  # softmax-like: all positive, mean comparable to the spread
        x = torch.rand(n, generator=g, dtype=torch.float64) / n
    elif name == "constant":
        x = torch.full((n,), 0.1, dtype=torch.float64)
    elif name == "integers":  # many values exactly on bin edges
        x = torch.randint(-32, 33, (n,), generator=g).to(torch.float64)
    return x.to(dtype)


@pytest.mark.parametrize("n", _PATH_SIZES)
@pytest.mark.parametrize(
    "name", ["randn", "relu", "sparse-grad", "offset", "positive", "constant", "integers"]
)
def test_cpu_paths_match_numpy(n: int, name: str) -> None:
    x = _distribution(name, n)
    row = check_tensor(x, bins=64)
    np.testing.assert_array_equal(row[:N_FIELDS], reduce_tensor(x, bins=0).numpy())
    if name == "offset":  # the exact std, not one lost to cancellation
        assert summarise(row)["std"] == pytest.approx(as_reference_array(x).std(), rel=1e-3)


@pytest.mark.parametrize("bins", [2, 127, 128, 255, 256, 300])
@pytest.mark.parametrize("name", ["relu", "sparse-grad", "randn"])
def test_cpu_paths_any_bin_count(bins: int, name: str) -> None:
    check_tensor(_distribution(name, CHUNK + 3), bins=bins)


@pytest.mark.parametrize("n", [SMALL + 1, 2 * CHUNK + 777])
def test_cpu_paths_float64_and_strided(n: int) -> None:
    check_tensor(_distribution("relu", n, torch.float64), bins=64)
    check_tensor(_distribution("offset", 2 * n)[::2], bins=64)  # a strided 1-D view


@pytest.mark.parametrize("n", [SMALL + 1, CHUNK + 1])
@pytest.mark.parametrize(
    "values",
    [
        [3e38, 3e38],
        [1e-25, -2e-25, 3e-25],
        [1e-45, 3e-45, -1e-44, 0.0],
        [1.0, math.nan],
        [2.0, -math.inf],
    ],
    ids=["sum-overflows", "squares-underflow", "subnormal", "nan", "inf"],
)
def test_cpu_paths_reduce_extremes_exactly(n: int, values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32).repeat(n // len(values) + 1)[:n]
    check_tensor(x, bins=16, var_rtol=1e-3)


@pytest.mark.parametrize("n", [100, SMALL + 1])
def test_lazy_conjugate_and_negative_views_are_read_as_their_values(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    z = torch.randn(n, dtype=torch.complex64, generator=g)
    conj = z.conj()  # a view with the conjugate bit: imaginary parts negated when read
    assert conj.is_conj()
    row = check_tensor(conj)
    np.testing.assert_array_equal(row, reduce_tensor(conj.resolve_conj(), bins=BINS).numpy())
    x = torch.randn(n, generator=g)
    neg = torch._neg_view(x)  # what some autograd formulas hand to gradient hooks
    assert neg.is_neg()
    np.testing.assert_array_equal(check_tensor(neg), reduce_tensor(-x, bins=BINS).numpy())


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_tensors_are_reduced_over_their_stored_values() -> None:
    dense = torch.tensor([[0.0, 2.0, 0.0], [-1.0, 0.0, 4.0]])
    stored = torch.tensor([2.0, -1.0, 4.0])
    for sparse in (dense.to_sparse(), dense.to_sparse_csr()):
        np.testing.assert_array_equal(
            reduce_tensor(sparse, bins=4).numpy(), reduce_tensor(stored, bins=4).numpy()
        )


@pytest.mark.parametrize("n", [10, SMALL + 2])
def test_float64_range_wider_than_float64(n: int) -> None:
    """hi - lo overflows: the histogram must still split the values, with finite edges."""
    x = torch.tensor([1e308, -1e308] * (n // 2), dtype=torch.float64)
    h = histogram(reduce_tensor(x, bins=4).numpy())
    assert h is not None and list(h.counts) == [n / 2, 0, 0, n / 2]
    assert np.all(np.isfinite(h.edges)) and (h.edges[0], h.edges[-1]) == (-1e308, 1e308)


@pytest.mark.parametrize("n", [100, SMALL + 1])
@pytest.mark.parametrize("make", ["constant", "randn"])
def test_tiny_values_keep_exact_second_moments(n: int, make: str) -> None:
    """Squares near float32's smallest normal number lose precision: such tensors are rescaled."""
    g = torch.Generator().manual_seed(n)
    for magnitude in (1e-25, 1e-22, 1e-19):
        x = (
            torch.full((n,), magnitude)
            if make == "constant"
            else torch.randn(n, generator=g) * magnitude
        )
        a = as_reference_array(x)
        s = summarise(reduce_tensor(x, bins=0).numpy())
        assert s["l2_norm"] == pytest.approx(np.sqrt(np.sum(a**2)), rel=1e-5), magnitude
        assert s["rms"] == pytest.approx(np.sqrt(np.mean(a**2)), rel=1e-5), magnitude


def test_reductions_inside_and_outside_inference_mode(cpu_path: str) -> None:
    for x in (torch.randn(SMALL + 5), torch.randn(3 * CHUNK).half()):
        with torch.inference_mode():
            inside = reduce_tensor(x, bins=64)
        np.testing.assert_array_equal(inside.numpy(), reduce_tensor(x, bins=64).numpy())


def test_tensors_of_up_to_small_values_are_reduced_in_float64() -> None:
    """1e8 + 1 - 1e8 summed in one float32 lane is 0; in float64 it is 1."""
    for n in (256, SMALL):
        x = torch.zeros(n)
        x[0], x[16], x[32] = 1e8, 1.0, -1e8
        a = x.numpy().astype(np.float64)
        s = summarise(reduce_tensor(x, bins=8).numpy())
        assert s["mean"] == 1.0 / n
        assert s["std"] == pytest.approx(a.std(), rel=1e-12)
        assert s["l2_norm"] == pytest.approx(np.sqrt(np.sum(a**2)), rel=1e-12)


# ------------------------------------------------------------------------------------------
# Bounded memory: tensors read in blocks (shrunk here so that small tensors have many)
# ------------------------------------------------------------------------------------------

_BLOCK = 4096


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(stats, "CHUNK", _BLOCK)
    monkeypatch.setattr(stats, "GENERAL_CHUNK", _BLOCK)
    return _BLOCK


def _block_case(name: str, n: int) -> torch.Tensor:
    """Tensors of ``n`` values (about) that every path reads in several blocks."""
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g)
    nonfinite = base.clone()
    nonfinite[n // 3], nonfinite[2 * n // 3], nonfinite[-5:] = math.nan, math.inf, -math.inf
    nan_block = base.clone()
    nan_block[_BLOCK : 2 * _BLOCK] = math.nan  # one whole block without a finite value
    cases = {
        "float32-nan-inf": lambda: nonfinite,
        "a-block-of-nan": lambda: nan_block,
        "all-nan": lambda: torch.full((n,), math.nan),
        "float16": lambda: base.half(),
        "bfloat16": lambda: base.bfloat16(),
        "int32": lambda: (base * 1000).int(),
        "bool": lambda: base > 0.5,
        "float64-offset": lambda: 1e4 + 1e-3 * base.double(),  # the centred pass
        "transposed": lambda: base[: n - n % 64].reshape(64, -1).t(),
        # strided even in memory order
        "columns": lambda: base[: n - n % 96].reshape(-1, 96)[:, 5:90],
        "negative-view": lambda: torch._neg_view(nonfinite),
        "huge-nan": lambda: nonfinite * 1e30,  # squares beyond float32: read again as float64
        "float64-tiny-nan": lambda: (
            nonfinite.double() * 1e-150
        ),  # squares near 1e-300: general path
    }
    return cases[name]()


_BLOCK_CASES = [
    "float32-nan-inf",
    "a-block-of-nan",
    "all-nan",
    "float16",
    "bfloat16",
    "int32",
    "bool",
    "float64-offset",
    "transposed",
    "columns",
    "negative-view",
    "huge-nan",
    "float64-tiny-nan",
]


@pytest.mark.parametrize("name", _BLOCK_CASES)
def test_tensors_read_in_blocks_match_numpy(small_blocks: int, name: str) -> None:
    check_tensor(_block_case(name, 64 * small_blocks + 17), bins=64, var_rtol=1e-3)


@pytest.mark.parametrize(
    "name", ["float32-nan-inf", "a-block-of-nan", "float16", "transposed", "columns"]
)
def test_the_general_path_read_in_blocks_matches_numpy(small_blocks: int, name: str) -> None:
    """The accelerators' path, on the CPU."""
    x = _block_case(name, 64 * small_blocks + 17)
    a = as_reference_array(x)
    row = _reduce_any(_values(x), 64, torch.float32).numpy()
    assert row[F["count"]] == a.size and row[F["finite"]] == np.isfinite(a).sum()
    assert_stats_close(summarise(row), reference(a), a.size, var_rtol=1e-3)
    assert_histogram_matches(row, a, 64)


def _peak_cpu_allocation(run: Callable[[], object]) -> int:
    """Peak of the bytes torch allocates on the CPU, and has not freed, while ``run`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.events() if e.self_cpu_memory_usage]
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in events)
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(
    "name",
    [
        "float32-nan-inf",
        "float16",
        "bfloat16",
        "int32",
        "transposed",
        "huge-nan",
        "float64-tiny-nan",
    ],
)
def test_temporary_memory_is_bounded_by_the_block_size(small_blocks: int, name: str) -> None:
    """A float32 copy of these tensors alone would take 256 blocks; every path stays under 16
    (the float64 tensor: its own blocks are twice as large)."""
    x = _block_case(name, 256 * small_blocks)
    peak = _peak_cpu_allocation(lambda: reduce_tensor(x, bins=64))
    block_bytes = small_blocks * x.element_size() if x.dtype == torch.float64 else small_blocks * 4
    assert peak <= 16 * block_bytes, f"{peak / block_bytes:.1f} blocks"


# ------------------------------------------------------------------------------------------
# Adversarial cases
# ------------------------------------------------------------------------------------------


def test_empty() -> None:
    for x in (torch.empty(0), torch.empty(3, 0, dtype=torch.float16)):
        row = check_tensor(x)
        s = summarise(row)
        assert row[F["count"]] == 0 and s["l2_norm"] == 0.0 and s["nan_count"] == 0.0
        assert math.isnan(s["mean"]) and math.isnan(s["zero_fraction"])
        assert histogram(row) is None


def test_all_nan_and_all_inf() -> None:
    row = check_tensor(torch.full((3, 4), math.nan))
    s = summarise(row)
    assert (
        s["nan_count"] == 12
        and s["inf_count"] == 0
        and math.isnan(s["min"])
        and math.isnan(s["std"])
    )
    assert histogram(row) is None
    row = check_tensor(torch.tensor([math.inf, -math.inf, math.nan]))
    s = summarise(row)
    assert (s["nan_count"], s["inf_count"], s["l2_norm"]) == (1.0, 2.0, 0.0)


def test_nan_inf_mix_uses_finite_values_only() -> None:
    x = torch.tensor([1.0, math.inf, -math.inf, math.nan, 2.0, 0.0, math.nan])
    row = check_tensor(x)
    s = summarise(row)
    assert (s["mean"], s["min"], s["max"]) == (1.0, 0.0, 2.0)
    assert (s["nan_count"], s["inf_count"]) == (2.0, 2.0)
    assert s["zero_fraction"] == pytest.approx(1 / 7)
    assert s["std"] == pytest.approx(np.std([1.0, 2.0, 0.0]))


def test_constant_tensor() -> None:
    x = torch.full((1000,), 0.1)
    row = check_tensor(x)
    s = summarise(row)
    assert s["min"] == s["max"] == np.float32(0.1)
    assert s["std"] <= 1e-6 * 0.1
    h = histogram(row)
    assert h is not None and h.counts.sum() == 1000 and h.counts.max() == 1000


def test_large_mean_small_spread_keeps_std() -> None:
    g = torch.Generator().manual_seed(0)
    x = 1000.0 + 1e-3 * torch.randn(4096, generator=g)
    a = as_reference_array(x)
    s = summarise(reduce_tensor(x, bins=8).numpy())
    assert s["std"] == pytest.approx(a.std(), rel=1e-2)
    assert s["mean"] == pytest.approx(a.mean(), rel=1e-7)
    # and the same through merge_rows (Chan's combination of centred sums)
    rows = np.stack([reduce_tensor(c, bins=8).numpy() for c in x.chunk(7)])
    assert summarise(merge_rows(rows))["std"] == pytest.approx(a.std(), rel=1e-2)


def test_huge_magnitudes_mean_min_max() -> None:
    x = torch.tensor([1e30, -2e30, 3e30, 5e29])
    a = as_reference_array(x)
    s = summarise(reduce_tensor(x, bins=4).numpy())
    assert s["mean"] == pytest.approx(a.mean(), rel=1e-5)
    assert (s["min"], s["max"]) == (a.min(), a.max())
    assert s["inf_count"] == 0


# Regression test (bug fixed in c51f9a1): std/rms/l2_norm of finite ~1e30 values overflow to inf (float32 sums of squares)
def test_huge_magnitudes_second_moments() -> None:
    x = torch.tensor([1e30, -2e30, 3e30, 5e29])
    a = as_reference_array(x)
    s = summarise(reduce_tensor(x, bins=4).numpy())
    assert s["l2_norm"] == pytest.approx(np.sqrt(np.sum(a**2)), rel=1e-5)
    assert s["rms"] == pytest.approx(np.sqrt(np.mean(a**2)), rel=1e-5)
    assert s["std"] == pytest.approx(a.std(), rel=1e-5)


# Regression test (bug fixed in c51f9a1): l2_norm/rms/std of finite values below ~1e-19 underflow to 0 (float32 squares)
def test_tiny_magnitudes_second_moments() -> None:
    x = torch.tensor([1e-25, -2e-25, 3e-25, 1e-25])
    a = as_reference_array(x)
    s = summarise(reduce_tensor(x, bins=4).numpy())
    assert s["abs_mean"] == pytest.approx(np.abs(a).mean(), rel=1e-5)
    assert s["l2_norm"] == pytest.approx(np.sqrt(np.sum(a**2)), rel=1e-5)
    assert s["rms"] == pytest.approx(np.sqrt(np.mean(a**2)), rel=1e-5)
    assert s["std"] == pytest.approx(a.std(), rel=1e-4)


# Regression test (bug fixed in c51f9a1): a NaN next to values near float32 max turns max into inf (mean overflows, NaN filled with it)
def test_near_float32_max_with_nan_keeps_min_max() -> None:
    x = torch.tensor([3e38, 3e38, math.nan])
    s = summarise(reduce_tensor(x, bins=4).numpy())
    assert s["max"] == pytest.approx(3e38, rel=1e-6)
    assert s["mean"] == pytest.approx(3e38, rel=1e-6)


# Regression test (bug fixed in c51f9a1): finite float64 values beyond float32 range are counted as Inf (cast to float32 first)
def test_float64_beyond_float32_range_is_finite() -> None:
    x = torch.tensor([1e300, 1.0], dtype=torch.float64)
    s = summarise(reduce_tensor(x, bins=4).numpy())
    assert s["inf_count"] == 0.0
    assert s["max"] == pytest.approx(1e300)


BIG = 3e38  # near float32 max


@pytest.mark.parametrize(
    "values",
    [
        [BIG, BIG],  # the sum overflows float32
        [BIG, -BIG, 1.0, math.nan],
        [-BIG, BIG / 2, math.inf],
        [1e-45, 3e-45, -1e-44, 0.0],  # subnormals
        [1e-40] * 100,
    ],
    ids=["sum-overflows", "big-both-signs-nan", "big-inf", "subnormal", "tiny-constant"],
)
def test_float32_extremes(values: list[float]) -> None:
    check_tensor(torch.tensor(values, dtype=torch.float32), bins=4)


def test_float32_extremes_abs_sum_overflow() -> None:
    check_tensor(torch.tensor([-BIG, BIG, 0.0]), bins=4)


def test_no_grad_and_inference_mode() -> None:
    w = torch.randn(5, 3, requires_grad=True)
    y = w * 2
    ref = reduce_tensor(y.detach(), bins=BINS)
    row = reduce_tensor(y, bins=BINS)
    assert not row.requires_grad and y.grad_fn is not None
    torch.testing.assert_close(row, ref, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(reduce_tensor(y, bins=BINS), ref, rtol=0, atol=0)
    with torch.inference_mode():
        z = y.detach() * 1.0  # an inference tensor
        torch.testing.assert_close(reduce_tensor(z, bins=BINS), ref, rtol=0, atol=0)


def test_bins_zero_and_row_layout() -> None:
    x = torch.tensor([0.0, 3.0, 4.0])
    row = reduce_tensor(x, bins=0)
    assert row.shape == (N_FIELDS,)
    assert histogram(row.numpy()) is None
    assert tensor_stats(x, ("l2_norm", "zero_fraction")) == {"l2_norm": 5.0, "zero_fraction": 1 / 3}
    assert tuple(summarise(row.numpy(), DEFAULT_STATS)) == DEFAULT_STATS


def test_histogram_object() -> None:
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, math.nan])
    h = histogram(reduce_tensor(x, bins=4).numpy())
    assert h is not None
    np.testing.assert_allclose(h.edges, [0.0, 1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(h.counts, [1, 1, 1, 2])  # last bin closed
    assert (h.min, h.max, h.num, h.sum, h.sum_squares) == (0.0, 4.0, 5.0, 10.0, 30.0)


# ------------------------------------------------------------------------------------------
# merge_rows
# ------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        hnp.arrays(np.float32, st.integers(0, 30), elements=_elements), min_size=1, max_size=5
    ),
    st.sampled_from([4, 16]),
)
def test_merge_rows_equals_reduction_of_concatenation(parts: list[np.ndarray], bins: int) -> None:
    tensors = [torch.from_numpy(p.copy()) for p in parts]
    merged = merge_rows(np.stack([reduce_tensor(t, bins=bins).numpy() for t in tensors]))
    whole_t = torch.cat(tensors)
    whole = reduce_tensor(whole_t, bins=bins).numpy()
    for name in ("count", "finite", "zeros", "nan", "inf"):
        assert merged[F[name]] == whole[F[name]], name
    a = as_reference_array(whole_t)
    assert_stats_close(summarise(merged), reference(a), a.size)
    counts = merged[N_FIELDS:]
    assert counts.sum() == np.isfinite(a).sum()  # totals exact
    if np.isfinite(a).any():
        assert (merged[F["min"]], merged[F["max"]]) == (whole[F["min"]], whole[F["max"]])


def test_merge_rows_shared_range_histogram_is_exact() -> None:
    g = torch.Generator().manual_seed(3)
    chunks = []
    for _ in range(4):
        c = torch.rand(50, generator=g) * 2 - 1
        c[0], c[1] = -1.0, 1.0  # every chunk spans the same range
        chunks.append(c)
    merged = merge_rows(np.stack([reduce_tensor(c, bins=10).numpy() for c in chunks]))
    whole = reduce_tensor(torch.cat(chunks), bins=10).numpy()
    np.testing.assert_array_equal(merged[N_FIELDS:], whole[N_FIELDS:])


def test_merge_rows_ignores_empty_and_all_nan_rows_for_moments() -> None:
    x = torch.tensor([1.0, 2.0, 3.0])
    rows = np.stack(
        [
            reduce_tensor(torch.empty(0), bins=4).numpy(),
            reduce_tensor(torch.full((2,), math.nan), bins=4).numpy(),
            reduce_tensor(x, bins=4).numpy(),
        ]
    )
    s = summarise(merge_rows(rows))
    assert (s["mean"], s["min"], s["max"], s["nan_count"]) == (2.0, 1.0, 3.0, 2.0)
    assert s["zero_fraction"] == 0.0
    assert s["std"] == pytest.approx(np.std([1.0, 2.0, 3.0]))
    assert merge_rows(rows)[N_FIELDS:].sum() == 3


def test_merge_single_row_is_a_copy() -> None:
    row = reduce_tensor(torch.tensor([1.0, 2.0]), bins=2).numpy()
    out = merge_rows(row[None, :])
    np.testing.assert_array_equal(out, row)
    out[0] = -1
    assert row[0] == 2


def test_summarise_rows_is_summarise_of_each_row() -> None:
    from lightning_inspect.core.stats import summarise_rows

    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(100, generator=g),
        torch.zeros(5),
        torch.full((3,), float("nan")),
        torch.empty(0),
        torch.tensor([1e30, -1e30]),
        torch.tensor([float("inf"), 1.0]),
    ]
    rows = [reduce_tensor(t, 8).numpy() for t in tensors]
    table = summarise_rows(np.stack([r[:N_FIELDS] for r in rows]), ALL_STATS)
    for row, got in zip(rows, table, strict=False):
        one = list(summarise(row, ALL_STATS).values())
        np.testing.assert_array_equal(got, one)  # NaN where NaN, the same floats elsewhere
    assert one[ALL_STATS.index("inf_count")] == 1 and np.isnan(table[2, ALL_STATS.index("mean")])
