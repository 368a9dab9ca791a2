"""Fuzz the whole ``convert`` path with broken and hostile model files.

    python -m tools.fuzz [--seconds 300] [--seed N] [--crashes build/fuzz/crashes]

(``make fuzz``; ``FUZZ_SECONDS`` sets the duration.)  ``tests/test_fuzz.py``
runs the same generators under hypothesis for a few seconds in ``make test``.

Every input is a (prototxt, caffemodel) pair of bytes, made from a seed
corpus: the real deploy files in ``../shared/models`` (when present), the
built-in example and a few small nets, each with deterministic synthetic
weights.  Generators:

``proto``   token-level mutations of a seed prototxt (delete, duplicate, swap,
            splice, truncate, interesting numbers, hostile names, stray bytes)
            paired with the seed's caffemodel;
``model``   byte-level mutations of the seed's caffemodel (bit flips,
            truncation, zero fill, inserted bytes, splices) with its prototxt;
``values``  NaN/Inf/negative/huge values written into a valid caffemodel's
            blobs (BatchNorm statistics included), or into the prototxt's float
            fields;
``both``    both of the above; ``swap`` the two files exchanged or paired with
            another net's file;
``valid``   syntax-preserving edits (numbers, types, renamed or rewired blobs,
            added fields, layers deleted, duplicated or swapped) with synthetic
            weights made for the result, so that odd but consistent nets get
            through reading into folding and writing;
``random``  random bytes for either file;
``special`` deep nesting, huge dimensions, hostile layer names, files that
            are empty or zero-filled.

Each input runs ``caffe2metal inspect`` (text or ``--json``, which must be
strict JSON) and then ``caffe2metal convert PROTOTXT CAFFEMODEL -o OUT`` in
process (``cli.main``), every other one through the write-behind threads that big
models use, and must end either in success or in exit status 2 with one
line ``caffe2metal: error: ...`` on stderr.  Anything else is a failure: an
uncaught exception, a run longer than the time limit (a hang), a
``MemoryError`` under the address-space limit (unbounded memory), a file
written outside OUT, a partial OUT left behind after an error, a thread left
running, an OUT that lacks its manifest after a success, or an input that
``inspect`` rejects but ``convert`` accepts (both read it the same way).

About a quarter of the inputs instead run ``verify``, ``compare`` and ``run`` on a
real output (the ``tiny`` seed converted once) whose ``manifest.json`` is mutated
(``mutate_manifest``: keys deleted, hostile values of every type, huge numbers,
path traversal, deep nesting, NaN, truncated or non-UTF-8 bytes); each must end
in a result or one ``caffe2metal: ...`` error line and write nothing (``run``: exit
status 0, or 2 with one ``caffe2metal: error: ...`` line).  About one in eight runs
``run`` alone on a hand-edited plan (``mutate_plan``, of ``tiny`` or the built-in
example: op fields, shapes, offsets and other geometry, ops and blobs out of order,
file specs, files deleted, truncated or grown on disk, absurd op counts and input
sizes) under the same rules, never a traceback, a hang or a MemoryError.  One in
fifty runs ``example`` into a hostile target (``EXAMPLE_TARGETS``: a file, a
link, FIFO or directory at a target name, missing parents, a name that is not
UTF-8): it must never write through a link nor leave temporary files, partial
directories or the parents it made.  Failing
inputs are saved to the crash directory as ``<id>.prototxt``, ``<id>.caffemodel`` and ``<id>.txt``
(what went wrong, with the traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
MAX_SEED_PARAMS = 6_000_000         # real nets with more weights are paired with another net's file

# ---------------------------------------------------------------- seed corpus

TINY = """name: "tiny"
input: "data"
input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1"
  batch_norm_param { eps: 0.001 } }
layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
  inner_product_param { num_output: 3 } }
layer { name: "fc_bn" type: "BatchNorm" bottom: "fc" top: "fc_bn" }
layer { name: "prob" type: "Softmax" bottom: "fc_bn" top: "prob" }
"""

TINY_V1 = """name: "tiny_v1"
input: "data"
input_dim: 1
input_dim: 2
input_dim: 6
input_dim: 6
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 group: 2 } }
layers { name: "relu" type: RELU bottom: "conv" top: "conv" }
layers { name: "up" type: DECONVOLUTION bottom: "conv" top: "up"
  convolution_param { num_output: 2 kernel_size: 2 stride: 2 } }
layers { name: "up_relu" type: RELU bottom: "up" top: "up" }
layers { name: "ip" type: INNER_PRODUCT bottom: "up" top: "ip"
  inner_product_param { num_output: 5 } }
"""

TINY_LAYER_INPUT = """name: "tiny_input_layer"
layer { name: "input" type: "Input" top: "data"
  input_param { shape { dim: 1 dim: 4 dim: 5 dim: 5 } } }
