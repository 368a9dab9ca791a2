"""The record of a net read from disk, shared by the reader and the weight attacher."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..caffe import textproto
from ..graph import Graph
from . import shapes as shape_rules


@dataclass
class Model:
    """A net as read from disk: the TEST-phase graph plus what the writers need."""
    graph: Graph
    document: textproto.Document          # the prototxt text and its field spans
    blocks: list[textproto.Field]         # the file's layer blocks, in order
    excluded: list[str] = field(default_factory=list)   # layers dropped by phase rules
    excluded_blocks: list[int] = field(default_factory=list)   # their block indices
    net_unknown_fields: list[str] = field(default_factory=list)
    prototxt: str = ""
    caffemodel: str | None = None
    shapes: shape_rules.Shapes = field(default_factory=shape_rules.Shapes)
    v1: bool = False
    # a train/test net read as a deploy net (net.reader): the layers dropped (name, type, why),
    # one error line per net input without a shape, and the edits of the text (start, end,
    # replacement) that make the merged prototxt declare the inputs
    dropped: list[tuple[str, str, str]] = field(default_factory=list)
    missing_inputs: list[str] = field(default_factory=list)
    text_edits: list[tuple[int, int, str]] = field(default_factory=list)
    # the TEST-phase data layers that have a transform_param: (layer, type, first top, the
    # transform_param as a dict); read for the manifest's preprocessing, nothing else
    data_transforms: list[tuple[str, str, str, dict]] = field(default_factory=list)
