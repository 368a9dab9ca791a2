"""Read and write binary ``.caffemodel`` files without a protobuf runtime.

A caffemodel is a serialized ``caffe.NetParameter``.  Parsing it with the
generated protobuf classes turns every weight into a Python float (VGG16:
~6 s and ~3x the file size in memory).  This module walks the protobuf wire
format itself over a read-only ``mmap`` and hands out the weights as numpy
*views* of the mapping: reading costs time proportional to the number of
fields, not the number of floats, and no memory beyond the pages you touch.

Wire subset read
----------------
``NetParameter``
    1 ``name`` (string), 100 ``layer`` (LayerParameter), 2 ``layers``
    (V1LayerParameter).  A file with both 100 and 2 is refused, as Caffe's
    ``UpgradeV1Net`` refuses it.
``LayerParameter``
    1 ``name``, 2 ``type`` (string), 7 ``blobs`` (BlobProto).
``V1LayerParameter``
    4 ``name``, 5 ``type`` (LayerType enum, mapped to the modern string as
    Caffe's ``UpgradeV1LayerType`` does; see :data:`V1_LAYER_TYPES`), 6
    ``blobs``.  Field 1 (a V0 ``layer``) means a pre-2014 V0 net: refused.
``BlobProto``
    7 ``shape`` (BlobShape: 1 ``dim``, int64, packed or not), legacy 1 ``num``,
    2 ``channels``, 3 ``height``, 4 ``width``; 5 ``data`` (float) and 8
    ``double_data`` (double), each packed or not; 6 ``diff`` and 9
    ``double_diff`` are skipped.
Every other field, of any wire type except groups, is skipped unread.

Blob semantics follow Caffe's ``Blob::FromProto``: if any of num / channels /
height / width is present the shape is ``[num, channels, height, width]``
(missing ones are 0), otherwise it is ``shape.dim`` (an absent or empty
``shape`` is a scalar, 1 element).  Repeated occurrences of a field follow
protobuf rules: a scalar's last value wins, a sub-message's dims and a
repeated field's values concatenate.

Arrays returned
---------------
* Packed ``data`` is a zero-copy ``np.frombuffer(..., '<f4')`` view reshaped to
  the blob shape; ``double_data`` likewise a ``'<f8'`` view (the consumer
  casts).  Non-packed (one tag per value) data is gathered with one
  vectorised strided read and copied once into a contiguous array; data split
  over several chunks is concatenated (one copy).
* Arrays are **read-only** (the mapping is read-only): copy before modifying.
  Packed data sits wherever the encoder put it, so views may be unaligned;
  numpy handles that transparently.
* Lifetime: nothing needs closing.  Every view keeps the mapping alive; it is
  unmapped when the last array (and the returned :class:`CaffeModel`) is
  garbage collected.  Do not truncate or rewrite the source file in place
  while arrays from it are alive (the OS would fault on access);
  :func:`write_caffemodel` writes to a temporary file and renames it over the
  target, so writing the merged model over its own input is safe.

Duplicate layer names
---------------------
:func:`read_caffemodel` returns every layer in file order, duplicates
included.  Caffe's ``Net::CopyTrainedLayersFrom`` walks the source layers in
order and copies each into the *first* net layer with that name, so when a
caffemodel repeats a name the *last* occurrence is what Caffe ends up using.
:meth:`CaffeModel.by_name` implements exactly that (last one wins);
:meth:`CaffeModel.duplicate_names` lists the names concerned.

Safety rules (reader)
---------------------
* Every varint and length prefix is checked against the end of its enclosing
  message before anything is sliced or allocated; nothing is ever allocated
  from a declared size, and the element count implied by a blob's shape must
  equal the number of values actually present.
* Varints longer than 10 bytes, field number 0, wire types 3/4 (groups) and
  6/7, a known field with the wrong wire type, blob data lengths that are not
  a multiple of the element size, negative dimensions, more than 32 axes
  (Caffe's ``kMaxBlobAxes``), a blob with both ``data`` and ``double_data``,
  invalid UTF-8 in names: all :class:`~caffe2metal.errors.ModelFormatError`.
* An empty file, a file that ends mid-message ("truncated"), a text prototxt
  or an HDF5 weights file passed by mistake, and a file with no layers are
  errors too.  A file cut exactly between two top-level layers cannot be told
  from a shorter model (protobuf has no end marker); compare against the
  prototxt.
* Unknown V1 ``LayerType`` numbers give type ``""``, as proto2 does (the value
  lands in unknown fields and the enum reads as ``NONE``).
* Messages name the file, the layer (by name, or ``#index`` if unnamed) and
  the blob index, plus the byte offset of the problem.

Wire subset written
-------------------
:func:`write_caffemodel` streams a modern ``NetParameter`` in canonical
field-number order, so its bytes equal ``SerializeToString()`` of the same
message built with ``caffe_pb2``: 1 ``name`` (if given), then per layer 100
``layer`` {1 ``name``, 2 ``type``, 7 ``blobs`` {5 ``data`` packed
little-endian float32 (omitted when empty), 7 ``shape`` {1 ``dim`` packed}}}.
Message sizes are computed arithmetically and each array's bytes are written
straight from its numpy buffer (blobs up to 64 KiB are gathered with their
framing into one buffer first, to save system calls): no per-float Python
work, never the whole file in memory, and layers pulled from the iterable one
at a time.  float64/float16 arrays are cast to float32 once (a finite value
that overflows float32 is an error); big-endian input is byteswapped.  An
optional ``progress(nbytes)`` callback sees every byte written.

Memory
------
Pages of the mapping that have been read stay resident (and count in the
process's RSS) while the mapping lives: one copy of the model.  A pipeline
that streams what it computes from them (``fold.FoldedWeights`` into
:func:`write_caffemodel`) adds only the blocks in flight.
"""
from __future__ import annotations