layer { name: "dw" type: "Convolution" bottom: "data" top: "dw"
  convolution_param { num_output: 4 group: 4 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "dw/bn" type: "BatchNorm" bottom: "dw" top: "dw/bn" }
layer { name: "dw/scale" type: "Scale" bottom: "dw/bn" top: "dw/bn"
  scale_param { bias_term: false } }
layer { name: "split" type: "Split" bottom: "dw/bn" top: "a" top: "b" }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" }
layer { name: "custom" type: "MyCustomLayer" bottom: "sum" top: "custom" }
layer { name: "pw" type: "Convolution" bottom: "custom" top: "pw"
  convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "pw_bn" type: "BatchNorm" bottom: "pw" top: "pw" }
"""
# blobs of layers whose shapes inference cannot know (they follow an unknown layer type)
EXTRA_BLOBS = {"pw": [(2, 4, 1, 1), (2,)], "pw_bn": [(2,), (2,), (1,)]}


@dataclass
class Seed:
    name: str
    prototxt: bytes
    caffemodel: bytes


def _synth_weights(text: str | bytes, seed: int = 0,
                   max_params: int = MAX_SEED_PARAMS) -> bytes | None:
    """Deterministic weights for ``text`` (no calibration), or None if too big or unreadable."""
    from caffe2metal.errors import Caffe2MetalError
    from caffe2metal.examples import weights as synth
    from caffe2metal.net.reader import read_prototxt
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "seed.prototxt"
        p.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
        try:
            model = read_prototxt(p)
        except Caffe2MetalError:
            return None
    total = sum(math.prod(s) for shapes in model.shapes.params.values() if shapes
                for s in shapes)
    if total > max_params:
        return None
    try:
        synth.init_weights(model, seed)
    except (ValueError, TypeError, MemoryError):     # synth is a test helper, not under test
        return None
    for layer in model.graph.layers:
        if model.shapes.params.get(layer.name) is None and layer.name in EXTRA_BLOBS:
            layer.blobs = [np.ones(s, np.float32) for s in EXTRA_BLOBS[layer.name]]
    for layer in model.graph.layers:          # statistics far from the defaults
        if layer.type == "BatchNorm" and len(layer.blobs) >= 3:
            rng = np.random.default_rng(len(layer.name))
            c = layer.blobs[0].shape
            scale = np.float32(7.5)
            layer.blobs = [(rng.normal(0, 1, c) * scale).astype(np.float32),
                           (rng.uniform(0.5, 2, c) * scale).astype(np.float32),
                           np.array([scale], np.float32)] + layer.blobs[3:]
    return synth.caffemodel_bytes(model)


@functools.cache
def corpus(models_dir: str | None = None, real: bool = True) -> tuple[Seed, ...]:
    """The seed nets: built-in ones first, then ``models_dir`` (default ../shared/models)."""
    from caffe2metal import examples
    texts = [("example", examples.prototxt()), ("tiny", TINY), ("tiny_v1", TINY_V1),
             ("tiny_input_layer", TINY_LAYER_INPUT)]
    root = Path(models_dir) if models_dir else SHARED_MODELS
    if real and root.is_dir():
        for p in sorted(root.glob("*/*.prototxt")):
            try:
                texts.append((f"{p.parent.name}/{p.name}", p.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError):
                continue
    seeds, fallback = [], None
    for name, text in texts:
        weights = _synth_weights(text)
        if weights is None:
            weights = fallback            # another net's caffemodel: names/shapes will not match
        else:
            fallback = fallback or weights
        if weights is not None:
            seeds.append(Seed(name, text.encode("utf-8"), weights))
    return tuple(seeds)


# ---------------------------------------------------------------- mutations

_TOKENS = re.compile(r'\s+|#[^\n]*|"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|[A-Za-z0-9_.+\-]+|.',
                     re.S)
_NUMBER = re.compile(r"[-+]?(\d|\.\d)")
INTERESTING_NUMBERS = [
    "0", "-0", "1", "-1", "2", "3", "7", "255", "256", "65535", "65536", "2147483647",
    "2147483648", "-2147483648", "4294967295", "4294967296", "9223372036854775807",
    "9223372036854775808", "-9223372036854775809", "18446744073709551616", "99999999999",
    "1000000", "1000000000", "1e9", "1e38", "3.5e38", "1e308", "1e400", "-1e400", "1e-45",
    "1e-320", "0.0", "-0.0", "nan", "-nan", "inf", "-inf", "Infinity", "0x10", "0x7fffffff",
    "010", "1.5", "-1.5", "0.5", "true", "false",
]
HOSTILE_NAMES = [
    "", ".", "..", "../../evil", "../../../../../../tmp/evil", "/etc/passwd", "/abs/path",
    "a/b/c", "a\\\\b", "C:\\\\evil", "C:", "con", "CON", "nul.txt", "aux", "COM1", "LPT1",
    "a b", " lead", "trail ", "tab\\there", "new\\nline", "ctrl\\001x", "q\\\"uote",
    "star*", "what?", "pipe|", "lt<gt>", "colon:x", "trailing.", "trailing ",
    "\\303\\251t\\303\\251", "ü", "日本語", "emoji😀", "x" * 300, "-" * 3, "~", "$HOME", "%s%n",
    "conv1", "CONV1", "bn1",
    "data", "a\\x4", "\\ud800", "\\?", "\\x00", "\\377", "\\U0001f600",
]
SPECIAL_TYPES = [
    "Convolution", "BatchNorm", "Scale", "InnerProduct", "Deconvolution", "Pooling", "ReLU",
    "Concat", "Eltwise", "Reshape", "Flatten", "Permute", "PriorBox", "DetectionOutput",
    "Slice", "Split", "Softmax", "Input", "PReLU", "Normalize", "Crop", "Upsample", "ArgMax",
    "Tile", "Axpy", "DepthwiseConvolution", "ConvolutionDepthwise", "Bias", "Silence", "Python",
    "Unknown", "",
]
_PUNCT = list("{}[]<>:,;\"'#")


def _quote(s: str) -> str:
    return '"' + s + '"'


def _structural_edit(rnd: random.Random, toks: list[str], i: int, op: int) -> None:
    """Ops 0-2, 7, 9-11 of ``mutate_prototxt``: move, copy or drop tokens (in place)."""
    n = len(toks)
    if op == 0:                                            # delete a token
        del toks[i]
    elif op == 1:                                          # duplicate a token
        toks.insert(i, toks[i])
    elif op == 2:                                          # swap two tokens
        j = rnd.randrange(n)
        toks[i], toks[j] = toks[j], toks[i]
    elif op == 7:                                          # stray punctuation
        toks.insert(i, rnd.choice(_PUNCT))
    elif op == 9:                                          # copy a span elsewhere
        a = rnd.randrange(n)
        b = min(n, a + rnd.randrange(1, 200))
        toks[i:i] = toks[a:b]
    elif op == 10:                                         # delete a span
        del toks[i:i + rnd.randrange(1, 100)]
    elif op == 11:                                         # truncate
        del toks[i:]


def _content_edit(rnd: random.Random, toks: list[str], i: int, op: int, seeds) -> None:
    """Ops 3-6, 8, 12 of ``mutate_prototxt``: replace numbers, strings, words (in place)."""
    if op in (3, 4):                                       # a number -> interesting number
        nums = [k for k, t in enumerate(toks) if _NUMBER.match(t)]
        if nums:
            k = rnd.choice(nums)
            toks[k] = rnd.choice(INTERESTING_NUMBERS)
    elif op == 5:                                          # a string -> hostile name
        strs = [k for k, t in enumerate(toks) if t[:1] == '"']
        if strs:
            toks[rnd.choice(strs)] = _quote(rnd.choice(HOSTILE_NAMES))
    elif op == 6:                                          # a type -> another type
        strs = [k for k, t in enumerate(toks) if t[:1] == '"']
        if strs:
            toks[rnd.choice(strs)] = _quote(rnd.choice(SPECIAL_TYPES))
    elif op == 8:                                          # a word -> another word of the file
        words = [t for t in toks if t[:1].isalpha()]
        if words:
            toks[i] = rnd.choice(words)
    elif op == 12 and seeds:                               # a span from another seed
        other = _TOKENS.findall(rnd.choice(seeds).prototxt.decode("utf-8"))
        a = rnd.randrange(max(1, len(other)))
        toks[i:i] = other[a:a + rnd.randrange(1, 300)]


_STRUCTURAL_OPS = (0, 1, 2, 7, 9, 10, 11)
_CONTENT_OPS = (3, 4, 5, 6, 8, 12)


def mutate_prototxt(rnd: random.Random, text: str, seeds=()) -> bytes:
    """A few random token-level edits of ``text`` (returned as bytes, maybe not UTF-8)."""
    toks = _TOKENS.findall(text)
    if not toks:
        toks = [""]
    raw_tail = b""
    for _ in range(rnd.choice([1, 1, 1, 2, 2, 3, 5, 8])):
        i = rnd.randrange(len(toks))
        op = rnd.randrange(14)
        if op in _STRUCTURAL_OPS:
            _structural_edit(rnd, toks, i, op)
        elif op in _CONTENT_OPS:
            _content_edit(rnd, toks, i, op, seeds)
        else:                                              # a stray byte
            raw_tail = bytes([rnd.randrange(256)])
            toks.insert(i, "\x00RAW\x00")
        if not toks:
            toks = [""]
    data = "".join(toks).encode("utf-8", "surrogatepass")
    return data.replace(b"\x00RAW\x00", raw_tail)

PLAUSIBLE_NUMBERS = ["0", "1", "2", "3", "4", "5", "7", "8", "16", "-1", "-2", "1000", "0.5",
                     "nan", "inf", "1e-5", "0", "2147483647", "65536"]
EXTRA_FIELDS = {
    "convolution_param": ["group: 2", "group: 3", "axis: 2", "axis: -1", "bias_term: false",
                          "bias_term: true", "dilation: 2", "stride: 3", "pad: 5",
                          "kernel_h: 1 kernel_w: 3", "num_output: 1", "engine: CAFFE",
                          "kernel_size: 1 kernel_size: 2 kernel_size: 3"],
    "batch_norm_param": ["use_global_stats: false", "use_global_stats: true", "eps: 0",
                         "eps: -1", "eps: 1e30", "moving_average_fraction: 0.5"],
    "scale_param": ["bias_term: false", "bias_term: true", "axis: 0", "axis: 2", "num_axes: 0",
                    "num_axes: -1", "num_axes: 2"],
    "inner_product_param": ["transpose: true", "axis: 2", "axis: -1", "bias_term: false"],
    "pooling_param": ["global_pooling: true", "round_mode: FLOOR", "pad: 3", "stride: 0"],
    "reshape_param": ["axis: 1", "num_axes: 1"],
    "concat_param": ["axis: 0", "axis: 3", "axis: -1"],
}
LAYER_SNIPPETS = [
    "relu_param { negative_slope: 0.1 }", "relu_param { negative_slope: inf }",
    "relu_param { negative_slope: -1e39 }", "elu_param { alpha: inf }",
    "clip_param { min: -inf max: inf }", "clip_param { min: 1 max: 0 }",
    "batch_norm_param { eps: inf }", "batch_norm_param { eps: -1e-3 }",
    "include { phase: TRAIN }", "exclude { phase: TEST }", "include { phase: TEST }",
    "include { stage: \"x\" }", "param { lr_mult: 0 }", "propagate_down: false",
    "top: \"extra_top\"", "bottom: \"data\"", "loss_weight: 1",
]


def _edit_fields(rnd: random.Random, text: str, op: int) -> str:
    """Ops 0-4 of ``mutate_semantics``: change numbers, types, names, bottoms, params."""
    if op == 0:                                      # a number -> another plausible one
        nums = list(re.finditer(r"(?<=[:\s])-?\d+(\.\d+)?(e-?\d+)?(?=\s)", text))
        if nums:
            m = rnd.choice(nums)
            text = text[:m.start()] + rnd.choice(PLAUSIBLE_NUMBERS) + text[m.end():]
    elif op == 1:                                    # a layer type -> another
        types = list(re.finditer(r'type:\s*"[^"]*"', text))
        if types:
            m = rnd.choice(types)
            text = text[:m.start()] + f'type: "{rnd.choice(SPECIAL_TYPES)}"' + text[m.end():]
    elif op == 2:                                    # rename a name everywhere (consistently)
        names = sorted(set(re.findall(r'(?:name|top|bottom|input):\s*"([^"\\]*)"', text)))
        if names:
            old = rnd.choice(names)
            new = rnd.choice(HOSTILE_NAMES)
            text = re.sub(r'"' + re.escape(old) + r'"', lambda m: f'"{new}"', text)
    elif op == 3:                                    # rewire a bottom
        bottoms = list(re.finditer(r'bottom:\s*"([^"]*)"', text))
        tops = re.findall(r'top:\s*"([^"]*)"', text)
        if bottoms and tops:
            m = rnd.choice(bottoms)
            text = text[:m.start()] + f'bottom: "{rnd.choice(tops)}"' + text[m.end():]
    elif op == 4:                                    # add a field to a param block
        key = rnd.choice(sorted(EXTRA_FIELDS))
        spots = [m.end() for m in re.finditer(re.escape(key) + r"\s*\{", text)]
        if spots:
            at = rnd.choice(spots)
            text = text[:at] + " " + rnd.choice(EXTRA_FIELDS[key]) + " " + text[at:]
    return text


def _edit_layers(rnd: random.Random, text: str, op: int, blocks: list) -> str:
    """Ops 5-8 of ``mutate_semantics``: delete, duplicate, swap or extend layer blocks."""
    if op == 5 and blocks:                           # delete a layer
        b = rnd.choice(blocks)
        text = text[:b.start] + text[b.end:]
    elif op == 6 and blocks:                         # duplicate a layer
        b = rnd.choice(blocks)
        text = text[:b.end] + "\n" + text[b.start:b.end] + text[b.end:]
    elif op == 7 and len(blocks) > 1:                # swap two layers
        a, b = sorted(rnd.sample(blocks, 2), key=lambda f: f.start)
        text = (text[:a.start] + text[b.start:b.end] + text[a.end:b.start]
                + text[a.start:a.end] + text[b.end:])
    elif op == 8 and blocks:                         # add a field to a layer
        b = rnd.choice(blocks)
        at = b.end - 1 if text[b.end - 1:b.end] in "}>" else b.end
        text = text[:at] + " " + rnd.choice(LAYER_SNIPPETS) + " " + text[at:]
    return text


def mutate_semantics(rnd: random.Random, text: str) -> bytes:
    """Edits that keep the syntax: numbers, types, renamed or rewired blobs, added
    fields, layers deleted, duplicated or swapped."""
    from caffe2metal.caffe import textproto
    from caffe2metal.errors import Caffe2MetalError
    for _ in range(rnd.choice([1, 1, 2, 3])):
        try:
            doc = textproto.parse(text)
        except Caffe2MetalError:
            break
        blocks = [f for f in doc.fields if f.name in ("layer", "layers")]
        op = rnd.randrange(9)
        text = (_edit_fields(rnd, text, op) if op < 5
                else _edit_layers(rnd, text, op, blocks))
    return text.encode("utf-8", "surrogatepass")

INTERESTING_FLOATS = [np.nan, -np.nan, np.inf, -np.inf, -1.0, 0.0, -1e-30, 1e38, 3.4e38, -3.4e38,
                      1e-45, -0.0]


def mutate_caffemodel(rnd: random.Random, data: bytes, seeds=()) -> bytes:
    """Byte-level damage to a binary caffemodel."""
    b = bytearray(data)
    for _ in range(rnd.choice([1, 1, 1, 2, 3, 6])):
        n = len(b)
        op = rnd.randrange(10)
        i = rnd.randrange(n) if n else 0
        if op == 0 and n:                                  # flip bits
            b[i] ^= 1 << rnd.randrange(8)
        elif op == 1 and n:                                # interesting byte
            b[i] = rnd.choice([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x08, 0x0A, 0x12, 0x3A, 0x2A])
        elif op == 2:                                      # truncate
            del b[i:]
        elif op == 3:                                      # insert random bytes
            b[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 12)))
        elif op == 4 and n:                                # zero-fill a region
            k = rnd.randrange(1, max(2, n // 4))
            b[i:i + k] = bytes(len(b[i:i + k]))
        elif op == 5 and n >= 4:                           # an aligned float -> interesting
            j = rnd.randrange(n - 3)
            b[j:j + 4] = np.float32(rnd.choice(INTERESTING_FLOATS)).tobytes()
        elif op == 6 and n:                                # a huge varint
            b[i:i + 1] = bytes([0xFF] * rnd.randrange(1, 11) + [0x01])
        elif op == 7 and n:                                # delete a region
            del b[i:i + rnd.randrange(1, 64)]
        elif op == 8 and seeds:                            # splice another seed
            other = rnd.choice(seeds).caffemodel
            a = rnd.randrange(len(other))
            b[i:i] = other[a:a + rnd.randrange(1, 4096)]
        elif op == 9 and n:                                # duplicate a region
            k = rnd.randrange(1, 512)
            b[i:i] = b[i:i + k]
    return bytes(b)


def mutate_values(rnd: random.Random, data: bytes) -> bytes:
    """Put NaN, Inf, negative or huge numbers into the blobs of a valid caffemodel."""
    from caffe2metal.caffe.caffemodel import ModelLayer, parse_caffemodel, write_caffemodel
    from caffe2metal.errors import Caffe2MetalError
    try:
        layers = [ModelLayer(layer.name, layer.type,
                             [np.array(x, dtype=np.float32) for x in layer.blobs])
                  for layer in parse_caffemodel(data)]
    except Caffe2MetalError:
        return data
    targets = [(layer, i) for layer in layers for i, x in enumerate(layer.blobs) if x.size]
    for _ in range(rnd.choice([1, 1, 2, 3])):
        if not targets:
            break
        bn = [(layer, i) for layer, i in targets if layer.type == "BatchNorm"]
        layer, i = rnd.choice(bn if bn and rnd.random() < 0.5 else targets)
        blob = layer.blobs[i].reshape(-1)
        k = rnd.randrange(blob.size)
        op = rnd.randrange(4)
        if op == 0:
            blob[k] = rnd.choice(INTERESTING_FLOATS)
        elif op == 1:
            blob[:] = -np.abs(blob) - rnd.choice([0.0, 1e-9, 1e-3, 1.0])
        elif op == 2:
            blob[:] = 0.0
        else:
            blob[k] = rnd.choice([1e30, -1e30, 1e-40, 3.4e38])
    buf = io.BytesIO()
    write_caffemodel(buf, layers)
    return buf.getvalue()


def _net_with(rnd: random.Random, names=None, dims=None, conv=None) -> str:
    """A small conv + BatchNorm + Scale net with chosen names, input dims and conv fields."""
    names = names or ["data", "conv", "bn", "scale", "relu"]
    dims = dims or [1, 3, 8, 8]
    conv = conv or {"num_output": 4, "kernel_size": 3}
    q = [json_str(n) for n in names]
    conv_text = " ".join(f"{k}: {v}" for k, v in conv.items())
    return (f'input: {q[0]}\ninput_shape {{ {" ".join(f"dim: {d}" for d in dims)} }}\n'
            f'layer {{ name: {q[1]} type: "Convolution" bottom: {q[0]} top: {q[1]}\n'
            f'  convolution_param {{ {conv_text} }} }}\n'
            f'layer {{ name: {q[2]} type: "BatchNorm" bottom: {q[1]} top: {q[1]} }}\n'
            f'layer {{ name: {q[3]} type: "Scale" bottom: {q[1]} top: {q[1]}'
            f' scale_param {{ bias_term: true }} }}\n'
            f'layer {{ name: {q[4]} type: "ReLU" bottom: {q[1]} top: {q[1]} }}\n')


def json_str(s: str) -> str:
    return json.dumps(s)


def special(rnd: random.Random, seeds) -> tuple[bytes, bytes]:
    """Hand-shaped hostile inputs (see the module doc)."""
    base = rnd.choice(seeds)
    kind = rnd.randrange(10)
    if kind == 0:                                              # deep nesting
        depth = rnd.choice([50, 101, 1000, 5000, 100_000])
        opener = rnd.choice(["a{", "layer {", "a <", "a: [", "layer { convolution_param {", "["])
        text = opener * depth + rnd.choice(["", "}" * depth, "x: 1"])
        return text.encode(), base.caffemodel
    if kind == 1:                                              # huge / odd dimensions
        dims = [rnd.choice([1, 0, -1, 3, 1000000, 2**31, 2**40, 99999999999])
                for _ in range(rnd.choice([4, 4, 4, 1, 2, 5]))]
        text = _net_with(rnd, dims=dims)
    elif kind == 2:                                            # odd conv fields
        conv = {"num_output": rnd.choice([4, 0, 10**9, 2**32 - 1, 3]),
                "kernel_size": rnd.choice([3, 0, 1, 9, 2**31 - 1]),
                rnd.choice(["stride", "pad", "dilation", "group", "axis"]):
                rnd.choice([0, 1, 2, 3, 4, -1, 2**31 - 1, 2**32 - 1])}
        text = _net_with(rnd, conv=conv)
    elif kind == 3:                                            # hostile names
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")           # invalid escapes are part of the point
            names = [rnd.choice(HOSTILE_NAMES).encode().decode("unicode_escape", "replace")
                     if rnd.random() < 0.6 else d
                     for d in ["data", "conv", "bn", "scale", "relu"]]
        text = _net_with(rnd, names=names)
    elif kind == 4:                                            # empty / zero / tiny files
        proto = base.prototxt if rnd.random() < 0.7 else rnd.choice(
            [b"", b"\x00" * 64, b"\n", b"#", b"layer", b"layer {}", b"\xef\xbb\xbf"])
        model = rnd.choice([b"", b"\x00" * rnd.choice([1, 64, 4096]), b"\x0a\x00", b"\xa2\x06\x00",
                            base.caffemodel[:rnd.randrange(len(base.caffemodel))]])
        return proto, model
    elif kind == 5:                                            # files swapped / other net
        other = rnd.choice(seeds)
        return rnd.choice([(base.caffemodel, base.prototxt), (base.prototxt, base.prototxt),
                           (base.caffemodel, base.caffemodel), (base.prototxt, other.caffemodel)])
    elif kind == 6:                                            # a blob declaring 10^12 values
        from caffe2metal.caffe.caffemodel import _varint_bytes as v
        shape = b"\x0a" + v(len(v(10**6) * 2)) + v(10**6) * 2
        blob = b"\x3a" + v(len(shape)) + shape
        blob = b"\x3a" + v(len(blob)) + blob
        head = b"\x0a\x04conv\x12\x0bConvolution"
        layer = head + blob
        return _net_with(rnd).encode(), b"\xa2\x06" + v(len(layer)) + layer
    elif kind == 7:                                            # length prefix past the end
        return _net_with(rnd).encode(), b"\xa2\x06\xff\xff\xff\xff\x0f\x0a\x04conv"
    elif kind == 8:                                            # huge input_dim with a big net
        text = base.prototxt.decode()
        text = re.sub(r"dim: \d+", lambda m: f"dim: {rnd.choice([1, 3, 10**6, 2**33])}", text)
        return text.encode(), base.caffemodel
    else:                                                      # long, repeated lists
        n = rnd.choice([1000, 100_000])
        text = "layer: [" + "{}," * n + "]" if rnd.random() < 0.5 else "a: [" + "1," * n + "1]"
        return text.encode(), base.caffemodel
    return text.encode(), _synth_weights(text) or base.caffemodel


KINDS = ("proto", "proto", "proto", "valid", "valid", "model", "model", "values", "both", "swap",
         "random", "special", "special")


def generate(rnd: random.Random, seeds, kind: str | None = None) -> tuple[str, bytes, bytes]:
    """(kind, prototxt bytes, caffemodel bytes) of one fuzz input."""
    kind = kind or rnd.choice(KINDS)
    base = rnd.choice(seeds)
    if kind == "proto":
        return kind, mutate_prototxt(rnd, base.prototxt.decode(), seeds), base.caffemodel
    if kind == "model":
        return kind, base.prototxt, mutate_caffemodel(rnd, base.caffemodel, seeds)
    if kind == "valid":
        proto = mutate_semantics(rnd, base.prototxt.decode())
        weights = _synth_weights(proto, rnd.randrange(1000), max_params=300_000)
        return kind, proto, base.caffemodel if weights is None else weights
    if kind == "values":
        return kind, base.prototxt, mutate_values(rnd, base.caffemodel)
    if kind == "both":
        return (kind, mutate_prototxt(rnd, base.prototxt.decode(), seeds),
                mutate_caffemodel(rnd, base.caffemodel, seeds))
    if kind == "swap":
        other = rnd.choice(seeds)
        return kind, *rnd.choice([(base.caffemodel, base.prototxt),
                                  (base.prototxt, other.caffemodel)])
    if kind == "random":
        size = rnd.choice([0, 1, 8, 100, 3000])
        junk = rnd.randbytes(size)
        if rnd.random() < 0.5:
            return kind, junk, base.caffemodel
        return kind, base.prototxt, junk
    return (kind, *special(rnd, seeds))


# ---------------------------------------------------------------- running one input

class Failure(Exception):
    """An input that broke a rule (the message says which)."""


class _Hang(BaseException):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    if not seconds or not hasattr(signal, "SIGALRM") or \
            signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        yield
        return

    def on_alarm(signum, frame):
        raise _Hang()
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def _memory_limit(extra_bytes: int | None):
    """Cap the address space at its current size plus ``extra_bytes`` (Linux)."""
    try:
        import resource
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError):
        extra_bytes = None
    if not extra_bytes:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = current + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _no_constants(name):
    raise ValueError(f"{name} is not JSON (a NaN or infinity reached the manifest)")


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_one(prototxt: bytes, caffemodel: bytes, workdir: str | os.PathLike, *,
            seconds: float = 20.0, memory: int | None = 2 << 30,
            threads: bool = False) -> str:
    """Convert one input in ``workdir`` (emptied first); "ok" or "error", else raise Failure.

    ``threads``: write through the write-behind threads whatever the model's size
    (the path big models take)."""
    from caffe2metal import pipeline
    work = Path(workdir)
    shutil.rmtree(work, ignore_errors=True)
    (work / "in").mkdir(parents=True)
    proto, model, out = work / "in" / "net.prototxt", work / "in" / "net.caffemodel", work / "out"
    proto.write_bytes(prototxt)
    model.write_bytes(caffemodel)
    before = _listing(work)
    inspected = _inspect_one(proto, model, seconds, memory, as_json=threads)
    if _listing(work) != before:
        raise Failure("inspect wrote files")
    threshold = pipeline.WRITE_BEHIND_MIN_BYTES
    try:
        if threads:
            pipeline.WRITE_BEHIND_MIN_BYTES = 0
        status, _, err = _run_cli(["convert", str(proto), str(model), "-o", str(out)],
                                  seconds, memory)
    finally:
        pipeline.WRITE_BEHIND_MIN_BYTES = threshold
    ours = [t.name for t in threading.enumerate() if t.name.startswith("caffe2metal")]
    if ours:
        raise Failure(f"threads left running: {ours}")
    after = _listing(work)
    outside = {p for p in after - before if p != "out" and not p.startswith("out" + os.sep)}
    if outside:
        raise Failure(f"files written outside OUT: {sorted(outside)[:10]}")
    if before - after:
        raise Failure(f"input files disappeared: {sorted(before - after)}")
    if status == 0:
        if not (out / "manifest.json").is_file():
            raise Failure("success without OUT/manifest.json")
        try:
            json.loads((out / "manifest.json").read_text(encoding="utf-8"),
                       parse_constant=_no_constants)
        except ValueError as e:
            raise Failure(f"manifest.json is not strict JSON: {e}") from None
        for p in out.rglob("*"):
            if p.is_symlink() or not p.resolve().is_relative_to(out.resolve()):
                raise Failure(f"{p} leaves OUT")
        if inspected == "error":
            raise Failure("inspect rejected what convert accepted (both read the same way)")
        return "ok"
    if status != 2:
        raise Failure(f"exit status {status}, expected 0 or 2; stderr: {err!r}")
    if out.exists():
        raise Failure("OUT exists after a failed conversion")
    if not _one_error_line(err):
        raise Failure(f"stderr is not one 'caffe2metal: error: ...' line: {err!r}")
    return "error"


def _one_error_line(err: str) -> bool:
    lines = err.splitlines()
    return len(lines) == 1 and lines[0].startswith("caffe2metal: error: ") and err.count("\n") == 1


def _inspect_one(proto: Path, model: Path, seconds: float, memory: int | None,
                 as_json: bool) -> str:
    """``caffe2metal inspect`` on the same files: "ok" or "error", else raise Failure."""
    argv = ["inspect", str(proto), str(model)] + (["--json"] if as_json else [])
    status, out, err = _run_cli(argv, seconds, memory, what="inspect: ")
    if status == 0:
        if as_json:
            try:
                json.loads(out, parse_constant=_no_constants)
            except ValueError as e:
                raise Failure(f"inspect --json printed no strict JSON: {e}") from None
        elif not out.strip():
            raise Failure("inspect succeeded without printing anything")
        return "ok"
    if status != 2:
        raise Failure(f"inspect: exit status {status}, expected 0 or 2")
    if not _one_error_line(err):
        raise Failure(f"inspect: stderr is not one 'caffe2metal: error: ...' line: {err!r}")
    return "error"


def _run_cli(argv: list[str], seconds: float, memory: int | None,
             what: str = "") -> tuple[int, str, str]:
    """``cli.main(argv)`` in process under the time and memory limits: (status, stdout,
    stderr); a hang, a MemoryError or any exception raises Failure (prefixed ``what``)."""
    from caffe2metal import cli
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with _time_limit(seconds), _memory_limit(memory), \
                contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = cli.main(argv)
    except _Hang:
        raise Failure(f"{what}no result after {seconds} s (a hang?)") from None
    except MemoryError:
        raise Failure(f"{what}MemoryError: tried to allocate more than the memory limit\n"
                      + traceback.format_exc()) from None
    except Exception:
        raise Failure(f"{what}uncaught exception\n{traceback.format_exc()}") from None
    return status, stdout.getvalue(), stderr.getvalue()


# ---------------------------------------------------------------- verify, compare, example

HOSTILE_VALUES = [None, True, False, 0, -1, 1, 2**31, 10**30, -10**30, 1.5, -0.0, 1e308, "",
                  "x", "../../etc/passwd", "/etc/passwd", "metal/../../x", "metal/\u0000",
                  "C:\\x", "..", ".", "float64", "int8", [], [0], [-1], [1, 2, 3, 4, 5],
                  [10**6] * 4, [2**40, 2**40], ["1"], [None], [[1]], {}, {"file": 1},
                  {"file": "metal/x", "dtype": "float32", "shape": [1]}, [True, 1]]


def _paths(value, prefix=()):
    """Every path (tuple of keys/indices) into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:8]):
            yield from _paths(v, prefix + (i,))


