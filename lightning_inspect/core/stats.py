"""Pure reductions: tensor -> one row of sufficient statistics and histogram counts.

The work is split in two halves so that a logging step costs one device-to-host transfer:

* on the device, :func:`reduce_tensor` turns any tensor into one float64 *row*: eleven sufficient
  statistics (see :data:`FIELDS`) followed by ``bins`` histogram counts over the tensor's finite
  values, with the histogram range taken from the same reduction (no ``.item()``, no sync);
* on the host, after the rows of a whole step were moved at once, :func:`merge_rows` combines the
  rows of one key (a module called several times, gradient accumulation, several ranks) and
  :func:`summarise` / :func:`histogram` turn a row into the statistics users see.

Statistics are computed at least in float32 (float64 tensors in float64; on the CPU see
:mod:`lightning_inspect.core.cpu_reduction`: small tensors entirely in float64) over the finite values
(NaN and Inf are counted, not used), except ``zero_fraction`` which is over all elements. Tensors
are read in blocks of a fixed number of values (:mod:`lightning_inspect.core.chunks`), so the memory a
reduction takes does not grow with the tensor. ``std`` is the population standard deviation
(``ddof=0``), computed from centred sums so it stays exact when ``|mean| >> std``.

Example:
    >>> import torch
    >>> row = reduce_tensor(torch.tensor([1.0, 2.0, 3.0, float("nan")]), bins=4)
    >>> s = summarise(row.numpy())
    >>> s["mean"], s["max"], s["nan_count"]
    (2.0, 3.0, 1.0)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from lightning_inspect.core import cpu_reduction
from lightning_inspect.core.chunks import as_vector, blocks
from lightning_inspect.core.cpu_reduction import reduce_cpu

#: The sufficient statistics at the start of every row, in order.
FIELDS = ("count", "finite", "sum", "m2", "sumsq", "abs_sum", "min", "max", "zeros", "nan", "inf")
N_FIELDS = len(FIELDS)
_F = {name: i for i, name in enumerate(FIELDS)}
#: Values per block on the general path on accelerators: its temporaries are a few float32
#: vectors of this length (16 MiB each). On the CPU its blocks are those of the CPU path
#: (:data:`lightning_inspect.core.cpu_reduction.CHUNK`), small enough for the allocator to reuse.
GENERAL_CHUNK = 1 << 22

#: Every statistic a monitor can log.
ALL_STATS = (
    "mean",
    "std",
    "min",
    "max",
    "abs_mean",
    "rms",
    "l2_norm",
    "zero_fraction",
    "nan_count",
    "inf_count",
)
#: What monitors log when ``stats`` is not given.
DEFAULT_STATS = (
    "mean",
    "std",
    "min",
    "max",
    "abs_mean",
    "l2_norm",
    "zero_fraction",
    "nan_count",
    "inf_count",
)


def row_length(bins: int) -> int:
    """Length of a row with ``bins`` histogram counts."""
    return N_FIELDS + bins


def _values(x: torch.Tensor) -> torch.Tensor:
    """The real values ``x`` holds, as a view wherever possible (never converted or flattened).

    Detached, so nothing after it records autograd history (cheaper than ``no_grad`` per call).
    Sparse tensors give their stored values (as for sparse gradients), complex ones their real and
    imaginary parts; a lazy conjugate of a complex tensor is resolved (copied) first.
    """
    x = x.detach()
    if x.layout != torch.strided:
        x = x.coalesce().values() if x.is_sparse else x.values()
    if x.is_complex():
        x = torch.view_as_real(x.resolve_conj().resolve_neg())
    return x


def empty_row(bins: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The row of a tensor with no elements."""
    row = torch.zeros(row_length(bins), dtype=torch.float64, device=device)
    row[_F["min"]] = math.inf
    row[_F["max"]] = -math.inf
    return row


