"""Pure reductions: tensor -> one float64 row (:mod:`~lightning_inspect.core.row`) on its device,
without a sync; rows -> merged rows, statistics and histograms on the host. Statistics are over
the finite values (NaN and Inf counted) except ``zero_fraction``; ``std`` is the population one,
from centred sums. Two paths, in bounded memory: the C kernels (contiguous float32/float64 CPU
tensors) and a general one in blocks (float64 on the CPU, float32 on accelerators).

Example:
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

from lightning_inspect.core.row import FIELDS as FIELDS  # re-exported: the row's layout
from lightning_inspect.core.row import N_FIELDS, Field, row_length

try:
    from lightning_inspect.core import _kernels
except ImportError:  # built without a C compiler: the general path does the work
    _kernels = None
if _kernels is not None and getattr(_kernels, "FIELDS", None) != N_FIELDS:
    _kernels = None  # built for another row layout: rebuild with `python setup.py build_ext -i`

#: Values per block of the general path: CPU (2 MiB of float64), accelerators (16 MiB of float32).
CHUNK, GENERAL_CHUNK = 1 << 18, 1 << 22

#: Every statistic a monitor can log, and what monitors log when ``stats`` is not given.
ALL_STATS = ("mean", "std", "min", "max", "abs_mean", "rms", "l2_norm", "zero_fraction")
ALL_STATS += ("nan_count", "inf_count")
DEFAULT_STATS = tuple(s for s in ALL_STATS if s != "rms")


def _values(x: torch.Tensor) -> torch.Tensor:
    """The real values of ``x``, detached (sparse: stored values; complex: real and imaginary)."""
    x = x.detach()
    if x.layout != torch.strided:
        x = x.coalesce().values() if x.is_sparse else x.values()
    if x.is_complex():
        x = torch.view_as_real(x.resolve_conj().resolve_neg())
    return x


def reduce_tensor(x: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Reduce ``x`` (never modified; any dtype, layout, strides) to one float64 row on its device.

    ``bins``: histogram counts (0: none); other dtypes than float32/64 are read as float32.
    """
    v = _values(x)
    if v.numel() == 0:
        row = torch.zeros(row_length(bins), dtype=torch.float64, device=v.device)
        row[Field.MIN], row[Field.MAX] = math.inf, -math.inf
        return row
    if v.device.type == "cpu":
        row = _reduce_kernel(v, bins)
        return row if row is not None else _reduce_any(v, bins, torch.float64)
    return _reduce_any(v, bins, torch.float64 if v.dtype == torch.float64 else torch.float32)


def _reduce_kernel(v: torch.Tensor, bins: int) -> torch.Tensor | None:
    """The row from the C kernels, or ``None`` where they do not apply or cannot be exact."""
    if _kernels is None or v.dtype not in (torch.float32, torch.float64):
        return None
    if v.is_neg() and v.numel() > CHUNK:  # a lazy negation (some gradients): copied when small
        return None
    v = memory_order(v.resolve_neg())  # a transposed matrix is its contiguous base read in order
    if not v.is_contiguous():
        return None
    row = torch.empty(row_length(bins), dtype=torch.float64)
    is_double = v.dtype == torch.float64
    exact = _kernels.reduce_row(v.data_ptr(), v.numel(), is_double, bins, row.data_ptr())
    return row if exact else None