def mutate_manifest(rnd: random.Random, manifest: dict) -> bytes:
    """A damaged or hostile ``manifest.json``: wrong types, deletions, deep nesting,
    huge numbers, path traversal, NaN, truncated or non-UTF-8 bytes."""
    m = json.loads(json.dumps(manifest))
    tail = ""
    for _ in range(rnd.choice([1, 1, 2, 3, 6])):
        paths = list(_paths(m))
        path = rnd.choice(paths[1:] or paths)
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1] if path else None
        op = rnd.randrange(8)
        if key is None or op == 7:
            tail = rnd.choice(["deep", "truncate", "bytes", "nan", "top"])
            continue
        if op in (0, 1):                                   # delete
            del parent[key]
        elif op in (2, 3, 4):                              # a hostile value
            parent[key] = rnd.choice(HOSTILE_VALUES)
        elif op == 5:                                      # wrapped in a list / object
            parent[key] = rnd.choice([[parent[key]], {"v": parent[key]}])
        else:                                              # another value of the file
            other = rnd.choice(paths)
            v = m
            for k in other:
                v = v[k]
            parent[key] = json.loads(json.dumps(v))
    text = json.dumps(m)
    if tail == "deep":
        text = text[:-1] + ', "layers": ' + "[" * 50_000 + "]" * 50_000 + "}"
    elif tail == "nan":
        text = text.replace("1", "NaN", 1)
    elif tail == "top":
        text = rnd.choice(["[]", "null", "1", '"caffe2metal"', "[" + text + "]"])
    data = text.encode()
    if tail == "truncate":
        data = data[:rnd.randrange(len(data) + 1)]
    elif tail == "bytes":
        i = rnd.randrange(len(data) + 1)
        data = data[:i] + bytes([rnd.randrange(128, 256)]) + data[i:]
    return data


