"""The caffemodel wire parser: a ``caffe.NetParameter`` walked over a buffer.

:class:`_Parser` reads the protobuf wire format directly (no protobuf runtime)
and hands out the weights as numpy views of the buffer it is given; see
:mod:`caffe2metal.caffe.caffemodel` for the public API and the arrays' rules.

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
    Caffe's ``UpgradeV1LayerType`` does; see :data:`~caffe2metal.caffe.v1.V1_LAYER_TYPES`), 6
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
"""
from __future__ import annotations

import math
import mmap
import re
from typing import NoReturn

import numpy as np

from ..errors import ModelFormatError
from .records import CaffeModel, ModelLayer
from .v1 import V1_LAYER_TYPES

MAX_BLOB_AXES = 32                  # Caffe's kMaxBlobAxes

# what the parser reads from: any buffer of bytes (the arrays are views of it)
ByteSource = bytes | bytearray | memoryview | mmap.mmap

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
    def __init__(self, buf: ByteSource, file: str, allow_empty: bool = False):
        self.allow_empty = allow_empty
        self.buf = buf                         # arrays are views of this object
        self.mv = memoryview(buf)
        if self.mv.ndim != 1 or self.mv.itemsize != 1:
            self.mv = self.mv.cast("B")
        self.size = len(self.mv)
        self.file = file
        self.layer: str | None = None
        self.blob: int | None = None
        self._u8: np.ndarray | None = None

    # -- errors ------------------------------------------------------------
    def fail(self, message: str, at: int | None = None) -> NoReturn:
        if at is not None:
            message = f"{message} (at byte {at})"
        raise ModelFormatError(message, file=self.file, layer=self.layer, blob=self.blob)

    def _past_end(self, what: str, at: int, need: int, end: int, msg: str) -> NoReturn:
        if end >= self.size:
            self.fail(f"file is truncated: {what} needs {need} bytes but the file "
                      f"ends at byte {self.size}", at)
        self.fail(f"{what} needs {need} bytes, past the end of its enclosing "
                  f"{msg} at byte {end}", at)

    # -- wire primitives ---------------------------------------------------
    def varint(self, pos: int, end: int, msg: str) -> tuple[int, int]:
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

    def next_field(self, pos: int, end: int, msg: str) -> tuple[int, int, int, int, int]:
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
               hint: str = "") -> None:
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
        return self.blob_array(legacy, dims, f32, f64)

    def blob_array(self, legacy: list[int | None], dims: list[int] | None,
                   f32: list[np.ndarray], f64: list[np.ndarray]) -> np.ndarray:
        """The blob's values in its shape (Blob::FromProto), checked against it."""
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
