"""The input verify feeds both models: an image (``--image``) or deterministic random values.

An image is read with ``cv2.imread`` (BGR, or gray for a 1-channel net), resized
to the net's input with ``cv2.resize`` INTER_LINEAR (as ``cv2.dnn.blobFromImage``
does), put in the model's channel order (``--channel-order RGB`` swaps B and
R), then ``(pixel - mean) * scale`` per channel, mean values given in the
model's channel order (blobFromImage's order with ``swapRB``).  The report's
input line states each of these steps as applied.

Bad input is one clear error, never a traceback: a missing, unreadable or
undecodable image, an image larger than ``MAX_IMAGE_PIXELS`` (checked from the
PNG/JPEG/GIF/BMP header before decoding; OpenCV's own limit of 2^30 for other
formats), a mean with the wrong number of values, a negative seed.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import Caffe2MetalError
from ..export import preprocessing
from ..net.reader import Model

MAX_IMAGE_PIXELS = 1 << 28            # decoded width x height; 2^28 = 16384 x 16384
MAX_IMAGE_BYTES = 1 << 30             # the encoded file
CHANNEL_ORDERS = preprocessing.CHANNEL_ORDERS


@dataclass(frozen=True)
class ImageInput:
    """``--image`` and how its pixels become the net's input."""
    path: str
    mean: tuple[float, ...] = ()       # one value, or one per channel in the model's order
    scale: float = 1.0
    channel_order: str = "BGR"         # the model's channel order
    source: str = ""                   # where mean/scale/order come from ("": the options)

    def describe(self, width: int, height: int, channels: int) -> str:
        order = ("gray" if channels == 1 else "BGR (as read)" if self.channel_order == "BGR"
                 else "RGB (B and R swapped)")
        mean = (f"mean [{', '.join(f'{m:g}' for m in self.mean)}] subtracted"
                if self.mean else "no mean subtraction")
        scale = f"times {self.scale:g}" if self.scale != 1 else "no scaling"
        where = f"; preprocessing {self.source}" if self.source else ""
        return (f"image {self.path} resized to {width}x{height} (cv2.resize INTER_LINEAR), "
                f"channels {order}, {mean}, {scale}{where}")


def image_input(image: str | os.PathLike | ImageInput | None, *, mean=None, scale=None,
                channel_order=None) -> ImageInput | None:
    """The image options checked and combined (None: no image, random input).

    Options without an image are an error; so are a non-finite mean or scale and an
    unknown channel order."""
    if isinstance(image, ImageInput):
        return image
    options = {"--mean": mean, "--scale": scale, "--channel-order": channel_order}
    if image is None:
        given = [k for k, v in options.items() if v is not None]
        if given:
            raise Caffe2MetalError(f"{', '.join(given)} only apply to an --image (the default "
                                   "input is uniform random values)")
        return None
    means, s, order = preprocessing.options(mean, scale, channel_order)
    return ImageInput(str(image), tuple(means), s, order)


def manifest_image_input(image: str | os.PathLike, manifest: dict,
                         where: str | os.PathLike | None = None) -> ImageInput:
    """``image`` preprocessed as the manifest's ``preprocessing`` records (nothing applied
    when it records nothing); a record that is not usable is an error naming ``where``."""
    rec = preprocessing.from_manifest(manifest)
    if rec["source"] == "none":
        return ImageInput(str(image), source="none: the manifest records no preprocessing")
    try:
        means, s, order = preprocessing.options(rec.get("mean") or None, rec.get("scale"),
                                                rec.get("channel_order"))
    except (Caffe2MetalError, TypeError, ValueError) as e:
        raise Caffe2MetalError(f"preprocessing: {e}", file=where) from None
    return ImageInput(str(image), means, s, order,
                      source=f"as the manifest records (from "
                             f"{preprocessing.describe_source(rec)})")


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise Caffe2MetalError(f"--seed {seed!r}: expected an integer >= 0")
    return seed


def net_inputs(model: Model) -> dict[str, tuple | None]:
    """Every net input (file blob name) and its shape."""
    g = model.graph
    shapes: dict[str, tuple | None] = {g.blob_names.get(b, b): s for b, s in g.inputs.items()}
    for layer in g.layers:
        if layer.type == "Input":
            shapes.update({g.blob_names.get(t, t): model.shapes.blobs[t] for t in layer.tops})
    return shapes


_net_inputs = net_inputs