@functools.cache
def _base_output(root: str) -> tuple[Path, Path, Path]:
    """A real conversion of the ``tiny`` seed (prototxt, caffemodel, OUT) under ``root``."""
    from caffe2metal.pipeline import convert
    d = Path(root)
    d.mkdir(parents=True, exist_ok=True)
    proto, weights = d / "tiny.prototxt", d / "tiny.caffemodel"
    proto.write_text(TINY)
    weights.write_bytes(_synth_weights(TINY))
    convert(proto, weights, d / "out")
    return proto, weights, d / "out"


def _cli_outcome(argv: list[str], seconds: float, what: str, ok: tuple[int, ...]) -> int:
    status, out, err = _run_cli(argv, seconds, 2 << 30, what=what)
    if status not in ok:
        raise Failure(f"{what}exit status {status}, expected one of {ok}; stderr: {err!r}")
    incomplete = status == 3 and not err and out.rstrip().splitlines()[-1:] and \
        out.rstrip().splitlines()[-1].startswith("verify: INCOMPLETE")
    if status in (2, 3) and not incomplete:     # (3 is also a complete, incomplete report)
        lines = err.splitlines()
        if len(lines) != 1 or not lines[0].startswith("caffe2metal: ") or "Traceback" in err:
            raise Failure(f"{what}stderr is not one 'caffe2metal: ...' line: {err!r}")
    return status


