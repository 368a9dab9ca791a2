"""Read a deploy prototxt (and its caffemodel) into a Graph.

Prototxt
    Parsed by ``caffe.prototxt.parse_prototxt`` (the NetParameter, the text's
    field spans, unknown fields per layer block, V1 nets upgraded).  From that,
    :func:`read_prototxt` builds the TEST-phase graph: blobs written more than
    once get ``name#k`` unique names, layers are filtered with Caffe's
    NetStateRule logic (the excluded ones are recorded for the merged file),
    and shapes are inferred.

Caffemodel
    Attached by :func:`~caffe2metal.net.weights.attach_weights`: read by
    ``caffemodel.read_caffemodel`` (zero-copy) and matched to layers by name,
    as Caffe's ``CopyTrainedLayersFrom`` does; blob counts and shapes are
    checked against what each layer type expects.

Train/test prototxts
    A net whose data comes from a data layer (``Data``, ``ImageData``,
    ``HDF5Data``, ``MemoryData``, ``DummyData``, ``WindowData``,
    ``AnnotatedData``) is read as the deploy net Caffe users write by hand: the
    data layer's first top becomes a net input (its shape from
    ``input_shapes``, i.e. ``--input-shape``, or from ``DummyData``/
    ``MemoryData``'s own fields), its other tops (labels) are dropped, and so is
    every layer that only training needs: ``Accuracy``, ``*Loss`` and whatever
    reads a label.  ``Model.dropped`` says which and why; ``Model.text_edits``
    turn the merged prototxt into a deploy file (a net-level ``input`` +
    ``input_shape`` where the data layer was declared; the dropped blocks are
    cut as ``excluded_blocks``).  ``input_shapes`` also sets the shape of a
    declared ``input`` or ``Input`` layer.  A net input without a shape is an
    error of :func:`read_model` naming the layer and how to give the shape
    (``allow_unknown_inputs=True``: recorded in ``Model.missing_inputs``, the
    shapes after it unknown, as ``inspect`` shows them).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..caffe import prototxt
from ..caffe.proto import caffe_pb2
from ..errors import ModelFormatError
from ..graph import Graph, Layer
from . import shapes as shape_rules
from .model import Model
from .names import BlobNames
from .weights import attach_weights

__all__ = ["DATA_TYPES", "InputShapes", "Model", "attach_weights", "parse_input_shape",
           "read_model", "read_prototxt"]

# Layers that read training data (Caffe's and the SSD fork's): a train/test prototxt's input
DATA_TYPES = frozenset({"Data", "ImageData", "HDF5Data", "MemoryData", "DummyData",
                        "WindowData", "AnnotatedData"})

InputShapes = Mapping[str, Sequence[int]]     # blob (or layer) name, "" = the only input -> shape

def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``[NAME=]N,C,H,W`` -> (NAME or "", shape); ModelFormatError when malformed."""
    name, _, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape) or len(shape) > 32:
        raise ModelFormatError(f"--input-shape {text!r}: expected [NAME=]N,C,H,W with positive "
                               "integers, e.g. 1,3,224,224 or data=1,3,224,224")
    return name.strip(), shape


def read_model(prototxt: str | os.PathLike, caffemodel: str | os.PathLike | None = None, *,
               input_shapes: InputShapes | None = None,
               allow_unknown_inputs: bool = False) -> Model:
    """The net (TEST phase, as a deploy net) and its weights.

    ``input_shapes``: see the module doc.  A net input with no shape is an error
    unless ``allow_unknown_inputs``."""
    model = read_prototxt(prototxt, input_shapes=input_shapes)
    if model.missing_inputs and not allow_unknown_inputs:
        raise ModelFormatError(model.missing_inputs[0], file=model.prototxt)
    if caffemodel is not None:
        attach_weights(model, caffemodel)
    return model


