"""Read a Caffe prototxt into a ``caffe.NetParameter``, with the text's field spans.

The text is parsed into our compiled ``caffe.NetParameter`` (``textfill``: the
same result as protobuf's ``text_format``, from the field tree ``textproto``
builds anyway; ``text_format`` itself for what ``textfill`` does not support).
Before that, ``textproto`` records the span of every field, so that

* fields our schema does not know (fork extensions) are reported per layer
  block, skipped when filling the messages, and kept verbatim for the merged
  file;
* the merged prototxt can be written as the original text with edits.

V1 ``layers { type: CONVOLUTION }`` nets are upgraded to modern layers
(:func:`~caffe2metal.caffe.v1.upgrade_v1`).  Layers are filtered for a phase
with Caffe's NetStateRule logic (:func:`included`); the graph itself is built
by ``caffe2metal.net.reader``.
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import NamedTuple

from google.protobuf import text_format

from ..errors import ModelFormatError
from ..paths import open_regular, read_all
from . import textfill, textproto
from .proto import caffe_pb2
from .v1 import upgrade_v1

__all__ = ["MAX_PROTOTXT_BYTES", "ParsedNet", "NetState", "parse_prototxt", "read_text",
           "declared_inputs", "test_state", "included", "layer_params", "nan_field",
           "message_to_dict"]

_NET = caffe_pb2.NetParameter.DESCRIPTOR

MAX_PROTOTXT_BYTES = 2**31 - 1         # Caffe's kProtoReadBytesLimit


@dataclass
class ParsedNet:
    """A prototxt parsed: the messages, and where each part stands in the text."""
    path: str
    net: caffe_pb2.NetParameter
    document: textproto.Document                # the prototxt text and its field spans
    blocks: list[textproto.Field]               # the file's layer blocks, in order
    layers: list[caffe_pb2.LayerParameter]      # one per block (V1 layers upgraded)
    block_unknown: dict[int, list[str]]         # block index -> fields the schema lacks
    net_unknown: list[str]                      # unknown fields outside any layer block
    v1: bool = False                            # written as V1 ``layers`` entries


class NetState(NamedTuple):
    """The state layers are filtered for (Caffe's ``NetState``)."""
    phase: int
    level: int
    stages: set[str]


def parse_prototxt(path: str) -> ParsedNet:
    """Read and parse the prototxt at ``path``; ModelFormatError if it is not one."""
    text = read_text(path)
    doc = textproto.parse(text, path)
    unknown = textproto.unknown_fields(doc.fields, _NET)
    net = _fill_net(doc, unknown, path)
    blocks = [f for f in doc.fields if f.name in ("layer", "layers")]
    layers, v1 = _layer_messages(net, blocks, path)
    block_unknown, net_unknown = _unknown_by_block(unknown, blocks)
    return ParsedNet(path=path, net=net, document=doc, blocks=blocks, layers=layers,
                     block_unknown=block_unknown, net_unknown=net_unknown, v1=v1)


# ---------------------------------------------------------------- the text

def _binary(path: str) -> ModelFormatError:
    return ModelFormatError("this is binary data, not a text prototxt "
                            "(a .caffemodel passed where the .prototxt belongs?)", file=path)


def read_text(path: str) -> str:
    """The file's text (UTF-8, BOM dropped), refusing binary data, huge files, names that
    are not UTF-8 and anything but a regular file (a FIFO, a device: never a hang)."""
    fd, st = open_regular(path, "prototxt", ModelFormatError)
    path = os.fsdecode(path)
    try:
        if st.st_size > MAX_PROTOTXT_BYTES:
            raise ModelFormatError(f"is larger than {MAX_PROTOTXT_BYTES} bytes, the "
                                   "most Caffe reads", file=path)
        head = os.pread(fd, 65536, 0) if hasattr(os, "pread") else b""
        if b"\x00" in head:                 # a caffemodel: stop here
            raise _binary(path)
        raw = bytes(read_all(fd, st.st_size, path, "prototxt", ModelFormatError))
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFormatError(f"not UTF-8 text at byte {e.start}: this looks like binary data, "
                               "not a text prototxt", file=path) from None
    return text.lstrip("\ufeff")


# ---------------------------------------------------------------- the messages

def _fill_net(doc: textproto.Document, unknown: list[tuple[str, textproto.Field]],
              path: str) -> caffe_pb2.NetParameter:
    """The NetParameter the text describes, without the ``unknown`` fields."""
    net = caffe_pb2.NetParameter()
    try:        # from the field tree we already have (equal to text_format, see textfill)
        textfill.fill(doc, doc.fields, net, skip={id(f) for _, f in unknown})
    except textfill.Unsupported:        # message lists, extensions: protobuf's own parser
        net.Clear()
        try:
            text_format.Parse(textproto.blank(doc.text, [(f.start, f.end) for _, f in unknown]),
                              net)
        except text_format.ParseError as e:
            raise ModelFormatError(f"{e}", file=path) from None
    return net


def _layer_messages(net: caffe_pb2.NetParameter, blocks: list[textproto.Field],
                    path: str) -> tuple[list[caffe_pb2.LayerParameter], bool]:
    """(the layers as modern messages, one per block; whether the net is V1)."""
    if net.layer and net.layers:
        raise ModelFormatError("mixes modern 'layer' and V1 'layers' entries", file=path)
    v1 = bool(net.layers)
    messages = [upgrade_v1(m, path) for m in net.layers] if v1 else list(net.layer)
    if not messages:
        raise ModelFormatError("defines no layers (is this a Caffe deploy prototxt?)", file=path)
    if len(messages) != len(blocks) or any(b.is_list for b in blocks):
        # `layer: [{...}, {...}]`: one text block for several layers
        raise ModelFormatError("layers given as a list (layer: [...]) are not supported: write "
                               "one 'layer { ... }' block per layer", file=path)
    return messages, v1


def _unknown_by_block(unknown: list[tuple[str, textproto.Field]],
                      blocks: list[textproto.Field]) -> tuple[dict[int, list[str]], list[str]]:
    """The unknown fields of each layer block (by block index, paths relative to
    the layer) and those outside every block (net level, full dotted paths)."""
    per_block: dict[int, list[str]] = {}
    net_unknown = []
    starts = [b.start for b in blocks]          # top-level fields: in order, disjoint
    for dotted, f in unknown:
        i = bisect.bisect_right(starts, f.start) - 1
        idx = i if i >= 0 and f.start < blocks[i].end else None
        if idx is None:
            net_unknown.append(dotted)
        else:
            relative = dotted.split(".", 1)[1] if "." in dotted else dotted
            per_block.setdefault(idx, []).append(relative)
    return per_block, net_unknown


def declared_inputs(net: caffe_pb2.NetParameter, path: str) -> list[tuple[str, tuple]]:
    """(name, shape) of each net-level ``input``, from input_shape or input_dim."""
    names = list(net.input)
    if net.input_shape:
        if len(net.input_shape) != len(names):
            raise ModelFormatError(f"{len(names)} inputs but {len(net.input_shape)} input_shape "
                                   "entries", file=path)
        return [(n, tuple(s.dim)) for n, s in zip(names, net.input_shape, strict=False)]
    if net.input_dim:
        if len(net.input_dim) != 4 * len(names):
            raise ModelFormatError(f"{len(names)} inputs need {4 * len(names)} input_dim values, "
                                   f"found {len(net.input_dim)}", file=path)
        dims = list(net.input_dim)
        return [(n, tuple(dims[4 * i:4 * i + 4])) for i, n in enumerate(names)]
    if names:
        raise ModelFormatError(f"input '{names[0]}' has no input_shape or input_dim", file=path)
    return []


# ---------------------------------------------------------------- phase rules

def test_state(net: caffe_pb2.NetParameter) -> NetState:
    """The TEST phase with the net's own level and stages."""
    return NetState(caffe_pb2.TEST, net.state.level, set(net.state.stage))


def meets(rule: caffe_pb2.NetStateRule, phase: int, level: int, stages: set[str]) -> bool:
    """Caffe's Net::StateMeetsRule."""
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if rule.HasField("min_level") and level < rule.min_level:
        return False
    if rule.HasField("max_level") and level > rule.max_level:
        return False
    if any(s not in stages for s in rule.stage):
        return False
    return not any(s in stages for s in rule.not_stage)


def included(msg: caffe_pb2.LayerParameter, state: NetState) -> bool:
    """Whether the layer is part of the net in ``state`` (its include/exclude rules)."""
    if msg.include:
        return any(meets(r, *state) for r in msg.include)
    return not any(meets(r, *state) for r in msg.exclude)


# ---------------------------------------------------------------- parameters

def _to_python(fd, value):
    if fd.message_type is not None:
        return message_to_dict(value)
    if fd.enum_type is not None:
        v = fd.enum_type.values_by_number.get(value)
        return v.name if v is not None else value
    return value


def message_to_dict(msg) -> dict:
    """The fields set in ``msg`` as plain Python values (enums by name)."""
    out = {}
    for fd, value in msg.ListFields():
        if fd.is_repeated:
            out[fd.name] = [_to_python(fd, v) for v in value]
        else:
            out[fd.name] = _to_python(fd, value)
    return out


def layer_params(msg: caffe_pb2.LayerParameter) -> dict:
    """The layer's ``*_param`` messages as dicts, by field name."""
    return {fd.name: message_to_dict(v) for fd, v in msg.ListFields()
            if fd.name.endswith("_param") and fd.message_type is not None}


def nan_field(value: object, where: str = "") -> str | None:
    """Dotted path of the first NaN among the parameter values, or None."""
    if isinstance(value, float):
        return where if value != value else None
    if isinstance(value, dict):
        children = [(f"{where}.{k}" if where else k, v) for k, v in value.items()]
    elif isinstance(value, list):
        children = [(where, v) for v in value]
    else:
        children = []
    for path, v in children:
        if (found := nan_field(v, path)) is not None:
            return found
    return None
