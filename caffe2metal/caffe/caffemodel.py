"""Read and write binary ``.caffemodel`` files without a protobuf runtime.

A caffemodel is a serialized ``caffe.NetParameter``.  Parsing it with the
generated protobuf classes turns every weight into a Python float (VGG16:
~6 s and ~3x the file size in memory).  This module walks the protobuf wire
format itself over a read-only ``mmap`` and hands out the weights as numpy
*views* of the mapping: reading costs time proportional to the number of
fields, not the number of floats, and no memory beyond the pages you touch.

Modules
-------
* :mod:`~caffe2metal.caffe.wire_reader`: the wire subset read, blob semantics
  and the reader's safety rules (:class:`~caffe2metal.caffe.wire_reader._Parser`);
* :mod:`~caffe2metal.caffe.wire_writer`: the wire subset written (the
  streaming writer behind :func:`write_caffemodel`);
* :mod:`~caffe2metal.caffe.records`: :class:`ModelLayer`, :class:`CaffeModel`
  and how duplicate layer names resolve;
* :mod:`~caffe2metal.caffe.v1`: V1 nets (:data:`V1_LAYER_TYPES`).

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

Memory
------
Pages of the mapping that have been read stay resident (and count in the
process's RSS) while the mapping lives: one copy of the model.  A pipeline
that streams what it computes from them (``fold.FoldedWeights`` into
:func:`write_caffemodel`) adds only the blocks in flight.
"""
from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Iterable

from ..errors import Caffe2MetalError, ExportError, ModelFormatError
from ..paths import open_regular, read_all
from .records import PROTO_BYTES_LIMIT, CaffeModel, ModelLayer
from .v1 import V1_LAYER_TYPES
from .wire_reader import MAX_BLOB_AXES as MAX_BLOB_AXES
from .wire_reader import ByteSource, _Parser
from .wire_writer import _FRAME_BUFFER as _FRAME_BUFFER
from .wire_writer import _SMALL_BLOB as _SMALL_BLOB
from .wire_writer import _WRITE_CHUNK, WriteBehind, write_stream
from .wire_writer import _varint_bytes as _varint_bytes

__all__ = [
    "ModelLayer",
    "CaffeModel",
    "V1_LAYER_TYPES",
    "read_caffemodel",
    "parse_caffemodel",
    "write_caffemodel",
]
# Also importable from here, as before the split: MAX_BLOB_AXES, PROTO_BYTES_LIMIT,
# _varint_bytes (tests and tools/fuzz.py encode with it), _SMALL_BLOB, _FRAME_BUFFER and
# _WRITE_CHUNK (write_caffemodel passes this module's value on, so patching it here works).

# Files up to this size are read into memory; bigger ones are memory-mapped.  A mapped
# file that is truncated while it is read kills the process with SIGBUS, which Python
# cannot catch (its partial output directory is then removed by the next run, see
# export.output); a copy cannot change under the reader.
COPY_BYTES = 1 << 30


def parse_caffemodel(data: ByteSource, *,
                     file: str = "<memory>") -> CaffeModel:
    """Parse a caffemodel held in any bytes-like object (bytes, mmap, ...).

    The returned arrays are read-only views of ``data`` (see the module doc);
    ``file`` is the name used in error messages.
    """
    return _Parser(data, file).parse()


def read_caffemodel(path: str | os.PathLike, *, allow_empty: bool = False) -> CaffeModel:
    """Read a binary caffemodel: its layers in file order, as a
    :class:`CaffeModel` (a ``list[ModelLayer]`` with ``net_name``).

    A file up to ``COPY_BYTES`` is read into memory (nothing can change it under
    the reader), a bigger one memory-mapped read-only; the blobs are views of
    that buffer and nothing needs closing (see the module doc).  Only a regular
    file is read: a FIFO, socket or device is refused before reading (never a
    hang), as is a name that is not valid UTF-8.  Raises
    :class:`ModelFormatError` for anything that is not a well-formed
    caffemodel and :class:`Caffe2MetalError` if the file cannot be opened.
    ``allow_empty`` accepts a file with no layers (what a net without any
    parameter blobs is saved as; Caffe accepts it too).
    """
    fd, st = open_regular(path, "caffemodel")
    path = os.fsdecode(path)
    buf: ByteSource
    try:
        if st.st_size == 0:
            if allow_empty:
                return CaffeModel(path=path)
            raise ModelFormatError("file is empty, expected a binary caffemodel", file=path)
        if st.st_size > PROTO_BYTES_LIMIT:
            raise ModelFormatError(f"larger than Caffe's limit of {PROTO_BYTES_LIMIT} bytes",
                                   file=path)
        if st.st_size <= COPY_BYTES:
            buf = memoryview(read_all(fd, st.st_size, path, "caffemodel")).toreadonly()
        else:
            try:
                buf = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except OSError as err:
                raise Caffe2MetalError(f"cannot read caffemodel: {err.strerror or err}",
                                       file=path) from None
    finally:
        os.close(fd)
    return _Parser(buf, path, allow_empty).parse()


def write_caffemodel(path_or_fileobj, layers: Iterable, net_name: str = "", *,
                     progress: Callable[[int], object] | None = None,
                     io: WriteBehind | None = None) -> int:
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

    ``io``, a :class:`~caffe2metal.export.writeback.WriteBehind`, does the writes on
    its thread while the next block is computed; they are all done (or
    reported) when this returns.
    """
    if hasattr(path_or_fileobj, "write"):
        label = str(getattr(path_or_fileobj, "name", "<stream>"))
        return write_stream(path_or_fileobj, layers, net_name, label, progress, io,
                            write_chunk=_WRITE_CHUNK)
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
            written = write_stream(f, layers, net_name, path, progress, io,
                                   write_chunk=_WRITE_CHUNK)
        os.replace(tmp, path)
    except OSError as err:
        _unlink_quietly(tmp)
        raise ExportError(f"cannot write caffemodel: {err.strerror or err}",
                          file=path) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return written


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
