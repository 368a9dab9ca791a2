"""The net as plain Python objects: layers, unique blob names, consumers.

Caffe lets a layer write its result into its input blob ("in place"), so one
blob name can stand for several values.  The graph gives every value its own
name: the first write keeps the file's name, later writes get ``name#1``,
``name#2``, ...  ``Graph.blob_names`` maps each unique name back to the name
in the file.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Layer:
    name: str
    type: str                      # modern Caffe type string, e.g. "Convolution"
    bottoms: list[str]             # unique blob names (see module doc)
    tops: list[str]
    params: dict = field(default_factory=dict)
    """The layer's ``*_param`` messages as nested dicts: only fields written in
    the file, repeated fields as lists, enums by name, e.g.
    ``{"convolution_param": {"num_output": 32, "kernel_size": [3]}}``."""
    blobs: list = field(default_factory=list)
    """Parameter blobs in Caffe's shapes (float32 unless the file held doubles): numpy
    arrays, or after ``fold.apply(lazy=True)`` a producer's ``FoldedWeights``."""
    unknown_fields: list[str] = field(default_factory=list)
    """Fields in the file that our schema does not know (kept verbatim on write)."""
    shared_params: list[str] = field(default_factory=list)
    """Names given in ``param { name: ... }``: layers naming the same one share that blob."""
    index: int = -1                # position among the file's layer blocks


@dataclass
class Graph:
    name: str = ""
    layers: list[Layer] = field(default_factory=list)
    inputs: dict[str, tuple] = field(default_factory=dict)   # unique blob name -> declared shape
    blob_names: dict[str, str] = field(default_factory=dict)  # unique blob name -> name in the file
    source: str = ""               # prototxt path, for messages
    _index: dict[str, Layer] = field(default_factory=dict, init=False, repr=False, compare=False)
    _indexed: tuple[list[Layer] | None, int] = field(default=(None, 0), init=False, repr=False,
                                                     compare=False)

    def layer(self, name: str) -> Layer:
        """The first layer called ``name`` (KeyError if none), found through an index
        rebuilt whenever ``layers`` has been replaced or grown."""
        indexed, count = self._indexed           # the list itself is held: no id reuse
        if indexed is not self.layers or count != len(self.layers):
            index: dict[str, Layer] = {}
            for layer in self.layers:
                index.setdefault(layer.name, layer)
            self._index, self._indexed = index, (self.layers, len(self.layers))
        return self._index[name]

    def producers(self) -> dict[str, Layer]:
        return {top: layer for layer in self.layers for top in layer.tops}

    def consumers(self) -> dict[str, list[Layer]]:
        users: dict[str, list[Layer]] = {}
        for layer in self.layers:
            for bottom in layer.bottoms:
                users.setdefault(bottom, []).append(layer)
        return users

    def outputs(self) -> list[str]:
        """Blobs nobody reads: the net's outputs, as Caffe defines them."""
        read = {b for layer in self.layers for b in layer.bottoms}
        return [t for layer in self.layers for t in layer.tops if t not in read]
