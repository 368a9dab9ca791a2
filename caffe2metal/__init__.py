"""caffe2metal: fold BatchNorm/Scale into Caffe models and export Metal weights.

Python API (``caffe2metal.api``), one function per command::

    inspect(prototxt, caffemodel=None) -> Inspection
    convert(prototxt, caffemodel=None, out=None, *, dtype="float32", naming="apple",
            metal=True, verify=False) -> Conversion
    verify(prototxt, caffemodel, out, *, image=None, seed=0) -> Verification
    run(out, *, image=None, activations="float32", backend="numpy", device=None) -> Run
    compare(dir_a, dir_b) -> DirectoryComparison
    example(directory) -> Example

Results are frozen dataclasses; ``result.render()`` is the text the command
prints.  Bad input raises a ``Caffe2MetalError`` subclass.  The steps behind
them are the subpackages (docs/ARCHITECTURE.md): ``pipeline`` (convert),
``verification``, ``examples``, ...

``import caffe2metal`` imports only this file and ``errors`` (1 ms, measured
with ``python -X importtime``): the API module (16 ms: dataclasses 8, typing 3,
its own classes 4) and the pipeline (numpy, 0.1 s; OpenCV for verify and
example) are imported when a function is first called.
"""
from __future__ import annotations

import importlib

from .errors import (
    Caffe2MetalError,
    ExportError,
    GraphError,
    ModelFormatError,
    VerificationUnavailable,
)

__version__ = "0.1.0"

_RESULTS = ("Conversion", "DirectoryComparison", "Example", "Inspection", "Run", "Skipped",
            "Verification")

__all__ = ["Caffe2MetalError", "ExportError", "GraphError", "ModelFormatError",
           "VerificationUnavailable", "compare",
           "convert", "example", "inspect", "run", "verify", *_RESULTS]


def _api():
    # imported on first use, not with the package (16 ms against the package's 1 ms)
    return importlib.import_module(".api", __name__)


def inspect(prototxt, caffemodel=None, *, input_shapes=None):
    """Read a net (and its weights, when given): layers, shapes, counts and fold plan.
    Returns an ``Inspection``; see ``caffe2metal.api.inspect``."""
    return _api().inspect(prototxt, caffemodel, input_shapes=input_shapes)


def convert(prototxt, caffemodel=None, out=None, *, dtype="float32", naming="apple",
            metal=True, verify=False, progress=None, input_shapes=None, image=None, mean=None,
            scale=None, channel_order=None, seed=0):
    """Fold BatchNorm/Scale; write the merged Caffe model, Metal weights (``dtype``
    float32 or float16) and manifest.json into ``out``; with ``verify`` check them
    (on ``image`` preprocessed with ``mean``, ``scale``, ``channel_order``).
    Returns a ``Conversion``; see ``caffe2metal.api.convert``."""
    return _api().convert(prototxt, caffemodel, out, dtype=dtype, naming=naming, metal=metal,
                          verify=verify, progress=progress, input_shapes=input_shapes,
                          image=image, mean=mean, scale=scale, channel_order=channel_order,
                          seed=seed)


def verify(prototxt, caffemodel, out, *, image=None, seed=0, mean=None, scale=None,
           channel_order=None, input_shapes=None, activations="float32"):
    """Recompute every Metal layer from ``out``'s files and compare it with the original
    model in OpenCV, the merged model end to end, and the plan run from ``out`` (its
    activations stored as ``activations``).  Returns a ``Verification``; raises
    ``VerificationUnavailable`` when OpenCV cannot run the model."""
    return _api().verify(prototxt, caffemodel, out, image=image, seed=seed, mean=mean,
                         scale=scale, channel_order=channel_order, input_shapes=input_shapes,
                         activations=activations)


def run(out, *, image=None, activations="float32", backend="numpy", device=None):
    """Execute ``out``'s execution plan from ``out`` alone (manifest.json and metal/) on
    ``image`` preprocessed as the manifest records, else verify's random input, with
    ``backend`` "numpy" or "mlx" (Apple's MLX; ``device`` "cpu" or "gpu").
    Returns a ``Run`` (net outputs by blob name, SSD detections, ops not run)."""
    return _api().run(out, image=image, activations=activations, backend=backend,
                      device=device)


def compare(dir_a, dir_b):
    """Max |A - B| of every weights/bias file two output directories share.
    Returns a ``DirectoryComparison``."""
    return _api().compare(dir_a, dir_b)


def example(directory):
    """Write the built-in MobileNet-SSD-style example model into ``directory``.
    Returns an ``Example`` (prototxt, caffemodel)."""
    return _api().example(directory)


def __getattr__(name: str):
    if name in _RESULTS:
        return getattr(_api(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
