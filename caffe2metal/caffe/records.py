"""The records a caffemodel is read into: :class:`ModelLayer` and :class:`CaffeModel`.

Duplicate layer names
---------------------
:func:`~caffe2metal.caffe.caffemodel.read_caffemodel` returns every layer in
file order, duplicates included.  Caffe's ``Net::CopyTrainedLayersFrom`` walks
the source layers in order and copies each into the *first* net layer with
that name, so when a caffemodel repeats a name the *last* occurrence is what
Caffe ends up using.  :meth:`CaffeModel.by_name` implements exactly that (last
one wins); :meth:`CaffeModel.duplicate_names` lists the names concerned.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ModelLayer", "CaffeModel", "PROTO_BYTES_LIMIT"]

PROTO_BYTES_LIMIT = 2**31 - 1       # Caffe's kProtoReadBytesLimit (INT_MAX)


@dataclass
class ModelLayer:
    """One layer of a caffemodel: its name, modern type string and blobs."""

    name: str
    type: str
    blobs: list[np.ndarray] = field(default_factory=list)


class CaffeModel(list):
    """The layers of a caffemodel in file order (a ``list[ModelLayer]``).

    ``net_name`` is ``NetParameter.name`` ("" if absent); ``path`` the file
    read (or the label given to
    :func:`~caffe2metal.caffe.caffemodel.parse_caffemodel`).
    """

    def __init__(self, layers: Iterable[ModelLayer] = (), net_name: str = "",
                 path: str | None = None):
        super().__init__(layers)
        self.net_name = net_name
        self.path = path

    def by_name(self) -> dict[str, ModelLayer]:
        """Name -> layer with Caffe's semantics: the last occurrence wins."""
        return {layer.name: layer for layer in self}

    def duplicate_names(self) -> list[str]:
        """Names that occur more than once, in order of first occurrence."""
        seen: dict[str, int] = {}
        for layer in self:
            seen[layer.name] = seen.get(layer.name, 0) + 1
        return [name for name, n in seen.items() if n > 1]

    def __repr__(self) -> str:
        return (f"CaffeModel(net_name={self.net_name!r}, path={self.path!r}, "
                f"layers={len(self)})")
