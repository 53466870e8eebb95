"""The CPU fast path of :func:`lightning_inspect.stats.reduce_tensor`, for tensors of finite values.

On the CPU reading a value back costs nothing, so the reduction may branch on the data; what
costs is memory traffic and the fixed cost of each call into torch (a few microseconds). Two
paths keep both low:

* **small tensors** (biases, norm weights, heads: up to :data:`SMALL` values) are reduced in
  float64 NumPy, about fifteen calls of a microsecond or two each, exact without any rescaling;
* **larger tensors** are reduced in chunks of at most :data:`CHUNK` values. Every temporary (the
  absolute values, the histogram index) is written into one scratch buffer per thread that is
  allocated once and reused, so no pass allocates (fresh multi-megabyte temporaries cost a page
  fault per 4 KiB, more than the arithmetic) and each chunk stays in cache between passes.

Both return ``None`` where they cannot be exact cheaply (a value or a square outside float32's
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

#: Tensors of up to this many values take the NumPy path.
SMALL = 4096
#: Larger tensors are reduced this many values at a time (1 MiB of float32 scratch per thread).
CHUNK = 1 << 18

_HEAD_FIELDS = 11  # len(stats.FIELDS); kept here to avoid a circular import


class _Scratch(threading.local):
    """One reusable buffer per thread and dtype (hooks may run on autograd's worker threads)."""

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def get(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffers.get(dtype)
        if buffer is None or buffer.numel() < n:
            buffer = self.buffers[dtype] = torch.empty(n, dtype=dtype)
        return buffer[:n]


_scratch = _Scratch()


def reduce_finite(v: torch.Tensor, bins: int) -> torch.Tensor | None:
    """The float64 row of a 1-D float32/float64 CPU tensor, or ``None`` if it holds a non-finite value.

    Also ``None`` in the rare cases the fast paths cannot reduce exactly (see the module docstring).
    """
    if v.numel() <= SMALL:
        return _reduce_small(v, bins)
    return _reduce_chunked(v, bins)


def _head(n: int, total: float, m2: float, sumsq: float, abs_sum: float, lo: float, hi: float, zeros: float) -> list[float]:
    return [float(n), float(n), total, m2, sumsq, abs_sum, lo, hi, zeros, 0.0, 0.0]


def _reduce_small(v: torch.Tensor, bins: int) -> torch.Tensor | None:
    a = v.numpy().astype(np.float64)
    n = a.size
    with np.errstate(over="ignore", invalid="ignore"):  # float64 values beyond 1e154: checked below
        abs_sum = float(np.abs(a).sum())
        sumsq = float(np.dot(a, a))
    if not (math.isfinite(abs_sum) and math.isfinite(sumsq)):
        return None
    total = float(a.sum())
    centred = a - total / n
    residual = float(centred.sum())
    m2 = max(float(np.dot(centred, centred)) - residual * residual / n, 0.0)
    lo, hi = float(a.min()), float(a.max())
    row = np.empty(_HEAD_FIELDS + max(bins, 0), dtype=np.float64)
    row[:_HEAD_FIELDS] = _head(n, total, m2, sumsq, abs_sum, lo, hi, float(n - np.count_nonzero(a)))
    if bins > 0:
        counts = _counts_small(a, lo, hi, bins)
        if counts is None:
            return None
        row[_HEAD_FIELDS:] = counts
    return torch.from_numpy(row)


def _counts_small(a: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray | None:
    if hi == lo:
        counts = np.zeros(bins)
        counts[0] = a.size
        return counts
    factor = bins / (hi - lo)
    if not factor < 1e300:
        return None
    index = ((a - lo) * factor).astype(np.intp)  # values >= 0, so truncation is floor
    counts = np.bincount(index, minlength=bins + 1)
    counts[bins - 1] += counts[bins:].sum()  # the maximum itself, in the closed last bin
    return counts[:bins]


def _reduce_chunked(v: torch.Tensor, bins: int) -> torch.Tensor | None:
    n = v.numel()
    chunks = [v[start : start + CHUNK] for start in range(0, n, CHUNK)]
    scratch = _scratch.get(len(chunks[0]), v.dtype)

    sums = []
    for chunk in chunks:
        magnitude = torch.abs(chunk, out=scratch[: len(chunk)])
        lo, hi = torch.aminmax(chunk)
        sums.append(
            torch.stack(
                # the dot of the contiguous magnitudes: BLAS accumulates strided vectors less exactly
                [chunk.sum(), magnitude.sum(), torch.dot(magnitude, magnitude), lo, hi, magnitude.sign_().sum()]
            )
        )
    per_chunk = (torch.stack(sums) if len(sums) > 1 else sums[0][None]).tolist()
    total = math.fsum(row[0] for row in per_chunk)
    abs_sum = math.fsum(row[1] for row in per_chunk)
    sumsq = math.fsum(row[2] for row in per_chunk)
    if not (math.isfinite(abs_sum) and math.isfinite(sumsq)):
        return None  # a non-finite value, or float32 sums that overflow: the general path decides
    lo, hi = min(row[3] for row in per_chunk), max(row[4] for row in per_chunk)
    if sumsq == 0.0 and hi > lo:
        return None  # squares underflow float32: the general path rescales
    nonzero = sum(row[5] for row in per_chunk)

    m2 = sumsq - total * total / n
    if m2 < 0.5 * sumsq:  # the mean is comparable to the spread: centre first, so nothing cancels
        m2 = _centred_m2(chunks, scratch, total / n, n)
    head = torch.tensor(_head(n, total, m2, sumsq, abs_sum, lo, hi, float(n - nonzero)), dtype=torch.float64)
    if bins <= 0:
        return head
    counts = _counts_chunked(chunks, scratch, lo, hi, bins)
    if counts is None:
        return None
    return torch.cat([head, counts.to(torch.float64)])


def _centred_m2(chunks: list[torch.Tensor], scratch: torch.Tensor, mean: float, n: int) -> float:
    """Sum of squared deviations, from values minus the (rounded) mean and the residual mean.

    The float32 mean is off by a rounding error the subtraction keeps; removing the residual
    (``sum(c)**2 / n``) keeps the result exact to float precision even for ``1e4 + 1e-3 * noise``.
    """
    sums = []
    for chunk in chunks:
        centred = torch.sub(chunk, mean, out=scratch[: len(chunk)])
        sums.append(torch.stack([centred.sum(), torch.dot(centred, centred)]))
    per_chunk = torch.stack(sums).tolist()
    residual = math.fsum(row[0] for row in per_chunk)
    return max(math.fsum(row[1] for row in per_chunk) - residual * residual / n, 0.0)


def _counts_chunked(
    chunks: list[torch.Tensor], scratch: torch.Tensor, lo: float, hi: float, bins: int
) -> torch.Tensor | None:
    if hi == lo:
        counts = torch.zeros(bins, dtype=torch.int64)
        counts[0] = sum(len(chunk) for chunk in chunks)
        return counts
    factor = bins / (hi - lo)
    if not factor < 1e30:
        return None  # a range so narrow (subnormals) that its inverse overflows float32
    index_dtype = torch.int32 if scratch.dtype == torch.float32 else torch.int64  # same width
    counts = None
    for chunk in chunks:
        position = torch.sub(chunk, lo, out=scratch[: len(chunk)]).mul_(factor)  # in [0, bins]
        index = position.view(index_dtype)
        index.copy_(position)  # in place: truncation, which is floor for values >= 0
        chunk_counts = torch.bincount(index, minlength=bins + 1)
        counts = chunk_counts if counts is None else counts.add_(chunk_counts)
    assert counts is not None
    counts[bins - 1] += counts[bins:].sum()  # the maximum itself, in the closed last bin
    return counts[:bins]
