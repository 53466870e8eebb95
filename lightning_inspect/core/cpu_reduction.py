"""The CPU path of :func:`lightning_inspect.core.stats.reduce_tensor`, in bounded memory.

On the CPU reading a value back costs nothing, so the reduction may branch on the data; what
costs is memory traffic and the fixed cost of each call into torch (a few microseconds).

A tensor is read in blocks of at most :data:`CHUNK` values (:mod:`lightning_inspect.core.chunks`). A
block that is contiguous float32 (or float64) is read where it lies; any other (fp16, bf16,
integers, bool, strided views) is converted to float32 (float64 stays float64) into one buffer
per thread, one block at a time, so nothing as large as the tensor is allocated. A block holding
NaN or Inf is reduced over its finite values (copied out: one block at most) and its NaN and Inf
are counted. With the C kernels a tensor of one block is reduced in one call; larger ones are
read block by block twice, once for every statistic and once for the histogram over the combined
range (a third read computes centred sums where the mean is comparable to the spread).

Where the package's C kernels are built (``lightning_inspect/core/_kernels.c``, compiled at install
where a C compiler is present) they do the work of each call, at about 1 ns a value and 4 µs a
call. Without them, the same rules run through torch and NumPy:

* **small tensors** (up to :data:`SMALL` values: biases, norm weights, heads) are reduced in
  float64 NumPy, exact without any rescaling (the kernels reduce them in float64 too);
* **other blocks** go through float32 torch calls (float64 for float64 tensors) whose temporaries
  (the absolute values, the histogram index) are written into one scratch buffer per thread that
  is allocated once and reused (fresh multi-megabyte temporaries cost a page fault per 4 KiB,
  more than the arithmetic), so each block stays in cache between passes.

A tensor whose float32 sums of squares overflow or underflow, or whose range is too narrow to
invert in float32, is read again as float64 (blocks converted as above). ``None`` is returned
only where even that cannot be exact (float64 values whose squares leave float64's range); the
caller then takes the general branch-free path. The row layout is
:data:`lightning_inspect.core.stats.FIELDS` followed by the histogram counts.

Example:
    >>> import torch
    >>> row = reduce_cpu(torch.tensor([0.0, 1.0, 2.0, 3.0, float("nan")]), bins=2)
    >>> row[:3].tolist(), row[9:11].tolist(), row[-2:].tolist()  # count, finite, sum; nan, inf
    ([5.0, 4.0, 6.0], [1.0, 0.0], [2.0, 2.0])
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import numpy as np
import torch

from lightning_inspect.core.chunks import as_vector, blocks

try:
    from lightning_inspect.core import _kernels
except ImportError:  # built without a C compiler: the torch/NumPy paths below do the same work
    _kernels = None

#: Tensors of up to this many values are reduced entirely in float64 (the kernels' own limit,
#: ``_kernels.WIDE_VALUES``, is the same; NumPy's float64 temporaries then stay under glibc's
#: 128 KiB mmap threshold, above which each call would page-fault them in afresh).
SMALL = 16384
#: Tensors are read in blocks of at most this many values (1 MiB of float32 per buffer).
CHUNK = 1 << 18

_HEAD_FIELDS = 11  # len(stats.FIELDS); kept here to avoid a circular import
_NAN, _INF = 9, 10  # their places in the head


class _Scratch(threading.local):
    """Reusable buffers per thread, use and dtype (hooks may run on autograd's worker threads)."""

    buffers: dict[tuple[str, torch.dtype], torch.Tensor]

    def __init__(self) -> None:
        self.buffers = {}


_scratch = _Scratch()


def _scratch_for(n: int, dtype: torch.dtype, use: str = "work") -> torch.Tensor:
    """A buffer of at least ``n`` elements of ``dtype`` for ``use`` ("input": converted blocks,
    "work": temporaries), this thread's own (slice it to size)."""
    buffers = _scratch.buffers
    buffer = buffers.get((use, dtype))
    if buffer is None or buffer.numel() < n:
        with torch.inference_mode(False):  # made in inference mode, it could not be written outside
            buffer = buffers[(use, dtype)] = torch.empty(n, dtype=dtype)
    return buffer


def reduce_cpu(x: torch.Tensor, bins: int) -> torch.Tensor | None:
    """The float64 row of a real CPU tensor with at least one value (any shape, strides, dtype).

    A tensor whose values or squares leave float32's range is read again in float64, which holds
    the squares of every float32 value. ``None`` where the fast paths cannot reduce exactly (see
    the module docstring).
    """
    if x.dtype == torch.float64:
        return _reduce_as(x, torch.float64, bins)
    row = _reduce_as(x, torch.float32, bins)
    return _reduce_as(x, torch.float64, bins) if row is None else row


def _reduce_as(x: torch.Tensor, dtype: torch.dtype, bins: int) -> torch.Tensor | None:
    """The row of ``x`` read as ``dtype`` (float32 or float64); ``None`` as above."""
    parts = blocks(x, CHUNK)
    in_place = x.dtype == dtype and not x.is_neg() and all(p.is_contiguous() for p in parts)
    buffer = None if in_place else _scratch_for(min(x.numel(), CHUNK), dtype, "input")
    if len(parts) > 1 or (_kernels is None and x.numel() > SMALL):
        return _reduce_blocks(parts, dtype, buffer, bins)
    v = as_vector(x, dtype, buffer)
    row = _reduce_vector(v, bins)
    if row is not None or bool(torch.isfinite(v).all()):
        return row
    finite, nan = _finite_part(v)
    if finite.numel() == 0:
        return _row(_nonfinite_head(v.numel(), nan), None, bins)
    row = _reduce_vector(finite, bins)
    if row is not None:
        row[0], row[_NAN], row[_INF] = v.numel(), nan, v.numel() - finite.numel() - nan
    return row


def _reduce_vector(v: torch.Tensor, bins: int) -> torch.Tensor | None:
    """The row of a contiguous vector of at most :data:`CHUNK` values in one call; ``None`` also
    where a value is not finite."""
    if _kernels is not None:
        row = torch.empty(_HEAD_FIELDS + max(bins, 0), dtype=torch.float64)
        is_double = v.dtype == torch.float64
        exact = _kernels.reduce_row(v.data_ptr(), v.numel(), is_double, bins, row.data_ptr())
        return row if exact else None
    return _reduce_small(v, bins)


def _finite_part(v: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The finite values of ``v`` (a copy) and the number of NaN in it."""
    return v[torch.isfinite(v)], int(torch.count_nonzero(torch.isnan(v)))


def _nonfinite_head(n: int, nan: int) -> list[float]:
    """The head of ``n`` values none of which is finite, ``nan`` of them NaN."""
    return [float(n), 0.0, 0.0, 0.0, 0.0, 0.0, math.inf, -math.inf, 0.0, float(nan), float(n - nan)]


def _row(head: list[float], counts: np.ndarray | None, bins: int) -> torch.Tensor:
    """The float64 row from its head and ``bins + 1`` counts (the last: values at the maximum)."""
    row = np.zeros(_HEAD_FIELDS + max(bins, 0), dtype=np.float64)
    row[:_HEAD_FIELDS] = head
    if bins > 0 and counts is not None:
        row[_HEAD_FIELDS:] = counts[:bins]
        row[-1] += counts[bins:].sum()  # the maximum itself, in the closed last bin
    return torch.from_numpy(row)


def _head(
    n: int,
    total: float,
    m2: float,
    sumsq: float,
    abs_sum: float,
    lo: float,
    hi: float,
    zeros: float,
) -> list[float]:
    return [float(n), float(n), total, m2, sumsq, abs_sum, lo, hi, zeros, 0.0, 0.0]


#: Below these magnitudes the largest squares come near the dtype's smallest normal number, where
#: sums of squares lose precision (float32: 1.2e-38; float64: 2.2e-308). ``_kernels.c`` uses the
#: same.
_TINY_SQUARE = {torch.float32: 1e-30, torch.float64: 1e-290}


def _squares_underflow(scale: float, dtype: torch.dtype) -> bool:
    """Whether the squares of values up to ``scale`` in magnitude are too small to sum exactly."""
    return 0.0 < scale * scale < _TINY_SQUARE[dtype]


def _reduce_small(v: torch.Tensor, bins: int) -> torch.Tensor | None:
    a = v.numpy().astype(np.float64)
    n = a.size
    if v.dtype == torch.float64:  # float32 values cannot overflow float64 sums of squares
        with np.errstate(over="ignore", invalid="ignore"):
            abs_sum, sumsq = float(np.abs(a).sum()), float(np.einsum("i,i->", a, a))
    else:
        with np.errstate(invalid="ignore"):  # NaN and Inf: the caller takes them out
            abs_sum, sumsq = float(np.abs(a).sum()), float(np.einsum("i,i->", a, a))
    if not (math.isfinite(abs_sum) and math.isfinite(sumsq)):
        return None
    total = float(a.sum())
    centred = a - total / n
    residual = float(centred.sum())
    m2 = max(float(np.einsum("i,i->", centred, centred)) - residual * residual / n, 0.0)
    lo, hi = float(a.min()), float(a.max())
    if v.dtype == torch.float64 and _squares_underflow(max(-lo, hi), torch.float64):
        return None  # (float32 values squared in float64 never come near its smallest number)
    head = _head(n, total, m2, sumsq, abs_sum, lo, hi, float(n - np.count_nonzero(a)))
    if bins <= 0 or hi == lo:
        return _row(head, _all_in_first_bin(n, bins), bins)
    factor = bins / (hi - lo)
    if not 0.0 < factor < 1e300:  # 0: a float64 range wider than float64 (hi - lo overflows)
        return None
    index = ((a - lo) * factor).astype(np.intp)  # values >= 0, so truncation is floor
    return _row(head, np.bincount(index, minlength=bins + 1), bins)


def _all_in_first_bin(n: int, bins: int) -> np.ndarray:
    counts = np.zeros(max(bins, 0) + 1)
    counts[0] = n
    return counts


# ---------------------------------------------------------------------------------------------
# Block by block: moments, centred sums, counts of one block each (C kernels or torch).
# ---------------------------------------------------------------------------------------------


def _reduce_blocks(
    parts: list[torch.Tensor], dtype: torch.dtype, buffer: torch.Tensor | None, bins: int
) -> torch.Tensor | None:
    """The row of the values of ``parts`` read block by block; ``None`` as above."""
    n = sum(p.numel() for p in parts)
    nonfinite: dict[int, int] = {}  # block index -> its NaN count, for blocks holding NaN or Inf
    kept = n
    moments = []
    for i, part in enumerate(parts):
        v = as_vector(part, dtype, buffer)
        m = _moments(v)
        if not (math.isfinite(m[1]) and math.isfinite(m[2])):
            if bool(torch.isfinite(v).all()):
                return None  # float32 sums of squares overflow: the general path rescales
            v, nonfinite[i] = _finite_part(v)
            kept -= part.numel() - v.numel()
            if v.numel() == 0:
                continue
            m = _moments(v)
        moments.append(m)
    nan = sum(nonfinite.values())
    if kept == 0:
        return _row(_nonfinite_head(n, nan), None, bins)
    per_block = np.stack(moments)
    with np.errstate(over="ignore"):
        total, sumsq, abs_sum = (float(per_block[:, i].sum()) for i in range(3))
    lo, hi = float(per_block[:, 3].min()), float(per_block[:, 4].max())
    if not (math.isfinite(abs_sum) and math.isfinite(sumsq)):
        return None  # sums beyond float64: the general path rescales
    if _squares_underflow(max(-lo, hi), dtype):
        return None  # sums beyond float64, or squares too small: the general path rescales
    zeros = float(per_block[:, 5].sum())

    def finite() -> Iterator[torch.Tensor]:  # one block at a time: they share one buffer
        return _finite_vectors(parts, dtype, buffer, nonfinite)

    m2 = sumsq - total * total / kept
    if m2 < 0.5 * sumsq:  # the mean is comparable to the spread: centre first, so nothing cancels
        centred = np.array([_centred(v, total / kept) for v in finite()])
        residual = float(centred[:, 0].sum())
        m2 = max(float(centred[:, 1].sum()) - residual * residual / kept, 0.0)
    head = _head(kept, total, m2, sumsq, abs_sum, lo, hi, zeros)
    head[0], head[_NAN], head[_INF] = float(n), float(nan), float(n - kept - nan)
    if bins <= 0 or hi == lo:
        return _row(head, _all_in_first_bin(kept, bins), bins)
    factor = bins / (hi - lo)
    if not 0.0 < factor < (1e300 if dtype == torch.float64 else 1e30):
        return None  # a range so narrow (float32 subnormals) that its inverse overflows float32,
        # or so wide (float64) that hi - lo overflows
    counts = np.zeros(bins + 1, dtype=np.int64)
    for v in finite():
        _count(v, lo, hi, bins, counts, mostly_zeros=zeros > kept / 4)
    return _row(head, counts, bins)


def _finite_vectors(
    parts: list[torch.Tensor],
    dtype: torch.dtype,
    buffer: torch.Tensor | None,
    nonfinite: dict[int, int],
) -> Iterator[torch.Tensor]:
    """The finite values of each block again, block by block (read lazily: one buffer)."""
    for i, part in enumerate(parts):
        v = as_vector(part, dtype, buffer)
        if i in nonfinite:
            v = v[torch.isfinite(v)]
        if v.numel():
            yield v


def _moments(v: torch.Tensor) -> np.ndarray:
    """``[sum, sumsq, abs_sum, min, max, zeros]`` of a contiguous vector (a non-finite value makes
    the sums non-finite)."""
    if _kernels is not None:
        out = np.empty(6, dtype=np.float64)
        _kernels.moments(v.data_ptr(), v.numel(), v.dtype == torch.float64, out.ctypes.data)
        return out
    magnitude = torch.abs(v, out=_scratch_for(v.numel(), v.dtype)[: v.numel()])
    lo, hi = torch.aminmax(v)
    # the dot of the contiguous magnitudes: BLAS accumulates strided vectors less exactly
    sums = [v.sum(), torch.dot(magnitude, magnitude), magnitude.sum(), lo, hi]
    sums.append(magnitude.sign_().sum())  # the number of nonzero values, after the sums above
    out = torch.stack(sums).numpy().astype(np.float64)
    out[5] = v.numel() - out[5]  # nonzero -> zeros
    return out


def _centred(v: torch.Tensor, mean: float) -> tuple[float, float]:
    """Sum of ``v - mean`` (mean rounded to ``v``'s dtype) and of its squares.

    The float32 mean is off by a rounding error the subtraction keeps; the caller removes the
    residual (``sum(c)**2 / n``), which keeps the result exact to float precision even for
    ``1e4 + 1e-3 * noise``.
    """
    if _kernels is not None:
        out = np.empty(2, dtype=np.float64)
        _kernels.centred(v.data_ptr(), v.numel(), v.dtype == torch.float64, mean, out.ctypes.data)
        return float(out[0]), float(out[1])
    centred = torch.sub(v, mean, out=_scratch_for(v.numel(), v.dtype)[: v.numel()])
    sums = torch.stack([centred.sum(), torch.dot(centred, centred)]).numpy().astype(np.float64)
    return float(sums[0]), float(sums[1])


def _count(
    v: torch.Tensor, lo: float, hi: float, bins: int, counts: np.ndarray, mostly_zeros: bool
) -> None:
    """Add the ``bins + 1`` counts of ``v`` over ``[lo, hi]`` to ``counts``; the last holds the
    values equal to ``hi``.

    ``mostly_zeros``: many values fall into one bin (ReLU gradients), which makes every increment
    wait for the previous one; counting byte pairs halves the increments (see :func:`_count_pairs`).
    """
    factor = bins / (hi - lo)
    if _kernels is not None:
        is_double = v.dtype == torch.float64
        _kernels.histogram(v.data_ptr(), v.numel(), is_double, lo, factor, bins, counts.ctypes.data)
        return
    size = v.numel()
    scratch = _scratch_for(size, v.dtype)[:size]
    # When the range holds 0, |lo * factor| <= bins and `factor * v - lo * factor` (one pass) is as
    # exact as `(v - lo) * factor` (two): both err by a few float32 ulps of `bins`.
    if lo <= 0.0 <= hi:
        offset = torch.tensor(-lo * factor, dtype=v.dtype)
        position = torch.add(offset, v, alpha=factor, out=scratch)
    else:
        position = torch.sub(v, lo, out=scratch).mul_(factor)
    index = position.view(torch.int32 if v.dtype == torch.float32 else torch.int64)  # same width
    index.copy_(position)  # in place: truncation, floor for values >= 0 (and 0 for -ulps)
    if bins >= 256:  # bincount runs about twice as fast over bytes: narrow the index when it fits
        counts += torch.bincount(index, minlength=bins + 1).numpy()
        return
    index = _scratch_for(size, torch.uint8)[:size].copy_(index)
    if mostly_zeros and bins < 128:  # a pair must fit a signed int16: second byte < 128
        counts += _count_pairs(index, bins)
    else:
        counts += torch.bincount(index, minlength=bins + 1).numpy()


def _count_pairs(index: torch.Tensor, bins: int) -> np.ndarray:
    """Counts of the byte ``index`` (values ``0..bins``, ``bins < 128``), read two bytes at a time.

    Viewed as int16, each pair of bytes is one number ``low + 256 * high`` (``bins < 128`` keeps it
    non-negative): one increment per pair into a (bins + 1) x 256 table, whose row sums count the
    high bytes and column sums the low ones, so their sum counts every byte whatever the byte
    order. For tensors whose values mostly share one bin this is about twice as fast.
    """
    size = index.numel()
    even = size - size % 2
    table = torch.bincount(index[:even].view(torch.int16), minlength=(bins + 1) * 256).numpy()
    table = table.reshape(bins + 1, 256)
    counts = table.sum(axis=1) + table[:, : bins + 1].sum(axis=0)
    if even < size:
        counts[int(index[-1])] += 1
    return counts
