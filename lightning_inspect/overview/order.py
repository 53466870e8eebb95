"""The model order of a run's keys, read from the start of its event files.

TensorBoard's data providers do not keep the order in which tags were written (the Rust data
server returns them in hash order), but the monitors write all keys of a logged step in one
event, in execution order. The first events of a run therefore give the order: every tag ranks by
its first appearance, up to the end of the first logged step.
"""

from __future__ import annotations

import glob
import os

from lightning_inspect.overview.model import split_histogram_key, split_key

#: Events read at most per run (the first logged step's events come first in the file).
MAX_EVENTS = 5_000


def key_order(logdir: str, run: str) -> dict[str, int]:
    """``{tag: rank}`` of the lightning-inspect tags of the first logged step of ``run``.

    Empty when the run's event files cannot be read (a remote log dir): the caller keeps the
    data provider's order then.
    """
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    files = sorted(glob.glob(os.path.join(logdir, run, "events.out.tfevents.*")))
    if not files:
        return {}
    ranks: dict[str, int] = {}
    first_step: int | None = None
    try:
        for n, event in enumerate(LegacyEventFileLoader(files[0]).Load()):
            if n >= MAX_EVENTS or (first_step is not None and event.step > first_step):
                break
            for value in event.summary.value:
                tag = value.tag
                if split_key(tag) is None and split_histogram_key(tag) is None:
                    continue
                if first_step is None:
                    first_step = event.step
                ranks.setdefault(tag, len(ranks))
    except Exception:  # an unreadable file: fall back to the provider's order
        return ranks
    return ranks
