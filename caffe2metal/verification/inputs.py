"""The input verify feeds both models: an image (``--image``) or deterministic random values."""
from __future__ import annotations

import os

import numpy as np

from ..errors import Caffe2MetalError
from ..net.reader import Model


def _net_inputs(model: Model) -> dict[str, tuple | None]:
    g = model.graph
    shapes: dict[str, tuple | None] = {g.blob_names.get(b, b): s for b, s in g.inputs.items()}
    for layer in g.layers:
        if layer.type == "Input":
            shapes.update({g.blob_names.get(t, t): model.shapes.blobs[t] for t in layer.tops})
    return shapes


def make_inputs(model: Model, image: str | os.PathLike | None = None,
                seed: int = 0) -> tuple[dict[str, np.ndarray], str]:
    """Batch-1 inputs for the net (file blob name -> float32 array) and a description."""
    rng = np.random.default_rng(seed)
    feed, described = {}, f"uniform [-1, 1) random, seed {seed}"
    image_used = image is None
    for name, shape in _net_inputs(model).items():
        if shape is None or any(d is None for d in shape):
            raise Caffe2MetalError(f"input '{name}' has no known shape", file=model.prototxt)
        shape = (1,) + tuple(shape[1:])
        if image is not None and not image_used and len(shape) == 4:
            feed[name] = _load_image(image, shape)
            described = f"image {image} resized to {shape[3]}x{shape[2]}, BGR, no mean subtraction"
            image_used = True
        else:
            feed[name] = rng.uniform(-1, 1, shape).astype(np.float32)
    if not image_used:
        raise Caffe2MetalError("--image given, but the net has no 4-D (N,C,H,W) input",
                               file=model.prototxt)
    return feed, described


def _load_image(path: str | os.PathLike, shape: tuple[int, ...]) -> np.ndarray:
    import cv2
    c, h, w = shape[1:]
    if c not in (1, 3):
        raise Caffe2MetalError(f"the net's input has {c} channels; --image needs 1 or 3", file=path)
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if c == 1 else cv2.IMREAD_COLOR)
    if img is None:
        raise Caffe2MetalError("cannot read this image (missing, or not a format OpenCV reads)",
                               file=path)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    img = img.reshape(h, w, c)
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None])
