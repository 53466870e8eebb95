"""lightning_inspect.core.recorder: step records, the single host transfer, the per-Trainer coordinator."""

from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import torch

from lightning_inspect.core.recorder import StepCoordinator, StepRecord, to_host
from lightning_inspect.core.stats import FIELDS, merge_rows, reduce_tensor, summarise

F = {name: i for i, name in enumerate(FIELDS)}


def test_step_record_truthiness_and_order() -> None:
    rec = StepRecord(step=4)
    assert not rec
    rec.add_scalar("param_grads/global_norm", torch.tensor(1.5))
    assert rec
    rec.add_row("b", reduce_tensor(torch.ones(2), bins=0))
    rec.add_row("a", reduce_tensor(torch.ones(2), bins=0))
    assert [k for k, _ in rec.rows] == ["b", "a"]


def test_to_host_merges_rows_by_key_in_first_seen_order() -> None:
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(5, generator=g), torch.randn(7, generator=g), torch.randn(3, generator=g)]
    rec = StepRecord(step=2)
    rec.add_row("shared", reduce_tensor(parts[0], bins=4))
    rec.add_row("other", reduce_tensor(parts[1], bins=4))
    rec.add_row("shared", reduce_tensor(parts[2], bins=4))
    rec.add_scalar("norm", torch.tensor(3.25, dtype=torch.float32))
    rec.add_scalar("ratio", torch.tensor(0.5, dtype=torch.float64))
    [(rows, scalars)] = to_host([rec])
    assert list(rows) == ["shared", "other"]
    expected = merge_rows(
        np.stack([reduce_tensor(parts[0], bins=4).numpy(), reduce_tensor(parts[2], bins=4).numpy()])
    )
    np.testing.assert_array_equal(rows["shared"], expected)
    np.testing.assert_array_equal(rows["other"], reduce_tensor(parts[1], bins=4).numpy())
    s = summarise(rows["shared"])
    both = torch.cat([parts[0], parts[2]]).double().numpy()
    assert s["mean"] == pytest.approx(both.mean(), rel=1e-6) and rows["shared"][F["count"]] == 8
    assert scalars == {"norm": 3.25, "ratio": 0.5}


def test_to_host_keeps_records_apart_and_handles_empty_ones() -> None:
    a, b, empty = StepRecord(0), StepRecord(0), StepRecord(0)
    a.add_row("k", reduce_tensor(torch.tensor([1.0, 2.0]), bins=0))
    b.add_row("k", reduce_tensor(torch.tensor([10.0]), bins=0))
    b.add_scalar("s", torch.tensor(float("nan")))
    out = to_host([a, empty, b])
    assert summarise(out[0][0]["k"])["mean"] == 1.5
    assert out[1] == ({}, {})
    assert summarise(out[2][0]["k"])["mean"] == 10.0
    assert math.isnan(out[2][1]["s"])


def test_to_host_makes_one_transfer_for_all_records(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = torch.Tensor.cpu

    def counting_cpu(self: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(self.numel())
        return original(self, *args, **kwargs)

    records = []
    rows = [reduce_tensor(torch.randn(10), bins=8) for _ in range(3)]
    for i in range(3):
        r = StepRecord(i)
        r.add_row(f"k{i}", rows[i])  # float64 on the CPU already: read in place, no copy
        r.add_row(f"f{i}", rows[i].to(torch.float32))  # as a device row would need: transferred
        r.add_scalar(f"s{i}", torch.tensor(float(i)))
        records.append(r)
    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    out = to_host(records)
    monkeypatch.undo()
    assert len(calls) == 1 and calls[0] == 3 * (len(FIELDS) + 8 + 1)
    assert [o[1] for o in out] == [{"s0": 0.0}, {"s1": 1.0}, {"s2": 2.0}]
    for i, (host_rows, _) in enumerate(out):
        np.testing.assert_array_equal(host_rows[f"k{i}"], rows[i].numpy())
        np.testing.assert_allclose(host_rows[f"f{i}"], rows[i].numpy(), rtol=1e-6)


class Member:
    def __init__(self, name: str, log: list, fail: bool = False) -> None:
        self.name = name
        self.log = log
        self.fail = fail

    def publish(self, record: StepRecord, values) -> None:  # type: ignore[no-untyped-def]
        self.log.append((self.name, record.step, values[1]))
        if self.fail:
            raise RuntimeError(f"{self.name} failed")


def _record(step: int, value: float) -> StepRecord:
    r = StepRecord(step)
    r.add_scalar("v", torch.tensor(value))
    return r


def test_coordinator_flushes_when_the_last_member_ends_its_batch() -> None:
    log: list = []
    c = StepCoordinator()
    a, b = Member("a", log), Member("b", log)
    c.join(a)
    c.join(b)
    c.join(a)  # idempotent
    c.submit(_record(0, 1.0), a.publish)
    c.batch_end(a)
    assert log == []  # b has not finished its batch yet
    c.submit(_record(0, 2.0), b.publish)
    c.batch_end(b)
    assert log == [("a", 0, {"v": 1.0}), ("b", 0, {"v": 2.0})]
    c.batch_end(b)
    assert len(log) == 2  # nothing pending, nothing published twice


def test_coordinator_publishes_everything_then_reraises_the_first_error() -> None:
    log: list = []
    c = StepCoordinator()
    a, b, d = Member("a", log, fail=True), Member("b", log, fail=True), Member("d", log)
    for m in (a, b, d):
        c.join(m)
        c.submit(_record(3, 0.0), m.publish)
    with pytest.raises(RuntimeError, match="a failed"):
        c.batch_end(d)
    assert [name for name, _, _ in log] == ["a", "b", "d"]
    c.flush()
    assert len(log) == 3


def test_coordinator_leave_flushes_pending() -> None:
    log: list = []
    c = StepCoordinator()
    a, b = Member("a", log), Member("b", log)
    c.join(a)
    c.join(b)
    c.submit(_record(5, 1.0), a.publish)
    c.leave(a)
    assert log == [("a", 5, {"v": 1.0})]
    c.submit(_record(6, 1.0), b.publish)
    c.batch_end(b)
    assert len(log) == 2


def test_coordinator_is_per_trainer_and_dropped_with_it() -> None:
    class T:
        pass

    t1, t2 = T(), T()
    c1 = StepCoordinator.for_trainer(t1)
    assert StepCoordinator.for_trainer(t1) is c1
    assert StepCoordinator.for_trainer(t2) is not c1
    alive = weakref.ref(t1)
    del t1
    gc.collect()
    assert alive() is None  # the coordinator does not keep the Trainer alive
    assert all(c is not c1 for c in StepCoordinator._instances.values())  # and goes with it
