"""The statistics row's layout, defined here only: one float64 vector of the :class:`Field`
sufficient statistics (sums over the finite values; ``m2``: squared deviations from their mean;
``count``: all values), then ``bins`` histogram counts over ``[min, max]``. The C kernels write
the same layout; their field count is checked against :data:`N_FIELDS` where they are loaded.

Example:
    >>> int(Field.NAN), FIELDS[Field.NAN], N_FIELDS, row_length(bins=4)
    (9, 'nan', 11, 15)
"""

from __future__ import annotations

from enum import IntEnum


class Field(IntEnum):
    """Index of each sufficient statistic in a row."""

    COUNT = 0
    FINITE = 1
    SUM = 2
    M2 = 3
    SUMSQ = 4
    ABS_SUM = 5
    MIN = 6
    MAX = 7
    ZEROS = 8
    NAN = 9
    INF = 10


#: The names of the fields, in row order.
FIELDS = tuple(f.name.lower() for f in Field)
N_FIELDS = len(FIELDS)


def row_length(bins: int) -> int:
    return N_FIELDS + bins
