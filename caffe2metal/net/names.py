"""Unique names for the values of a net's blobs.

Caffe lets a layer write its result into its input blob ("in place": top j
has the name of bottom j), so one blob name can stand for several values.
The graph gives every value its own name: the first write keeps the file's
name, the k-th later write of ``x`` is ``x#k``.  A name the file itself uses
anywhere is never given to another value: should ``x#1`` be a blob of the file,
the in-place write of ``x`` becomes ``x##1`` (and so on), so an internal name
can never be mistaken for a user's blob.

As Caffe's ``Net::AppendTop`` does, a top that is not in place may not reuse a
name that already holds a value ("produced by multiple sources").
"""
from __future__ import annotations

from ..caffe.proto import caffe_pb2
from ..caffe.prototxt import ParsedNet
from ..errors import GraphError
from ..graph import Graph


class BlobNames:
    """The naming of one net's values, in the order they are written."""

    def __init__(self, graph: Graph, parsed: ParsedNet):
        self.graph = graph
        self.current: dict[str, str] = {}     # file blob name -> unique name of its latest value
        self.writes: dict[str, int] = {}
        self.taken: set[str] = set(parsed.net.input)   # every name the file uses
        for msg in parsed.layers:
            self.taken.update(msg.bottom)
            self.taken.update(msg.top)

    def define(self, name: str) -> str:
        """A new value of file blob ``name``; returns its unique name."""
        k = self.writes.get(name, 0)
        self.writes[name] = k + 1
        unique = name if k == 0 else self._internal(name, k)
        self.current[name] = unique
        self.graph.blob_names[unique] = name
        return unique

    def write(self, name: str, msg: caffe_pb2.LayerParameter, j: int, path: str) -> str:
        """Top ``j`` of layer ``msg``: in place when bottom ``j`` has the same name,
        else a name that holds no value yet."""
        in_place = j < len(msg.bottom) and msg.bottom[j] == name
        if name in self.current and not in_place:
            raise GraphError(f"top '{name}' is produced by multiple sources (an earlier layer or "
                             f"input already writes it, and this is not in place: Caffe refuses "
                             "such a net)", file=path, layer=msg.name)
        return self.define(name)

    def read(self, name: str, path: str, layer: str) -> str:
        if name not in self.current:
            raise GraphError(f"bottom '{name}' is not produced by any earlier layer or input",
                             file=path, layer=layer)
        return self.current[name]

    def _internal(self, name: str, k: int) -> str:
        marks = "#"
        while (unique := f"{name}{marks}{k}") in self.taken or unique in self.graph.blob_names:
            marks += "#"
        self.taken.add(unique)
        return unique
