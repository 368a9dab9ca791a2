"""Metal files of lazily folded layers, written from the blocks the merged caffemodel is."""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .. import fold
from ..errors import ExportError
from ..graph import Graph
from ..layers import registry
from ..mps.rows import RowBlocks
from .files import DTYPES, METAL_DIR, cast, to_bytes


class _Stream:
    """One layer's Metal weights written from the folded blocks the merged-caffemodel
    writer computes (``FoldedWeights.observers``), into a staging file."""

    def __init__(self, path: Path, blocks: RowBlocks, dtype: str, io):
        self.path, self.blocks, self.dtype, self.io = path, blocks, dtype, io
        self.rows, self.total = 0, blocks.shape[0]
        self.digest = hashlib.sha256()
        self.file: BinaryIO | None = None
        self.broken = False

    def __call__(self, start: int, rows: np.ndarray) -> None:
        if self.broken or start != self.rows:       # not in order: export() writes it anew
            self.broken = True
            return
        if self.file is None:
            try:
                self.file = open(self.path, "xb")  # noqa: SIM115  (closed in close())
            except OSError as e:
                raise ExportError(f"cannot write: {e.strerror}", file=self.path) from None
        data = to_bytes(self.blocks.convert(rows), self.dtype)
        if self.io is None:
            self.digest.update(data)
            self.file.write(data)
        else:
            self.io.hash(self.digest, data)
            self.io.write(self.file, data, name=self.path)
        self.rows += len(rows)
        if self.rows == self.total:
            self.close()

    @property
    def complete(self) -> bool:
        return not self.broken and self.rows == self.total and self.total > 0

    def close(self) -> None:
        if self.file is not None:
            if self.io is None:
                self.file.close()
            else:
                self.io.close_file(self.file, name=self.path)
            self.file = None


class Streams:
    """The Metal weights of lazily folded layers, written as the merged caffemodel is.

    Made by :func:`stream_folded` before the merged caffemodel is written;
    :func:`export` then renames each completed staging file to its final name
    (claimed in net order as usual) and takes its sha256, instead of folding
    and laying out the weights a second time.  Use as a context manager: files
    left open by a failed conversion are closed on the way out, and staging
    files nobody took are removed."""

    def __init__(self, dtype: str = "float32"):
        self.dtype = dtype
        self.by_source: dict[int, _Stream] = {}

    def take(self, array, path: Path, dtype: str):
        """The sha256 object of ``array``'s weights if a stream wrote them (now
        renamed to ``path``; its last bytes may still be on their way through the
        writer thread, into the same file), else None."""
        key = id(getattr(array, "source", None))
        stream = self.by_source.get(key)
        if stream is None or not stream.complete or dtype != self.dtype:
            return None
        del self.by_source[key]
        try:
            os.replace(stream.path, path)
        except OSError as e:
            raise ExportError(f"cannot write: {e.strerror}", file=path) from None
        return stream.digest

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for stream in self.by_source.values():        # never taken: not part of the output
            stream.close()
            with contextlib.suppress(OSError):
                os.unlink(stream.path)
        self.by_source.clear()
        return False


def stream_folded(model, merged: Graph, out, *, dtype: str = "float32", io=None) -> Streams:
    """Arrange for the Metal weights of every lazily folded layer whose layout goes row
    by row (convolution, depthwise, fully connected) to be written from the blocks the
    merged-caffemodel writer folds: one fold instead of two.  Call before writing the
    merged caffemodel, pass the result to :func:`export` after."""
    streams = Streams(dtype)
    if dtype not in DTYPES:
        return streams                                  # export() reports it
    directory = Path(out) / METAL_DIR
    shapes = model.shapes.blobs
    for i, layer in enumerate(merged.layers):
        w = layer.blobs[0] if layer.blobs else None
        spec = registry.get(layer.type)
        if (spec is None or spec.export is None or not isinstance(w, fold.FoldedWeights)
                or len(layer.bottoms) != 1 or len(layer.tops) != 1):
            continue
        try:
            geo = spec.export(layer, shapes.get(layer.bottoms[0]))
        except ExportError:
            continue                                    # export() reports it
        blocks = geo["weights"]
        if not isinstance(blocks, RowBlocks) or blocks.source is not w:
            continue
        owner = layer.name
        as_dtype = blocks.map(lambda b, owner=owner: cast(b, dtype, owner, checked=True))
        directory.mkdir(parents=True, exist_ok=True)
        stream = _Stream(directory / f".stream-{i}.partial", as_dtype, dtype, io)
        streams.by_source[id(w)] = stream
        w.observers.append(stream)
    return streams