def reduce_tensor(x: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Reduce ``x`` to one float64 row on its own device, without synchronising an accelerator.

    Works for any dtype (bf16, fp16, integers, bool are read as float32; complex as its real and
    imaginary parts), any shape and strides, empty tensors, tensors holding NaN or Inf, and sparse
    tensors (their stored values). The tensor is read in blocks of a fixed number of values,
    each converted to float32 (float64 stays float64) on its own, so the temporary memory does
    not grow with the tensor.

    On the CPU, where reading a value costs no transfer, the reduction branches on the data
    (:mod:`lightning_inspect.core.cpu_reduction`); everywhere else it is branch-free
    (blocks of :data:`GENERAL_CHUNK` values on accelerators).

    Args:
        x: the tensor; it is never modified.
        bins: number of histogram bins; 0 for no histogram.

    Returns:
        ``[count, finite, sum, m2, sumsq, abs_sum, min, max, zeros, nan, inf, *counts]`` where
        ``m2`` is the sum of squared deviations from the mean of the finite values, ``sumsq`` the
        sum of their squares, and ``counts`` are the numbers of finite values in ``bins``
        equal-width bins spanning ``[min, max]``.
    """
    v = _values(x)
    if v.numel() == 0:
        return empty_row(bins, v.device)
    if v.device.type == "cpu":
        row = reduce_cpu(v, bins)  # None where its fast paths cannot be exact
        if row is not None:
            return row
    return _reduce_any(v, bins)


def _reduce_any(x: torch.Tensor, bins: int) -> torch.Tensor:
    """The row of any real tensor, on its device, without a host round trip.

    Two reads, block by block: counts, sum and range first; then, rescaled by the largest
    magnitude (so no square overflows or underflows), centred and plain sums of squares, absolute
    sum and histogram counts over the combined range.
    """
    f64 = torch.float64
    dtype = f64 if x.dtype == f64 else torch.float32
    parts = blocks(x, cpu_reduction.CHUNK if x.device.type == "cpu" else GENERAL_CHUNK)
    firsts = []
    for part in parts:
        v = as_vector(part, dtype)
        firsts.append(
            torch.stack(
                [
                    torch.count_nonzero(torch.isfinite(v)).to(f64),
                    torch.count_nonzero(torch.isnan(v)).to(f64),
                    (v.numel() - torch.count_nonzero(v)).to(f64),
                    torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0).sum(dtype=f64),
                    torch.nan_to_num(v, nan=math.inf, neginf=math.inf).amin().to(f64),
                    torch.nan_to_num(v, nan=-math.inf, posinf=-math.inf).amax().to(f64),
                ]
            )
        )
    first = torch.stack(firsts)
    n_finite, n_nan, zeros, total = first[:, :4].sum(0)
    lo, hi = first[:, 4].amin(), first[:, 5].amax()  # +inf, -inf when nothing is finite
    scale = torch.maximum(lo.abs(), hi.abs())
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    scale_v = scale.to(dtype)  # one of the values: exact in their dtype
    mean_scaled = (total / n_finite.clamp(min=1) / scale).to(dtype)
    lo_scaled, hi_scaled = (lo / scale).to(dtype), (hi / scale).to(dtype)
    seconds = []
    counts = None
    for part in parts:
        v = as_vector(part, dtype)
        finite = torch.isfinite(v)
        zeros_only = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
        scaled = zeros_only / scale_v
        centred = torch.where(finite, scaled - mean_scaled, 0.0)
        seconds.append(
            torch.stack(
                [
                    torch.dot(centred, centred).to(f64),
                    centred.sum(dtype=f64),
                    torch.dot(scaled, scaled).to(f64),
                    zeros_only.abs().sum(dtype=f64),
                ]
            )
        )
        if bins > 0:
            part_counts = _histogram_counts(scaled, finite, lo_scaled, hi_scaled, bins)
            counts = part_counts if counts is None else counts + part_counts
    centred_sumsq, residual, scaled_sumsq, abs_sum = torch.stack(seconds).sum(0)
    scale2 = scale**2
    n = x.numel()
    head = torch.stack(
        [
            torch.full((), float(n), dtype=f64, device=x.device),  # a fill, not a host copy
            n_finite,
            total,
            (centred_sumsq - residual**2 / n_finite.clamp(min=1)).clamp(min=0) * scale2,
            scaled_sumsq * scale2,
            abs_sum,
            lo,
            hi,
            zeros,
            n_nan,
            n - n_finite - n_nan,
        ]
    )
    if counts is None:
        return head
    return torch.cat([head, counts.to(f64)])


def _histogram_counts(
    v: torch.Tensor, finite: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor, bins: int
) -> torch.Tensor:
    """Counts of the (finite) values of ``v`` in ``bins`` equal bins over ``[lo, hi]``, on the device.

    ``finite`` masks the entries to count (``None``: all of them).
    """
    fraction = (v - lo) / (hi - lo).clamp(min=torch.finfo(v.dtype).tiny)  # in [0, 1]
    index = fraction.mul_(bins).floor_().clamp_(0, bins - 1)
    if finite is not None:
        index = torch.where(finite, index, float(bins))  # non-finite -> an overflow bin, dropped
    if v.device.type == "cpu":
        return torch.bincount(index.to(torch.int32), minlength=bins + 1)[:bins]
    # On accelerators bincount reads the largest index back to size its output (a sync):
    # scatter into a fixed-size buffer instead (deterministic for integer counts).
    index = index.to(torch.int64)
    counts = torch.zeros(bins + 1, dtype=torch.int64, device=v.device)
    return counts.scatter_add_(0, index, torch.ones_like(index))[:bins]


# ---------------------------------------------------------------------------------------------
# Host side: rows (NumPy) -> merged rows -> statistics and histograms.
# ---------------------------------------------------------------------------------------------


def merge_rows(rows: np.ndarray) -> np.ndarray:
    """Combine rows of the same quantity (several calls, micro-batches or ranks) into one row.

    Counts and sums add, ``m2`` combines with Chan's parallel formula, min/max take the extremes,
    and histograms are re-binned onto the combined range by bin centre (exact when all rows share
    one range; otherwise each count moves at most one source bin width).
    """
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim == 1:
        return rows.copy()
    if len(rows) == 1:
        return rows[0].copy()
    out = np.zeros(rows.shape[1], dtype=np.float64)
    for name in ("count", "finite", "sum", "sumsq", "abs_sum", "zeros", "nan", "inf"):
        out[_F[name]] = rows[:, _F[name]].sum()
    n_i = rows[:, _F["finite"]]
    n = out[_F["finite"]]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_i = np.where(n_i > 0, rows[:, _F["sum"]] / np.maximum(n_i, 1), 0.0)
        mean = out[_F["sum"]] / n if n > 0 else 0.0
    out[_F["m2"]] = rows[:, _F["m2"]].sum() + float(np.sum(n_i * (mean_i - mean) ** 2))
    has = n_i > 0
    out[_F["min"]] = rows[has, _F["min"]].min() if has.any() else math.inf
    out[_F["max"]] = rows[has, _F["max"]].max() if has.any() else -math.inf
    bins = rows.shape[1] - N_FIELDS
    if bins > 0 and has.any():
        out[N_FIELDS:] = _rebin(rows[has], out[_F["min"]], out[_F["max"]], bins)
    return out


def _rebin(rows: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    counts = np.zeros(bins, dtype=np.float64)
    width = max(hi - lo, np.finfo(np.float32).tiny)
    for row in rows:
        r_lo, r_hi = row[_F["min"]], row[_F["max"]]
        centres = r_lo + (np.arange(bins) + 0.5) * (r_hi - r_lo) / bins
        index = np.clip(np.floor((centres - lo) / width * bins), 0, bins - 1).astype(np.int64)
        np.add.at(counts, index, row[N_FIELDS:])
    return counts


def scale_row(row: np.ndarray, factor: float) -> np.ndarray:
    """The row of ``x * factor`` (``factor > 0``) from the row of ``x``; histogram counts unchanged."""
    out = np.array(row, dtype=np.float64)
    for name in ("sum", "abs_sum", "min", "max"):
        out[_F[name]] *= factor
    for name in ("m2", "sumsq"):
        out[_F[name]] *= factor * factor
    return out


def summarise(row: np.ndarray, stats: tuple[str, ...] = ALL_STATS) -> dict[str, float]:
    """The named statistics of one (host) row; NaN where a statistic has no finite value."""
    return dict(
        zip(
            stats, summarise_rows(np.asarray(row)[None, :N_FIELDS], stats)[0].tolist(), strict=False
        )
    )


def summarise_rows(rows: np.ndarray, stats: tuple[str, ...] = ALL_STATS) -> np.ndarray:
    """:func:`summarise` of many rows at once: ``out[i, j]`` is ``stats[j]`` of ``rows[i]``.

    ``rows`` is 2-D (one row per key, at least the :data:`FIELDS` columns); a logging step of
    thousands of keys costs one NumPy expression per statistic instead of one per value.
    """
    col = {name: rows[:, i].astype(np.float64) for name, i in _F.items()}
    finite, count = col["finite"], col["count"]
    columns = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for name in stats:
            if name == "mean":
                value = col["sum"] / finite
            elif name == "std":
                value = np.sqrt(np.maximum(col["m2"], 0.0) / finite)
            elif name in ("min", "max"):
                value = col[name]
            elif name == "abs_mean":
                value = col["abs_sum"] / finite
            elif name == "rms":
                value = np.sqrt(col["sumsq"] / finite)
            elif name == "l2_norm":
                columns.append(np.sqrt(col["sumsq"]))
                continue
            elif name == "zero_fraction":
                columns.append(np.where(count > 0, col["zeros"] / count, np.nan))
                continue
            else:  # nan_count, inf_count
                columns.append(col[name[:3]])
                continue
            columns.append(np.where(finite > 0, value, np.nan))
    return np.stack(columns, axis=1) if columns else np.empty((len(rows), 0))


@dataclass(frozen=True)
class Histogram:
    """Histogram of the finite values of one tensor: ``counts[i]`` values in ``[edges[i], edges[i+1])``.

    The last bin is closed. ``sum`` and ``sum_squares`` are over the finite values.
    """

    edges: np.ndarray
    counts: np.ndarray
    min: float
    max: float
    num: float
    sum: float
    sum_squares: float


@functools.lru_cache(maxsize=8)
def _unit_edges(bins: int) -> np.ndarray:
    """``bins + 1`` equal steps from 0 to 1 (exactly 1 at the end); read-only, shared."""
    unit = np.linspace(0.0, 1.0, bins + 1)
    unit.flags.writeable = False
    return unit


def histogram(row: np.ndarray) -> Histogram | None:
    """The histogram of a host row, or ``None`` when it has no bins or no finite value."""
    bins = len(row) - N_FIELDS
    finite = float(row[_F["finite"]])
    if bins <= 0 or finite <= 0:
        return None
    lo, hi = float(row[_F["min"]]), float(row[_F["max"]])
    total = float(row[_F["sum"]])
    unit = _unit_edges(bins)
    edges = (
        lo * (1.0 - unit) + hi * unit
    )  # no hi - lo, which overflows for the widest float64 ranges
    edges[-1] = hi  # exactly
    return Histogram(
        edges=edges,
        counts=np.asarray(row[N_FIELDS:], dtype=np.float64),
        min=lo,
        max=hi,
        num=finite,
        sum=total,
        sum_squares=float(row[_F["sumsq"]]),
    )


def tensor_stats(x: torch.Tensor, stats: tuple[str, ...] = ALL_STATS) -> dict[str, float]:
    """Convenience for one tensor: reduce, move to the host, summarise (synchronises).

    >>> tensor_stats(torch.tensor([0.0, 3.0, 4.0]), ("l2_norm", "zero_fraction"))
    {'l2_norm': 5.0, 'zero_fraction': 0.3333333333333333}
    """
    return summarise(reduce_tensor(x, bins=0).cpu().numpy(), stats)
