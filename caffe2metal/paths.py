"""Opening the files a user names, safely: never blocking, never a surprise.

* :func:`check_name`: a file name that is not valid UTF-8 (bytes that
  ``os.fsdecode`` turns into lone surrogates) is refused, so no such name ever
  reaches ``manifest.json`` or a report (both are always valid UTF-8).
* :func:`open_regular`: opens with ``O_NONBLOCK`` (a FIFO without a writer
  does not block the open) and refuses anything that is not a regular file
  after ``fstat``: FIFOs, sockets and devices (``/dev/zero`` never ends, a
  terminal or a pipe may never deliver), before reading a byte.  Reading
  from a pipe (``/dev/stdin``, ``<(...)``) is therefore not supported:
  write the data to a file first.
* :func:`read_regular`: the whole of a regular file, refused unread when it
  is larger than a bound (the size is known from ``fstat`` before reading).
"""
from __future__ import annotations

import os
import stat

from .errors import Caffe2MetalError

__all__ = ["check_name", "open_regular", "read_regular", "kind_of"]


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def check_name(path: str | os.PathLike | bytes, error=Caffe2MetalError) -> str:
    """``path`` as text; ``error`` if its name is not valid UTF-8."""
    text = os.fsdecode(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise error("file name is not valid UTF-8: rename the file (caffe2metal writes "
                    "names into UTF-8 JSON)", file=text) from None
    return text


def open_regular(path: str | os.PathLike, what: str = "file", error=Caffe2MetalError,
                 no_follow: bool = False) -> tuple[int, os.stat_result]:
    """An fd open for reading on the regular file ``path``, and its ``fstat``.

    Never blocks (``O_NONBLOCK`` open, checked before any read); ``error``
    names the file for anything else: missing, unreadable, or not a regular
    file.  ``no_follow`` refuses a symbolic link as the last component."""
    text = check_name(path, error)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    if no_follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"cannot read {what}: no such file", file=text) from None
    except OSError as e:
        raise error(f"cannot read {what}: {e.strerror or e}", file=text) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"cannot read {what}: {kind_of(st.st_mode)}, not a regular file",
                        file=text)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException as e:
        os.close(fd)
        if isinstance(e, OSError):
            raise error(f"cannot read {what}: {e.strerror or e}", file=text) from None
        raise
    return fd, st


def read_all(fd: int, size: int, path: str, what: str, error=Caffe2MetalError,
             to_end: bool = True) -> bytearray:
    """Exactly ``size`` bytes from ``fd`` (a file that shrinks meanwhile, or with
    ``to_end`` grows, is an error: it is being written to)."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    try:
        while got < size:
            n = os.readv(fd, [view[got:]]) if hasattr(os, "readv") else _read_into(fd, view[got:])
            if n == 0:
                break
            got += n
        extra = os.read(fd, 1) if got == size and to_end else b""
    except OSError as e:
        raise error(f"cannot read {what}: {e.strerror or e}", file=path) from None
    if got != size or extra:
        raise error(f"cannot read {what}: the file changed size while it was read "
                    "(is something writing it?)", file=path)
    return buf


def _read_into(fd: int, view: memoryview) -> int:
    data = os.read(fd, len(view))
    view[:len(data)] = data
    return len(data)


def read_regular(path: str | os.PathLike, limit: int, what: str = "file",
                 error=Caffe2MetalError, no_follow: bool = False) -> bytes:
    """The bytes of the regular file ``path``, refused unread above ``limit`` bytes."""
    fd, st = open_regular(path, what, error, no_follow)
    text = os.fsdecode(path)
    try:
        if st.st_size > limit:
            raise error(f"cannot read {what}: {st.st_size} bytes, more than the {limit} "
                        "expected", file=text)
        return bytes(read_all(fd, st.st_size, text, what, error))
    finally:
        os.close(fd)