def run_manifest(manifest: bytes, workdir: str | os.PathLike, base_root: str | os.PathLike,
                 seconds: float = 30.0) -> str:
    """``verify`` and ``compare`` on a copy of a real OUT with ``manifest`` as its
    manifest.json: "ok" or "error", else raise Failure."""
    proto, weights, base = _base_output(str(base_root))
    work = Path(workdir)
    shutil.rmtree(work, ignore_errors=True)
    out = work / "out"
    shutil.copytree(base, out)
    (out / "manifest.json").write_bytes(manifest)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    v = _cli_outcome(["verify", str(proto), str(weights), str(out)], seconds, "verify: ",
                     (0, 1, 2, 3))
    c = _cli_outcome(["compare", str(base), str(out)], seconds, "compare: ", (0, 2))
    r = _run_outcome(out, seconds)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    if after != before or {p.name for p in work.iterdir()} != {"out"}:
        raise Failure("verify, compare or run changed or wrote files")
    return "error" if 2 in (v, c, r) else "ok"


def _run_outcome(out: Path, seconds: float, argv: tuple[str, ...] = ()) -> int:
    """``run OUT``: 0; 3 when ops marked ``unavailable`` were not run (named in the output);
    or 2 with one ``caffe2metal: error: ...`` line."""
    status, stdout, err = _run_cli(["run", str(out), *argv], seconds, 2 << 30, what="run: ")
    if status not in (0, 2, 3):
        raise Failure(f"run: exit status {status}, expected 0, 2 or 3; stderr: {err!r}")
    if status == 3 and "not run: " not in stdout and '"skipped": [{' not in stdout:
        raise Failure(f"run: exit status 3 without the ops it did not run: {stdout[-300:]!r}")
    if status == 2 and (not _one_error_line(err) or "Traceback" in err):
        raise Failure(f"run: stderr is not one 'caffe2metal: error: ...' line: {err!r}")
    return status


