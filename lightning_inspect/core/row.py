"""The statistics row: its layout is defined here and nowhere else.

A row is one float64 vector: the sufficient statistics named by :class:`Field`, in that order,
then ``bins`` histogram counts of the finite values over ``[min, max]``. ``m2`` is the sum of
squared deviations from the mean of the finite values; every sum is over the finite values;
``count`` counts all values, NaN and Inf included. The C kernels (``_kernels.c``) write the same
layout: they report their field count, checked against :data:`N_FIELDS` where they are loaded.

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
    """Length of a row with ``bins`` histogram counts."""
    return N_FIELDS + bins
