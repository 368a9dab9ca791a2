"""Read a deploy prototxt (and its caffemodel) into a Graph.

Prototxt
    Parsed into our compiled ``caffe.NetParameter`` (``textfill``: the same result as
    protobuf's ``text_format``, from the field tree ``textproto`` builds anyway).
    Before that, ``textproto`` records the span of every field, so that
    * fields our schema does not know (fork extensions) are reported per layer,
      skipped when filling the messages, and kept verbatim for the merged file;
    * the merged prototxt can be written as the original text with edits.
    V1 ``layers { type: CONVOLUTION }`` nets are upgraded to modern layers.
    Layers are filtered for the TEST phase with Caffe's NetStateRule logic.

Caffemodel
    Read by ``caffemodel.read_caffemodel`` (zero-copy) and matched to layers by
    name, as Caffe's ``CopyTrainedLayersFrom`` does; blob counts and shapes are
    checked against what each layer type expects.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from google.protobuf import text_format

from . import shapes as shape_rules
from ..caffe import textfill
from ..caffe import textproto
from ..arrays import first_nonfinite
from ..errors import GraphError, ModelFormatError
from ..graph import Graph, Layer
from ..caffe.proto import caffe_pb2

_NET = caffe_pb2.NetParameter.DESCRIPTOR
_LAYER = caffe_pb2.LayerParameter.DESCRIPTOR


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
    shapes: shape_rules.Shapes | None = None
    v1: bool = False


def read_model(prototxt: str | os.PathLike, caffemodel: str | os.PathLike | None = None) -> Model:
    model = read_prototxt(prototxt)
    if caffemodel is not None:
        attach_weights(model, caffemodel)
    return model


# ---------------------------------------------------------------- prototxt

MAX_PROTOTXT_BYTES = 2**31 - 1         # Caffe's kProtoReadBytesLimit


def _binary(path):
    return ModelFormatError("this is binary data, not a text prototxt "
                            "(a .caffemodel passed where the .prototxt belongs?)", file=path)


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            chunks = [f.read(65536)]         # /dev/zero or a caffemodel: stop here
            if b"\x00" in chunks[0]:
                raise _binary(path)
            size = len(chunks[0])
            while chunk := f.read(1 << 20):
                size += len(chunk)
                if size > MAX_PROTOTXT_BYTES:
                    raise ModelFormatError(f"is larger than {MAX_PROTOTXT_BYTES} bytes, the "
                                           "most Caffe reads", file=path)
                chunks.append(chunk)
        raw = b"".join(chunks)
    except FileNotFoundError:
        raise ModelFormatError("no such file", file=path) from None
    except IsADirectoryError:
        raise ModelFormatError("is a directory, not a prototxt file", file=path) from None
    except OSError as e:
        raise ModelFormatError(f"cannot read: {e.strerror}", file=path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFormatError(f"not UTF-8 text at byte {e.start}: this looks like binary data, "
                               "not a text prototxt", file=path) from None
    return text.lstrip("\ufeff")


def read_prototxt(path: str | os.PathLike) -> Model:
    path = str(path)
    text = _read_text(path)
    doc = textproto.parse(text, path)
    unknown = textproto.unknown_fields(doc.fields, _NET)
    net = caffe_pb2.NetParameter()
    try:        # from the field tree we already have (equal to text_format, see textfill)
        textfill.fill(doc, doc.fields, net, skip={id(f) for _, f in unknown})
    except textfill.Unsupported:        # message lists, extensions: protobuf's own parser
        net.Clear()
        try:
            text_format.Parse(textproto.blank(text, [(f.start, f.end) for _, f in unknown]), net)
        except text_format.ParseError as e:
            raise ModelFormatError(f"{e}", file=path) from None

    blocks = [f for f in doc.fields if f.name in ("layer", "layers")]
    if net.layer and net.layers:
        raise ModelFormatError("mixes modern 'layer' and V1 'layers' entries", file=path)
    v1 = bool(net.layers)
    messages = [_upgrade_v1(m, path) for m in net.layers] if v1 else list(net.layer)
    if not messages:
        raise ModelFormatError("defines no layers (is this a Caffe deploy prototxt?)", file=path)
    if len(messages) != len(blocks) or any(b.is_list for b in blocks):
        # `layer: [{...}, {...}]`: one text block for several layers
        raise ModelFormatError("layers given as a list (layer: [...]) are not supported: write "
                               "one 'layer { ... }' block per layer", file=path)

    # fields of each block that the schema does not know, by block index
    per_block: dict[int, list[str]] = {}
    net_unknown = []
    for dotted, f in unknown:
        idx = next((i for i, b in enumerate(blocks) if b.start <= f.start < b.end), None)
        if idx is None:
            net_unknown.append(dotted)
        else:
            per_block.setdefault(idx, []).append(dotted.split(".", 1)[1] if "." in dotted else dotted)

    graph = Graph(name=net.name, source=path)
    current: dict[str, str] = {}          # file blob name -> unique name of its latest value
    writes: dict[str, int] = {}

    def define(name: str) -> str:
        k = writes.get(name, 0)
        writes[name] = k + 1
        unique = name if k == 0 else f"{name}#{k}"
        current[name] = unique
        graph.blob_names[unique] = name
        return unique

    for name, shape in _declared_inputs(net, path):
        graph.inputs[define(name)] = shape

    excluded, excluded_blocks = [], []
    state = (caffe_pb2.TEST, net.state.level, set(net.state.stage))
    for idx, msg in enumerate(messages):
        if not _included(msg, state):
            excluded.append(msg.name)
            excluded_blocks.append(idx)
            continue
        bottoms = []
        for b in msg.bottom:
            if b not in current:
                raise GraphError(f"bottom '{b}' is not produced by any earlier layer or input",
                                 file=path, layer=msg.name)
            bottoms.append(current[b])
        tops = [define(t) for t in msg.top]
        params = _params(msg)
        if (where := _nan_field(params)) is not None:
            raise ModelFormatError(f"{where} is NaN, which no layer can compute with",
                                   file=path, layer=msg.name)
        graph.layers.append(Layer(name=msg.name, type=msg.type, bottoms=bottoms, tops=tops,
                                  params=params, unknown_fields=per_block.get(idx, []),
                                  shared_params=[p.name for p in msg.param if p.name],
                                  index=idx))
    model = Model(graph=graph, document=doc, blocks=blocks, excluded=excluded,
                  excluded_blocks=excluded_blocks,
                  net_unknown_fields=net_unknown, prototxt=path, v1=v1)
    model.shapes = shape_rules.infer(graph)
    return model


def _declared_inputs(net, path):
    names = list(net.input)
    if net.input_shape:
        if len(net.input_shape) != len(names):
            raise ModelFormatError(f"{len(names)} inputs but {len(net.input_shape)} input_shape "
                                   "entries", file=path)
        return [(n, tuple(s.dim)) for n, s in zip(names, net.input_shape)]
    if net.input_dim:
        if len(net.input_dim) != 4 * len(names):
            raise ModelFormatError(f"{len(names)} inputs need {4 * len(names)} input_dim values, "
                                   f"found {len(net.input_dim)}", file=path)
        dims = list(net.input_dim)
        return [(n, tuple(dims[4 * i:4 * i + 4])) for i, n in enumerate(names)]
    if names:
        raise ModelFormatError(f"input '{names[0]}' has no input_shape or input_dim", file=path)
    return []


def _meets(rule, phase, level, stages) -> bool:
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


def _included(msg, state) -> bool:
    if msg.include:
        return any(_meets(r, *state) for r in msg.include)
    return not any(_meets(r, *state) for r in msg.exclude)


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


def _nan_field(value, where: str = "") -> str | None:
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
        if (found := _nan_field(v, path)) is not None:
            return found
    return None


def _params(msg) -> dict:
    return {fd.name: message_to_dict(v) for fd, v in msg.ListFields()
            if fd.name.endswith("_param") and fd.message_type is not None}


def _upgrade_v1(v1, path):
    from ..caffe.caffemodel import V1_LAYER_TYPES
    layer = caffe_pb2.LayerParameter(name=v1.name, bottom=v1.bottom, top=v1.top)
    if v1.type not in V1_LAYER_TYPES:
        raise ModelFormatError(f"V1 layer type {v1.type} has no modern equivalent",
                               file=path, layer=v1.name)
    layer.type = V1_LAYER_TYPES[v1.type]
    for rule in v1.include:
        layer.include.add().CopyFrom(rule)
    for rule in v1.exclude:
        layer.exclude.add().CopyFrom(rule)
    for fd, value in v1.ListFields():
        if fd.name.endswith("_param") and fd.name in _LAYER.fields_by_name:
            getattr(layer, fd.name).CopyFrom(value)
    return layer


# ---------------------------------------------------------------- weights

def attach_weights(model: Model, caffemodel: str | os.PathLike) -> None:
    """Give every layer its blobs from ``caffemodel``, checked against the prototxt."""
    from ..caffe.caffemodel import read_caffemodel
    path = str(caffemodel)
    # a net whose layers all take no blobs is saved with no layers at all
    weightless = all(s is not None and not s for s in model.shapes.params.values())
    stored = read_caffemodel(path, allow_empty=weightless).by_name()   # the last of a name wins
    model.caffemodel = path
    expected = model.shapes.params
    for layer in model.graph.layers:
        want = expected.get(layer.name)
        entry = stored.get(layer.name)
        blobs = list(entry.blobs) if entry is not None else []
        if want is None:            # a type whose blobs we do not know: take what is there
            layer.blobs = blobs
            continue
        if not want:
            if blobs:
                raise GraphError(f"{layer.type} takes no parameter blobs but the caffemodel has "
                                 f"{len(blobs)}", file=path, layer=layer.name)
            continue
        if entry is None:
            raise GraphError(f"needs {len(want)} parameter blob(s) {[list(s) for s in want]} "
                             "but the caffemodel has no layer of that name", file=path,
                             layer=layer.name)
        counts = {len(want)}
        if layer.type == "BatchNorm":
            counts.add(5)                           # NVCaffe: + scale, bias
            want = want + [want[0], want[0]]
        if len(blobs) not in counts:
            raise GraphError(f"expects {len(want)} parameter blob(s) but the caffemodel has "
                             f"{len(blobs)}", file=path, layer=layer.name)
        fixed = []
        for i, (blob, shape) in enumerate(zip(blobs, want)):
            shape = tuple(shape)
            if blob.shape != shape:
                # legacy 4-D blobs (num, channels, height, width) hold the same values
                if not _legacy_compatible(blob.shape, shape):
                    raise GraphError(f"has shape {list(blob.shape)} but the prototxt implies "
                                     f"{list(shape)}", file=path, layer=layer.name, blob=i)
                blob = blob.reshape(shape)
            fixed.append(blob)
        layer.blobs = fixed
    for layer in model.graph.layers:
        for i, blob in enumerate(layer.blobs):
            bad = first_nonfinite(blob)
            if bad is not None:
                value = blob.reshape(-1)[bad]
                raise ModelFormatError(f"holds {value} at element {bad}: weights and "
                                       "statistics must be finite numbers", file=path,
                                       layer=layer.name, blob=i)


def _legacy_compatible(have: tuple, want: tuple) -> bool:
    """Caffe's Blob::ShapeEquals for legacy num/channels/height/width blobs:
    the expected shape, padded on the left with 1s to four axes."""
    return len(have) == 4 and len(want) <= 4 and (1,) * (4 - len(want)) + tuple(want) == tuple(have)
