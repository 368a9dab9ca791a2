"""Caffe layer types, one module per family, each registered by type name.

What a type means lives in its family's module: its shape rule, its blob
layout and checks, whether and how it absorbs a BatchNorm/Scale fold, its
Metal export and its numpy Caffe reference (``registry`` says how).  Importing
this package registers every family; a type nobody registered is unknown.

Where a new layer type goes: into the module of its family (or a new module
imported below), with its test in ``tests/test_layers.py``.
"""
from . import (  # noqa: F401  (imported to register their types)
    activations,
    affine,
    convolution,
    deconvolution,
    fork,
    inner_product,
    pooling,
    ssd,
    structure,
)
from .registry import LayerType, Producer, Unknown, get, known, need, register

__all__ = ["LayerType", "Producer", "Unknown", "get", "known", "need", "register"]