import math
import mmap
import os
import re
import stat
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable

import numpy as np

from ..errors import Caffe2MetalError, ExportError, ModelFormatError

__all__ = [
    "ModelLayer",
    "CaffeModel",
    "V1_LAYER_TYPES",
    "read_caffemodel",
    "parse_caffemodel",
    "write_caffemodel",
]

# V1LayerParameter.LayerType number -> modern type string.  Numbers from
# BVLC caffe src/caffe/proto/caffe.proto, names from UpgradeV1LayerType in
# src/caffe/util/upgrade_proto.cpp.
V1_LAYER_TYPES: dict[int, str] = {
    0: "",                          # NONE
    1: "Accuracy",
    2: "BNLL",
    3: "Concat",
    4: "Convolution",
    5: "Data",
    6: "Dropout",
    7: "EuclideanLoss",
    8: "Flatten",
    9: "HDF5Data",
    10: "HDF5Output",
    11: "Im2col",
    12: "ImageData",
    13: "InfogainLoss",
    14: "InnerProduct",
    15: "LRN",
    16: "MultinomialLogisticLoss",
    17: "Pooling",
    18: "ReLU",
    19: "Sigmoid",
    20: "Softmax",
    21: "SoftmaxWithLoss",
    22: "Split",
    23: "TanH",
    24: "WindowData",
    25: "Eltwise",
    26: "Power",
    27: "SigmoidCrossEntropyLoss",
    28: "HingeLoss",
    29: "MemoryData",
    30: "ArgMax",
    31: "Threshold",
    32: "DummyData",
    33: "Slice",
    34: "MVN",
    35: "AbsVal",
    36: "Silence",
    37: "ContrastiveLoss",
    38: "Exp",
    39: "Deconvolution",
}

MAX_BLOB_AXES = 32                  # Caffe's kMaxBlobAxes
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
    read (or the label given to :func:`parse_caffemodel`).
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

    def __repr__(self):
        return (f"CaffeModel(net_name={self.net_name!r}, path={self.path!r}, "
                f"layers={len(self)})")


# ---------------------------------------------------------------------------
# reader

_MASK64 = (1 << 64) - 1
_WIRE_NAMES = {0: "varint", 1: "64-bit", 2: "length-delimited", 3: "start-group",
               4: "end-group", 5: "32-bit", 6: "invalid (6)", 7: "invalid (7)"}