def read_prototxt(path: str | os.PathLike, *, input_shapes: InputShapes | None = None) -> Model:
    """The TEST-phase graph of the prototxt at ``path``, with its shapes inferred."""
    parsed = prototxt.parse_prototxt(str(path))               # 1. text -> NetParameter
    graph = Graph(name=parsed.net.name, source=parsed.path)
    names = BlobNames(graph, parsed)                          # 2. blob naming (#k)
    phase = _split_by_phase(parsed)                           # 3. TEST-phase exclusion
    deploy = _Deploy(parsed, phase, dict(input_shapes or {}))
    deploy.add_inputs(graph, names)                           # 4. inputs (declared, data)
    for idx, msg in phase.kept:                               # 5. layers
        if idx not in deploy.cut:
            graph.layers.append(_layer(deploy.messages.get(idx, msg), idx, names, parsed))
    model = Model(graph=graph, document=parsed.document, blocks=parsed.blocks,
                  excluded=phase.excluded, excluded_blocks=phase.excluded_blocks + deploy.cut,
                  net_unknown_fields=parsed.net_unknown, prototxt=parsed.path, v1=parsed.v1,
                  dropped=deploy.dropped, missing_inputs=deploy.missing,
                  text_edits=deploy.edits,
                  data_transforms=[(m.name, m.type, m.top[0] if m.top else "",
                                    prototxt.message_to_dict(m.transform_param))
                                   for _, m in phase.kept if m.type in DATA_TYPES
                                   and m.HasField("transform_param")])
    model.shapes = shape_rules.infer(graph)                   # 6. shapes
    return model


def _dims(shape: Sequence[int]) -> str:
    return " ".join(f"dim: {d}" for d in shape)


def _how(name: str, several: bool) -> str:
    return f"--input-shape {name + '=' if several else ''}N,C,H,W (e.g. 1,3,224,224)"


