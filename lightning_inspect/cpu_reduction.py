"""The CPU fast path of :func:`lightning_inspect.stats.reduce_tensor`, for tensors of finite values.

On the CPU reading a value back costs nothing, so the reduction may branch on the data; what
costs is memory traffic and the fixed cost of each call into torch (a few microseconds).

Where the package's C kernels are built (``lightning_inspect/_kernels.c``, compiled at install
where a C compiler is present), one call reads the tensor twice, once for every statistic and once
for the histogram, at about 1 ns a value and 4 µs a call. Without them, the same rules run through
torch and NumPy, on two paths that keep both costs low:

* **small tensors** (biases, norm weights, heads: up to :data:`SMALL` values) are reduced in
  float64 NumPy, about fifteen calls of a microsecond or two each, exact without any rescaling;
* **larger tensors** are reduced in chunks of at most :data:`CHUNK` values. Every temporary (the
  absolute values, the histogram index) is written into one scratch buffer per thread that is
  allocated once and reused, so no pass allocates (fresh multi-megabyte temporaries cost a page
  fault per 4 KiB, more than the arithmetic) and each chunk stays in cache between passes.

All return ``None`` where they cannot be exact cheaply (a value or a square outside float32's
range, a histogram range too narrow to invert); the caller then takes the general branch-free
path. The row layout is :data:`lightning_inspect.stats.FIELDS` followed by the histogram counts.

Example:
    >>> import torch
    >>> row = reduce_finite(torch.tensor([0.0, 1.0, 2.0, 3.0]), bins=2)
    >>> row[:3].tolist(), row[-2:].tolist()  # count, finite, sum ... then two bins
    ([4.0, 4.0, 6.0], [2.0, 2.0])
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

try:
    from lightning_inspect import _kernels
except ImportError:  # built without a C compiler: the torch/NumPy paths below do the same work
    _kernels = None

#: Tensors of up to this many values take the NumPy path (its float64 temporaries stay under
#: glibc's 128 KiB mmap threshold; above it each call would page-fault them in afresh).
SMALL = 16384
#: Larger tensors are reduced this many values at a time (1.25 MiB of scratch per thread).
CHUNK = 1 << 18

_HEAD_FIELDS = 11  # len(stats.FIELDS); kept here to avoid a circular import


class _Scratch(threading.local):
    """One reusable buffer per thread and dtype (hooks may run on autograd's worker threads)."""

    buffers: dict[torch.dtype, torch.Tensor]

    def __init__(self) -> None:
        self.buffers = {}


_scratch = _Scratch()


def _scratch_for(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A buffer of at least ``n`` elements of ``dtype``, this thread's own (slice it to size)."""
    buffers = _scratch.buffers
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < n:
        with torch.inference_mode(False):  # made in inference mode, it could not be written outside
            buffer = buffers[dtype] = torch.empty(n, dtype=dtype)
    return buffer


def reduce_finite(v: torch.Tensor, bins: int) -> torch.Tensor | None:
    """The float64 row of a 1-D float32/float64 CPU tensor, or ``None`` if it holds a non-finite value.

    Also ``None`` in the rare cases the fast paths cannot reduce exactly (see the module docstring).
    """
    if _kernels is not None:  # a strided view is copied: one path, so a view reduces like its copy
        return _reduce_native(v.contiguous(), bins)
    if v.numel() <= SMALL:
        return _reduce_small(v, bins)
    return _reduce_chunked(v, bins)


def _row(head: list[float], counts: np.ndarray | None, bins: int) -> torch.Tensor:
    """The float64 row from its head and ``bins + 1`` counts (the last: values at the maximum)."""
    row = np.empty(_HEAD_FIELDS + max(bins, 0), dtype=np.float64)
    row[:_HEAD_FIELDS] = head
    if bins > 0:
        assert counts is not None
        row[_HEAD_FIELDS:] = counts[:bins]
        row[-1] += counts[bins:].sum()  # the maximum itself, in the closed last bin
    return torch.from_numpy(row)


def _head(n: int, total: float, m2: float, sumsq: float, abs_sum: float, lo: float, hi: float, zeros: float) -> list[float]:
    return [float(n), float(n), total, m2, sumsq, abs_sum, lo, hi, zeros, 0.0, 0.0]


#: Below these magnitudes the largest squares come near the dtype's smallest normal number, where
#: sums of squares lose precision (float32: 1.2e-38; float64: 2.2e-308). ``_kernels.c`` uses the same.
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


def _reduce_native(v: torch.Tensor, bins: int) -> torch.Tensor | None:
    """The row of a contiguous vector from the C kernels, written in place; ``None`` as above."""
    row = torch.empty(_HEAD_FIELDS + max(bins, 0), dtype=torch.float64)
    exact = _kernels.reduce_row(v.data_ptr(), v.numel(), v.dtype == torch.float64, bins, row.data_ptr())
    return row if exact else None


def _all_in_first_bin(n: int, bins: int) -> np.ndarray:
    counts = np.zeros(max(bins, 0) + 1)
    counts[0] = n
    return counts


def _reduce_chunked(v: torch.Tensor, bins: int) -> torch.Tensor | None:
    n = v.numel()
    if n <= CHUNK:
        chunks = [(v, n)]
    else:
        chunks = [(v[start : start + CHUNK], min(CHUNK, n - start)) for start in range(0, n, CHUNK)]
    scratch = _scratch_for(chunks[0][1], v.dtype)

    sums = []
    for chunk, size in chunks:
        magnitude = torch.abs(chunk, out=scratch[:size])
        lo, hi = torch.aminmax(chunk)
        # the dot of the contiguous magnitudes: BLAS accumulates strided vectors less exactly
        sums += [chunk.sum(), magnitude.sum(), torch.dot(magnitude, magnitude), lo, hi, magnitude.sign_().sum()]
    per_chunk = torch.stack(sums).view(-1, 6).numpy().astype(np.float64)
    total, abs_sum, sumsq = (math.fsum(per_chunk[:, i]) for i in range(3))
    if not (math.isfinite(abs_sum) and math.isfinite(sumsq)):
        return None  # a non-finite value, or float32 sums that overflow: the general path decides
    lo, hi = float(per_chunk[:, 3].min()), float(per_chunk[:, 4].max())
    if _squares_underflow(max(-lo, hi), v.dtype):
        return None  # the general path rescales
    nonzero = float(per_chunk[:, 5].sum())

    m2 = sumsq - total * total / n
    if m2 < 0.5 * sumsq:  # the mean is comparable to the spread: centre first, so nothing cancels
        m2 = _centred_m2(chunks, scratch, total / n, n)
    head = _head(n, total, m2, sumsq, abs_sum, lo, hi, n - nonzero)
    if bins <= 0 or hi == lo:
        return _row(head, _all_in_first_bin(n, bins), bins)
    counts = _counts_chunked(chunks, scratch, lo, hi, bins, mostly_zeros=n - nonzero > n / 4)
    return None if counts is None else _row(head, counts, bins)


def _centred_m2(chunks: list[tuple[torch.Tensor, int]], scratch: torch.Tensor, mean: float, n: int) -> float:
    """Sum of squared deviations, from values minus the (rounded) mean and the residual mean.

    The float32 mean is off by a rounding error the subtraction keeps; removing the residual
    (``sum(c)**2 / n``) keeps the result exact to float precision even for ``1e4 + 1e-3 * noise``.
    """
    sums = []
    for chunk, size in chunks:
        centred = torch.sub(chunk, mean, out=scratch[:size])
        sums += [centred.sum(), torch.dot(centred, centred)]
    per_chunk = torch.stack(sums).view(-1, 2).numpy().astype(np.float64)
    residual = math.fsum(per_chunk[:, 0])
    return max(math.fsum(per_chunk[:, 1]) - residual * residual / n, 0.0)


def _counts_chunked(
    chunks: list[tuple[torch.Tensor, int]],
    scratch: torch.Tensor,
    lo: float,
    hi: float,
    bins: int,
    mostly_zeros: bool = False,
) -> np.ndarray | None:
    """``bins + 1`` counts over ``[lo, hi]``; the last holds the values equal to ``hi``.

    ``mostly_zeros``: many values fall into one bin (ReLU gradients), which makes every increment
    wait for the previous one; counting byte pairs halves the increments (see :func:`_count_pairs`).
    """
    factor = bins / (hi - lo)
    if not 0.0 < factor < 1e30:
        return None  # a range so narrow (subnormals) that its inverse overflows float32, or so
        # wide (float64) that hi - lo overflows
    index_dtype = torch.int32 if scratch.dtype == torch.float32 else torch.int64  # same width
    # bincount runs about twice as fast over bytes: narrow the index when it fits in one
    narrow = _scratch_for(chunks[0][1], torch.uint8) if bins < 256 else None
    counts = np.zeros(bins + 1, dtype=np.int64)
    # When the range holds 0, |lo * factor| <= bins and `factor * v - lo * factor` (one pass) is as
    # exact as `(v - lo) * factor` (two): both err by a few float32 ulps of `bins`.
    offset = torch.tensor(-lo * factor, dtype=scratch.dtype) if lo <= 0.0 <= hi else None
    for chunk, size in chunks:
        if offset is not None:
            position = torch.add(offset, chunk, alpha=factor, out=scratch[:size])  # in [0, bins]
        else:
            position = torch.sub(chunk, lo, out=scratch[:size]).mul_(factor)
        index = position.view(index_dtype)
        index.copy_(position)  # in place: truncation, floor for values >= 0 (and 0 for -ulps)
        if narrow is None:
            counts += torch.bincount(index, minlength=bins + 1).numpy()
            continue
        index = narrow[:size].copy_(index)
        if mostly_zeros and bins < 128:  # a pair must fit a signed int16: second byte < 128
            counts += _count_pairs(index, bins)
        else:
            counts += torch.bincount(index, minlength=bins + 1).numpy()
    return counts


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
