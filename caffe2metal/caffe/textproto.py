"""Protobuf text format as a tree of spans over the original text.

We parse prototxt files twice: ``text_format`` fills the compiled Caffe
messages (the values we compute with), and this module records *where* each
field stands in the file.  The spans serve two purposes:

* the merged prototxt is the original text with surgical edits (folded layers
  cut out, a top renamed, ``bias_term`` set), so every comment, fork-specific
  layer and field the user wrote comes back out untouched;
* fields our schema does not know are found by walking the tree against the
  message descriptors, reported, and blanked out before ``text_format`` sees
  them (their text still goes to the merged file verbatim).

Grammar (what Caffe's files use): ``name [:] value`` where value is a scalar
token, one or more adjacent strings, ``{ fields }`` or ``< fields >``, or a
``[v, v, ...]`` list of either.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple, NoReturn

from google.protobuf import text_encoding

from ..errors import ModelFormatError

_TOKEN = re.compile(
    r"""(?P<skip>(?:\s+|\#[^\n]*)+)
      | (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
      | (?P<word>[A-Za-z0-9_.+\-]+)
      | (?P<punct>[{}<>:\[\],;])""",
    re.X,
)
_CLOSE = {"{": "}", "<": ">"}
MAX_DEPTH = 100     # protobuf's default recursion limit; Caffe files nest 4 or 5 deep
_NOT_NEWLINE = re.compile(r"[^\n]")


@dataclass
class Field:
    name: str
    start: int                      # offset of the field name
    end: int                        # offset just past the value (or closing brace)
    children: list[Field] | None = None   # for message values (concatenated for lists)
    value: str | None = None        # raw text of a scalar value (first one for lists)
    value_start: int = -1
    is_list: bool = False           # written as ``name: [v, v, ...]``

    def get(self, name: str) -> list[Field]:
        return [f for f in self.children or () if f.name == name]


@dataclass
class Document:
    text: str
    fields: list[Field] = field(default_factory=list)
    path: str = ""

    def position(self, offset: int) -> tuple[int, int]:
        line = self.text.count("\n", 0, offset) + 1
        col = offset - (self.text.rfind("\n", 0, offset) + 1) + 1
        return line, col


class _Token(NamedTuple):
    kind: str           # "str", "word" or "punct"
    text: str
    start: int
    end: int


def _tokens(text: str, path: str) -> list[_Token]:
    pos, n = 0, len(text)
    out = []
    while pos < n:
        m = _TOKEN.match(text, pos)
        if m is None:
            doc = Document(text)
            line, col = doc.position(pos)
            raise ModelFormatError(f"{line}:{col}: unexpected character {text[pos]!r}", file=path)
        if m.lastgroup != "skip":
            out.append(_Token(m.lastgroup or "", m.group(), m.start(), m.end()))
        pos = m.end()
    return out


class _Parser:
    """Recursive descent over the token list: ``i`` is the next token, ``depth``
    the current nesting of ``{ }``, ``< >`` and ``[ ]``."""

    def __init__(self, text: str, path: str):
        self.toks = _tokens(text, path)
        self.doc = Document(text, path=path)
        self.i = 0
        self.depth = 0

    def fail(self, msg: str, at: int) -> NoReturn:
        toks, doc = self.toks, self.doc
        line, col = doc.position(toks[at].start if at < len(toks) else len(doc.text))
        raise ModelFormatError(f"{line}:{col}: {msg}", file=doc.path)

    def parse(self) -> Document:
        self.doc.fields = self.message(None)
        return self.doc

    def message(self, close: str | None) -> list[Field]:
        """The fields up to ``close`` (consumed), or to the end of the file if None."""
        toks = self.toks
        fields: list[Field] = []
        while True:
            if self.i >= len(toks):
                if close is None:
                    return fields
                self.fail(f"missing '{close}' before the end of the file", self.i)
            kind, tok, start, _ = toks[self.i]
            if close is not None and tok == close and kind == "punct":
                self.i += 1
                return fields
            if tok in (",", ";") and kind == "punct":
                self.i += 1
                continue
            f = Field(self.field_name(), start, start)
            if self.i < len(toks) and toks[self.i].text == ":" and toks[self.i].kind == "punct":
                self.i += 1
            self.value(f)
            fields.append(f)

    def field_name(self) -> str:
        """A field name (a word, or a bracketed ``[extension.name]``), consumed."""
        toks, i = self.toks, self.i
        kind, tok = toks[i].kind, toks[i].text
        if kind == "punct" and tok == "[":              # [extension.name]
            j = i
            while j < len(toks) and toks[j].text != "]":
                j += 1
            if j >= len(toks):
                self.fail("unterminated extension name", i)
            self.i = j + 1
            return "".join(t.text for t in toks[i:j + 1])
        if kind == "word":
            self.i += 1
            return tok
        self.fail(f"expected a field name, found {tok!r}", i)

    def nest(self, at: int) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"nested more than {MAX_DEPTH} levels deep", at)

    def value(self, f: Field) -> None:
        """The value of ``f`` (a message, a list or a scalar), recorded on it."""
        toks = self.toks
        if self.i >= len(toks):
            self.fail(f"missing value for field '{f.name}'", self.i)
        kind, tok, start, _ = toks[self.i]
        if kind == "punct" and tok in _CLOSE:
            self.message_value(f, tok)
        elif kind == "punct" and tok == "[":
            self.list_value(f)
        elif kind in ("word", "str"):
            if f.value is None:
                f.value, f.value_start = tok, start
            self.i += 1
            while kind == "str" and self.i < len(toks) and toks[self.i].kind == "str":
                self.i += 1                                 # "a" "b" concatenation
            f.end = toks[self.i - 1].end
        else:
            self.fail(f"expected a value for field '{f.name}', found {tok!r}", self.i)

    def message_value(self, f: Field, open_: str) -> None:
        """``{ fields }`` or ``< fields >``: appended to ``f``'s children."""
        self.nest(self.i)
        self.i += 1
        if f.children is None:
            f.children = []
        f.children.extend(self.message(_CLOSE[open_]))
        f.end = self.toks[self.i - 1].end
        self.depth -= 1

    def list_value(self, f: Field) -> None:
        """``[v, v, ...]``: each value recorded on ``f`` as if written separately."""
        toks = self.toks
        self.nest(self.i)
        f.is_list = True
        self.i += 1
        while True:
            if self.i >= len(toks):
                self.fail("unterminated list", self.i)
            if toks[self.i].text == "]":
                self.i += 1
                break
            if toks[self.i].text == ",":
                self.i += 1
                continue
            self.value(f)
        f.end = toks[self.i - 1].end
        self.depth -= 1


def parse(text: str, path: str = "") -> Document:
    """Split ``text`` into a field tree; raises ModelFormatError with line:col."""
    return _Parser(text, path).parse()


def unknown_fields(fields: list[Field], descriptor, prefix: str = "") -> list[tuple[str, Field]]:
    """(dotted path, field) for every field that ``descriptor`` does not declare."""
    found = []
    for f in fields:
        fd = descriptor.fields_by_name.get(f.name)
        if fd is None:
            found.append((prefix + f.name, f))
        elif fd.message_type is not None and f.children is not None:
            found.extend(unknown_fields(f.children, fd.message_type, prefix + f.name + "."))
    return found


def blank(text: str, spans) -> str:
    """Replace each (start, end) span by spaces, keeping newlines (so line:col stay valid)."""
    out, pos = [], 0
    for start, end in sorted(spans):
        out += [text[pos:start], _NOT_NEWLINE.sub(" ", text[start:end])]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def unquote(token: str) -> str:
    """The value of a quoted string token, unescaped exactly as protobuf's text format does."""
    if token[:1] in "\"'":
        body = token[1:-1]
        if "\\" in body:
            try:
                return text_encoding.CUnescape(body).decode("utf-8")
            except (ValueError, UnicodeError):     # text_format refuses these too
                return body
        return body
    return token