_F32_RECORD = np.dtype([("tag", "u1"), ("value", "<f4")])     # itemsize 5
_F64_RECORD = np.dtype([("tag", "u1"), ("value", "<f8")])     # itemsize 9
# One-byte tag of a non-packed BlobProto value -> (field, value size, record)
_RUN_TAGS = {
    (5 << 3) | 5: (5, 4, _F32_RECORD),     # data
    (6 << 3) | 5: (6, 4, _F32_RECORD),     # diff
    (8 << 3) | 1: (8, 8, _F64_RECORD),     # double_data
    (9 << 3) | 1: (9, 8, _F64_RECORD),     # double_diff
}
_TEXT_START = re.compile(rb"\s*(#|[A-Za-z_][A-Za-z0-9_.]*\s*[:{<])")
_CONTROL = re.compile(rb"[\x00-\x08\x0e-\x1f\x7f]")


def _looks_like_text(head: bytes) -> bool:
    """True if ``head`` reads like a protobuf text file (a prototxt)."""
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    if not _TEXT_START.match(head) or _CONTROL.search(head):
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start >= len(head) - 3      # only a character cut at the end
    return True


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= (1 << 63) else v


class _Parser:
    def __init__(self, buf, file: str, allow_empty: bool = False):
        self.allow_empty = allow_empty
        self.buf = buf                         # arrays are views of this object
        self.mv = memoryview(buf)
        if self.mv.ndim != 1 or self.mv.itemsize != 1:
            self.mv = self.mv.cast("B")
        self.size = len(self.mv)
        self.file = file
        self.layer: str | None = None
        self.blob: int | None = None
        self._u8 = None

    # -- errors ------------------------------------------------------------
    def fail(self, message: str, at: int | None = None):
        if at is not None:
            message = f"{message} (at byte {at})"
        raise ModelFormatError(message, file=self.file, layer=self.layer, blob=self.blob)

    def _past_end(self, what: str, at: int, need: int, end: int, msg: str):
        if end >= self.size:
            self.fail(f"file is truncated: {what} needs {need} bytes but the file "
                      f"ends at byte {self.size}", at)
        self.fail(f"{what} needs {need} bytes, past the end of its enclosing "
                  f"{msg} at byte {end}", at)

    # -- wire primitives ---------------------------------------------------
    def varint(self, pos: int, end: int, msg: str):
        mv = self.mv
        if pos < end:
            b = mv[pos]
            if b < 0x80:
                return b, pos + 1
        start = pos
        result = 0
        shift = 0
        while True:
            if pos >= end:
                if end >= self.size:
                    self.fail(f"file is truncated in the middle of a varint in {msg}", start)
                self.fail(f"varint runs past the end of its enclosing {msg} at byte {end}",
                          start)
            b = mv[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result & _MASK64, pos
            shift += 7
            if shift >= 70:
                self.fail(f"varint longer than 10 bytes in {msg}", start)

    def next_field(self, pos: int, end: int, msg: str):
        """Decode one field: (number, wire type, a, b, next pos).

        varint: a = value; 64/32-bit: a = offset of the value;
        length-delimited: [a, b) is the payload.
        """
        at = pos
        tag, pos = self.varint(pos, end, msg)
        number, wt = tag >> 3, tag & 7
        if number == 0 or tag > 0xFFFFFFFF:
            self.fail(f"invalid field number {number} in {msg}", at)
        if wt == 0:
            v, pos = self.varint(pos, end, msg)
            return number, 0, v, 0, pos
        if wt == 2:
            n, pos = self.varint(pos, end, msg)
            if n > end - pos:
                self._past_end(f"field {number} of {msg}", at, n, end, msg)
            return number, 2, pos, pos + n, pos + n
        if wt == 5 or wt == 1:
            n = 4 if wt == 5 else 8
            if n > end - pos:
                self._past_end(f"field {number} of {msg}", at, n, end, msg)
            return number, wt, pos, 0, pos + n
        if wt in (3, 4):
            self.fail(f"field {number} of {msg} uses the group wire type {wt}, "
                      "which caffe.proto never uses", at)
        self.fail(f"invalid wire type {wt} for field {number} of {msg}", at)

    def expect(self, number: int, wt: int, want: int, msg: str, fname: str, at: int,
               hint: str = ""):
        if wt != want:
            self.fail(f"field {number} ({fname}) of {msg} has wire type "
                      f"{_WIRE_NAMES[wt]}, expected {_WIRE_NAMES[want]}{hint}", at)

    def string(self, a: int, b: int, what: str, at: int) -> str:
        try:
            return str(self.mv[a:b], "utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8", at)

    def run_length(self, pos: int, end: int, tag: int, record: int) -> int:
        """How many complete ``record``-byte items starting with byte ``tag``
        follow back to back from ``pos`` (vectorised, in growing chunks so the
        work is proportional to the run)."""
        if self._u8 is None:
            self._u8 = np.frombuffer(self.buf, np.uint8)
        u8 = self._u8
        n = 0
        chunk = 64
        while True:
            p = pos + n * record
            avail = (end - p) // record
            if avail <= 0:
                return n
            k = min(chunk, avail)
            bad = np.flatnonzero(u8[p:p + k * record:record] != tag)
            if bad.size:
                return n + int(bad[0])
            n += k
            chunk *= 2

    # -- messages ----------------------------------------------------------
    def parse(self) -> CaffeModel:
        if self.size == 0:
            self.fail("file is empty, expected a binary caffemodel")
        head = bytes(self.mv[:4096])
        if head.startswith(b"\x89HDF\r\n\x1a\n"):
            self.fail("this is an HDF5 file (.caffemodel.h5); only binary protobuf "
                      "caffemodels are supported")
        if _looks_like_text(head):
            self.fail("this looks like a text prototxt, not a binary caffemodel "
                      "(were the prototxt and caffemodel arguments swapped?)")
        model = CaffeModel(path=self.file)
        net_name = ""
        kinds = set()
        pos, end = 0, self.size
        msg = "NetParameter"
        while pos < end:
            at = pos
            number, wt, a, b, pos = self.next_field(pos, end, msg)
            if number == 1:
                self.expect(number, wt, 2, msg, "name", at,
                            hint=" (not a NetParameter: a .binaryproto mean or a "
                                 ".solverstate?)")
                net_name = self.string(a, b, "net name", at)
            elif number == 100 or number == 2:
                v1 = number == 2
                self.expect(number, wt, 2, msg, "layers" if v1 else "layer", at)
                kinds.add(number)
                if len(kinds) > 1:
                    self.fail("file has both 'layer' (modern) and 'layers' (V1) entries; "
                              "Caffe refuses such inconsistent NetParameters", at)
                model.append(self.parse_layer(a, b, len(model), v1))
        if not model and not self.allow_empty:
            self.fail("file contains no layers; is this really a caffemodel?")
        model.net_name = net_name
        return model

    def parse_layer(self, start: int, end: int, index: int, v1: bool) -> ModelLayer:
        msg = "V1LayerParameter" if v1 else "LayerParameter"
        name_no, type_no, blobs_no = (4, 5, 6) if v1 else (1, 2, 7)
        self.layer = f"#{index}"
        name, type_ = "", ""
        spans = []
        pos = start
        while pos < end:
            at = pos
            number, wt, a, b, pos = self.next_field(pos, end, msg)
            if number == name_no:
                self.expect(number, wt, 2, msg, "name", at)
                name = self.string(a, b, "layer name", at)
                self.layer = name if name else f"#{index}"
            elif number == type_no:
                if v1:
                    self.expect(number, wt, 0, msg, "type", at)
                    type_ = V1_LAYER_TYPES.get(a, type_)
                else:
                    self.expect(number, wt, 2, msg, "type", at)
                    type_ = self.string(a, b, "layer type", at)
            elif number == blobs_no:
                self.expect(number, wt, 2, msg, "blobs", at)
                spans.append((a, b))
            elif v1 and number == 1:
                self.fail("V0 layer definition (pre-2014 Caffe format) is not supported; "
                          "upgrade it with Caffe's upgrade_net_proto_binary", at)
        blobs = []
        for i, (a, b) in enumerate(spans):
            self.blob = i
            blobs.append(self.parse_blob(a, b))
        self.blob = None
        self.layer = None
        return ModelLayer(name, type_, blobs)

    def parse_blob(self, start: int, end: int) -> np.ndarray:
        msg = "BlobProto"
        mv, buf = self.mv, self.buf
        legacy: list[int | None] = [None, None, None, None]
        dims: list[int] | None = None
        f32: list[np.ndarray] = []
        f64: list[np.ndarray] = []
        pos = start
        while pos < end:
            run = _RUN_TAGS.get(mv[pos])
            if run is not None:                   # non-packed values, one tag each
                number, size, record = run
                n = self.run_length(pos, end, mv[pos], size + 1)
                if n:
                    if number == 5 or number == 8:
                        values = np.frombuffer(buf, record, n, pos)["value"]
                        (f32 if number == 5 else f64).append(values)
                    pos += n * (size + 1)
                    continue
            at = pos
            number, wt, a, b, pos = self.next_field(pos, end, msg)
            if 1 <= number <= 4:
                self.expect(number, wt, 0, msg,
                            ("num", "channels", "height", "width")[number - 1], at)
                legacy[number - 1] = _signed64(a)
            elif number == 7:
                self.expect(number, wt, 2, msg, "shape", at)
                dims = (dims or []) + self.parse_shape(a, b, len(dims or ()))
            elif number == 5 or number == 8:
                size = 4 if number == 5 else 8
                dtype = "<f4" if number == 5 else "<f8"
                fname = "data" if number == 5 else "double_data"
                chunks = f32 if number == 5 else f64
                if wt == 2:
                    if (b - a) % size:
                        self.fail(f"packed {fname} is {b - a} bytes, not a multiple of "
                                  f"{size}", at)
                    chunks.append(np.frombuffer(buf, dtype, (b - a) // size, a))
                else:
                    self.expect(number, wt, 5 if number == 5 else 1, msg, fname, at)
                    chunks.append(np.frombuffer(buf, dtype, 1, a))
        if f32 and f64:
            self.fail("blob has both data (float) and double_data; expected one of them")
        if any(v is not None for v in legacy):
            shape = [v or 0 for v in legacy]
            source = "num/channels/height/width"
        else:
            shape = dims or []
            source = "shape"
        for d in shape:
            if d < 0:
                self.fail(f"blob {source} {tuple(shape)} has a negative dimension")
        count = math.prod(shape)
        chunks = f32 or f64
        have = sum(c.size for c in chunks)
        if have != count:
            kind = "double" if f64 else "float"
            self.fail(f"blob {source} {tuple(shape)} declares {count} elements but the "
                      f"blob holds {have} {kind} values")
        if not chunks:
            arr = np.empty(0, "<f4")
        elif len(chunks) == 1:
            arr = chunks[0]
            if not arr.flags.c_contiguous:
                arr = np.ascontiguousarray(arr)
        else:
            arr = np.concatenate(chunks)
        return arr.reshape(shape)

    def parse_shape(self, start: int, end: int, have: int) -> list[int]:
        msg = "BlobShape"
        dims: list[int] = []
        pos = start
        while pos < end:
            at = pos
            number, wt, a, b, pos = self.next_field(pos, end, msg)
            if number != 1:
                continue
            if wt == 0:
                dims.append(_signed64(a))
            elif wt == 2:
                p = a
                while p < b:
                    v, p = self.varint(p, b, "packed BlobShape.dim")
                    dims.append(_signed64(v))
                    if have + len(dims) > MAX_BLOB_AXES:
                        break
            else:
                self.expect(number, wt, 0, msg, "dim", at)
            if have + len(dims) > MAX_BLOB_AXES:
                self.fail(f"blob shape has more than {MAX_BLOB_AXES} axes "
                          "(Caffe's kMaxBlobAxes)", at)
        return dims


def parse_caffemodel(data, *, file: str = "<memory>") -> CaffeModel:
    """Parse a caffemodel held in any bytes-like object (bytes, mmap, ...).

    The returned arrays are read-only views of ``data`` (see the module doc);
    ``file`` is the name used in error messages.
    """
    return _Parser(data, file).parse()


def read_caffemodel(path, *, allow_empty: bool = False) -> CaffeModel:
    """Read a binary caffemodel: its layers in file order, as a
    :class:`CaffeModel` (a ``list[ModelLayer]`` with ``net_name``).

    The file is memory-mapped read-only and the blobs are views of the
    mapping; nothing needs closing (see the module doc).  Raises
    :class:`ModelFormatError` for anything that is not a well-formed
    caffemodel and :class:`Caffe2MetalError` if the file cannot be opened.
    ``allow_empty`` accepts a file with no layers (what a net without any
    parameter blobs is saved as; Caffe accepts it too).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):      # pipe, /dev/stdin, a device, ...
                buf = _read_bounded(f, path)
            elif st.st_size == 0:
                if allow_empty:
                    return CaffeModel(path=path)
                raise ModelFormatError("file is empty, expected a binary caffemodel",
                                       file=path)
            else:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as err:
        raise Caffe2MetalError(f"cannot read caffemodel: {err.strerror or err}",
                               file=path) from None
    return _Parser(buf, path, allow_empty).parse()


def _read_bounded(f, path) -> bytes:
    """A non-regular file's bytes, never more than Caffe's limit (a device never ends)."""
    buf = bytearray()
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            return bytes(buf)
        if not buf and chunk[:1] == b"\x00":
            raise ModelFormatError("starts with a zero byte (field number 0): not a caffemodel",
                                   file=path)
        buf += chunk
        if len(buf) > PROTO_BYTES_LIMIT:
            raise ModelFormatError(f"larger than Caffe's limit of {PROTO_BYTES_LIMIT} bytes",
                                   file=path)


# ---------------------------------------------------------------------------
# writer

def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _string_field(tag: bytes, s: str) -> bytes:
    b = s.encode("utf-8")
    return tag + _varint_bytes(len(b)) + b


def _prepare_blob(blob, label: str, layer: str, index: int):
    """-> (float32 data: contiguous 1-D array, or a lazy blob with ``row_blocks``;
    packed dims payload)."""
    if hasattr(blob, "row_blocks"):            # fold.FoldedWeights: float32 rows on demand
        return blob, b"".join(_varint_bytes(d) for d in blob.shape)
    arr = np.asarray(blob)
    if arr.dtype.kind != "f":
        raise ExportError(f"blob dtype {arr.dtype} is not floating point",
                          file=label, layer=layer, blob=index)
    shape = arr.shape
    if arr.dtype != np.dtype("<f4"):
        with np.errstate(over="ignore", invalid="ignore"):
            data = np.ascontiguousarray(arr, "<f4")
        if arr.dtype.itemsize > 4 and not np.array_equal(
                np.isfinite(data.reshape(shape)), np.isfinite(arr)):
            raise ExportError("blob has finite values outside the float32 range",
                              file=label, layer=layer, blob=index)
    else:
        data = np.ascontiguousarray(arr)
    dims = b"".join(_varint_bytes(d) for d in shape)
    return data.reshape(-1), dims


def _bytes(array) -> memoryview:
    """The little-endian float32 bytes of ``array`` (no copy when it already is that)."""
    return memoryview(np.ascontiguousarray(array, "<f4").reshape(-1)).cast("B")


_WRITE_CHUNK = 1 << 26      # big blobs are written in pieces of 64 MiB (progress granularity)
_SMALL_BLOB = 1 << 16       # blobs up to 64 KiB are copied into the frame buffer
_FRAME_BUFFER = 1 << 20     # which is flushed once it holds 1 MiB


def _write_stream(f: BinaryIO, layers: Iterable, net_name: str, label: str,
                  progress: Callable[[int], object] | None = None, io=None) -> int:
    total = 0
    out = bytearray()

    def emit(data) -> None:
        nonlocal total
        if io is None:
            f.write(data)
        else:
            io.write(f, data, name=label)
        n = memoryview(data).nbytes
        total += n
        if progress is not None:
            progress(n)

    def flush() -> None:
        if out:
            emit(bytes(out) if io is not None else out)
            out.clear()

    def write_layer(index: int, layer) -> None:
        # a function, so that this layer's arrays are unreferenced once it returns
        # (while the caller's generator builds the next layer)
        try:
            name, type_, blobs = layer.name, layer.type, list(layer.blobs)
        except AttributeError:
            raise ExportError(f"layer #{index} is a {type(layer).__name__}, expected an "
                              "object with name, type and blobs", file=label) from None
        if not isinstance(name, str) or not isinstance(type_, str):
            raise ExportError(f"layer #{index}: name and type must be str",
                              file=label, layer=str(name))
        head = _string_field(b"\x0a", name) + _string_field(b"\x12", type_)
        parts = []
        size = len(head)
        for i, blob in enumerate(blobs):
            data, dims = _prepare_blob(blob, label, name, i)
            shape_msg = (b"\x0a" + _varint_bytes(len(dims)) + dims) if dims else b""
            nbytes = data.nbytes
            blob_size = 1 + _varint_len(len(shape_msg)) + len(shape_msg)
            if nbytes:
                blob_size += 1 + _varint_len(nbytes) + nbytes
            parts.append((data, nbytes, shape_msg, blob_size))
            size += 1 + _varint_len(blob_size) + blob_size
        layer_bytes = 2 + _varint_len(size) + size
        if total + len(out) + layer_bytes > PROTO_BYTES_LIMIT:
            raise ExportError(f"the caffemodel would exceed {PROTO_BYTES_LIMIT} bytes, the "
                              "most Caffe and OpenCV can read", file=label, layer=name)
        out.extend(b"\xa2\x06" + _varint_bytes(size) + head)
        for data, nbytes, shape_msg, blob_size in parts:
            out.extend(b"\x3a" + _varint_bytes(blob_size))
            if nbytes:
                out.extend(b"\x2a" + _varint_bytes(nbytes))
                if not isinstance(data, np.ndarray):   # lazy: computed a block at a time
                    flush()
                    for block in data.row_blocks():
                        emit(_bytes(block))
                elif nbytes <= _SMALL_BLOB:        # copied into the frame buffer: fewer writes
                    out.extend(memoryview(data).cast("B"))
                else:                              # written straight from the array
                    flush()
                    raw = memoryview(data).cast("B")
                    for start in range(0, nbytes, _WRITE_CHUNK):
                        emit(raw[start:start + _WRITE_CHUNK])
            out.extend(b"\x3a" + _varint_bytes(len(shape_msg)) + shape_msg)
            if len(out) >= _FRAME_BUFFER:
                flush()

    if net_name:
        out += _string_field(b"\x0a", net_name)
    index = 0
    try:
        for layer in layers:        # (not enumerate: its cached tuple would keep the layer)
            write_layer(index, layer)
            del layer
            index += 1
        flush()
    except BaseException:
        if io is not None:
            io.abort()              # nothing more reaches f, which the caller closes
        raise
    if io is not None:
        io.wait()                   # every byte in f (or the error) before returning
    return total


def write_caffemodel(path_or_fileobj, layers: Iterable, net_name: str = "", *,
                     progress: Callable[[int], object] | None = None, io=None) -> int:
    """Write ``layers`` as a modern binary caffemodel; return the byte count.

    ``layers`` may be any iterable (a generator is consumed once) of objects
    with ``name``, ``type`` and ``blobs`` attributes (:class:`ModelLayer`,
    ``graph.Layer``, ...); blobs must be floating-point arrays.  A path is
    written via a temporary file in the same directory that is renamed over
    the target when complete (so a failed write leaves no partial file and
    overwriting a file that is still memory-mapped is safe); a binary file
    object is written to directly, starting at its current position.

    ``progress``, if given, is called with the number of bytes just written,
    every 64 MiB at most (for a progress bar).  Layers are pulled from
    ``layers`` one at a time and each blob is written straight from its
    buffer, so a generator that builds one layer at a time keeps only that
    layer in memory.  A blob may also be lazy: an object with ``shape``,
    ``nbytes`` and ``row_blocks()`` yielding float32 rows in order (a
    ``fold.FoldedWeights``), written a block at a time as it is computed.

    ``io``, a :class:`~caffe2metal.writeback.WriteBehind`, does the writes on
    its thread while the next block is computed; they are all done (or
    reported) when this returns.
    """
    if hasattr(path_or_fileobj, "write"):
        label = str(getattr(path_or_fileobj, "name", "<stream>"))
        return _write_stream(path_or_fileobj, layers, net_name, label, progress, io)
    path = os.fspath(path_or_fileobj)
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o666)
    except OSError as err:
        raise ExportError(f"cannot create caffemodel: {err.strerror or err}",
                          file=path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            written = _write_stream(f, layers, net_name, path, progress, io)
        os.replace(tmp, path)
    except OSError as err:
        _unlink_quietly(tmp)
        raise ExportError(f"cannot write caffemodel: {err.strerror or err}",
                          file=path) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return written


def _unlink_quietly(path: str):
    try:
        os.unlink(path)
    except OSError:
        pass
