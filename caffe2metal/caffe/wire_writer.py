"""The caffemodel wire writer: layers streamed out as a modern ``NetParameter``.

Wire subset written
-------------------
:func:`~caffe2metal.caffe.caffemodel.write_caffemodel` streams a modern
``NetParameter`` in canonical
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

:class:`_StreamWriter` does the streaming onto an open binary file: each
layer is validated and sized (:meth:`~_StreamWriter.frame_layer`), checked
against Caffe's size limit, then its framing and data go out through a 1 MiB
frame buffer (:meth:`~_StreamWriter.emit`, :meth:`~_StreamWriter.flush`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, BinaryIO, NamedTuple, Protocol

import numpy as np

from ..errors import ExportError
from .records import PROTO_BYTES_LIMIT

_WRITE_CHUNK = 1 << 26      # big blobs are written in pieces of 64 MiB (progress granularity)
_SMALL_BLOB = 1 << 16       # blobs up to 64 KiB are copied into the frame buffer
_FRAME_BUFFER = 1 << 20     # which is flushed once it holds 1 MiB


class WriteBehind(Protocol):
    """What the writer needs of ``caffe2metal.export.writeback.WriteBehind``."""

    def write(self, f: BinaryIO, data: bytes | bytearray | memoryview,
              name: str | None = None) -> object: ...
    def abort(self) -> object: ...
    def wait(self) -> object: ...


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
    return np.ascontiguousarray(array, "<f4").reshape(-1).data.cast("B")



class _BlobFrame(NamedTuple):
    """One blob of a layer, sized: its data and the framing around it."""
    data: Any               # float32 1-D np.ndarray, or a lazy blob with row_blocks()
    nbytes: int
    shape_msg: bytes        # the BlobShape payload (b"" for a scalar)
    size: int               # the BlobProto payload size


class _LayerFrame(NamedTuple):
    """One layer, sized: what goes before its blobs and the blobs themselves."""
    name: str
    head: bytes             # the name and type fields
    blobs: list[_BlobFrame]
    size: int               # the LayerParameter payload size


class _StreamWriter:
    """Writes layers to ``f`` (or through ``io``), counting and reporting bytes."""

    def __init__(self, f: BinaryIO, label: str,
                 progress: Callable[[int], object] | None = None,
                 io: WriteBehind | None = None, write_chunk: int = _WRITE_CHUNK):
        self.f = f
        self.label = label
        self.progress = progress
        self.io = io
        self.write_chunk = write_chunk
        self.total = 0                  # bytes emitted so far
        self.out = bytearray()          # the frame buffer

    def emit(self, data: bytes | bytearray | memoryview) -> None:
        if self.io is None:
            self.f.write(data)
        else:
            self.io.write(self.f, data, name=self.label)
        n = memoryview(data).nbytes
        self.total += n
        if self.progress is not None:
            self.progress(n)

    def flush(self) -> None:
        if self.out:
            self.emit(bytes(self.out) if self.io is not None else self.out)
            self.out.clear()

    def frame_layer(self, index: int, layer: Any) -> _LayerFrame:
        """The layer's fields checked and its messages sized (no bytes written)."""
        label = self.label
        try:
            name, type_, blobs = layer.name, layer.type, list(layer.blobs)
        except AttributeError:
            raise ExportError(f"layer #{index} is a {type(layer).__name__}, expected an "
                              "object with name, type and blobs", file=label) from None
        if not isinstance(name, str) or not isinstance(type_, str):
            raise ExportError(f"layer #{index}: name and type must be str",
                              file=label, layer=str(name))
        head = _string_field(b"\x0a", name) + _string_field(b"\x12", type_)
        frames = []
        size = len(head)
        for i, blob in enumerate(blobs):
            data, dims = _prepare_blob(blob, label, name, i)
            shape_msg = (b"\x0a" + _varint_bytes(len(dims)) + dims) if dims else b""
            nbytes = data.nbytes
            blob_size = 1 + _varint_len(len(shape_msg)) + len(shape_msg)
            if nbytes:
                blob_size += 1 + _varint_len(nbytes) + nbytes
            frames.append(_BlobFrame(data, nbytes, shape_msg, blob_size))
            size += 1 + _varint_len(blob_size) + blob_size
        return _LayerFrame(name, head, frames, size)

    def write_layer(self, index: int, layer: Any) -> None:
        # a method, so that this layer's arrays are unreferenced once it returns
        # (while the caller's generator builds the next layer)
        frame = self.frame_layer(index, layer)
        layer_bytes = 2 + _varint_len(frame.size) + frame.size
        if self.total + len(self.out) + layer_bytes > PROTO_BYTES_LIMIT:
            raise ExportError(f"the caffemodel would exceed {PROTO_BYTES_LIMIT} bytes, the "
                              "most Caffe and OpenCV can read", file=self.label,
                              layer=frame.name)
        out = self.out
        out.extend(b"\xa2\x06" + _varint_bytes(frame.size) + frame.head)
        for blob in frame.blobs:
            out.extend(b"\x3a" + _varint_bytes(blob.size))
            if blob.nbytes:
                out.extend(b"\x2a" + _varint_bytes(blob.nbytes))
                self.write_data(blob.data, blob.nbytes)
            out.extend(b"\x3a" + _varint_bytes(len(blob.shape_msg)) + blob.shape_msg)
            if len(out) >= _FRAME_BUFFER:
                self.flush()

    def write_data(self, data: Any, nbytes: int) -> None:
        """A blob's float32 bytes, after its framing (already in the buffer)."""
        if not isinstance(data, np.ndarray):   # lazy: computed a block at a time
            self.flush()
            for block in data.row_blocks():
                self.emit(_bytes(block))
        elif nbytes <= _SMALL_BLOB:            # copied into the frame buffer: fewer writes
            self.out.extend(data.data.cast("B"))
        else:                                  # written straight from the array
            self.flush()
            raw = data.data.cast("B")
            for start in range(0, nbytes, self.write_chunk):
                self.emit(raw[start:start + self.write_chunk])

    def write(self, layers: Iterable, net_name: str) -> int:
        """The whole NetParameter; returns the byte count.  Every byte is in ``f``
        (or the error raised) when this returns."""
        if net_name:
            self.out += _string_field(b"\x0a", net_name)
        index = 0
        try:
            for layer in layers:    # (not enumerate: its cached tuple would keep the layer)
                self.write_layer(index, layer)
                del layer
                index += 1
            self.flush()
        except BaseException:
            if self.io is not None:
                self.io.abort()     # nothing more reaches f, which the caller closes
            raise
        if self.io is not None:
            self.io.wait()          # every byte in f (or the error) before returning
        return self.total


def write_stream(f: BinaryIO, layers: Iterable, net_name: str, label: str,
                 progress: Callable[[int], object] | None = None,
                 io: WriteBehind | None = None, *, write_chunk: int = _WRITE_CHUNK) -> int:
    """Write ``layers`` (see ``write_caffemodel``) to the open binary file ``f``;
    ``label`` names it in error messages.  Returns the byte count."""
    return _StreamWriter(f, label, progress, io, write_chunk).write(layers, net_name)
