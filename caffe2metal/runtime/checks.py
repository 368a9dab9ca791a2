"""The plan checked whole before ``run`` allocates or computes anything.

``check_plan(manifest, out, where)`` walks the plan once, in execution order, and
raises a one-line :class:`PlanError` (``op 'NAME': FIELD: why``) for the first op a
hand-edited or damaged manifest makes unrunnable:

* structure: an op that is not an object, a name, ``bottoms``/``tops`` that are not
  lists of blob names, more than ``MAX_OPS`` ops;
* order: a bottom that is neither a net input nor an earlier op's top (a cycle, or a
  blob read before it is written), a top written twice;
* shapes: a dimension that is not a non-negative integer (``null`` is an unknown
  one), more than ``MAX_DIMS`` dimensions, ``MAX_ELEMENTS`` values or more in one
  blob (or in all of them), a bottom's recorded shape that disagrees with the shape
  its producer (or the manifest's ``inputs``) records;
* geometry: kernel sizes, strides, dilations, offsets and destinations that are not
  integers, an offset beyond the source and the kernel, a destination that is not
  the top's shape, a padded source far larger than the blobs (an absurd allocation);
* files: a weights, bias, slopes, scale or priors file that leaves OUT, is missing,
  or whose size is not its recorded shape and dtype (``stat`` only: ``run`` reads it
  later and checks its sha256);
* kinds: a kernel ``run`` does not execute, parameters of the wrong type.

Nothing here reads a weights file or builds an array.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import Caffe2MetalError
from .limits import (
    MAX_ELEMENTS,
    MAX_OPS,
    _Context,
    _known,
    _shape,
)
from .op_checks import _Op
from .ops import PlanError


def check_plan(manifest: dict, out: Path, where: Path) -> None:
    """Raise PlanError (or Caffe2MetalError for keys outside the plan) for the first
    problem; return None when every op can run as written."""
    plan = manifest["plan"]
    if len(plan) > MAX_OPS:
        raise Caffe2MetalError(f"plan: {len(plan)} ops, more than {MAX_OPS}", file=where)
    inputs = _inputs(manifest, where)
    ctx = _Context(Path(out), _entries(manifest, where), _object(manifest, "ssd", where))
    names = _object(manifest, "blob_names", where)
    if not all(isinstance(v, str) for v in names.values()):
        raise Caffe2MetalError("blob_names: a value is not a string", file=where)
    for i, op in enumerate(plan):
        _structure(i, op)
    state = _State(inputs)
    for i, op in enumerate(plan):
        _walk(ctx, state, i, op)


def _structure(i: int, op) -> None:
    """Op #i is an object with a name and lists of blob names.  Raised as a plain
    Caffe2MetalError (the same text as PlanError's): a plan that is not a list of ops
    cannot be run in part by cutting one op out (verify's plan rows do that to a PlanError)."""
    if not isinstance(op, dict) or not isinstance(op.get("name"), str):
        raise Caffe2MetalError(f"op '#{i}': name: an op without a name (not an object with a "
                               "string name)")
    for key in ("bottoms", "tops"):
        if not isinstance(op.get(key), list) or not all(isinstance(b, str) for b in op[key]):
            raise Caffe2MetalError(f"op {op['name']!r}: {key}: is not a list of blob names")


class _State:
    """What the ops before the current one wrote: recorded shapes, writers, and the shapes
    of the arrays ``run`` computes (batch 1; None where only the data knows)."""

    def __init__(self, inputs: dict[str, list]):
        self.inputs = inputs
        self.shapes: dict[str, list | None] = dict(inputs)
        self.actual: dict[str, tuple | None] = {n: (1, *s[1:]) for n, s in inputs.items()}
        self.writer = {n: "the manifest's inputs" for n in inputs}
        self.total = 0


def _walk(ctx: _Context, state: _State, i: int, op) -> None:
    """Check op #i (``_structure`` found it well formed) against what the earlier ops
    wrote, then record its tops."""
    name = op["name"]
    own = _own_shapes(op)
    app = op.get("app")
    is_input = isinstance(app, dict) and app.get("op") == "input" and not op["bottoms"]
    for b in op["bottoms"]:
        if b not in state.writer:
            raise PlanError(name, "bottoms", f"{b!r} is read before any op writes it (not a "
                            "net input nor an earlier op's top: ops run in the plan's order, "
                            "a cycle cannot run)")
        _agree(name, b, own, state.shapes.get(b), state.writer[b])
        _computes(name, b, own.get(b), state.actual.get(b), f"{state.writer[b]} computes")
    _tops(name, op["tops"], own, state, is_input)
    if is_input:
        for t in op["tops"]:
            state.writer[t] = f"op {name!r}"
        return
    tops = [own.get(t) for t in op["tops"]]
    bottoms = [state.actual.get(b) or _batch1(own.get(b, state.shapes.get(b)))
               for b in op["bottoms"]]
    outs = _Op(ctx, op, bottoms, tops).check()
    for k, (t, s) in enumerate(zip(op["tops"], tops, strict=True)):
        computed = outs[k] if outs is not None and k < len(outs) else None
        if computed is not None and _known(list(computed)) >= MAX_ELEMENTS:
            raise PlanError(name, f"shapes.{t}", f"this op computes {list(computed)}: "
                            "2^31 values or more")
        _computes(name, t, s, computed, "this op computes")
        state.writer[t] = f"op {name!r}"
        state.actual[t] = computed if computed is not None else _batch1(s)
        state.shapes[t] = s
        state.total += _known(list(state.actual[t] or ())) or _known(s)
        if state.total >= MAX_ELEMENTS:
            raise PlanError(name, f"shapes.{t}", f"the plan's blobs hold {state.total} values "
                            f"in all up to here, 2^{MAX_ELEMENTS.bit_length() - 1} or more")


def _batch1(shape: list | None) -> tuple | None:
    """A recorded shape as the array run computes (batch 1), if every dimension is known."""
    if shape is None or not shape or None in shape:
        return None
    return (1, *shape[1:])


def _computes(name: str, blob: str, recorded: list | None, computed: tuple | None,
              who: str) -> None:
    """The recorded shape is the computed one (batch aside; trailing 1s aside: an N,C blob
    of Caffe's is an MPS image of 1 x 1 pixels)."""
    if recorded is None or computed is None:
        return
    a, b = list(recorded[1:]), list(computed[1:])
    while a and a[-1] == 1:
        a.pop()
    while b and b[-1] == 1:
        b.pop()
    if len(a) != len(b) or any(x is not None and y is not None and x != y
                               for x, y in zip(a, b, strict=True)):
        raise PlanError(name, f"shapes.{blob}", f"{recorded} is not the {list(computed)} "
                        f"{who}")


def _tops(name: str, tops: list, own: dict, state: _State, is_input: bool) -> None:
    seen: set[str] = set()
    for t in tops:
        if t in seen:
            raise PlanError(name, "tops", f"{t!r} twice")
        seen.add(t)
        if is_input:
            if t not in state.inputs:
                raise PlanError(name, "tops", f"input {t!r} is not in the manifest's inputs")
            _agree(name, t, own, state.inputs[t], "the manifest's inputs")
        elif t in state.writer:
            raise PlanError(name, "tops", f"{t!r} is already written by {state.writer[t]}")


def _object(manifest: dict, key: str, where: Path) -> dict:
    v = manifest.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise Caffe2MetalError(f"{key}: is not an object", file=where)
    return v


def _inputs(manifest: dict, where: Path) -> dict[str, list]:
    """The manifest's inputs (``default_feed`` allocates them): name -> positive dims."""
    rows = manifest.get("inputs", [])
    if not isinstance(rows, list):
        raise Caffe2MetalError("inputs: is not a list", file=where)
    found: dict[str, list] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            raise Caffe2MetalError(f"inputs[{i}]: is not an object with a string name",
                                   file=where)
        try:
            shape = _shape(row.get("shape"), unknown=False, low=1)
        except ValueError as e:
            raise Caffe2MetalError(f"inputs[{i}] {row['name']!r}: shape: {e}",
                                   file=where) from None
        if not shape:
            raise Caffe2MetalError(f"inputs[{i}] {row['name']!r}: shape: is empty", file=where)
        if row["name"] in found:
            raise Caffe2MetalError(f"inputs[{i}] {row['name']!r}: name: listed twice",
                                   file=where)
        found[row["name"]] = shape
    return found


def _entries(manifest: dict, where: Path) -> dict[str, dict]:
    rows = manifest.get("layers", [])
    if not isinstance(rows, list):
        raise Caffe2MetalError("layers: is not a list", file=where)
    entries = {}
    for i, e in enumerate(rows):
        if isinstance(e, dict):
            if not isinstance(e.get("name"), str):
                raise Caffe2MetalError(f"layers[{i}].name: is not a string", file=where)
            entries[e["name"]] = e
    return entries


def _own_shapes(op: dict) -> dict[str, list | None]:
    rec = op.get("shapes", {})
    if not isinstance(rec, dict):
        raise PlanError(op["name"], "shapes", "is not an object")
    own: dict[str, list | None] = {}
    for blob, s in rec.items():
        if s is None:
            own[blob] = None
            continue
        try:
            own[blob] = _shape(s)
        except ValueError as e:
            raise PlanError(op["name"], f"shapes.{blob}", str(e)) from None
    return own


def _agree(name: str, blob: str, own: dict, theirs: list | None, writer: str) -> None:
    mine = own.get(blob)
    if mine is None or theirs is None:
        return
    if len(mine) != len(theirs) or any(a is not None and b is not None and a != b
                                       for a, b in zip(mine, theirs, strict=True)):
        raise PlanError(name, f"shapes.{blob}", f"{mine} disagrees with {theirs} recorded by "
                        f"{writer}")


