"""The descriptor-driven filler gives exactly what protobuf's text_format gives."""
from __future__ import annotations

import random

import pytest
from google.protobuf import text_format

from caffe2metal.caffe import textfill, textproto
from caffe2metal.caffe.proto import caffe_pb2
from caffe2metal.errors import ModelFormatError
from caffe2metal.examples import prototxt as example_prototxt
from conftest import SHARED_MODELS

FILES = sorted(SHARED_MODELS.glob("*/*.prototxt")) if SHARED_MODELS.is_dir() else []


def both(text):
    """(ours, text_format's): each a NetParameter or the exception type name."""
    results = []
    try:
        doc = textproto.parse(text)
        ours = caffe_pb2.NetParameter()
        textfill.fill(doc, doc.fields, ours)
        results.append(ours)
    except ModelFormatError:
        results.append("error")
    except textfill.Unsupported:
        results.append("unsupported")
    try:
        theirs = caffe_pb2.NetParameter()
        text_format.Parse(text, theirs)
        results.append(theirs)
    except text_format.ParseError:
        results.append("error")
    return results


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_equal_to_text_format_on_real_files(path):
    ours, theirs = both(path.read_text())
    assert ours == theirs


def test_equal_on_the_builtin_example():
    ours, theirs = both(example_prototxt())
    assert isinstance(ours, caffe_pb2.NetParameter) and ours == theirs


VALUES = ["1", "-1", "0x10", "010", "1.5", "1e-3", "-2.5e+2", "1.0f", "inf", "-inf", "nan",
          "true", "false", "t", "f", "True", "MAX", "AVE", "CAFFE", "4294967296",
          "2147483648", "-2147483649", '"s"', "'q'", '"a" "b"', '"\\n\\t\\x41"', "[1, 2]",
          "[]", "{}", "1.", ".5", "abc", "0", "-0"]


@pytest.mark.slow
def test_equal_on_mutated_scalars():
    """Replace scalar values of a real-looking net with every kind of literal: both
    parsers must agree on the result or on refusing it."""
    base = example_prototxt()
    doc = textproto.parse(base)
    scalars = []

    def walk(fields):
        for f in fields:
            if f.children is not None:
                walk(f.children)
            elif f.value_start >= 0:
                scalars.append(f)
    walk(doc.fields)
    rng = random.Random(0)
    checked = 0
    for f in rng.sample(scalars, 20):
        for v in VALUES:
            text = base[:f.value_start] + v + base[f.value_start + len(f.value):]
            ours, theirs = both(text)
            if ours == "unsupported":
                continue
            if isinstance(theirs, str) or isinstance(ours, str):
                assert ours == theirs, (f.name, v)
            else:
                assert ours == theirs or (ours.SerializeToString() == theirs.SerializeToString()), \
                    (f.name, v)
            checked += 1
    assert checked > 500


@pytest.mark.parametrize("text", [
    'name: "a" name: "b"',
    'layer { convolution_param { num_output: 1 } convolution_param { kernel_size: 3 } }',
    'layer { name: "x" } layer < name: "y" >',
    'input_dim: 1 input_dim: 2',
    'layer { type: "Pooling" pooling_param { pool: 1 } }',
    'layer { type: "Pooling" pooling_param { pool: 7 } }',
    'force_backward: 1',
    'layer { name: "a" bottom: ["x", "y"] }',
    'state { phase: TEST stage: "a" }',
])
def test_equal_on_edge_cases(text):
    ours, theirs = both(text)
    assert ours == theirs
