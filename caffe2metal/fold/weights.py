"""Folded weights computed when asked for, a block of rows at a time."""
from __future__ import annotations

import numpy as np

from ..arrays import first_nonfinite
from ..errors import GraphError
from ..graph import Graph, Layer
from ..layers import registry

BLOCK_BYTES = 1 << 21           # folded weights are handed out 2 MiB at a time (see below)


class FoldedWeights:
    """A producer's folded weights ``W' = W*k``, computed when asked for.

    Holds only the source weights (a view of the caffemodel, at least two
    axes: ``_check_producer``) and the per-channel factors.  Slicing rows
    (``fw[i:j]``, axis 0) computes those rows; ``np.asarray(fw)`` computes all
    of them; :meth:`row_blocks` yields them ``BLOCK_BYTES`` at a time and shows
    each block to the ``observers`` (``metal.stream_folded`` writes the Metal
    file from the blocks the merged-caffemodel writer folds: one fold, two
    outputs).  No folded copy of a layer ever exists whole (a VGG fc6 is
    411 MB): the source pages are the only copy of the model in memory.

    Every row is computed in float64 and rounded to float32 once (numpy's
    buffered casting: no float64 copy of the weights either); a value that
    does not fit in float32 raises :class:`GraphError` naming the producer.

    Blocks are small on purpose: malloc serves 2 MiB again and again from
    memory it has already faulted in, while from 4 MiB on numpy asks for huge
    pages and every block becomes fresh memory the kernel must zero (measured
    on the VGG16 bench: 16 MiB blocks made folding 5x slower, 4-8 MiB blocks
    the whole conversion ~1.4x slower).
    """

    dtype = np.dtype(np.float32)

    def __init__(self, source: np.ndarray, mult: np.ndarray, *, file=None, layer: str = "",
                 chain: list[str] | None = None):
        self.source, self.mult = source, mult
        self.shape, self.ndim, self.size = source.shape, source.ndim, source.size
        self.nbytes = self.size * self.dtype.itemsize
        self.observers: list = []      # fn(first_row, rows) for every block row_blocks makes
        self._where = (file, layer, list(chain or []))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.shape[0])
            return self.rows(start, max(start, stop))
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None):
        a = self.rows(0, len(self))
        return a if dtype is None else a.astype(dtype, copy=False)

    def rows(self, start: int, stop: int) -> np.ndarray:
        w = self.source[start:stop]
        m = self.mult if self.mult.shape[0] == 1 else self.mult[start:stop]
        out = np.empty(w.shape, np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(w, m, out=out, dtype=np.float64, casting="same_kind")
        if not np.isfinite(out).all():
            self._overflow(w, start)
        return out

    def row_blocks(self, block_bytes: int | None = None):
        """The folded rows, ``block_bytes`` (default ``BLOCK_BYTES``) of them, at least
        one row, at a time."""
        block_bytes = BLOCK_BYTES if block_bytes is None else block_bytes
        n = len(self)
        rows = max(1, block_bytes // max(1, self.nbytes // max(1, n)))
        for i in range(0, n, rows):
            block = self.rows(i, min(n, i + rows))
            for observe in self.observers:
                observe(i, block)
            yield block

    def _overflow(self, w: np.ndarray, start: int):
        file, layer, chain = self._where
        bad = first_nonfinite(w)
        if bad is not None:                     # the source itself (not from the reader?)
            at = start * (self.size // max(1, len(self))) + bad
            raise GraphError(f"holds {w.reshape(-1)[bad]} at element {at}", file=file,
                             layer=layer, blob=0)
        raise GraphError(f"folding {', '.join(chain)} into it gives values beyond float32 (a "
                         "variance + eps near 0 or huge weights?)", file=file, layer=layer,
                         blob=0)


def folded_weights(graph: Graph, layer: Layer, k: np.ndarray, fold_layers=()) -> FoldedWeights:
    """``layer``'s weights followed by the per-channel factors ``k``, as a FoldedWeights."""
    w = np.asarray(layer.blobs[0])
    mult = registry.producer_of(layer.type).multiplier(layer, w, k)
    return FoldedWeights(w, mult, file=graph.source, layer=layer.name, chain=list(fold_layers))