# ---------------------------------------------------------------- run on hostile plans

PLAN_NUMBERS = [0, -1, 1, 2, 3, 4, 5, 7, 8, 9, 16, 150, 2**16, 2**31 - 1, 2**31, 2**40, 10**9,
                -10**9, 10**30, 1.5, -0.0, 1e308, None, True, "8", [], {}, [8], {"x": 1}]
GEOMETRY = ("kernelSize", "stride", "dilation", "offset")
FILE_SPECS = ("weights", "bias")


def _ops(m: dict) -> list:
    return [op for op in m["plan"] if isinstance(op, dict)]


def _rewire(blobs: list, names: list, rnd: random.Random) -> None:
    """One of ``blobs`` replaced by another of the plan's names (or one more added)."""
    if blobs and rnd.random() < 0.7:
        blobs[rnd.randrange(len(blobs))] = rnd.choice(names)
    else:
        blobs.append(rnd.choice(names))


def _blob_names(m: dict) -> list[str]:
    names = [i.get("name") for i in m.get("inputs", []) if isinstance(i, dict)]
    names += [t for op in _ops(m) for t in op.get("tops", []) if isinstance(t, str)]
    return [n for n in names if isinstance(n, str)] or ["data"]


def _specs(m: dict) -> list[dict]:
    """Every file object of the manifest run reads: weights, bias, slopes, priors, scale."""
    found = [e[k] for e in m.get("layers", []) if isinstance(e, dict)
             for k in FILE_SPECS if isinstance(e.get(k), dict)]
    found += [(op.get("mps") or {}).get("slopes") for op in _ops(m)]
    found += [(op.get("app") or {}).get("scale") for op in _ops(m)]
    found.append((m.get("ssd") or {}).get("priors"))
    return [f for f in found if isinstance(f, dict)]


def _edit_shape(rnd: random.Random, m: dict) -> None:
    ops = [op for op in _ops(m) if isinstance(op.get("shapes"), dict) and op["shapes"]]
    if not ops:
        return
    op = rnd.choice(ops)
    blob = rnd.choice(list(op["shapes"]))
    shape = op["shapes"][blob]
    k = rnd.randrange(6)
    if k == 0 or not isinstance(shape, list) or not shape:      # another blob's shape
        other = rnd.choice(ops)
        op["shapes"][blob] = json.loads(json.dumps(rnd.choice(list(other["shapes"].values()))))
    elif k in (1, 2):                                            # one dimension
        shape[rnd.randrange(len(shape))] = rnd.choice(PLAN_NUMBERS)
    elif k == 3:                                                 # a dimension more or less
        if rnd.random() < 0.5:
            shape.insert(rnd.randrange(len(shape) + 1), rnd.choice([1, 2, 3]))
        else:
            del shape[rnd.randrange(len(shape))]
    elif k == 4:                                                 # huge
        op["shapes"][blob] = [1, 2**20, 2**20, rnd.choice([1, 8, 2**20])]
    else:
        op["shapes"][blob] = rnd.choice([None, "x", [None], [-1], [1] * 40, {}])


def _edit_geometry(rnd: random.Random, m: dict) -> None:
    ops = [op for op in _ops(m) if isinstance(op.get("mps"), dict)]
    if not ops:
        return
    mps = rnd.choice(ops)["mps"]
    key = rnd.choice([*GEOMETRY, "destination", "groups", "kind", "kernel", "entry", "edgeMode",
                      "neuronType", "a", "b", "c", "secondaryScale",
                      "destinationFeatureChannelOffsets", "channelMap", "zeroPadSizeX"])
    v = mps.get(key)
    if isinstance(v, dict) and v and rnd.random() < 0.8:
        v[rnd.choice(list(v))] = rnd.choice(PLAN_NUMBERS)
    elif isinstance(v, list) and v and rnd.random() < 0.8:
        v[rnd.randrange(len(v))] = rnd.choice(PLAN_NUMBERS)
    elif key in ("kernel", "kind", "entry", "edgeMode", "neuronType") and rnd.random() < 0.7:
        values = {op["mps"].get(key) for op in ops} | {"MPSCNNPoolingAverage", "zero",
                                                        "convolution_transpose", "ghost"}
        mps[key] = rnd.choice(sorted(values, key=str))
    elif rnd.random() < 0.3:
        mps.pop(key, None)
    else:
        mps[key] = rnd.choice(PLAN_NUMBERS)