def _reduce_any(x: torch.Tensor, bins: int, dtype: torch.dtype) -> torch.Tensor:
    """The row of any real tensor computed in ``dtype`` on its device, in two reads by block:
    counts, sum, range; then, scaled by the largest magnitude (no square overflows), sums of
    squares, absolute sum, counts. Buffers are made once per call (per block: heap fragments).
    """
    f64, device, inf = torch.float64, x.device, math.inf
    parts = blocks(x, CHUNK if device.type == "cpu" else GENERAL_CHUNK)
    size = max(p.numel() for p in parts)
    read, clean, work = (torch.empty(size, dtype=dtype, device=device) for _ in range(3))
    finite, mask = (torch.empty(size, dtype=torch.bool, device=device) for _ in range(2))
    index = torch.empty(size, dtype=torch.int64, device=device)
    big = torch.finfo(dtype).max
    firsts = torch.empty(len(parts), 6, dtype=f64, device=device)
    for i, part in enumerate(parts):
        v, n = as_vector(part, dtype, read), part.numel()
        firsts[i] = torch.stack(
            [
                torch.count_nonzero(torch.le(torch.abs(v, out=work[:n]), big, out=finite[:n])),
                torch.count_nonzero(torch.ne(v, v, out=mask[:n])),
                n - torch.count_nonzero(v),
                torch.nan_to_num(v, 0.0, 0.0, 0.0, out=work[:n]).sum(dtype=f64),
                torch.nan_to_num(v, inf, inf, inf, out=work[:n]).amin(),
                torch.nan_to_num(v, -inf, -inf, -inf, out=work[:n]).amax(),
            ]
        ).to(f64)
    n_finite, n_nan, zeros, total = firsts[:, :4].sum(0)
    lo, hi = firsts[:, 4].amin(), firsts[:, 5].amax()  # +inf, -inf when nothing is finite
    scale = torch.maximum(lo.abs(), hi.abs())  # as a power of two: dividing by it is exact
    usable = torch.isfinite(scale) & (scale > 0)
    scale = torch.where(usable, torch.exp2(torch.floor(torch.log2(scale))), torch.ones_like(scale))
    scale_v = scale.to(dtype)
    mean_scaled = (total / n_finite.clamp(min=1) / scale).to(dtype)
    lo_scaled, hi_scaled = (lo / scale).to(dtype), (hi / scale).to(dtype)
    seconds = torch.empty(len(parts), 4, dtype=f64, device=device)
    counts = torch.zeros(bins + 1, dtype=torch.int64, device=device)
    for i, part in enumerate(parts):
        if len(parts) > 1:  # one block: its vector and finite mask from the first read still hold
            v, n = as_vector(part, dtype, read), part.numel()
            torch.le(torch.abs(v, out=work[:n]), big, out=finite[:n])
        is_finite = finite[:n]
        scaled = torch.nan_to_num(v, 0.0, 0.0, 0.0, out=clean[:n])
        abs_sum = torch.abs(scaled, out=work[:n]).sum(dtype=f64)
        scaled.div_(scale_v)
        centred = torch.sub(scaled, mean_scaled, out=work[:n]).mul_(is_finite)
        sums = [torch.dot(centred, centred), centred.sum(dtype=f64), torch.dot(scaled, scaled)]
        seconds[i] = torch.stack([*(s.to(f64) for s in sums), abs_sum])
        if bins > 0:
            position = torch.sub(scaled, lo_scaled, out=work[:n])
            position.div_((hi_scaled - lo_scaled).clamp(min=torch.finfo(dtype).tiny))
            position.mul_(bins).floor_().clamp_(0, bins - 1)
            position.masked_fill_(torch.logical_not(is_finite, out=mask[:n]), bins)
            _count(index[:n].copy_(position), counts)  # non-finite: the dropped last count
    centred_sumsq, residual, scaled_sumsq, abs_sum = seconds.sum(0)
    n = x.numel()
    head = torch.stack(
        [
            torch.full((), float(n), dtype=f64, device=device),  # a fill, not a host copy
            n_finite,
            total,
            (centred_sumsq - residual**2 / n_finite.clamp(min=1)).clamp(min=0) * scale**2,
            scaled_sumsq * scale**2,
            abs_sum,
            lo,
            hi,
            zeros,
            n_nan,
            n - n_finite - n_nan,
        ]
    )
    return torch.cat([head, counts[:bins].to(f64)]) if bins > 0 else head


