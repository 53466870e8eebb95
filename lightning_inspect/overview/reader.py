"""Read the overview's data of a TensorBoard log dir through TensorBoard's data provider.

Scalars come from the ``scalars`` plugin, histograms (written with ``add_histogram_raw``) from
the ``histograms`` plugin as ``[left, right, count]`` buckets, and health findings from the
JSON text that :class:`~lightning_inspect.HealthMonitor` writes under :data:`FINDINGS_KEY`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from lightning_inspect.core.keys import FINDINGS_KEY
from lightning_inspect.overview.model import RunData, split_histogram_key, split_key
from lightning_inspect.overview.order import key_order

#: At most this many steps per series are read (TensorBoard keeps a sample of longer series).
MAX_STEPS = 10_000


class LogDirReader:
    """The overview's view of one TensorBoard data provider (one experiment)."""

    def __init__(self, provider: Any, logdir: str = "", experiment_id: str = "") -> None:
        self.provider = provider
        self.logdir = logdir
        self.experiment_id = experiment_id

    def _list(self, ctx: Any, plugin: str, run: str | None = None) -> dict[str, dict[str, Any]]:
        from tensorboard.data.provider import RunTagFilter

        run_filter = RunTagFilter(runs=[run]) if run is not None else None
        method = self.provider.list_scalars if plugin == "scalars" else self.provider.list_tensors
        return method(
            ctx, experiment_id=self.experiment_id, plugin_name=plugin, run_tag_filter=run_filter
        )

    def runs(self, ctx: Any) -> list[str]:
        """The runs holding lightning-inspect statistics or histograms, in the provider's order."""
        found: dict[str, None] = {}
        for run, tags in self._list(ctx, "scalars").items():
            if any(split_key(tag) is not None for tag in tags):
                found.setdefault(run)
        for run, tags in self._list(ctx, "histograms").items():
            if any(split_histogram_key(tag) is not None for tag in tags):
                found.setdefault(run)
        return list(found)

    def version(self, ctx: Any, run: str) -> tuple[Any, ...]:
        """Changes whenever new data of ``run`` is loaded (to cache what is read)."""
        marks = []
        for plugin in ("scalars", "histograms", "text"):
            series = self._list(ctx, plugin, run).get(run, {})
            marks.append(
                max(((s.max_step, s.max_wall_time) for s in series.values()), default=None)
            )
        return tuple(marks)

    def run_data(self, ctx: Any, run: str) -> RunData:
        """Statistics, findings and the (empty) histogram series of ``run``.

        Histograms are read one layer at a time with :meth:`histograms`; here only which layers
        have them is noted (an empty series keeps the layer's place in the order).
        """
        from tensorboard.data.provider import RunTagFilter

        data = RunData()
        rank = key_order(self.logdir, run) if self.logdir else {}
        last = len(rank)  # tags not in the first logged step: after those, in the provider's order

        def in_model_order(tags: Any) -> list[str]:
            return sorted(tags, key=lambda tag: rank.get(tag, last))

        tags = in_model_order(
            t for t in self._list(ctx, "scalars", run).get(run, {}) if split_key(t)
        )
        if tags:
            read = self.provider.read_scalars(
                ctx,
                experiment_id=self.experiment_id,
                plugin_name="scalars",
                downsample=MAX_STEPS,
                run_tag_filter=RunTagFilter(runs=[run], tags=tags),
            ).get(run, {})
            by_step: dict[int, dict[str, float]] = {}
            for tag in tags:
                for datum in read.get(tag, ()):
                    by_step.setdefault(datum.step, {})[tag] = datum.value
            for step in sorted(by_step):
                data.add_scalars(step, by_step[step])
        for tag in in_model_order(self._list(ctx, "histograms", run).get(run, {})):
            data.note_histograms(tag)
        data.add_findings(self.findings(ctx, run))
        return data

    def findings(self, ctx: Any, run: str) -> list[dict[str, Any]]:
        """The health findings written to ``run`` (all of them, oldest first)."""
        from tensorboard.data.provider import RunTagFilter

        # SummaryWriter.add_text writes the tag with "/text_summary" appended
        tags = [
            t
            for t in self._list(ctx, "text", run).get(run, {})
            if t in (FINDINGS_KEY, f"{FINDINGS_KEY}/text_summary")
        ]
        if not tags:
            return []
        read = self.provider.read_tensors(
            ctx,
            experiment_id=self.experiment_id,
            plugin_name="text",
            downsample=MAX_STEPS,
            run_tag_filter=RunTagFilter(runs=[run], tags=tags),
        ).get(run, {})
        found: list[dict[str, Any]] = []
        for datum in (d for tag in tags for d in read.get(tag, ())):
            for text in np.asarray(datum.numpy).reshape(-1):
                raw = text.decode("utf-8") if isinstance(text, bytes) else str(text)
                try:
                    found.extend(json.loads(raw))
                except ValueError:
                    continue  # not ours: skip it
        return found

    def histograms(self, ctx: Any, run: str, kind: str, layer: str) -> dict[str, Any]:
        """One layer's histograms over steps (``steps``, ``lo``, ``hi``, ``counts``)."""
        from tensorboard.data.provider import RunTagFilter

        tag = f"{'weights' if kind == 'update_ratios' else kind}/{layer}"
        read = self.provider.read_tensors(
            ctx,
            experiment_id=self.experiment_id,
            plugin_name="histograms",
            downsample=MAX_STEPS,
            run_tag_filter=RunTagFilter(runs=[run], tags=[tag]),
        ).get(run, {})
        data = RunData()
        for datum in read.get(tag, ()):
            buckets = np.asarray(datum.numpy, dtype=np.float64).reshape(-1, 3)
            if len(buckets):
                data.add_histogram(tag, datum.step, buckets[0, 0], buckets[-1, 1], buckets[:, 2])
        found = split_histogram_key(tag)
        if found is None or found[0] not in data.kinds:
            return {"steps": [], "lo": [], "hi": [], "counts": []}
        return data.layer_histograms(*found)