def _edit_order(rnd: random.Random, m: dict) -> None:
    plan = m["plan"]
    if not plan:
        return
    i, j = rnd.randrange(len(plan)), rnd.randrange(len(plan))
    op = plan[i] if isinstance(plan[i], dict) else {}
    k = rnd.randrange(8)
    if k == 0:                                                   # two ops swapped
        plan[i], plan[j] = plan[j], plan[i]
    elif k == 1:                                                 # an op moved
        plan.insert(j, plan.pop(i))
    elif k == 2:                                                 # an op twice
        plan.insert(j, json.loads(json.dumps(plan[i])))
    elif k == 3:                                                 # an op gone
        del plan[i]
    elif k == 4 and isinstance(op.get("bottoms"), list):         # reads another blob
        _rewire(op["bottoms"], _blob_names(m), rnd)
    elif k == 5 and isinstance(op.get("tops"), list):            # writes another blob
        _rewire(op["tops"], _blob_names(m), rnd)
    elif k == 6:                                                 # bottoms and tops exchanged
        op["bottoms"], op["tops"] = op.get("tops"), op.get("bottoms")
    else:                                                        # not an op
        plan[i] = rnd.choice([None, 1, "conv1", [], {}, {"name": 1}, {"name": "x"}])


def _edit_file(rnd: random.Random, m: dict, files: list) -> None:
    specs = _specs(m)
    if not specs:
        return
    spec = rnd.choice(specs)
    k = rnd.randrange(7)
    if k == 0:                                                   # the file damaged on disk
        files.append((spec.get("file"), rnd.choice(["delete", "truncate", "grow", "dir"])))
    elif k == 1:                                                 # another file
        spec["file"] = rnd.choice([rnd.choice(specs).get("file"), "metal/none.dat", "metal",
                                   "../manifest.json", "/etc/passwd", "metal/../manifest.json",
                                   "", 1, None])
    elif k == 2:
        spec["dtype"] = rnd.choice(["float16", "float32", "float64", "int8", None, 4])
    elif k == 3 and isinstance(spec.get("shape"), list) and spec["shape"]:
        spec["shape"][rnd.randrange(len(spec["shape"]))] = rnd.choice(PLAN_NUMBERS)
    elif k == 4:
        spec["shape"] = rnd.choice([[], [0], [1], [2, 2], [2**31], [-4], None, "x"])
    elif k == 5:
        spec.pop(rnd.choice(["file", "dtype", "shape", "sha256"]), None)
    else:
        spec["sha256"] = rnd.choice(["0" * 64, "", None, 1])


def _edit_op_field(rnd: random.Random, m: dict) -> None:
    ops = _ops(m)
    if not ops:
        return
    op = rnd.choice(ops)
    paths = [p for p in _paths(op) if p]
    path = rnd.choice(paths)
    parent = op
    for key in path[:-1]:
        parent = parent[key]
    if rnd.random() < 0.25:
        del parent[path[-1]]
    elif rnd.random() < 0.5:                                     # the same field of another op
        other = rnd.choice(ops)
        v = other
        for key in path:
            if not isinstance(v, dict | list) or (isinstance(v, dict) and key not in v) or \
                    (isinstance(v, list) and not (isinstance(key, int) and key < len(v))):
                v = rnd.choice(PLAN_NUMBERS)
                break
            v = v[key]
        parent[path[-1]] = json.loads(json.dumps(v))
    else:
        parent[path[-1]] = rnd.choice(PLAN_NUMBERS + HOSTILE_VALUES)


def mutate_plan(rnd: random.Random, manifest: dict) -> tuple[bytes, list]:
    """A plan edited by hand: op fields, shapes, geometry (offsets, strides, kernels,
    destinations), ops and blobs out of order, file specs; and files damaged on disk.
    Returns (manifest.json bytes, [(relative file, "delete"|"truncate"|"grow"|"dir")])."""
    m = json.loads(json.dumps(manifest))
    files: list = []
    for _ in range(rnd.choice([1, 1, 1, 2, 3])):
        k = rnd.randrange(10)
        try:            # an earlier edit may have left anything where an edit looks
            if k < 2:
                _edit_shape(rnd, m)
            elif k < 4:
                _edit_geometry(rnd, m)
            elif k < 6:
                _edit_order(rnd, m)
            elif k < 8:
                _edit_file(rnd, m, files)
            elif k < 9:
                _edit_op_field(rnd, m)
            elif rnd.random() < 0.1:                             # absurd op counts
                m["plan"] = m["plan"] + [{}] * 1_000_001
            else:
                m["inputs"] = rnd.choice([[{"name": "data", "shape": [1, 3, 2**20, 2**20]}],
                                          [{"name": "data", "shape": [1, -3, 8, 8]}],
                                          [{"name": "data"}], [], None, "data"])
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            continue
    return json.dumps(m).encode(), files


def _damage(out: Path, files: list) -> None:
    for rel, how in files:
        if not isinstance(rel, str) or not rel.startswith("metal/") or ".." in rel:
            continue
        path = out / rel
        if not path.is_file():
            continue
        if how == "delete":
            path.unlink()
        elif how == "truncate":
            path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
        elif how == "grow":
            path.write_bytes(path.read_bytes() + b"\0" * 4)
        else:
            path.unlink()
            path.mkdir()


def run_plan_manifest(manifest: bytes, files: list, workdir: str | os.PathLike, base: Path,
                      argv: tuple[str, ...] = (), seconds: float = 30.0) -> str:
    """``run`` on a copy of the converted ``base`` with ``manifest`` and ``files`` damaged:
    "ok" or "error", else raise Failure (a traceback, another status, a hang, a
    MemoryError under 2 GiB more address space, a file written)."""
    work = Path(workdir)
    shutil.rmtree(work, ignore_errors=True)
    out = work / "out"
    shutil.copytree(base, out)
    (out / "manifest.json").write_bytes(manifest)
    _damage(out, files)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    status = _run_outcome(out, seconds, argv)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    if after != before or {p.name for p in work.iterdir()} != {"out"}:
        raise Failure("run changed or wrote files")
    return "ok" if status == 0 else "error"


@functools.cache
def _example_output(root: str) -> Path:
    """The built-in example (MobileNet-SSD: transpose, reshape, concat, priors, detection
    output) converted once under ``root``."""
    from caffe2metal.examples import build
    from caffe2metal.pipeline import convert
    d = Path(root)
    proto, weights = build(d / "src")
    convert(proto, weights, d / "out")
    return d / "out"


def plan_bases(root: str | os.PathLike) -> list[Path]:
    return [_base_output(str(Path(root) / "tiny"))[2], _example_output(str(Path(root) / "ex"))]


def hostile_plan(rnd: random.Random, root: str | os.PathLike) -> tuple:
    """(manifest bytes, damaged files, base OUT, run's options): one hostile plan of one of
    ``plan_bases`` for ``run_plan_manifest``."""
    base = rnd.choice(plan_bases(root))
    manifest, files = mutate_plan(rnd, json.loads((base / "manifest.json").read_text()))
    argv = rnd.choice([(), (), ("--json",), ("--activations", "float16"),
                       ("--backend", "mlx"), ("--backend", "mlx", "--activations", "float16")])
    return manifest, files, base, argv


EXAMPLE_TARGETS = ("new", "nested", "existing", "file", "file_parent", "link_at_name",
                   "dangling_link_at_name", "fifo_at_name", "dir_at_name", "not_utf8")