@dataclass
class _Deploy:
    """The net's inputs as a deploy net has them, and what a train/test net loses."""
    parsed: prototxt.ParsedNet
    phase: _PhaseSplit
    given: dict[str, Sequence[int]]
    cut: list[int] = field(default_factory=list)          # data/loss block indices dropped
    dropped: list[tuple[str, str, str]] = field(default_factory=list)   # (layer, type, why)
    missing: list[str] = field(default_factory=list)      # one error line per shapeless input
    edits: list[tuple[int, int, str]] = field(default_factory=list)
    messages: dict[int, caffe_pb2.LayerParameter] = field(default_factory=dict)  # replaced

    def add_inputs(self, graph: Graph, names: BlobNames) -> None:
        net, path = self.parsed.net, self.parsed.path
        data = [(i, m) for i, m in self.phase.kept if m.type in DATA_TYPES]
        inputs = [(i, m) for i, m in self.phase.kept if m.type == "Input"]
        sources = (list(net.input) + [t for _, m in inputs for t in m.top]
                   + [m.top[0] for _, m in data if m.top])
        several = len(sources) != 1
        if "" in self.given and several:
            raise ModelFormatError(f"--input-shape without a NAME, but the net has "
                                   f"{len(sources)} inputs ({', '.join(sources) or 'none'}): "
                                   "write NAME=N,C,H,W", file=path)
        known = set(sources) | {m.name for _, m in data}
        for name in self.given:
            if name and name not in known:
                raise ModelFormatError(f"--input-shape {name}=...: the net has no input of that "
                                       f"name (its inputs: {', '.join(sources) or 'none'})",
                                       file=path)

        def given(*keys: str) -> tuple[int, ...] | None:
            for k in (*keys, ""):
                if k in self.given:
                    return tuple(self.given[k])
            return None

        for name, shape in self._declared(given, several):
            graph.inputs[names.define(name)] = shape      # type: ignore[assignment]
        for idx, msg in inputs:
            self._input_layer(idx, msg, given)
        if data:
            self._drop_training(data)
            self._data_inputs(graph, names, data, given, several)

    def _data_inputs(self, graph: Graph, names: BlobNames, data, given, several: bool) -> None:
        """Each data layer's first top as a net input, declared in the merged text."""
        insert: list[str] = []
        uses_dim = bool(self.parsed.net.input_dim)
        for _, msg in data:
            if not msg.top:
                continue
            top = msg.top[0]
            shape = given(top, msg.name) or _own_shape(msg)
            # None: unknown (read_model refuses it unless told to allow it, for inspect)
            graph.inputs[names.define(top)] = shape      # type: ignore[assignment]
            if shape is None:
                self.missing.append(
                    f"layer '{msg.name}': the net has no input shape: this {msg.type} layer "
                    f"reads training data (a train/test prototxt, not a deploy file); give the "
                    f"shape with {_how(top, several)}")
            elif uses_dim and len(shape) == 4:
                insert.append(f'input: "{top}"\n' + "".join(f"input_dim: {d}\n" for d in shape))
            elif uses_dim:
                raise ModelFormatError(f"declares its inputs with input_dim, which needs 4 "
                                       f"dimensions; --input-shape for '{top}' has "
                                       f"{len(shape)}", file=self.parsed.path)
            else:
                insert.append(f'input: "{top}"\ninput_shape {{ {_dims(shape)} }}\n')
        if insert:
            self.edits.append((self._insert_at(), self._insert_at(), "".join(insert)))

    def _declared(self, given, several) -> list[tuple[str, tuple | None]]:
        """Net-level ``input`` entries: declared shapes, overridden or filled by ``given``."""
        net, path, doc = self.parsed.net, self.parsed.path, self.parsed.document
        names = list(net.input)
        if not names:
            return []
        declared: list[tuple[str, tuple | None]] = []
        if net.input_shape or net.input_dim:
            declared += prototxt.declared_inputs(net, path)
        else:
            declared += [(n, None) for n in names]
        shape_fields = [f for f in doc.fields if f.name == "input_shape"]
        dim_fields = [f for f in doc.fields if f.name == "input_dim"]
        result: list[tuple[str, tuple | None]] = []
        fill: list[str] = []
        for i, (name, shape) in enumerate(declared):
            new = given(name)
            if new is None or tuple(new) == shape:
                if shape is None:
                    self.missing.append(f"input '{name}' has no input_shape or input_dim: give "
                                        f"its shape with {_how(name, several)}")
                result.append((name, shape))
                continue
            result.append((name, new))
            if shape is None:
                fill.append(f"input_shape {{ {_dims(new)} }}\n")
            elif net.input_shape and i < len(shape_fields) and not shape_fields[i].is_list:
                f = shape_fields[i]
                self.edits.append((f.start, f.end, f"input_shape {{ {_dims(new)} }}"))
            elif net.input_dim and len(new) == 4 and len(dim_fields) == 4 * len(names) \
                    and not any(f.is_list for f in dim_fields):
                for f, d in zip(dim_fields[4 * i:4 * i + 4], new, strict=True):
                    self.edits.append((f.value_start, f.value_start + len(f.value or ""), str(d)))
            else:
                raise ModelFormatError(f"cannot set the shape of input '{name}' to "
                                       f"{list(new)} in this prototxt's input declaration",
                                       file=path)
        if fill:
            last = max(f.end for f in doc.fields if f.name == "input")
            self.edits.append((last, last, "\n" + "".join(fill).rstrip("\n")))
        return result

    def _input_layer(self, idx: int, msg: caffe_pb2.LayerParameter, given) -> None:
        """An ``Input`` layer whose shape ``given`` sets: its message and its text."""
        own = [tuple(s.dim) for s in msg.input_param.shape]
        new = [given(t, msg.name) for t in msg.top]
        if all(n is None for n in new):
            return
        shapes = [n or (own[j] if j < len(own) else own[0] if len(own) == 1 else None)
                  for j, n in enumerate(new)]
        if any(s is None for s in shapes):
            raise ModelFormatError("give --input-shape for every top of this Input layer",
                                   file=self.parsed.path, layer=msg.name)
        changed = caffe_pb2.LayerParameter()
        changed.CopyFrom(msg)
        changed.input_param.ClearField("shape")
        for s in shapes:
            changed.input_param.shape.add().dim.extend(s)
        self.messages[idx] = changed
        text = "input_param { " + " ".join(f"shape {{ {_dims(s or ())} }}" for s in shapes) + " }"
        block = self.parsed.blocks[idx]
        params = block.get("input_param")
        if params:
            self.edits.append((params[0].start, params[0].end, text))
        else:
            brace = self.parsed.document.text.index("{", block.start)
            self.edits.append((brace + 1, brace + 1, f" {text} "))

    def _drop_training(self, data: list[tuple[int, caffe_pb2.LayerParameter]]) -> None:
        """Cut the data layers and what only training needs (loss, accuracy, label readers)."""
        gone: dict[str, str] = {}          # blob -> why it is gone
        for idx, msg in self.phase.kept:
            if msg.type in DATA_TYPES:
                self.cut.append(idx)
                for t in msg.top[1:]:
                    gone[t] = f"'{t}' is a label top of data layer '{msg.name}'"
                continue
            why = None
            if msg.type == "Accuracy" or msg.type.endswith("Loss"):
                why = f"{msg.type} is only used in training"
            elif (reads := [b for b in msg.bottom if b in gone]):
                why = f"reads {gone[reads[0]]}"
            if why is None:
                for t in msg.top:
                    gone.pop(t, None)       # a kept layer writes it again
                continue
            self.cut.append(idx)
            self.dropped.append((msg.name, msg.type, why))
            for t in msg.top:
                gone.setdefault(t, f"'{t}', the output of dropped layer '{msg.name}'")
        self.dropped = [(m.name, m.type, "the data layer: its first top is the net input, "
                         "the others are labels") for _, m in data] + self.dropped

    def _insert_at(self) -> int:
        """Where new net-level input fields go: after the declared ones, else at the
        start of the first layer's line."""
        doc = self.parsed.document
        declared = [f.end for f in doc.fields if f.name in ("input", "input_shape", "input_dim")]
        if declared:
            end = max(declared)
            nl = doc.text.find("\n", end)
            return len(doc.text) if nl < 0 else nl + 1
        first = self.parsed.blocks[0].start
        line = doc.text.rfind("\n", 0, first) + 1
        return line if doc.text[line:first].strip() == "" else first


