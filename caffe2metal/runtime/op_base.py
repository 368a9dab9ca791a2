"""What every op check needs: the op, its name, the shapes it reads; one-line failures."""
from __future__ import annotations

import math
from pathlib import Path
from typing import NoReturn

from .limits import DTYPES, MIN_SCRATCH, _Context, _known, _shape, _short
from .ops import PlanError


class _OpBase:
    """One op's kind-specific checks: ``bottoms`` are the shapes of the arrays it reads
    (tuples, batch 1, or None), ``tops`` the recorded shapes of its tops (or None).
    ``check`` returns the shapes of the arrays it computes."""

    def __init__(self, ctx: _Context, op: dict, bottoms: list, tops: list):
        self.ctx, self.op, self.name = ctx, op, op["name"]
        self.bottoms, self.tops = bottoms, tops

    def fail(self, field: str, message: str) -> NoReturn:
        raise PlanError(self.name, field, message)

    # ---------------------------------------------------------------- helpers

    def need_bottoms(self, n: int, field: str = "bottoms") -> None:
        if len(self.bottoms) < n:
            self.fail(field, f"{len(self.bottoms)} bottoms, this op reads {n}")

    def nchw(self, i: int = 0, top: bool = False) -> tuple:
        """A bottom's array as an MPS image (4-D), or a top's recorded shape as one (an N,C
        blob is an image of 1 x 1 pixels); every dimension known."""
        blobs = self.op["tops"] if top else self.op["bottoms"]
        if i >= len(blobs):
            self.fail("tops" if top else "bottoms", f"{len(blobs)} {'tops' if top else 'bottoms'}"
                      f", this op {'writes' if top else 'reads'} {i + 1}")
        s = (self.tops if top else self.bottoms)[i]
        if s is None or not (2 <= len(s) <= 4 if top else len(s) == 4) or None in s:
            self.fail(f"shapes.{blobs[i]}", f"{s!r} is not a known N,C,H,W shape (an MPS "
                      "image)")
        return (*s, *(1,) * (4 - len(s)))

    def integer(self, v, field: str, low: int | None = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(field, f"{_short(v)} is not an integer")
        if low is not None and v < low:
            self.fail(field, f"{v} is less than {low}")
        return v

    def number(self, v, field: str) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            self.fail(field, f"{_short(v)} is not a finite number")
        return float(v)

    def axis(self, v, ndim: int, field: str) -> int:
        v = self.integer(v, field)
        if not -ndim <= v < ndim:
            self.fail(field, f"{v} is not an axis of a {ndim}-D blob")
        return v

    def file(self, spec, field: str) -> list:
        """A file spec's shape after checking what ``_array`` relies on, without reading."""
        if not isinstance(spec, dict):
            self.fail(field, f"{_short(spec)} is not a file object")
        rel = spec.get("file")
        if not isinstance(rel, str) or not rel or "\x00" in rel:
            self.fail(f"{field}.file", f"{_short(rel)} is not a file name")
        path = Path(rel)
        if path.is_absolute() or ".." in path.parts:
            self.fail(f"{field}.file", f"{rel!r} leaves the output directory")
        dtype = spec.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            self.fail(f"{field}.dtype", f"unknown dtype {_short(dtype)}")
        try:
            shape = _shape(spec.get("shape", []), unknown=False)
        except ValueError as e:
            self.fail(f"{field}.shape", str(e))
        try:
            st = (self.ctx.out / path).stat()
        except (OSError, ValueError) as e:
            self.fail(f"{field}.file", f"cannot read {rel}: "
                      f"{getattr(e, 'strerror', None) or e}")
        size = math.prod(shape) * DTYPES[dtype]
        if not (self.ctx.out / path).is_file():
            self.fail(f"{field}.file", f"{rel} is not a regular file")
        if st.st_size != size:
            self.fail(f"{field}.file", f"{rel} has {st.st_size} bytes, not {shape} {dtype} "
                      f"({size} bytes): missing or short")
        return shape

    def scratch(self, elements: int, field: str, what: str) -> None:
        joined = sum(_known(s) for s in (*self.bottoms[:1], *self.tops[:1]))
        limit = max(16 * joined, MIN_SCRATCH)
        if elements > limit:
            self.fail(field, f"{what} holds {elements} values, more than {limit} (16 times "
                      "the source and destination): an absurd geometry")

    def same_bottoms(self, field: str, skip_axis: int | None = None) -> None:
        """Every bottom's recorded shape is the first's (but along ``skip_axis``)."""
        first = self.bottoms[0]
        for blob, s in zip(self.op["bottoms"], self.bottoms, strict=True):
            if first is None or s is None:
                continue
            pairs = enumerate(zip(s, first, strict=False))
            if len(s) != len(first) or any(i != skip_axis and a is not None and b is not None
                                           and a != b for i, (a, b) in pairs):
                self.fail(field if skip_axis is not None else f"shapes.{blob}",
                          f"{s} does not line up with the first bottom's {first}")
