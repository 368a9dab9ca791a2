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
    children: list["Field"] | None = None   # for message values (concatenated for lists)
    value: str | None = None        # raw text of a scalar value (first one for lists)
    value_start: int = -1
    is_list: bool = False           # written as ``name: [v, v, ...]``

    def get(self, name: str) -> list["Field"]:
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


def _tokens(text: str, path: str):
    pos, n = 0, len(text)
    out = []
    while pos < n:
        m = _TOKEN.match(text, pos)
        if m is None:
            doc = Document(text)
            line, col = doc.position(pos)
            raise ModelFormatError(f"{line}:{col}: unexpected character {text[pos]!r}", file=path)
        if m.lastgroup != "skip":
            out.append((m.lastgroup, m.group(), m.start(), m.end()))
        pos = m.end()
    return out


def parse(text: str, path: str = "") -> Document:
    """Split ``text`` into a field tree; raises ModelFormatError with line:col."""
    toks = _tokens(text, path)
    doc = Document(text, path=path)
    i = 0
    depth = 0

    def fail(msg, at):
        line, col = doc.position(toks[at][2] if at < len(toks) else len(text))
        raise ModelFormatError(f"{line}:{col}: {msg}", file=path)

    def message(close):
        nonlocal i
        fields = []
        while True:
            if i >= len(toks):
                if close is None:
                    return fields
                fail(f"missing '{close}' before the end of the file", i)
            kind, tok, start, _ = toks[i]
            if close is not None and tok == close and kind == "punct":
                i += 1
                return fields
            if tok in (",", ";") and kind == "punct":
                i += 1
                continue
            if kind == "punct" and tok == "[":          # [extension.name]
                j = i
                while j < len(toks) and toks[j][1] != "]":
                    j += 1
                if j >= len(toks):
                    fail("unterminated extension name", i)
                name = "".join(t[1] for t in toks[i:j + 1])
                i = j + 1
            elif kind == "word":
                name = tok
                i += 1
            else:
                fail(f"expected a field name, found {tok!r}", i)
            f = Field(name, start, start)
            if i < len(toks) and toks[i][1] == ":" and toks[i][0] == "punct":
                i += 1
            value(f)
            fields.append(f)

    def nest(at):
        nonlocal depth
        depth += 1
        if depth > MAX_DEPTH:
            fail(f"nested more than {MAX_DEPTH} levels deep", at)

    def value(f):
        nonlocal i, depth
        if i >= len(toks):
            fail(f"missing value for field '{f.name}'", i)
        kind, tok, start, end = toks[i]
        if kind == "punct" and tok in _CLOSE:
            nest(i)
            i += 1
            if f.children is None:
                f.children = []
            f.children.extend(message(_CLOSE[tok]))
            f.end = toks[i - 1][3]
            depth -= 1
        elif kind == "punct" and tok == "[":
            nest(i)
            f.is_list = True
            i += 1
            while True:
                if i >= len(toks):
                    fail("unterminated list", i)
                if toks[i][1] == "]":
                    i += 1
                    break
                if toks[i][1] == ",":
                    i += 1
                    continue
                value(f)
            f.end = toks[i - 1][3]
            depth -= 1
        elif kind in ("word", "str"):
            if f.value is None:
                f.value, f.value_start = tok, start
            i += 1
            while kind == "str" and i < len(toks) and toks[i][0] == "str":   # "a" "b" concatenation
                i += 1
            f.end = toks[i - 1][3]
        else:
            fail(f"expected a value for field '{f.name}', found {tok!r}", i)

    doc.fields = message(None)
    return doc


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
