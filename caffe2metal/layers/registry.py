"""The layer registry: what each Caffe layer type means, in one place per family.

Every module of this package describes one family of Caffe layer types and
registers each type it knows with :func:`register`, giving the roles it plays:

``shape(layer, bottom_shapes) -> (top_shapes, param_shapes)``
    Caffe's output-size rule, and the parameter blobs the layer expects
    (``None`` when the blob layout is not known).  Raise :class:`Unknown`
    (through :func:`need`) when a bottom's shape is unknown.
``producer``
    A :class:`Producer` when the type can absorb a following BatchNorm/Scale.
``export(layer, in_shape) -> dict``
    The Metal export: ``kind`` (a row of ``mps.KINDS``), the MPS weights and
    geometry.
``reference(layer, x) -> y``
    Caffe's definition in plain float64 numpy on one batch item (NCHW without
    N), from the layer's original blobs.
``opencv_type``
    The type name OpenCV's importer knows this type by, when it differs
    (a fork alias with the same blobs and math).
``plan(layer, ctx) -> dict``
    The layer as an op of the manifest's execution plan (``export.plan``): ``mps``
    (the MPSCNN kernel class and every parameter an app sets), ``mpsgraph`` (where
    MPSGraph differs) and/or ``app`` (exact semantics of what has no MPS kernel).
    ``ctx`` is a :class:`PlanContext`.  Registered apart (:func:`register_plan`).
``forward(layer, inputs) -> outputs``
    Caffe's (or the fork's) forward pass in plain numpy on whole float32 NCHW
    blobs, batch included: one array per top.  verify runs it inside OpenCV
    for the types OpenCV cannot create (``verification.fork_layers``).

A type registered twice is an error; a type nobody registered is unknown:
its outputs have unknown shapes, and nothing is guessed about it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..graph import Layer

Shape = tuple
ShapeRule = Callable[[Layer, list], tuple]
Forward = Callable[[Layer, list[np.ndarray]], list[np.ndarray]]


class Unknown(Exception):
    """A shape rule met an unknown bottom shape: its outputs are unknown too."""


def axis_index(axis: int, ndim: int) -> int:
    """Caffe's CanonicalAxisIndex: ``axis`` (negative from the end) as 0..ndim-1."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for {ndim} dimensions")
    return axis % ndim


def need(ins: list, n: int | None = None) -> list:
    """The bottom shapes, all (or the first ``n``) known; else :class:`Unknown`."""
    if not ins or any(s is None for s in ins[: n or len(ins)]):
        raise Unknown
    return ins


@dataclass(frozen=True)
class Producer:
    """A layer that BatchNorm/Scale after it can fold into: ``W' = W*k`` per output
    channel, ``b' = b*k + c``."""
    param_key: str                                 # holds num_output, bias_term, axis, group
    weight_axes: tuple[int, ...]                   # the ndim its weights may have
    output_channels: Callable[[Layer], int]
    multiplier: Callable[[Layer, np.ndarray, np.ndarray], np.ndarray]
    """(layer, weights, k) -> the factor of every row of the weights, broadcastable
    against them: row r of the folded weights is ``W[r] * m[r]`` (or ``* m[0]``
    when ``m`` has one row)."""
    fan_in: Callable[[Layer, tuple], int]          # He initialisation of synthetic weights
    check: Callable[[Layer, np.ndarray], str | None] | None = None
    """Why the weights cannot be folded as they are (beyond ndim), or None."""
    normalize: Callable[[np.ndarray], np.ndarray] | None = None
    """Legacy weight shapes as the canonical ones (same values), before any check."""


@dataclass(frozen=True)
class LayerType:
    name: str
    shape: ShapeRule | None = None
    producer: Producer | None = None
    export: Callable | None = None
    reference: Callable | None = None
    opencv_type: str | None = None
    forward: Forward | None = None
    plan: Callable | None = None


@dataclass(frozen=True)
class PlanContext:
    """What a ``plan`` role reads besides the layer: Caffe shapes of unique blobs, the
    manifest's weight entry of a layer (or None), the manifest's ``ssd`` key, and its
    ``metal.normalize`` (Normalize layer name -> its scale file object)."""
    shapes: dict
    entries: dict
    ssd: dict | None = None
    scales: dict = field(default_factory=dict)

    def shape(self, blob: str) -> tuple:
        s = self.shapes.get(blob)
        if s is None or any(d is None for d in s):
            raise Unknown(blob)
        return tuple(int(d) for d in s)


_TYPES: dict[str, LayerType] = {}


def register(*names: str, shape: ShapeRule | None = None, producer: Producer | None = None,
             export: Callable | None = None, reference: Callable | None = None,
             opencv_type: str | None = None, forward: Forward | None = None) -> None:
    """Register each of ``names`` with the given roles (see the module doc)."""
    for name in names:
        if name in _TYPES:
            raise RuntimeError(f"layer type {name!r} registered twice")
        _TYPES[name] = LayerType(name, shape, producer, export, reference, opencv_type, forward)


def register_plan(*names: str, plan: Callable) -> None:
    """Give each registered type of ``names`` its ``plan`` role (once)."""
    import dataclasses
    for name in names:
        t = _TYPES[name]
        if t.plan is not None:
            raise RuntimeError(f"layer type {name!r} has a plan role twice")
        _TYPES[name] = dataclasses.replace(t, plan=plan)


def shape_rule(*names: str, **roles):
    """Decorator form of :func:`register` for a shape rule."""
    def decorate(fn: ShapeRule) -> ShapeRule:
        register(*names, shape=fn, **roles)
        return fn
    return decorate


def get(name: str) -> LayerType | None:
    """The registered type ``name``, or None when it is unknown."""
    return _TYPES.get(name)


def known() -> frozenset[str]:
    return frozenset(_TYPES)


def producer(name: str) -> Producer | None:
    t = _TYPES.get(name)
    return None if t is None else t.producer


def producer_of(name: str) -> Producer:
    """The Producer role of type ``name``, which the caller knows has one."""
    role = producer(name)
    if role is None:
        raise KeyError(f"layer type {name!r} has no producer role")
    return role


def producer_types() -> tuple[str, ...]:
    return tuple(n for n, t in _TYPES.items() if t.producer is not None)


def exported_types() -> tuple[str, ...]:
    return tuple(n for n, t in _TYPES.items() if t.export is not None)


def forward(name: str) -> Forward | None:
    """The numpy forward of type ``name`` (see the module doc), or None."""
    t = _TYPES.get(name)
    return None if t is None else t.forward


def opencv_type(name: str) -> str:
    """The name OpenCV knows type ``name`` by."""
    t = _TYPES.get(name)
    return name if t is None or t.opencv_type is None else t.opencv_type