def image_target(model: Model, spec: ImageInput) -> tuple[str, tuple[int, ...]]:
    """The input the image feeds (the first 4-D one) and its batch-1 shape; errors for
    a net without one and for a mean that does not match its channels."""
    for name, shape in net_inputs(model).items():
        if shape is not None and len(shape) == 4 and None not in shape:
            c = shape[1]
            if c not in (1, 3):
                raise Caffe2MetalError(f"the net's input '{name}' has {c} channels; --image "
                                       "needs 1 or 3", file=model.prototxt)
            if spec.mean and len(spec.mean) not in (1, c):
                raise Caffe2MetalError(f"--mean has {len(spec.mean)} values; the net's input "
                                       f"'{name}' has {c} channel(s): give 1 or {c}",
                                       file=model.prototxt)
            return name, (1,) + tuple(shape[1:])
    raise Caffe2MetalError("--image given, but the net has no 4-D (N,C,H,W) input",
                           file=model.prototxt)


def make_inputs(model: Model, image: str | os.PathLike | ImageInput | None = None,
                seed: int = 0) -> tuple[dict[str, np.ndarray], str]:
    """Batch-1 inputs for the net (file blob name -> float32 array) and a description."""
    check_seed(seed)
    spec = image_input(image)
    for why in model.missing_inputs:
        raise Caffe2MetalError(why, file=model.prototxt)
    target = image_target(model, spec) if spec is not None else None
    rng = np.random.default_rng(seed)
    feed, described = {}, f"uniform [-1, 1) random, seed {seed}"
    for name, shape in net_inputs(model).items():
        if shape is None or any(d is None for d in shape):
            raise Caffe2MetalError(f"input '{name}' has no known shape: give it with "
                                   f"--input-shape {name}=N,C,H,W", file=model.prototxt)
        shape = (1,) + tuple(shape[1:])
        if spec is not None and target is not None and name == target[0]:
            feed[name] = load_image(spec, shape)
            described = spec.describe(shape[3], shape[2], shape[1])
            if len(feed) < len(net_inputs(model)):
                described += f"; other inputs uniform [-1, 1) random, seed {seed}"
        else:
            feed[name] = rng.uniform(-1, 1, shape).astype(np.float32)
    return feed, described


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, GIF or BMP header; None for other formats."""
    with open(path, "rb") as f:
        head = f.read(32)
        if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
            w, h = struct.unpack(">II", head[16:24])
            return w, h
        if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
            w, h = struct.unpack("<HH", head[6:10])
            return w, h
        if head.startswith(b"BM") and len(head) >= 26:
            w, h = struct.unpack("<ii", head[18:26])
            return abs(w), abs(h)
        if head.startswith(b"\xff\xd8"):
            return _jpeg_size(f)
    return None


def _jpeg_size(f) -> tuple[int, int] | None:
    f.seek(2)
    while True:
        byte = f.read(1)
        while byte and byte != b"\xff":
            byte = f.read(1)
        while byte == b"\xff":
            byte = f.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue
        raw = f.read(2)
        if len(raw) < 2:
            return None
        length = struct.unpack(">H", raw)[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            data = f.read(5)
            if len(data) < 5:
                return None
            h, w = struct.unpack(">HH", data[1:5])
            return w, h
        f.seek(max(0, length - 2), 1)


def check_image(spec: ImageInput) -> None:
    """Refuse an image that is missing, too big or not decodable, before anything runs."""
    _read_image(spec.path, color=True)


def _read_image(path: str, color: bool) -> np.ndarray:
    p = Path(path)
    try:
        if not p.is_file():
            raise Caffe2MetalError("no such image file" if not p.exists() else "is not a file",
                                   file=path)
        if p.stat().st_size > MAX_IMAGE_BYTES:
            raise Caffe2MetalError(f"the image file is larger than {MAX_IMAGE_BYTES} bytes",
                                   file=path)
        size = image_size(p)
        data = np.fromfile(p, np.uint8)
    except OSError as e:
        raise Caffe2MetalError(f"cannot read the image: {e.strerror or e}", file=path) from None
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise Caffe2MetalError(f"the image is {size[0]}x{size[1]} pixels, more than the "
                               f"{MAX_IMAGE_PIXELS} (2^28) verify decodes", file=path)
    import cv2
    try:
        img = cv2.imdecode(data, cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE)
    except cv2.error:
        img = None
    except MemoryError:
        raise Caffe2MetalError("not enough memory to decode the image", file=path) from None
    if img is None or img.size == 0:
        raise Caffe2MetalError("cannot decode this image (broken, too large, or not a format "
                               "OpenCV reads)", file=path)
    return img


def load_image(spec: ImageInput, shape: tuple[int, ...]) -> np.ndarray:
    """The image as the net's batch-1 NCHW float32 input (see the module doc)."""
    import cv2
    c, h, w = shape[1:]
    img = _read_image(spec.path, color=c == 3)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    img = img.reshape(h, w, c)
    if c == 3 and spec.channel_order == "RGB":
        img = img[:, :, ::-1]
    if spec.mean:
        img = img - np.asarray(spec.mean, np.float32).reshape(1, 1, -1)
    if spec.scale != 1:
        img = img * np.float32(spec.scale)
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None], dtype=np.float32)
