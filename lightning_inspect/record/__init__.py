"""The run record: :class:`RunRecord` and what it records, one concept per module."""

from lightning_inspect.record.callback import RunRecord
from lightning_inspect.record.construction import (
    RecordInit,
    construction_record,
    record_init,
    unrecorded,
)

__all__ = ["RecordInit", "RunRecord", "construction_record", "record_init", "unrecorded"]
