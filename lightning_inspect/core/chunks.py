"""Read a tensor of any shape, strides and dtype in pieces of bounded size, never copied whole.

:func:`blocks` splits a tensor into views that together hold each value once, each of at most
``size`` values: the tensor itself when it is small enough, else blocks of its
:func:`memory_order` (a transposed matrix is read as its contiguous base, at memory speed rather
than gathered across pages). :func:`as_vector` turns one block into a contiguous 1-D tensor of
the dtype a reduction works in, copying (into a caller's reusable buffer where given) only when
the block is not one already.

Example:
    >>> import torch
    >>> x = torch.arange(12.0).reshape(4, 3).t()  # a transposed view, 3 x 4
    >>> [tuple(b.shape) for b in blocks(x, 12)]  # small enough: itself
    [(3, 4)]
    >>> as_vector(x, torch.float32)[:4].tolist()  # copied in row-major order
    [0.0, 3.0, 6.0, 9.0]
    >>> [tuple(b.shape) for b in blocks(x, 8)]  # blocks of its memory order, the 4 x 3 base
    [(2, 3), (2, 3)]
    >>> as_vector(blocks(x, 8)[1], torch.float32).tolist()
    [6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
"""

from __future__ import annotations

import torch


def memory_order(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its dimensions permuted by decreasing stride (a view; the same values)."""
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    return x.permute(order)


def blocks(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Views of at most ``size`` values each (whole rows where a row fits) that hold each value of
    ``x`` once: ``[x]`` itself if it is small enough, else blocks of ``memory_order(x)``."""
    if x.numel() <= size or x.dim() == 0:
        return [x]
    return _split(memory_order(x), size)


def _split(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    if x.numel() <= size:
        return [x]
    if x.dim() == 1:
        return [x[start : start + size] for start in range(0, x.numel(), size)]
    row = x.numel() // x.shape[0]
    if row <= size:
        rows = size // row
        return [x[start : start + rows] for start in range(0, x.shape[0], rows)]
    return [piece for i in range(x.shape[0]) for piece in _split(x[i], size)]


def as_vector(
    block: torch.Tensor, dtype: torch.dtype, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """The values of ``block`` as a contiguous 1-D ``dtype`` tensor: a view where it is one already,
    else a copy, written into ``buffer`` (at least ``block.numel()`` values) when given.

    Lazy negative views are copied, so the result's memory holds the values as read.
    """
    if block.dtype == dtype and block.is_contiguous() and not block.is_neg():
        return block.reshape(-1)
    n = block.numel()
    out = buffer[:n] if buffer is not None else torch.empty(n, dtype=dtype, device=block.device)
    out.view(block.shape).copy_(block)
    return out
