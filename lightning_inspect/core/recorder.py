"""A logging step's reduced values: kept on the device, moved to the host in one transfer per
device for every monitor of a Trainer (:class:`StepCoordinator`), rows of one key merged, and
per-rank rows combined across data-parallel ranks.

Example:
    >>> import torch
    >>> from lightning_inspect.core.stats import reduce_tensor
    >>> rec = StepRecord()
    >>> rec.add_row("activations/fc", reduce_tensor(torch.ones(3), bins=0))
    >>> rec.add_row("activations/fc", reduce_tensor(torch.zeros(1), bins=0))
    >>> rec.add_scalar("param_grads/global_norm", torch.tensor(2.0))
    >>> rows, scalars = to_host([rec])[0]
    >>> float(rows["activations/fc"][0]), scalars
    (4.0, {'param_grads/global_norm': 2.0})
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from lightning_inspect.core.keys import is_per_rank
from lightning_inspect.core.stats import merge_rows


@dataclass
class StepRecord:
    """Device tensors of one monitor for one logging step, in the order they were produced."""

    step: int = -1
    rows: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    scalars: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    def add_row(self, key: str, row: torch.Tensor) -> None:
        self.rows.append((key, row))

    def add_scalar(self, key: str, value: torch.Tensor) -> None:
        self.scalars.append((key, value))

    def __bool__(self) -> bool:
        return bool(self.rows or self.scalars)


HostRecord = tuple[dict[str, np.ndarray], dict[str, float]]


def to_host(records: Sequence[StepRecord]) -> list[HostRecord]:
    """Per record, ``({key: merged row}, {key: scalar})`` (first-seen order); one transfer per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    places: list[list[tuple[str, Any]]] = []  # per record: (key, host array or (device, index))
    for record in records:
        place: list[tuple[str, Any]] = []
        for key, tensor in [*record.rows, *record.scalars]:
            if tensor.device.type == "cpu" and tensor.dtype == torch.float64 and tensor.dim() == 1:
                place.append((key, tensor.detach().numpy()))  # a CPU row: on the host already
                continue
            flat = tensor.detach().reshape(-1).to(torch.float64)
            parts = by_device.setdefault(flat.device, [])
            place.append((key, (flat.device, len(parts))))
            parts.append(flat)
        places.append(place)
    host = {
        device: np.split(torch.cat(parts).cpu().numpy(), np.cumsum([p.numel() for p in parts]))
        for device, parts in by_device.items()
    }
    out: list[HostRecord] = []
    for record, place in zip(records, places, strict=True):
        values = [(k, v if isinstance(v, np.ndarray) else host[v[0]][v[1]]) for k, v in place]
        n_rows = len(record.rows)
        grouped: dict[str, list[np.ndarray]] = {}
        for key, value in values[:n_rows]:
            grouped.setdefault(key, []).append(value)
        rows = {k: v[0] if len(v) == 1 else merge_rows(np.stack(v)) for k, v in grouped.items()}
        out.append((rows, {key: float(value[0]) for key, value in values[n_rows:]}))
    return out


def distributed_world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def combine_across_ranks(host: list[HostRecord]) -> list[HostRecord]:
    """Merge the rows of :data:`~lightning_inspect.core.keys.PER_RANK_KINDS` over the ranks
    that have them (a collective: one ``all_gather_object``); the rest is the same on all ranks."""
    payload = [{k: v for k, v in rows.items() if is_per_rank(k)} for rows, _ in host]
    gathered: list[list[dict[str, np.ndarray]] | None] = [None] * distributed_world_size()
    torch.distributed.all_gather_object(gathered, payload)
    combined: list[HostRecord] = []
    for i, (rows, scalars) in enumerate(host):
        per_rank = [g[i] for g in gathered if g is not None and i < len(g)]
        merged = dict(rows)
        for key in dict.fromkeys(k for part in per_rank for k in part):  # ordered union
            merged[key] = merge_rows(np.stack([part[key] for part in per_rank if key in part]))
        combined.append((merged, scalars))
    return combined


Publisher = Callable[[StepRecord, HostRecord], None]
#: Receives what monitors published: step, scalars, histograms (by key), health findings.
Observer = Callable[[int, Mapping[str, float], Mapping[str, Any], Sequence[Any]], None]


class StepCoordinator:
    """One per Trainer: its monitors share one device-to-host transfer per logging step (the
    last member's :meth:`batch_end` transfers and publishes every submitted record)."""

    _instances: ClassVar[weakref.WeakKeyDictionary[object, StepCoordinator]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self) -> None:
        self._members: list[int] = []
        self._pending: list[tuple[StepRecord, Publisher]] = []
        self.observers: list[Observer] = []
        #: Called after each :meth:`flush` has published every record (e.g. to send the step).
        self.flushed: list[Callable[[], None]] = []

    @classmethod
    def for_trainer(cls, trainer: object) -> StepCoordinator:
        return cls._instances.setdefault(trainer, cls())

    def join(self, member: object) -> None:
        if id(member) not in self._members:
            self._members.append(id(member))

    def leave(self, member: object) -> None:
        self.flush()
        if id(member) in self._members:
            self._members.remove(id(member))

    def submit(self, record: StepRecord, publish: Publisher) -> None:
        """Queue a record, even empty (under DDP every rank takes part in the collective)."""
        self._pending.append((record, publish))

    def batch_end(self, member: object) -> None:
        if not self._members or id(member) == self._members[-1]:
            self.flush()

    def notify(
        self,
        step: int,
        scalars: Mapping[str, float],
        histograms: Mapping[str, Any],
        findings: Sequence[Any] = (),
    ) -> None:
        for observer in self.observers:
            observer(step, scalars, histograms, findings)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        host = to_host([record for record, _ in pending])
        if distributed_world_size() > 1:
            host = combine_across_ranks(host)
        first_error: Exception | None = None
        for (record, publish), values in zip(pending, host, strict=False):
            try:
                publish(record, values)
            except Exception as exc:  # publish every record, then re-raise the first error
                first_error = first_error or exc
        for done in list(self.flushed):
            done()
        if first_error is not None:
            raise first_error
