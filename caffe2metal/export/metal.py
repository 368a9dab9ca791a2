"""Write Metal Performance Shaders weight files and describe them in the manifest.

Input: the folded graph (``fold.apply``) and the plan.  Output: raw weight and
bias files under ``OUT/metal/``, SSD priors when the net has PriorBox layers,
and the manifest keys ``layers``, ``metal`` and (SSD only) ``ssd``.  What gets
exported, and how, in one table (``g`` = groups)::

  Caffe layer                           kind                    weights layout
  ------------------------------------  ----------------------  ---------------------------------
  Convolution (also fork DepthwiseConv-  convolution             [out][kH][kW][in/g]
    olution, ConvolutionDepthwise)
    ... with g == in == out              depthwise_convolution   [C][kH][kW]
    ... with in/g or out/g not % 4       convolution             [out][kH][kW][in], g -> 1, zeros
                                                                 off the block diagonal
  Deconvolution                         convolution_transpose   [out][kH][kW][in/g], kernel flipped
  InnerProduct                          fully_connected         [out][H][W][C] of its input
  BatchNorm/Scale chain left unfolded   channel_affine          [C] scale; bias = [C] shift

Bias is float32, one value per output channel (zeros when the layer had none).
Other layers with parameters (Normalize, a PReLU that does not follow an
exported layer, a Scale that multiplies by a second bottom, ...) are listed in
``metal.skipped`` with the reason, never silently dropped.

The layouts come from ``mps.py`` (one converter per layout); this module adds
the file naming, the MPS group rule, SSD priors and the manifest text.

Manifest format (README section)
--------------------------------

``OUT/manifest.json`` is UTF-8 JSON; ``caffe2metal/export/manifest.schema.json`` is its
JSON Schema (draft 2020-12).  Top level: ``format`` (``"caffe2metal"``),
``version`` (``1``), ``source``, ``inputs``, ``merged`` (the merged Caffe files),
``folds``, ``kept``, ``layers``, ``metal`` and, for SSD nets, ``ssd``.

* Files are raw little-endian numbers in C order with no header: the byte
  count is exactly ``prod(shape) * itemsize``.  A *file* object is
  ``{"file", "dtype", "shape", "layout", "sha256"}``; ``file`` is relative to
  OUT, always ``metal/<name>``, with ``<name>`` made of ``[A-Za-z0-9_.-]``.
* Names: ``weights_<layer>.dat`` / ``bias_<layer>.dat`` (``--naming apple``,
  Apple's MetalImageRecognition) or ``<layer>_w.bin`` / ``<layer>_b.bin``
  (``--naming forge``).  In ``<layer>`` every character outside
  ``[A-Za-z0-9_.-]`` becomes ``_``, leading dots become ``_``, a Windows device
  name (``CON``, ``NUL``, ``COM1``...) gets a ``_`` appended.  Two layers whose
  files would coincide (also ignoring case) are an error, never an overwrite.
* ``layers`` lists the exported layers in net order.  Each entry: ``name``
  (Caffe layer), ``type`` (Caffe type), ``kind`` (``convolution``,
  ``depthwise_convolution``, ``fully_connected``, ``convolution_transpose``,
  ``channel_affine``), ``weights`` and ``bias`` (file objects), ``folded``
  (BatchNorm/Scale layers folded into it), ``chain`` (for ``channel_affine``:
  the layers it composes, else ``[]``), ``kernel``, ``stride``, ``pad``,
  ``dilation`` (``[h, w]``, Caffe semantics: symmetric pad, floor output size),
  ``groups`` (as MPS must use it), ``dense_from_groups`` (the Caffe group count
  when a grouped layer was written dense, else ``null``), ``input_channels``,
  ``output_channels``, ``input``/``output`` (``{"blob", "shape"}``, Caffe NCHW
  shapes), ``activation`` (``null`` or the activation that alone reads the
  output: ``{"layer", "type", ...}`` with ``negative_slope`` for ReLU,
  ``alpha`` for ELU, ``min``/``max`` for Clip, and for PReLU
  ``channel_shared`` plus ``slopes``, a float32 file object).
  ``fully_connected`` has kernel = the input's ``[H, W]``; ``channel_affine``
  has kernel 1x1; both have stride 1, pad 0, dilation 1, groups 1.
* MPS group rule: grouped (non-depthwise) convolutions need in/groups and
  out/groups to be multiples of 4.  A layer that breaks it is written dense
  (``groups: 1``, ``dense_from_groups: g``); compute is g times larger.
* ``metal``: ``directory``, ``naming``, ``weights_dtype`` (``float32`` or
  ``float16``, IEEE half), ``bias_dtype`` (always ``float32``), ``byte_order``
  and ``skipped`` (``[{"name", "type", "reason"}]``).
* ``ssd`` (nets with PriorBox): ``priors`` (file object ``metal/priors.dat``,
  float32, Caffe's concatenated PriorBox output without its batch axis:
  ``[2][num_priors*4]``, all boxes ``xmin, ymin, xmax, ymax`` normalised to the
  image, then all variances), ``num_priors``, ``image_size`` ``[H, W]``,
  ``priorbox_concat``/``loc_concat``/``conf_concat`` (Concat layer names),
  ``loc_order``/``conf_order`` (the head layers in each Concat's bottom order),
  ``heads`` in priors order (``priorbox``, ``loc``, ``conf``, ``feature_map``
  ``[H, W]``, ``priors_per_cell``, ``num_priors``, ``first_prior``), and
  ``detection_output`` (``null`` or ``layer``, ``num_classes``,
  ``share_location``, ``background_label_id``, ``nms_threshold``, ``top_k``,
  ``eta``, ``keep_top_k``, ``confidence_threshold``, ``code_type``,
  ``variance_encoded_in_target``; Caffe's defaults filled in, ``null`` = unset).
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path

import numpy as np

from .. import fold
from .. import mps
from ..arrays import first_nonfinite
from ..errors import ExportError
from ..graph import Graph, Layer
from ..net.shapes import conv_geometry

CONV_TYPES = ("Convolution", "DepthwiseConvolution", "ConvolutionDepthwise")
DTYPES = {"float32": "<f4", "float16": "<f2"}
NAMINGS = ("apple", "forge")
METAL_DIR = "metal"
LAYOUTS = {
    "convolution": "[out][kH][kW][in/groups]",
    "depthwise_convolution": "[C][kH][kW]",
    "fully_connected": "[out][H][W][C]",
    "convolution_transpose": "[out][kH][kW][in/groups], kernel flipped",
    "channel_affine": "[C] scale",
}
ACTIVATIONS = ("ReLU", "ReLU6", "PReLU", "Sigmoid", "TanH", "ELU", "Clip")
_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
             *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}


# ---------------------------------------------------------------- file names

def safe_name(name: str) -> str:
    """A layer name as one harmless file-name component (see the module doc)."""
    s = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    stripped = s.lstrip(".")
    s = "_" * (len(s) - len(stripped)) + stripped or "_"
    stem = s.split(".", 1)[0]
    if stem.upper() in _RESERVED:
        s = stem + "_" + s[len(stem):]
    if len(s) > 120:                       # stay far below 255-byte file-name limits
        s = s[:100] + "-" + hashlib.sha256(name.encode()).hexdigest()[:16]
    return s


def file_names(name: str, naming: str = "apple") -> tuple[str, str]:
    """(weights file, bias file) of a layer, without the directory."""
    s = safe_name(name)
    if naming == "apple":
        return f"weights_{s}.dat", f"bias_{s}.dat"
    if naming == "forge":
        return f"{s}_w.bin", f"{s}_b.bin"
    raise ExportError(f"unknown naming '{naming}' (use one of {', '.join(NAMINGS)})")


class _Writer:
    """Writes files under OUT/metal and refuses two owners for one file.  With a
    ``WriteBehind`` (``io``) the bytes go to disk on its thread while the next
    block is laid out and hashed here."""

    def __init__(self, out: Path, io=None, streams: "Streams | None" = None):
        self.out, self.io = Path(out), io
        self.streams = streams
        self.dir = self.out / METAL_DIR
        self.owners: dict[str, tuple[str, str]] = {}   # lower-case file name -> (owner, file)

    def claim(self, file: str, owner: str) -> None:
        key = file.lower()
        if key in self.owners:
            other, other_file = self.owners[key]
            if other_file == file:
                what = f"would both write {METAL_DIR}/{file} (names are made file-safe)"
            else:
                what = (f"would write {METAL_DIR}/{other_file} and {METAL_DIR}/{file}, one file "
                        "on case-insensitive file systems (macOS, Windows)")
            raise ExportError(f"layers '{other}' and '{owner}' {what}: rename one of them",
                              layer=owner)
        self.owners[key] = (owner, file)

    def write(self, file: str, owner: str, array, dtype: str, layout: str) -> dict:
        """Write an array, or a ``_RowBlocks`` one block at a time; hash as it goes."""
        self.claim(file, owner)
        path = self.dir / file
        if path.parent != self.dir or file in ("", ".", ".."):     # safe_name makes this impossible
            raise ExportError(f"file name {file!r} would leave {self.dir}", layer=owner)
        spec = {"file": f"{METAL_DIR}/{file}", "dtype": dtype, "shape": list(array.shape),
                "layout": layout}
        digest = self.streams.take(array, path, dtype) if self.streams is not None else None
        if digest is None:                         # (else written while the caffemodel was)
            digest = hashlib.sha256()
            self._write_file(path, owner, array, dtype, digest)
        if self.io is None:
            spec["sha256"] = digest.hexdigest()
        else:                                      # filled in by the hashing thread
            spec["sha256"] = None
            self.io.when_hashed(lambda: spec.__setitem__("sha256", digest.hexdigest()))
        return spec

    def _write_file(self, path: Path, owner: str, array, dtype: str, digest) -> None:
        blocks = array if isinstance(array, _RowBlocks) else (array,)
        self.dir.mkdir(exist_ok=True)
        try:
            f = open(path, "xb")
        except FileExistsError:
            raise ExportError(f"{path} already exists", layer=owner) from None
        except OSError as e:
            raise ExportError(f"cannot write: {e.strerror}", file=path, layer=owner) from None
        if self.io is None:
            try:
                with f:
                    for block in blocks:
                        data = _bytes(block, dtype)
                        f.write(data)
                        digest.update(data)
            except OSError as e:
                raise ExportError(f"cannot write: {e.strerror}", file=path,
                                  layer=owner) from None
        else:
            try:
                for block in blocks:
                    data = _bytes(block, dtype)
                    self.io.hash(digest, data)
                    self.io.write(f, data, name=path)
            finally:
                self.io.close_file(f, name=path)


def _bytes(block, dtype: str) -> memoryview:
    """The bytes of ``block`` as ``dtype`` in C order (no copy when it already is that)."""
    return memoryview(np.ascontiguousarray(block, dtype=DTYPES[dtype]).reshape(-1)).cast("B")


_ROW_BLOCK_BYTES = 1 << 21      # small blocks: malloc reuses them (see fold.BLOCK_BYTES)


class _RowBlocks:
    """A big layout conversion done a block of output rows at a time, so that the
    converted copy never exists whole: ``shape`` of the result, iterate for blocks."""

    def __init__(self, shape, rows_source, convert, block_bytes=None):
        block_bytes = _ROW_BLOCK_BYTES if block_bytes is None else block_bytes
        self.shape = tuple(shape)
        self.source, self.convert = rows_source, convert
        row = max(1, rows_source[:1].nbytes)
        self.rows = max(1, block_bytes // row)

    def __iter__(self):
        for i in range(0, self.shape[0], self.rows):
            yield self.convert(self.source[i:i + self.rows])

    def map(self, fn):
        out = _RowBlocks.__new__(_RowBlocks)
        out.shape, out.source, out.rows = self.shape, self.source, self.rows
        out.convert = lambda rows: fn(self.convert(rows))
        return out


class _Stream:
    """One layer's Metal weights written from the folded blocks the merged-caffemodel
    writer computes (``FoldedWeights.observers``), into a staging file."""

    def __init__(self, path: Path, blocks: _RowBlocks, dtype: str, io):
        self.path, self.blocks, self.dtype, self.io = path, blocks, dtype, io
        self.rows, self.total = 0, blocks.shape[0]
        self.digest = hashlib.sha256()
        self.file = None
        self.broken = False

    def __call__(self, start: int, rows: np.ndarray) -> None:
        if self.broken or start != self.rows:       # not in order: export() writes it anew
            self.broken = True
            return
        if self.file is None:
            try:
                self.file = open(self.path, "xb")
            except OSError as e:
                raise ExportError(f"cannot write: {e.strerror}", file=self.path) from None
        data = _bytes(self.blocks.convert(rows), self.dtype)
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
            try:
                os.unlink(stream.path)
            except OSError:
                pass
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
        if (layer.type not in EXPORTERS or not isinstance(w, fold.FoldedWeights)
                or len(layer.bottoms) != 1 or len(layer.tops) != 1):
            continue
        try:
            geo = EXPORTERS[layer.type](layer, shapes.get(layer.bottoms[0]))
        except ExportError:
            continue                                    # export() reports it
        blocks = geo["weights"]
        if not isinstance(blocks, _RowBlocks) or blocks.source is not w:
            continue
        owner = layer.name
        cast = blocks.map(lambda b, owner=owner: _cast(b, dtype, owner, checked=True))
        directory.mkdir(parents=True, exist_ok=True)
        stream = _Stream(directory / f".stream-{i}.partial", cast, dtype, io)
        streams.by_source[id(w)] = stream
        w.observers.append(stream)
    return streams


# ---------------------------------------------------------------- per-type layouts

def _pair_list(t) -> list[int]:
    return [int(v) for v in t]


def _param(layer: Layer, key: str) -> dict:
    return layer.params.get(key, {})


def _layout(shape, w, convert):
    """``convert(w)``, or the same a block of rows at a time (a ``_RowBlocks``) when
    ``w`` is big or folded lazily: the converted copy then never exists whole."""
    if isinstance(w, fold.FoldedWeights) or w.nbytes > _ROW_BLOCK_BYTES:
        convert(w[:1])                              # the checks, on one row
        return _RowBlocks(shape, w, convert)
    return convert(np.asarray(w))


def _conv_like(layer: Layer, in_shape, transpose: bool) -> dict:
    p = _param(layer, "convolution_param")
    w = layer.blobs[0]                              # an array or fold.FoldedWeights
    if not isinstance(w, fold.FoldedWeights):
        w = np.asarray(w)
    if w.ndim != 4:
        raise ExportError(f"has {w.ndim}-D weights {list(w.shape)}: MPS convolutions are 2-D",
                          layer=layer.name)
    if p.get("axis", 1) not in (1, -3):
        raise ExportError("convolution_param.axis is not 1: MPS needs channels on axis 1",
                          layer=layer.name)
    try:
        geo = conv_geometry(p, 2)
    except ValueError as e:
        raise ExportError(str(e), layer=layer.name) from None
    kh, kw = w.shape[2:]
    if transpose:                                   # Caffe Deconvolution: W [in][out/g][kH][kW]
        group = int(p.get("group", 1))
        cin, cout = w.shape[0], w.shape[1] * group
        arr = mps.deconv_weights(np.asarray(w), group)
        kind = "convolution_transpose"
    else:
        if layer.type == "ConvolutionDepthwise":    # fork type: one group per input channel
            group = int(in_shape[1]) if in_shape and in_shape[1] else w.shape[0]
        else:
            group = int(p.get("group", 1))
        cin, cout = w.shape[1] * group, w.shape[0]
        if group > 1 and group == cin == cout:      # rows are channels: [C][kH][kW]
            arr = _layout((cout, kh, kw), w, mps.depthwise_weights)
            kind = "depthwise_convolution"
        else:
            kind = "convolution"
            arr = None
    dense_from = None
    per_group = (cin // group, cout // group)
    if kind != "depthwise_convolution" and group > 1 and (per_group[0] % 4 or per_group[1] % 4):
        if arr is None:
            arr = mps.conv_weights(np.asarray(w))
        arr = _dense(arr, group, layer.name)
        dense_from, group = group, 1
    elif arr is None:                               # rows are output channels
        arr = _layout((cout, kh, kw, w.shape[1]), w, mps.conv_weights)
    return dict(kind=kind, weights=arr, kernel=_pair_list(geo["kernel"]),
                stride=_pair_list(geo["stride"]), pad=_pair_list(geo["pad"]),
                dilation=_pair_list(geo["dilation"]), groups=group, dense_from_groups=dense_from,
                input_channels=cin, output_channels=cout)


def _dense(w: np.ndarray, groups: int, layer: str = "") -> np.ndarray:
    """Grouped MPS weights [out][kH][kW][in/g] as one dense block-diagonal [out][kH][kW][in]."""
    if w.size * groups > max(16 * w.size, 1 << 24):
        raise ExportError(f"{groups} groups of {w.shape[3]} channel(s) would take "
                          f"{w.size * groups:,} values written dense (MPS wants each group's "
                          "channel count to be a multiple of 4)", layer=layer)
    out, kh, kw, cg = w.shape
    d = np.zeros((groups, out // groups, kh, kw, groups, cg), w.dtype)
    g = np.arange(groups)
    d[g, :, :, :, g, :] = w.reshape(groups, out // groups, kh, kw, cg)
    return d.reshape(out, kh, kw, groups * cg)


def _conv(layer, in_shape):
    return _conv_like(layer, in_shape, transpose=False)


def _deconv(layer, in_shape):
    return _conv_like(layer, in_shape, transpose=True)


def _fc(layer, in_shape):
    p = _param(layer, "inner_product_param")
    axis = p.get("axis", 1)
    if in_shape is not None and axis < 0:
        axis += len(in_shape)
    if axis != 1:
        raise ExportError("inner_product_param.axis is not 1: MPSCNNFullyConnected reads the "
                          "whole image", layer=layer.name)
    if in_shape is None or any(d is None for d in in_shape):
        raise ExportError("the shape of its input is unknown (an earlier layer's type or fields "
                          "are not known), so its weights cannot be laid out as [out][H][W][C]",
                          layer=layer.name)
    if len(in_shape) == 2:
        chw = (in_shape[1], 1, 1)
    elif len(in_shape) == 4:
        chw = tuple(in_shape[1:])
    else:
        raise ExportError(f"input shape {list(in_shape)} is neither N,C nor N,C,H,W",
                          layer=layer.name)
    w = layer.blobs[0]                                  # an array or fold.FoldedWeights
    transpose = bool(p.get("transpose", False))
    if transpose:
        w = np.asarray(w)
    try:
        if w.ndim == 2:
            rows = w.T if transpose else w              # [out][K]
            arr = _layout((rows.shape[0], chw[1], chw[2], chw[0]), rows,
                          lambda r: mps.fc_weights(r, chw))
        else:
            arr = mps.fc_weights(w, chw, transpose=transpose)
    except ValueError as e:
        raise ExportError(str(e), layer=layer.name) from None
    return dict(kind="fully_connected", weights=arr, kernel=[chw[1], chw[2]], stride=[1, 1],
                pad=[0, 0], dilation=[1, 1], groups=1, dense_from_groups=None,
                input_channels=chw[0], output_channels=arr.shape[0])


EXPORTERS = {}


def _register(types, fn):
    for t in types:
        if t in EXPORTERS:
            raise RuntimeError(f"exporter for {t!r} registered twice")
        EXPORTERS[t] = fn


_register(CONV_TYPES, _conv)
_register(("Deconvolution",), _deconv)
_register(("InnerProduct",), _fc)


# ---------------------------------------------------------------- export

def export(model, merged: Graph, plan: fold.Plan, out, *, dtype: str = "float32",
           naming: str = "apple", io=None, streams: Streams | None = None) -> dict:
    """Write OUT/metal/* and return the manifest keys ``layers``, ``metal`` (and ``ssd``).

    ``merged`` may hold ``fold.FoldedWeights`` (``fold.apply(lazy=True)``): big
    fully connected layers are then folded, laid out and written a block of
    rows at a time.  ``io``: a ``writeback.WriteBehind`` for the file writes;
    ``streams``: from :func:`stream_folded`, the files already written."""
    if dtype not in DTYPES:
        raise ExportError(f"unknown weight dtype '{dtype}' (use float32 or float16)")
    if naming not in NAMINGS:
        raise ExportError(f"unknown naming '{naming}' (use one of {', '.join(NAMINGS)})")
    writer = _Writer(Path(out), io, streams)
    graph, shapes = model.graph, model.shapes.blobs
    name = merged.blob_names.get
    folded = {f.producer: f.layers for f in plan.folds}
    kept_first = {k.layers[0]: k for k in plan.kept}
    in_kept = {n for k in plan.kept for n in k.layers}
    users = merged.consumers()
    outputs = set(merged.outputs())
    entries, skipped, slopes_done = [], [], set()

    def blob(b):
        s = shapes.get(b)
        return {"blob": name(b, b), "shape": None if s is None else list(s)}

    def files(entry_name, geo, weights, bias, owner, checked=False):
        wfile, bfile = file_names(entry_name, naming)
        cast = (weights.map(lambda b: _cast(b, dtype, owner, checked))
                if isinstance(weights, _RowBlocks) else _cast(weights, dtype, owner, checked))
        wspec = writer.write(wfile, owner, cast, dtype, LAYOUTS[geo["kind"]])
        bspec = writer.write(bfile, owner, _finite32(bias, owner), "float32",
                             "[C] shift" if geo["kind"] == "channel_affine" else "[out]")
        return wspec, bspec

    for layer in merged.layers:
        if layer.type in EXPORTERS and layer.blobs:
            if len(layer.bottoms) != 1 or len(layer.tops) != 1:
                raise ExportError(f"has {len(layer.bottoms)} bottoms and {len(layer.tops)} tops; "
                                  "MPS kernels take one input and one output", layer=layer.name)
            in_shape = shapes.get(layer.bottoms[0])
            geo = EXPORTERS[layer.type](layer, in_shape)
            n_out = geo["output_channels"]
            bias = (np.asarray(layer.blobs[1], np.float32).reshape(-1) if len(layer.blobs) > 1
                    else np.zeros(n_out, np.float32))
            if bias.size != n_out:
                raise ExportError(f"has {bias.size} bias values for {n_out} outputs",
                                  layer=layer.name)
            wspec, bspec = files(layer.name, geo, geo.pop("weights"), bias, layer.name,
                                 checked=isinstance(layer.blobs[0], fold.FoldedWeights))
            top = layer.tops[0]
            act = _activation(layer, top, users, outputs, writer, naming, slopes_done)
            entries.append(_entry(layer.name, layer.type, geo, wspec, bspec,
                                  folded.get(layer.name, []), [], blob(layer.bottoms[0]),
                                  blob(top), act))
        elif layer.name in kept_first:
            chain = [graph.layer(n) for n in kept_first[layer.name].layers]
            why = _affine_problem(chain, shapes)
            if why:
                skipped.extend({"name": l.name, "type": l.type, "reason": why} for l in chain)
                continue
            k, c = fold.chain_affine(graph, chain)
            channels = k.size
            geo = dict(kind="channel_affine", kernel=[1, 1], stride=[1, 1], pad=[0, 0],
                       dilation=[1, 1], groups=1, dense_from_groups=None,
                       input_channels=channels, output_channels=channels)
            wspec, bspec = files(layer.name, geo, k, c, layer.name)
            top = chain[-1].tops[0]
            act = _activation(chain[-1], top, users, outputs, writer, naming, slopes_done)
            entries.append(_entry(layer.name, layer.type, geo, wspec, bspec, [],
                                  [l.name for l in chain], blob(chain[0].bottoms[0]), blob(top),
                                  act))
        elif layer.name in in_kept:
            continue                                  # written with its chain's first layer
        elif layer.blobs and layer.name not in slopes_done:
            skipped.append({"name": layer.name, "type": layer.type,
                            "reason": _skip_reason(layer)})
    result = {
        "layers": entries,
        "metal": {"directory": METAL_DIR, "naming": naming, "weights_dtype": dtype,
                  "bias_dtype": "float32", "byte_order": "little", "skipped": skipped},
    }
    try:
        ssd = _ssd(model, merged, writer)
    except _NotSSDPriors as e:
        det = next(l for l in merged.layers if l.type == "DetectionOutput")
        skipped.append({"name": det.name, "type": det.type, "reason": str(e)})
        ssd = None
    if ssd is not None:
        result["ssd"] = ssd
    return result


def _entry(name, caffe_type, geo, wspec, bspec, folded, chain, inp, outp, act) -> dict:
    return {"name": name, "type": caffe_type, "kind": geo["kind"], "weights": wspec,
            "bias": bspec, "folded": list(folded), "chain": chain,
            "kernel": geo["kernel"], "stride": geo["stride"], "pad": geo["pad"],
            "dilation": geo["dilation"], "groups": geo["groups"],
            "dense_from_groups": geo["dense_from_groups"],
            "input_channels": int(geo["input_channels"]),
            "output_channels": int(geo["output_channels"]),
            "input": inp, "output": outp, "activation": act}


def _finite32(values, owner, checked: bool = False) -> np.ndarray:
    """``values`` as float32, checked finite unless they come from ``fold.FoldedWeights``
    (which checks every value it computes)."""
    a = np.asarray(values)
    if a.dtype != np.float32:
        a = np.asarray(a, np.float64)
    bad = None if checked else first_nonfinite(a)
    if bad is not None:
        raise ExportError(f"holds {a.reshape(-1)[bad]} at element {bad}", layer=owner)
    return a.astype(np.float32, copy=False)


def _cast(values, dtype, owner, checked: bool = False) -> np.ndarray:
    a = _finite32(values, owner, checked)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            h = a.astype(np.float16)
        if not np.isfinite(h).all():
            raise ExportError(f"weights up to {np.abs(a).max():.6g} do not fit in float16 "
                              "(max 65504): use --dtype float32", layer=owner)
        return h
    return a


def _affine_problem(chain: list[Layer], shapes) -> str | None:
    """Why a kept BatchNorm/Scale chain cannot be one per-channel affine, or None."""
    for l in chain:
        if len(l.bottoms) != 1:
            return f"'{l.name}' multiplies by a second bottom, not by learned weights"
        if l.type == "BatchNorm" and _param(l, "batch_norm_param").get("use_global_stats") is False:
            return f"'{l.name}' normalises with each batch's own statistics"
        if l.type == "Scale":
            p = _param(l, "scale_param")
            if p.get("axis", 1) not in (1, -3) or p.get("num_axes", 1) != 1:
                return f"'{l.name}' does not scale per channel (axis/num_axes)"
        if l.unknown_fields:
            return f"'{l.name}' has fields our schema does not know"
    s = shapes.get(chain[0].bottoms[0])
    channels = None if not s or len(s) < 2 else s[1]
    sizes = {np.asarray(l.blobs[0]).size for l in chain if l.blobs}
    if channels is not None and sizes - {channels}:
        return f"parameters have {sorted(sizes)} values for {channels} channels"
    return None


def _skip_reason(layer: Layer) -> str:
    if layer.type == "PReLU":
        return ("PReLU that does not follow an exported layer (MPS: MPSCNNNeuronPReLU; slopes "
                "in the caffemodel)")
    if layer.type == "Normalize":
        return "Normalize (L2 over channels, then per-channel scale) has no MPS weight layout here"
    return f"{layer.type} has no MPS weight export"


def _activation(layer, top, users, outputs, writer, naming, slopes_done) -> dict | None:
    readers = users.get(top, [])
    if len(readers) != 1 or top in outputs or readers[0].type not in ACTIVATIONS:
        return None
    act = readers[0]
    out = {"layer": act.name, "type": act.type}
    if act.type == "ReLU":
        out["negative_slope"] = _f(_param(act, "relu_param").get("negative_slope", 0.0),
                                   act.name, "relu_param.negative_slope")
    elif act.type == "ELU":
        out["alpha"] = _f(_param(act, "elu_param").get("alpha", 1.0), act.name, "elu_param.alpha")
    elif act.type == "Clip":
        p = _param(act, "clip_param")
        out["min"] = _f(p["min"], act.name, "clip_param.min")
        out["max"] = _f(p["max"], act.name, "clip_param.max")
    elif act.type == "PReLU":
        if not act.blobs:
            return None
        slopes = np.asarray(act.blobs[0], np.float32).reshape(-1)
        out["channel_shared"] = bool(_param(act, "prelu_param").get("channel_shared", False))
        out["slopes"] = writer.write(file_names(act.name, naming)[0], act.name,
                                     _finite32(slopes, act.name), "float32", "[C] slope")
        slopes_done.add(act.name)
    return out


# ---------------------------------------------------------------- SSD

def _ssd(model, merged: Graph, writer: _Writer) -> dict | None:
    from ..layers.priorbox import prior_boxes, priors_per_cell
    priorboxes = [l for l in merged.layers if l.type == "PriorBox"]
    if not priorboxes:
        return None
    shapes = model.shapes.blobs
    producers = merged.producers()
    detections = [l for l in merged.layers if l.type == "DetectionOutput"]
    det = detections[0] if detections else None

    def concat_of(blob, member_type=None):
        layer = producers.get(blob)
        while layer is not None and layer.type in _PASS_THROUGH and len(layer.bottoms) == 1:
            layer = producers.get(layer.bottoms[0])
        if layer is None or layer.type != "Concat":
            return None
        if member_type and not all(producers.get(b) is not None and producers[b].type ==
                                   member_type for b in layer.bottoms):
            return None
        return layer

    def head_layer(blob):
        layer = producers.get(blob)
        while layer is not None and layer.type in _PASS_THROUGH and len(layer.bottoms) == 1:
            layer = producers.get(layer.bottoms[0])
        return None if layer is None else layer.name

    concat = None
    if det is not None and len(det.bottoms) >= 3:
        concat = concat_of(det.bottoms[2], "PriorBox")
        if concat is None and producers.get(det.bottoms[2]) in priorboxes:
            priorboxes = [producers[det.bottoms[2]]]
    if concat is None and (det is None or len(priorboxes) > 1):
        concat = next((l for l in merged.layers if l.type == "Concat" and all(
            producers.get(b) is not None and producers[b].type == "PriorBox" for b in l.bottoms)),
            None)
    order = [producers[b] for b in concat.bottoms] if concat is not None else priorboxes

    parts, heads, first = [], [], 0
    image_size = None
    for pb in order:
        params = dict(_param(pb, "prior_box_param"))
        feat = shapes.get(pb.bottoms[0])
        img = shapes.get(pb.bottoms[1]) if len(pb.bottoms) > 1 else None
        if not feat or len(feat) != 4 or not img or len(img) != 4 or None in feat + img:
            raise ExportError("PriorBox needs known 4-D shapes of its feature map and image "
                              f"(have {feat} and {img})", layer=pb.name)
        try:
            boxes = prior_boxes(feat[2:], img[2:], **params)
            per_cell = priors_per_cell(**params)
        except (TypeError, ValueError) as e:
            raise ExportError(str(e), layer=pb.name) from None
        parts.append(boxes[None])
        n = feat[2] * feat[3] * per_cell
        heads.append({"priorbox": pb.name, "loc": None, "conf": None,
                      "feature_map": [feat[2], feat[3]], "priors_per_cell": per_cell,
                      "num_priors": n, "first_prior": first})
        first += n
        image_size = image_size or [img[2], img[3]]
    axis = 2 if concat is None else _param(concat, "concat_param").get(
        "axis", _param(concat, "concat_param").get("concat_dim", 1))
    try:
        priors = np.concatenate(parts, axis=axis)[0]
    except (ValueError, IndexError) as e:
        raise ExportError(f"cannot concatenate the PriorBox outputs on axis {axis}: {e}",
                          layer=None if concat is None else concat.name) from None
    if det is not None:
        _check_prior_counts(det, first, shapes)
    spec = writer.write("priors.dat", "priors", priors, "float32",
                        "[2][num_priors*4]: xmin, ymin, xmax, ymax of every prior, "
                        "then their variances")
    loc_concat = conf_concat = None
    loc_order = conf_order = []
    if det is not None:
        loc_concat, conf_concat = concat_of(det.bottoms[0]), concat_of(det.bottoms[1])
        loc_order = ([head_layer(b) for b in loc_concat.bottoms] if loc_concat
                     else [head_layer(det.bottoms[0])])
        conf_order = ([head_layer(b) for b in conf_concat.bottoms] if conf_concat
                      else [head_layer(det.bottoms[1])])
        for i, h in enumerate(heads):
            if len(loc_order) == len(heads):
                h["loc"] = loc_order[i]
            if len(conf_order) == len(heads):
                h["conf"] = conf_order[i]
    return {"priors": spec, "num_priors": first, "image_size": image_size,
            "priorbox_concat": None if concat is None else concat.name,
            "loc_concat": None if loc_concat is None else loc_concat.name,
            "conf_concat": None if conf_concat is None else conf_concat.name,
            "loc_order": loc_order, "conf_order": conf_order, "heads": heads,
            "detection_output": None if det is None else _detection_params(det)}


_PASS_THROUGH = ("Flatten", "Reshape", "Permute", "Softmax", "Sigmoid")


class _NotSSDPriors(Exception):
    """PriorBox layers whose count does not match the heads: not SSD's PriorBox semantics."""


def _check_prior_counts(det: Layer, num_priors: int, shapes) -> None:
    """The loc and conf inputs of DetectionOutput must hold exactly one entry per prior."""
    p = _param(det, "detection_output_param")
    classes = p.get("num_classes")
    loc_classes = 1 if p.get("share_location", True) else classes
    for blob, per_prior, what in ((det.bottoms[0], 4 * (loc_classes or 0), "loc"),
                                  (det.bottoms[1], classes or 0, "conf")):
        shape = shapes.get(blob)
        if shape is None or None in shape or not per_prior:
            continue
        have = int(np.prod(shape[1:]))
        if have != num_priors * per_prior:
            raise _NotSSDPriors(
                f"the PriorBox layers give {num_priors} priors, so DetectionOutput's {what} "
                f"input should hold {num_priors * per_prior} values per image, but it holds "
                f"{have}: this net's prior boxes are not SSD's PriorBox (e.g. FaceBoxes "
                "densifies anchors); no priors.dat is written")


def _detection_params(det: Layer) -> dict:
    p = _param(det, "detection_output_param")
    nms = p.get("nms_param", {})
    return {
        "layer": det.name,
        "num_classes": p.get("num_classes"),
        "share_location": bool(p.get("share_location", True)),
        "background_label_id": int(p.get("background_label_id", 0)),
        "nms_threshold": _f(nms.get("nms_threshold", 0.3), det.name, "nms_param.nms_threshold"),
        "top_k": nms.get("top_k"),
        "eta": _f(nms.get("eta", 1.0), det.name, "nms_param.eta"),
        "keep_top_k": int(p.get("keep_top_k", -1)),
        "confidence_threshold": _f(p.get("confidence_threshold"), det.name,
                                   "confidence_threshold"),
        "code_type": p.get("code_type", "CORNER"),
        "variance_encoded_in_target": bool(p.get("variance_encoded_in_target", False)),
    }


def _f(v, layer: str, field: str):
    """A proto float as the shortest decimal that reads back to the same float32.
    JSON has no inf or NaN, and no app can use one here: those are errors."""
    if v is None:
        return None
    if not math.isfinite(v):
        raise ExportError(f"{field} is {v}, which the manifest (JSON) cannot hold and no MPS "
                          "kernel can use", layer=layer)
    v = float(np.float32(v))
    for digits in range(6, 10):
        s = float(f"{v:.{digits}g}")
        if np.float32(s) == np.float32(v):
            return s
    return v