def _own_shape(msg: caffe_pb2.LayerParameter) -> tuple[int, ...] | None:
    """The data shape a DummyData or MemoryData layer declares itself."""
    if msg.type == "DummyData":
        p = msg.dummy_data_param
        if p.shape:
            return tuple(p.shape[0].dim) or None
        if p.num and p.channels and p.height and p.width:
            return (p.num[0], p.channels[0], p.height[0], p.width[0])
    if msg.type == "MemoryData":
        q = msg.memory_data_param
        if q.batch_size and q.channels and q.height and q.width:
            return (q.batch_size, q.channels, q.height, q.width)
    return None


@dataclass
class _PhaseSplit:
    kept: list[tuple[int, caffe_pb2.LayerParameter]]    # (block index, layer) in the graph
    excluded: list[str]                                 # names of the layers left out
    excluded_blocks: list[int]                          # and their block indices


def _split_by_phase(parsed: prototxt.ParsedNet) -> _PhaseSplit:
    """The layers Caffe keeps in the TEST phase, and those it leaves out."""
    state = prototxt.test_state(parsed.net)
    split = _PhaseSplit([], [], [])
    for idx, msg in enumerate(parsed.layers):
        if prototxt.included(msg, state):
            split.kept.append((idx, msg))
        else:
            split.excluded.append(msg.name)
            split.excluded_blocks.append(idx)
    return split


def _layer(msg: caffe_pb2.LayerParameter, idx: int, names: BlobNames,
           parsed: prototxt.ParsedNet) -> Layer:
    """The graph layer for block ``idx``: bottoms resolved, tops named, params checked."""
    path = parsed.path
    bottoms = [names.read(b, path, msg.name) for b in msg.bottom]
    tops = [names.write(t, msg, j, path) for j, t in enumerate(msg.top)]
    params = prototxt.layer_params(msg)
    if (where := prototxt.nan_field(params)) is not None:
        raise ModelFormatError(f"{where} is NaN, which no layer can compute with",
                               file=path, layer=msg.name)
    return Layer(name=msg.name, type=msg.type, bottoms=bottoms, tops=tops,
                 params=params, unknown_fields=parsed.block_unknown.get(idx, []),
                 shared_params=[p.name for p in msg.param if p.name], index=idx)
