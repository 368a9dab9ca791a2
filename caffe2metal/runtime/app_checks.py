"""The checks of ``app`` ops (what has no MPS kernel) and of fork layers."""
from __future__ import annotations

import math

from ..graph import Layer
from ..layers import registry
from .limits import APP_OPS, _short
from .op_base import _OpBase


class _AppChecks(_OpBase):
    # ---------------------------------------------------------------- app ops

    def app(self, app: dict) -> list | None:
        kind = app.get("op")
        if not isinstance(kind, str):
            self.fail("app.op", f"{_short(kind)} is not a string")
        if kind == "unavailable":       # run skips it and what reads it (RunOutput.skipped)
            if not isinstance(app.get("reason"), str):
                self.fail("app.reason", f"{_short(app.get('reason'))} is not a string")
            return None
        if kind == "none":
            return []
        if kind == "constant":
            return [self.constant(app)]
        self.need_bottoms(1)
        first = self.bottoms[0]
        if kind in ("identity", "input"):
            return [first] * len(self.tops)
        if kind == "detection_output":
            self.need_bottoms(3)
            if not isinstance(app.get("params"), dict):
                self.fail("app.params", "is not an object")
            return None
        if kind == "slice":
            return self.slice(app, first)
        check = self._APP.get(kind)
        if check is not None:
            return [check(self, app, first)]
        if kind in APP_OPS:
            return [first]
        return self.fork(app)

    def reshape(self, app: dict, first: tuple | None) -> tuple:
        top = self.tops[0] if self.tops else None
        if top is None or None in top:
            self.fail(f"shapes.{self.op['tops'][0] if self.tops else '?'}",
                      "is not a known shape")
        if first is not None and None not in first and \
                math.prod(first[1:]) != math.prod(top[1:]):
            self.fail(f"shapes.{self.op['tops'][0]}", f"{top} does not hold the "
                      f"{list(first)} bottom's values")
        return (1, *top[1:])

    def transpose(self, app: dict, first: tuple | None) -> tuple | None:
        order = app.get("order")
        ndim = None if first is None else len(first)
        if not isinstance(order, list) or not all(
                isinstance(a, int) and not isinstance(a, bool) for a in order) or \
                sorted(order) != list(range(len(order))) or \
                (ndim is not None and len(order) != ndim):
            self.fail("app.order", f"{_short(order)} is not a permutation of the bottom's "
                      f"{ndim} axes")
        return None if first is None else tuple(first[a] for a in order)

    def concat(self, app: dict, first: tuple | None) -> tuple | None:
        if first is None or any(s is None for s in self.bottoms):
            self.fail(f"shapes.{self.op['bottoms'][0]}", "concat of an unknown shape")
        axis = self.axis(app.get("axis", 1), len(first), "app.axis") % len(first)
        self.same_bottoms("app.axis", axis)
        return (*first[:axis], sum(s[axis] for s in self.bottoms), *first[axis + 1:])

    def softmax(self, app: dict, first: tuple | None) -> tuple | None:
        self.axis(app.get("axis", 1), len(first) if first else 1, "app.axis")
        return first

    def clip(self, app: dict, first: tuple | None) -> tuple | None:
        self.number(app.get("min"), "app.min")
        self.number(app.get("max"), "app.max")
        return first

    def maximum(self, app: dict, first: tuple | None) -> tuple | None:
        self.same_bottoms("bottoms")
        return first

    def scale_by(self, app: dict, first: tuple | None) -> tuple | None:
        self.need_bottoms(2)
        self.integer(app.get("axis"), "app.axis", 0)
        return first

    def normalize(self, app: dict, first: tuple | None) -> tuple | None:
        self.file(app.get("scale"), "app.scale")
        return first

    def constant(self, app: dict) -> tuple | None:
        priors = self.file(self.ctx.ssd.get("priors"), "ssd.priors")
        if math.prod(priors) % 2:
            self.fail("ssd.priors.shape", f"{priors} is not two rows")
        cols = app.get("columns", [0, -1])
        if not isinstance(cols, list) or len(cols) != 2:
            self.fail("app.columns", f"{_short(cols)} is not [start, count]")
        for c in cols:
            self.integer(c, "app.columns")
        return (1, 2, cols[1]) if cols[1] > 0 else None

    def slice(self, app: dict, first: tuple | None) -> list:
        if first is None:
            self.fail(f"shapes.{self.op['bottoms'][0]}", "is not a known shape")
        axis = self.axis(app.get("axis"), len(first), "app.axis")
        starts, sizes = app.get("starts"), app.get("sizes")
        if not isinstance(starts, list) or not isinstance(sizes, list) or \
                len(starts) != len(sizes) or len(sizes) != len(self.tops):
            self.fail("app.starts", f"need one start and one size per top ({len(self.tops)})")
        dim = first[axis]
        outs = []
        for s, n in zip(starts, sizes, strict=True):
            s, n = self.integer(s, "app.starts", 0), self.integer(n, "app.sizes", 0)
            if dim is not None and s + n > dim:
                self.fail("app.sizes", f"[{s}, {s}+{n}) is outside the bottom's {dim}")
            outs.append((*first[:axis], n, *first[axis + 1:]))
        return outs

    def lrn(self, app: dict, first: tuple | None) -> tuple | None:
        n = self.integer(app.get("local_size"), "app.local_size", 1)
        for key in ("alpha", "beta"):
            self.number(app.get(key), f"app.{key}")
        self.number(app.get("k", 1.0), "app.k")
        within = app.get("norm_region", "ACROSS_CHANNELS") != "ACROSS_CHANNELS"
        if first is not None and None not in first:
            if within and len(first) != 4:
                self.fail("app.norm_region", f"WITHIN_CHANNEL needs an N,C,H,W bottom, not "
                          f"{first}")
            reach = max(first[2:4]) if within else (first[1] if len(first) > 1 else 1)
            if n > 2 * reach + 1:
                self.fail("app.local_size", f"{n} is wider than twice the bottom's {reach}")
        return first

    def fork(self, app: dict) -> list | None:
        """A type with a numpy forward: what its shape rule makes of the bottoms (the
        forward computes that)."""
        caffe_type = app.get("caffe_type")
        if not isinstance(caffe_type, str) or registry.forward(caffe_type) is None:
            self.fail("app.op", f"{_short(app.get('op'))} has no numpy implementation in run")
        params = app.get("params")
        if not isinstance(params, dict):
            self.fail("app.params", "is not an object")
        spec = registry.get(caffe_type)
        if spec is None or spec.shape is None or any(s is None for s in self.bottoms):
            return None
        layer = Layer(name=self.name, type=caffe_type, bottoms=list(self.op["bottoms"]),
                      tops=list(self.op["tops"]), params=params)
        try:
            tops, _ = spec.shape(layer, list(self.bottoms))
        except registry.Unknown:
            return None
        except Exception as e:      # noqa: BLE001  any parameter a shape rule cannot use
            self.fail("app.params", f"{type(e).__name__}: {e}")
        return [None if t is None or None in t else tuple(t) for t in tops]

    _APP = {"reshape": reshape, "transpose": transpose, "concat": concat, "softmax": softmax,
            "clip": clip, "max": maximum, "scale_by": scale_by, "lrn": lrn,
            "normalize": normalize}
    """App ops of one top with parameters to check (``identity`` has none)."""
