"""Read the overview's data through TensorBoard's data provider; the order in which tags were
written, which providers lose, from the start of the run's event file (:func:`key_order`)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Any

import numpy as np

from lightning_inspect.core.keys import FINDINGS_KEY
from lightning_inspect.overview.model import RunData, split_histogram_key, split_key

MAX_STEPS = 10_000  # steps read per series (TensorBoard keeps a sample of longer series)
MAX_EVENTS = 5_000  # events read per run for the order


def key_order(logdir: str, run: str) -> dict[str, int]:
    """``{tag: rank}`` of the library's tags of the first logged step of ``run``, in the order
    written; ``{}`` when the event files cannot be read (a remote log dir)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    files = sorted(glob.glob(os.path.join(logdir, run, "events.out.tfevents.*")))
    ranks: dict[str, int] = {}
    first_step: int | None = None
    with contextlib.suppress(Exception):  # unreadable: what was read, then the provider's order
        for n, event in enumerate(LegacyEventFileLoader(files[0]).Load() if files else ()):
            if n >= MAX_EVENTS or (first_step is not None and event.step > first_step):
                break
            for value in event.summary.value:
                if split_key(value.tag) or split_histogram_key(value.tag):
                    first_step = event.step if first_step is None else first_step
                    ranks.setdefault(value.tag, len(ranks))
    return ranks


class LogDirReader:
    """The overview's view of one TensorBoard data provider (one experiment)."""

    def __init__(self, provider: Any, logdir: str = "", experiment_id: str = "") -> None:
        self.provider, self.logdir, self.experiment_id = provider, logdir, experiment_id

    def _ask(self, ctx: Any, verb: str, plugin: str, run: str | None, tags: Any = None) -> Any:
        """``list`` or ``read`` the ``plugin``'s series of ``run`` (``None``: of every run)."""
        from tensorboard.data.provider import RunTagFilter

        method = getattr(self.provider, f"{verb}_{'scalars' if plugin == 'scalars' else 'tensors'}")
        kw: dict[str, Any] = {"downsample": MAX_STEPS} if verb == "read" else {}
        kw["run_tag_filter"] = RunTagFilter([run], tags) if run is not None else None
        found = method(ctx, experiment_id=self.experiment_id, plugin_name=plugin, **kw)
        return found if run is None else found.get(run, {})

    def runs(self, ctx: Any) -> list[str]:
        """The runs holding the library's statistics or histograms, in the provider's order."""
        found: dict[str, None] = {}
        for plugin, ours in (("scalars", split_key), ("histograms", split_histogram_key)):
            for run, tags in self._ask(ctx, "list", plugin, None).items():
                if any(ours(tag) is not None for tag in tags):
                    found.setdefault(run)
        return list(found)

    def version(self, ctx: Any, run: str) -> tuple[Any, ...]:
        """Changes whenever new data of ``run`` is loaded (to cache what is read)."""
        found = [self._ask(ctx, "list", p, run) for p in ("scalars", "histograms", "text")]
        return tuple(
            max(((s.max_step, s.max_wall_time) for s in f.values()), default=None) for f in found
        )

    def run_data(self, ctx: Any, run: str) -> RunData:
        """Statistics and findings of ``run``, and which layers have histograms."""
        data, rank = RunData(), key_order(self.logdir, run) if self.logdir else {}

        def order(tag: str) -> int:  # tags not in the first logged step: after those
            return rank.get(tag, len(rank))

        tags = sorted(
            (t for t in self._ask(ctx, "list", "scalars", run) if split_key(t)), key=order
        )
        read = self._ask(ctx, "read", "scalars", run, tags) if tags else {}
        by_step: dict[int, dict[str, float]] = {}
        for tag in tags:
            for datum in read.get(tag, ()):
                by_step.setdefault(datum.step, {})[tag] = datum.value
        for step in sorted(by_step):
            data.add_scalars(step, by_step[step])
        for tag in sorted(self._ask(ctx, "list", "histograms", run), key=order):
            data.note_histograms(tag)
        data.add_findings(self.findings(ctx, run))
        return data

    def findings(self, ctx: Any, run: str) -> list[dict[str, Any]]:
        """The health findings written to ``run``, oldest first."""
        ours = (FINDINGS_KEY, f"{FINDINGS_KEY}/text_summary")  # as SummaryWriter.add_text names it
        tags = [t for t in self._ask(ctx, "list", "text", run) if t in ours]
        read = self._ask(ctx, "read", "text", run, tags) if tags else {}
        found: list[dict[str, Any]] = []
        for datum in (d for tag in tags for d in read.get(tag, ())):
            for text in np.asarray(datum.numpy).reshape(-1):
                with contextlib.suppress(ValueError):  # not ours: skip it
                    found.extend(
                        json.loads(text.decode() if isinstance(text, bytes) else str(text))
                    )
        return found

    def histograms(self, ctx: Any, run: str, kind: str, layer: str) -> dict[str, Any]:
        """One layer's histograms over steps (``steps``, ``lo``, ``hi``, ``counts``)."""
        tag = f"{'weights' if kind == 'update_ratios' else kind}/{layer}"
        data = RunData()
        for datum in self._ask(ctx, "read", "histograms", run, [tag]).get(tag, ()):
            buckets = np.asarray(datum.numpy, dtype=np.float64).reshape(-1, 3)
            if len(buckets):
                data.add_histogram(tag, datum.step, buckets[0, 0], buckets[-1, 1], buckets[:, 2])
        return data.layer_histograms(*(split_histogram_key(tag) or (kind, layer)))