def _count(index: torch.Tensor, counts: torch.Tensor) -> None:
    """Add the counts of ``index`` (values in ``[0, len(counts))``) to ``counts``."""
    if index.device.type == "cpu":
        counts += torch.bincount(index, minlength=len(counts))
    else:  # bincount reads the largest index back to size its output (a sync): scatter instead
        counts.scatter_add_(0, index, torch.ones_like(index))


def memory_order(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its dimensions permuted by decreasing stride (a view; the same values)."""
    return x.permute(sorted(range(x.dim()), key=lambda d: -x.stride(d)))


def blocks(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Views of at most ``size`` values (whole rows where one fits) holding each value once.

    >>> x = torch.arange(12.0).reshape(4, 3).t()  # transposed: read as its 4 x 3 base
    >>> [as_vector(b, torch.float32).tolist() for b in blocks(x, 8)]
    [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0, 10.0, 11.0]]
    """
    if x.numel() <= size or x.dim() == 0:
        return [x]
    x = memory_order(x)  # an identity on the sub-blocks below: already in memory order
    if x.dim() == 1:
        return [x[start : start + size] for start in range(0, x.numel(), size)]
    row = x.numel() // x.shape[0]
    if row <= size:
        rows = size // row
        return [x[start : start + rows] for start in range(0, x.shape[0], rows)]
    return [piece for i in range(x.shape[0]) for piece in blocks(x[i], size)]


def as_vector(
    block: torch.Tensor, dtype: torch.dtype, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """``block`` as a contiguous 1-D ``dtype`` tensor: a view, else a copy into ``buffer``."""
    if block.dtype == dtype and block.is_contiguous() and not block.is_neg():
        return block.reshape(-1)
    if block.dtype not in (torch.float32, torch.float64):
        block = block.float()  # every other dtype's values are read as float32
    n = block.numel()
    out = buffer[:n] if buffer is not None else torch.empty(n, dtype=dtype, device=block.device)
    out.view(block.shape).copy_(block)
    return out


_ADDED = [Field.COUNT, Field.FINITE, Field.SUM, Field.SUMSQ, Field.ABS_SUM]
_ADDED += [Field.ZEROS, Field.NAN, Field.INF]


def merge_rows(rows: np.ndarray) -> np.ndarray:
    """Combine rows of one quantity (calls, micro-batches, ranks): sums add, ``m2`` by Chan's
    formula; histograms re-binned by bin centre onto the combined range (exact if all share it).
    """
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim == 1 or len(rows) == 1:
        return rows.reshape(-1).copy()
    out = np.zeros(rows.shape[1], dtype=np.float64)
    out[_ADDED] = rows[:, _ADDED].sum(0)
    n_i, n = rows[:, Field.FINITE], out[Field.FINITE]
    mean_i = np.where(n_i > 0, rows[:, Field.SUM] / np.maximum(n_i, 1), 0.0)
    mean = out[Field.SUM] / n if n > 0 else 0.0
    out[Field.M2] = rows[:, Field.M2].sum() + float(np.sum(n_i * (mean_i - mean) ** 2))
    has = n_i > 0
    out[Field.MIN] = rows[has, Field.MIN].min() if has.any() else math.inf
    out[Field.MAX] = rows[has, Field.MAX].max() if has.any() else -math.inf
    bins = rows.shape[1] - N_FIELDS
    if bins > 0 and has.any():
        out[N_FIELDS:] = _rebin(rows[has], out[Field.MIN], out[Field.MAX], bins)
    return out


def _rebin(rows: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    counts = np.zeros(bins, dtype=np.float64)
    width = max(hi - lo, np.finfo(np.float32).tiny)
    for row in rows:
        r_lo, r_hi = row[Field.MIN], row[Field.MAX]
        centres = r_lo + (np.arange(bins) + 0.5) * (r_hi - r_lo) / bins
        index = np.clip(np.floor((centres - lo) / width * bins), 0, bins - 1).astype(np.int64)
        np.add.at(counts, index, row[N_FIELDS:])
    return counts


def scale_row(row: np.ndarray, factor: float) -> np.ndarray:
    """The row of ``x * factor`` (``factor > 0``) from the row of ``x``."""
    out = np.array(row, dtype=np.float64)
    out[[Field.SUM, Field.ABS_SUM, Field.MIN, Field.MAX]] *= factor
    out[[Field.M2, Field.SUMSQ]] *= factor * factor
    return out


def summarise(row: np.ndarray, stats: tuple[str, ...] = ALL_STATS) -> dict[str, float]:
    """The named statistics of one (host) row; NaN where a statistic has no finite value."""
    values = summarise_rows(np.asarray(row)[None, :N_FIELDS], stats)[0].tolist()
    return dict(zip(stats, values, strict=True))


def summarise_rows(rows: np.ndarray, stats: tuple[str, ...] = ALL_STATS) -> np.ndarray:
    """``out[i, j]``: ``stats[j]`` of ``rows[i]`` (2-D, at least the fields)."""
    col = {f: rows[:, f].astype(np.float64) for f in Field}
    finite, count = col[Field.FINITE], col[Field.COUNT]
    with np.errstate(divide="ignore", invalid="ignore"):
        over_finite = {  # NaN without a finite value
            "mean": col[Field.SUM] / finite,
            "std": np.sqrt(np.maximum(col[Field.M2], 0.0) / finite),
            "min": col[Field.MIN],
            "max": col[Field.MAX],
            "abs_mean": col[Field.ABS_SUM] / finite,
            "rms": np.sqrt(col[Field.SUMSQ] / finite),
        }
        value = {k: np.where(finite > 0, v, np.nan) for k, v in over_finite.items()}
        value["l2_norm"] = np.sqrt(col[Field.SUMSQ])
        value["zero_fraction"] = np.where(count > 0, col[Field.ZEROS] / count, np.nan)
    value["nan_count"], value["inf_count"] = col[Field.NAN], col[Field.INF]
    return np.stack([value[s] for s in stats], axis=1) if stats else np.empty((len(rows), 0))


@dataclass(frozen=True)
class Histogram:
    """The finite values' histogram: ``counts[i]`` in ``[edges[i], edges[i+1])``, the last closed."""

    edges: np.ndarray
    counts: np.ndarray
    min: float
    max: float
    num: float
    sum: float
    sum_squares: float


@functools.lru_cache(maxsize=8)
def _unit_edges(bins: int) -> np.ndarray:
    unit = np.linspace(0.0, 1.0, bins + 1)
    unit.flags.writeable = False
    return unit


def histogram(row: np.ndarray) -> Histogram | None:
    """The histogram of a host row, or ``None`` when it has no bins or no finite value."""
    bins = len(row) - N_FIELDS
    finite = float(row[Field.FINITE])
    if bins <= 0 or finite <= 0:
        return None
    lo, hi = float(row[Field.MIN]), float(row[Field.MAX])
    unit = _unit_edges(bins)
    edges = lo * (1.0 - unit) + hi * unit  # no hi - lo: it overflows for the widest ranges
    edges[-1] = hi  # exactly
    counts = np.asarray(row[N_FIELDS:], dtype=np.float64)
    return Histogram(edges, counts, lo, hi, finite, float(row[Field.SUM]), float(row[Field.SUMSQ]))


def squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The squared L2 norm of all ``tensors`` together, in float64 (finite for huge values), on
    the first one's device; no sync.

    >>> float(squared_norm([torch.tensor([3.0]), torch.tensor([4.0])]))
    25.0
    """
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float64)
    return torch.stack([n.to(norms[0].device) for n in norms]).square().sum()


def tensor_stats(x: torch.Tensor, stats: tuple[str, ...] = ALL_STATS) -> dict[str, float]:
    """Statistics of one tensor (synchronises).

    >>> tensor_stats(torch.tensor([0.0, 3.0, 4.0]), ("l2_norm", "zero_fraction"))
    {'l2_norm': 5.0, 'zero_fraction': 0.3333333333333333}
    """
    return summarise(reduce_tensor(x, bins=0).cpu().numpy(), stats)
