"""Fill compiled protobuf messages from a ``textproto`` field tree.

``textproto.parse`` already splits a prototxt into fields (it must, to keep
every layer's original text); protobuf's pure-Python ``text_format`` would
tokenize the whole file a second time, and is most of the time a conversion
spends reading a 3,000-line deploy file.  This fills the messages from the
tree instead, driven by the descriptors, with text_format's rules for values:

* integers in decimal, hex (0x) or octal (leading 0), range-checked per type;
* floats with exponents, ``inf``/``nan`` (any case, optional sign), an optional
  ``f`` suffix, and integers;
* bools ``true``/``false``/``t``/``f``/``1``/``0`` (``True``/``False`` too);
* strings with C escapes, adjacent strings concatenated; enums by name or number.

``tests/test_textfill.py`` checks that the result equals ``text_format.Parse``
on every real deploy file and on mutations of them.
"""
from __future__ import annotations

import math
import re
from typing import NoReturn

from google.protobuf.descriptor import FieldDescriptor as FD

from ..errors import ModelFormatError
from .textproto import Document, Field, unquote

_INT_RANGE = {
    FD.CPPTYPE_INT32: (-2**31, 2**31 - 1), FD.CPPTYPE_INT64: (-2**63, 2**63 - 1),
    FD.CPPTYPE_UINT32: (0, 2**32 - 1), FD.CPPTYPE_UINT64: (0, 2**64 - 1),
}
_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?[fF]?$")
_STRINGS = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'')
_TRUE, _FALSE = ("true", "t", "1", "True"), ("false", "f", "0", "False")


def fill(doc: Document, fields: list[Field], message,
         skip: set[int] | frozenset[int] = frozenset()) -> None:
    """Set every field of ``fields`` on ``message``; fields whose id() is in ``skip``
    (the ones our schema does not know) are left out."""
    descriptor = message.DESCRIPTOR
    for f in fields:
        if id(f) in skip:
            continue
        fd = descriptor.fields_by_name.get(f.name)
        if f.name.startswith("[") or (fd is not None and fd.message_type is not None and
                                      doc.text[f.start:f.end].rstrip().endswith("]")):
            raise Unsupported(f.name)
        if fd is None:
            _fail(doc, f.start, f"message type \"{descriptor.full_name}\" has no field named "
                  f"\"{f.name}\"")
        if fd.message_type is not None:
            if f.children is None:
                _fail(doc, f.start, f"field \"{f.name}\" needs a {{ ... }} value")
            if not fd.is_repeated and message.HasField(f.name):
                _fail(doc, f.start, f"non-repeated field \"{f.name}\" is set twice")
            target = getattr(message, f.name).add() if fd.is_repeated else \
                getattr(message, f.name)
            target.SetInParent()
            fill(doc, f.children, target, skip)
            continue
        if f.children is not None:
            _fail(doc, f.start, f"field \"{f.name}\" takes a value, not a {{ ... }} block")
        values = [_scalar(doc, fd, tok, at) for tok, at in _scalar_tokens(doc, f)]
        if fd.is_repeated:
            getattr(message, f.name).extend(values)
        else:
            if len(values) != 1:
                _fail(doc, f.start, f"field \"{f.name}\" is not repeated")
            if message.HasField(f.name) and fd.containing_oneof is None:
                _fail(doc, f.start, f"non-repeated field \"{f.name}\" is set twice")
            setattr(message, f.name, values[0])


class Unsupported(Exception):
    """A construct this filler leaves to text_format (message lists, extensions)."""


def _scalar_tokens(doc: Document, f: Field):
    """The raw value tokens of a scalar field, with their offsets (lists included)."""
    text = doc.text
    start = f.value_start
    if start < 0:
        return []
    if text[f.start:f.end].rstrip().endswith("]") and "[" in text[f.start:start + 1]:
        body = text[text.index("[", f.start) + 1:f.end - 1]
        base = text.index("[", f.start) + 1
        out = []
        for m in re.finditer(r'"(?:[^"\\\n]|\\.)*"(?:\s*"(?:[^"\\\n]|\\.)*")*'
                             r"|'(?:[^'\\\n]|\\.)*'|[^,\s\]]+", body):
            out.append((m.group(), base + m.start()))
        return out
    tok = f.value or ""
    if tok[:1] in "\"'":           # adjacent strings: "a" "b"
        return [(" ".join(_STRINGS.findall(text[start:f.end])), start)]
    return [(tok, start)]


def _scalar(doc: Document, fd: FD, tok: str, at: int) -> object:
    """The value of one scalar token for field ``fd``, by text_format's rules."""
    t = fd.cpp_type
    if t == FD.CPPTYPE_STRING:
        return _string(doc, fd, tok, at)
    if tok[:1] in "\"'":
        _fail(doc, at, f"field \"{fd.name}\" does not take a string")
    if t in _INT_RANGE:
        return _integer(doc, fd, tok, at)
    if t in (FD.CPPTYPE_FLOAT, FD.CPPTYPE_DOUBLE):
        return _float(doc, fd, tok, at)
    if t == FD.CPPTYPE_BOOL:
        return _bool(doc, fd, tok, at)
    if t == FD.CPPTYPE_ENUM:
        return _enum(doc, fd, tok, at)
    _fail(doc, at, f"field \"{fd.name}\" has a type this reader does not handle")


def _string(doc: Document, fd: FD, tok: str, at: int) -> str | bytes:
    if tok[:1] not in "\"'":
        _fail(doc, at, f"expected a string for field \"{fd.name}\", found {tok}")
    value = "".join(unquote(s) for s in _STRINGS.findall(tok))
    return value.encode("latin-1") if fd.type == FD.TYPE_BYTES else value


def _integer(doc: Document, fd: FD, tok: str, at: int) -> int:
    try:
        v = int(tok, 0) if not re.fullmatch(r"-?0\d+", tok) else int(tok, 8)
    except ValueError:
        _fail(doc, at, f"expected an integer for field \"{fd.name}\", found {tok}")
    lo, hi = _INT_RANGE[fd.cpp_type]
    if not lo <= v <= hi:
        _fail(doc, at, f"integer {tok} is out of range for field \"{fd.name}\"")
    return v


def _float(doc: Document, fd: FD, tok: str, at: int) -> float:
    low = tok.lower().lstrip("+-")
    if low in ("inf", "infinity", "inff", "infinityf"):
        return -math.inf if tok.startswith("-") else math.inf
    if low in ("nan", "nanf"):
        return math.nan
    if not _FLOAT.match(tok) or re.fullmatch(r"[-+]?0\d+", tok):   # 010: octal, not a float
        _fail(doc, at, f"expected a number for field \"{fd.name}\", found {tok}")
    return float(tok.rstrip("fF"))


def _bool(doc: Document, fd: FD, tok: str, at: int) -> bool:
    if tok in _TRUE:
        return True
    if tok in _FALSE:
        return False
    _fail(doc, at, f"expected true or false for field \"{fd.name}\", found {tok}")


def _enum(doc: Document, fd: FD, tok: str, at: int) -> int:
    value = fd.enum_type.values_by_name.get(tok)
    if value is not None:
        return value.number
    try:
        number = int(tok, 0)
    except ValueError:
        number = None
    if number is not None and number in fd.enum_type.values_by_number:
        return number
    _fail(doc, at, f"enum type \"{fd.enum_type.full_name}\" has no value named {tok}")


def _fail(doc: Document, offset: int, message: str) -> NoReturn:
    line, col = doc.position(offset)
    raise ModelFormatError(f"{line}:{col}: {message}", file=doc.path or None)