def run_example(rnd: random.Random, workdir: str | os.PathLike, seconds: float = 120.0) -> str:
    """``example`` into a hostile target: "ok" or "error", else raise Failure."""
    from caffe2metal.examples import STEM
    work = Path(workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    victim = work / "victim"
    victim.write_text("secret")
    kind = rnd.choice(EXAMPLE_TARGETS)
    target = work / "ex"
    name = target / f"{STEM}.{rnd.choice(['prototxt', 'caffemodel'])}"
    if kind == "nested":
        target = work / "a" / "b" / "ex"
    elif kind != "new":
        target.mkdir()
        (target / "mine.txt").write_text("keep")
    if kind == "file":
        shutil.rmtree(target)
        target.write_text("keep")
    elif kind == "file_parent":
        shutil.rmtree(target)
        target.write_text("keep")
        target = target / "sub"
    elif kind == "link_at_name":
        name.symlink_to(victim)
    elif kind == "dangling_link_at_name":
        name.symlink_to(work / "nowhere")
    elif kind == "fifo_at_name":
        os.mkfifo(name)
    elif kind == "dir_at_name":
        name.mkdir()
    elif kind == "not_utf8":
        target = Path(os.fsdecode(os.fsencode(work) + b"/ex\xff"))
    status = _cli_outcome(["example", str(target)], seconds, f"example ({kind}): ", (0, 2))
    if victim.read_text() != "secret" or (work / "nowhere").exists():
        raise Failure(f"example ({kind}) wrote through a link")
    left = [p.name for p in work.rglob("*") if ".tmp" in p.name or ".partial-" in p.name]
    if left:
        raise Failure(f"example ({kind}) left {left}")
    if status == 2 and kind in ("new", "nested") and os.path.lexists(target):
        raise Failure(f"example ({kind}) failed and left {target}")
    if status == 2 and kind == "nested" and (work / "a").exists():
        raise Failure("example (nested) failed and left the parents it made")
    return "ok" if status == 0 else "error"


def save_crash(directory: str | os.PathLike, prototxt: bytes, caffemodel: bytes,
               message: str) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ident = hashlib.sha1(prototxt + b"\0" + caffemodel).hexdigest()[:16]
    (d / f"{ident}.prototxt").write_bytes(prototxt)
    (d / f"{ident}.caffemodel").write_bytes(caffemodel)
    (d / f"{ident}.txt").write_text(message)
    return d / ident


def _signature(message: str) -> str:
    """First line plus the innermost frame: one entry per distinct bug."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', message)
    last = message.strip().splitlines()[-1] if message.strip() else ""
    where = f"{Path(frames[-1][0]).name}:{frames[-1][1]} {frames[-1][2]}" if frames else ""
    return f"{message.splitlines()[0]} | {where} | {last[:200]}"


def fuzz(seconds: float, seed: int = 0, crashes: str | os.PathLike | None = None,
         models_dir: str | None = None, max_inputs: int | None = None,
         log=print) -> dict:
    """Run random inputs for ``seconds``; returns counts and distinct failures."""
    seeds = corpus(models_dir)
    log(f"seed corpus: {len(seeds)} nets ({', '.join(s.name for s in seeds[:6])}"
        f"{', ...' if len(seeds) > 6 else ''})")
    rnd = random.Random(seed)
    stats = {"inputs": 0, "ok": 0, "error": 0, "failures": 0, "converts": 0, "manifests": 0,
             "plans": 0, "examples": 0}
    distinct: dict[str, Path | None] = {}
    start = time.monotonic()
    last_log = start
    with tempfile.TemporaryDirectory(prefix="caffe2metal-fuzz-") as tmp:
        while time.monotonic() - start < seconds and (max_inputs is None
                                                       or stats["inputs"] < max_inputs):
            stats["inputs"] += 1
            command = rnd.random()
            manifest = b""
            try:
                if command < 0.25:                 # verify + compare on a hostile manifest
                    kind, proto, model = "manifest", b"", b""
                    manifest = mutate_manifest(rnd, json.loads(
                        (_base_output(str(Path(tmp) / "base"))[2] / "manifest.json").read_text()))
                    stats["manifests"] += 1
                    stats[run_manifest(manifest, Path(tmp) / "m", Path(tmp) / "base")] += 1
                elif command < 0.40:               # run on a hand-edited plan
                    kind, proto, model = "plan", b"", b""
                    stats["plans"] += 1
                    manifest, files, base, argv = hostile_plan(rnd, Path(tmp) / "plans")
                    try:
                        stats[run_plan_manifest(manifest, files, Path(tmp) / "p", base,
                                                argv)] += 1
                    except Failure as f:
                        raise Failure(f"{f}\n(base {base.parent.name}, options {argv}, "
                                      f"damaged files {files})") from None
                elif command < 0.42:               # example into a hostile target
                    kind, proto, model = "example", b"", b""
                    stats["examples"] += 1
                    stats[run_example(rnd, Path(tmp) / "e")] += 1
                else:
                    kind, proto, model = generate(rnd, seeds)
                    stats["converts"] += 1
                    stats[run_one(proto, model, Path(tmp) / "c",
                                  threads=stats["inputs"] % 2 == 0)] += 1
            except Failure as f:
                if manifest:
                    model = manifest
                stats["failures"] += 1
                sig = _signature(f"{kind}: {f}")
                if sig not in distinct:
                    path = save_crash(crashes, proto, model, f"{kind}: {f}") if crashes else None
                    distinct[sig] = path
                    log(f"FAILURE #{len(distinct)} ({kind}): {sig}" +
                        (f"\n  saved {path}.*" if path else ""))
            if time.monotonic() - last_log > 30:
                last_log = time.monotonic()
                log(f"  {stats['inputs']} inputs ({stats['converts']} convert, "
                    f"{stats['manifests']} verify+compare+run, {stats['plans']} run on hostile "
                    f"plans, {stats['examples']} example), "
                    f"{stats['ok']} ok, {stats['error']} rejected, {stats['failures']} failures")
    stats["distinct"] = distinct
    stats["seconds"] = time.monotonic() - start
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.fuzz",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", 300)))
    ap.add_argument("--seed", type=int,
                    default=int(os.environ.get("FUZZ_SEED", time.time_ns() % 2**32)))
    ap.add_argument("--crashes", default="build/fuzz/crashes")
    ap.add_argument("--models", help="folder of <net>/*.prototxt seeds (default ../shared/models)")
    ap.add_argument("--replay", nargs="+", metavar="ID",
                    help="rerun saved crashes (<dir>/<id>, without extension)")
    args = ap.parse_args(argv)
    if args.replay:
        bad = 0
        with tempfile.TemporaryDirectory() as tmp:
            for ident in args.replay:
                base = Path(ident)
                try:
                    r = run_one(base.with_suffix(".prototxt").read_bytes(),
                                base.with_suffix(".caffemodel").read_bytes(), tmp)
                    print(f"{ident}: {r}")
                except Failure as f:
                    bad += 1
                    print(f"{ident}: FAILURE {f}")
        return 1 if bad else 0
    print(f"fuzzing inspect + convert for {args.seconds:g} s, seed {args.seed}")
    stats = fuzz(args.seconds, args.seed, args.crashes, args.models)
    print(f"{stats['inputs']} inputs in {stats['seconds']:.0f} s ({stats['converts']} convert, "
          f"{stats['manifests']} verify+compare+run on hostile manifests, {stats['plans']} run "
          f"on hostile plans, {stats['examples']} "
          f"example into hostile targets): {stats['ok']} ok, "
          f"{stats['error']} rejected with an error, {stats['failures']} failures "
          f"({len(stats['distinct'])} distinct)")
    return 1 if stats["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
