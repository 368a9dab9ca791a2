"""Layout conversions a block of rows at a time, for weights too big to copy whole."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

ROW_BLOCK_BYTES = 1 << 21      # small blocks: malloc reuses them (see fold.BLOCK_BYTES)


class RowBlocks:
    """A big layout conversion done a block of output rows at a time, so that the
    converted copy never exists whole: ``shape`` of the result, iterate for blocks."""

    def __init__(self, shape, rows_source, convert: Callable, block_bytes: int | None = None):
        block_bytes = ROW_BLOCK_BYTES if block_bytes is None else block_bytes
        self.shape = tuple(shape)
        self.source, self.convert = rows_source, convert
        row = max(1, rows_source[:1].nbytes)
        self.rows = max(1, block_bytes // row)

    def __iter__(self):
        for i in range(0, self.shape[0], self.rows):
            yield self.convert(self.source[i:i + self.rows])

    def map(self, fn: Callable) -> RowBlocks:
        out = RowBlocks.__new__(RowBlocks)
        out.shape, out.source, out.rows = self.shape, self.source, self.rows
        out.convert = lambda rows: fn(self.convert(rows))
        return out


def layout(shape, w, convert: Callable):
    """``convert(w)``, or the same a block of rows at a time (a :class:`RowBlocks`) when
    ``w`` is big or computed lazily (not an ndarray: ``fold.FoldedWeights``): the
    converted copy then never exists whole."""
    if not isinstance(w, np.ndarray) or w.nbytes > ROW_BLOCK_BYTES:
        convert(w[:1])                              # the checks, on one row
        return RowBlocks(shape, w, convert)
    return convert(np.asarray(w))
