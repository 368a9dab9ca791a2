"""How far float16 weight files and float16 activations take the plan run from the original.

    python -m tools.precision [--models a,b,...] [--markdown FILE]

For the built-in example and every real architecture in ../shared/models that OpenCV
runs (synthetic weights, seed 0, calibrated as the tests do; verify's input), it
converts twice (float32 and float16 weight files) and reads verify's own plan-run
rows (the plan executed from OUT against the original in OpenCV; worst rel over the
rows held to the tolerance itself: net outputs, SSD's loc, and the input of a
Softmax/Sigmoid computing an output or SSD's scores) for:

* ``f32``: float32 weights, float32 activations;
* ``f16 w``: float16 weight files;
* ``f16 act``: float32 weights, every MPS op's output stored as float16
  (``verify --activations float16``);
* ``f16 both``: both;
* ``yardstick``: the float32 plan against the original with every parameter blob
  multiplied by ``1 + u * 2^-12`` (u uniform in [-1, 1], seed 1): a random perturbation
  of the size of float16's rounding (half a unit in the last of 11 bits), i.e. how much
  this network with these weights amplifies weight errors of that size.  Where ``f16 w``
  is of the order of the yardstick, the float16 gap is the network's sensitivity, not
  the files or the runtime;
* ``f16 w, squashed``: with float16 weights, the worst row a Softmax/Sigmoid computes
  (its tolerance grows with its input's measured difference: logits in the hundreds, as
  random heads give, turn small relative differences into large ones after the squash).

Not part of the tests (it converts and verifies every model four to five times:
minutes); tests/test_run_real_models.py holds every model to verify's float16
tolerance with the same measure.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "models"
YARDSTICK = 2.0 ** -12
COLUMNS = ("f32", "f16 w", "f16 act", "f16 both", "yardstick", "f16 w, squashed")
# as tests/test_real_models.py: not loadable by OpenCV, or at another input size
NOT_IN_OPENCV = {"enet", "segnet", "yolov3"}
INPUT_SIZE = {"mobilenetv2_ssdlite": 600}
DROP = {"faceboxes": ("DetectionOutput",)}


def _weights(proto: Path, name: str) -> Path:
    from caffe2metal.examples.weights import write_synthetic
    from caffe2metal.net.reader import read_prototxt
    return write_synthetic(read_prototxt(proto), proto.with_suffix(".caffemodel"), 0, True,
                           DROP.get(name, ()))


def _perturbed(weights: Path, dst: Path) -> Path:
    from caffe2metal.caffe.caffemodel import read_caffemodel, write_caffemodel
    rng = np.random.default_rng(1)
    layers = read_caffemodel(weights)

    class Perturbed:
        def __init__(self, layer):
            self.name, self.type = layer.name, layer.type
            self.blobs = [(np.asarray(b) * (1 + YARDSTICK * rng.uniform(-1, 1, np.shape(b))))
                          .astype(np.asarray(b).dtype) for b in layer.blobs]
    write_caffemodel(dst, [Perturbed(layer) for layer in layers], net_name=layers.net_name)
    return dst


def _worst(checked, squashed: bool = False) -> float:
    """The worst rel of the plan rows held to the tolerance itself, or (``squashed``) of the
    rows a Softmax/Sigmoid computes from one of those (their tolerance grows with it)."""
    rels = [r.rel for r in checked.plan if r.kind != "sets (label, score, IoU)" and r.counted
            and ("of the row above" in r.note) == squashed]
    return max(rels, default=float("nan"))


def measure(proto: Path, weights: Path, work: Path) -> dict[str, float]:
    from caffe2metal import api
    out32 = api.convert(proto, weights, out=work / "f32").out
    out16 = api.convert(proto, weights, out=work / "f16", dtype="float16").out
    f16 = api.verify(proto, weights, out16)
    return {
        "f32": _worst(api.verify(proto, weights, out32)),
        "f16 w": _worst(f16),
        "f16 w, squashed": _worst(f16, squashed=True),
        "f16 act": _worst(api.verify(proto, weights, out32, activations="float16")),
        "f16 both": _worst(api.verify(proto, weights, out16, activations="float16")),
        "yardstick": _worst(api.verify(proto, _perturbed(weights, work / "perturbed.caffemodel"),
                                       out32)),
    }


def models(only: set[str] | None) -> list[tuple[str, Path | None]]:
    found: list[tuple[str, Path | None]] = [("example", None)]
    found += [(p.parent.name, p) for p in sorted(SHARED_MODELS.glob("*/deploy.prototxt"))
              if p.parent.name not in NOT_IN_OPENCV]
    return [(n, p) for n, p in found if only is None or n in only]


def main(argv=None) -> int:
    from caffe2metal import api
    ap = argparse.ArgumentParser(prog="python -m tools.precision")
    ap.add_argument("--models", help="comma-separated names (default: all)")
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args(argv)
    only = set(args.models.split(",")) if args.models else None
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    print(lines[0], flush=True)
    for name, src in models(only):
        with tempfile.TemporaryDirectory(prefix="caffe2metal-precision-") as tmp:
            work = Path(tmp)
            if src is None:
                made = api.example(work / "model")
                proto, weights = Path(made.prototxt), Path(made.caffemodel)
            else:
                proto = work / "deploy.prototxt"
                text = src.read_text()
                if name in INPUT_SIZE:
                    text = text.replace("dim: 300", f"dim: {INPUT_SIZE[name]}")
                proto.write_text(text)
                weights = _weights(proto, name)
            try:
                got = measure(proto, weights, work)
            except Exception as e:      # noqa: BLE001  a model that cannot be measured: say so
                print(f"| {name} | {type(e).__name__}: {e} |", flush=True)
                continue
        line = f"| {name} | " + " | ".join(f"{got[c]:.2g}" for c in COLUMNS) + " |"
        lines.append(line)
        print(line, flush=True)
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
