"""The manifest's ``preprocessing``: how an image becomes the net's input.

One record, written by ``convert`` and read by ``verify --image`` and ``run --image``:

* from ``convert --mean V[,V,V] --scale S --channel-order BGR|RGB`` when any of them
  is given (``source: "options"``; the ones not given take their defaults: no mean,
  scale 1, BGR);
* else from the ``transform_param`` of the prototxt's TEST-phase data layer
  (``source: "transform_param"``, ``layer``): its ``mean_value`` (one value or one per
  channel) and ``scale``, channel order BGR (Caffe's data layers decode images with
  OpenCV); a ``mean_file`` (a per-pixel mean image) is not read: nothing is recorded then;
* else nothing is known and nothing is assumed: ``{"source": "none", "note": ...}``.

A known record: ``input`` (the net input it feeds), ``resize`` (``"bilinear"``: the
image is resized to the input's height x width with ``cv2.resize`` INTER_LINEAR, as
``cv2.dnn.blobFromImage`` does), ``channel_order`` (the model's: ``BGR`` as OpenCV
reads images, ``RGB`` swaps B and R), ``mean`` (``[]``, one value for every channel, or
one per channel in the model's channel order), ``scale``; the input is
``(pixel - mean) * scale``.  The README's "Output" section specifies it.
"""
from __future__ import annotations

import math

from ..errors import Caffe2MetalError

CHANNEL_ORDERS = ("BGR", "RGB")
NONE_NOTE = ("no --mean, --scale or --channel-order was given and the prototxt has no "
             "transform_param: the model's preprocessing is unknown, nothing is assumed "
             "(run/verify --image feed the resized BGR pixels as they are)")


def numbers(value, option: str) -> tuple[float, ...]:
    """``V`` or ``V,V,V`` (a string, a number or a sequence) as finite floats."""
    parts: list
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", ",").split(",") if p]
    elif isinstance(value, (int, float)):
        parts = [value]
    else:
        parts = list(value)
    try:
        found = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        found = ()
    if not found or not all(math.isfinite(n) for n in found):
        raise Caffe2MetalError(f"{option} {value!r}: expected V or V,V,V (finite numbers)")
    return found


def options(mean=None, scale=None, channel_order=None) -> tuple[tuple[float, ...], float, str]:
    """``--mean``, ``--scale``, ``--channel-order`` checked, defaults filled in."""
    means = numbers(mean, "--mean") if mean is not None else ()
    s = 1.0 if scale is None else float(scale)
    if not math.isfinite(s) or s == 0:
        raise Caffe2MetalError(f"--scale {scale!r}: expected a finite number other than 0")
    order = (channel_order or "BGR").upper()
    if order not in CHANNEL_ORDERS:
        raise Caffe2MetalError(f"--channel-order {channel_order!r}: use BGR or RGB")
    return means, s, order


def given(mean=None, scale=None, channel_order=None) -> bool:
    return any(v is not None for v in (mean, scale, channel_order))


def _image_input(model) -> tuple[str, int] | None:
    """The first 4-D net input with a known shape: (file blob name, channels)."""
    g = model.graph
    shapes = {g.blob_names.get(b, b): s for b, s in g.inputs.items()}
    for layer in g.layers:
        if layer.type == "Input":
            shapes.update({g.blob_names.get(t, t): model.shapes.blobs.get(t) for t in layer.tops})
    for name, shape in shapes.items():
        if shape is not None and len(shape) == 4 and shape[1] is not None:
            return name, int(shape[1])
    return None


def record(model, *, mean=None, scale=None, channel_order=None) -> dict:
    """The ``preprocessing`` record of ``model`` (see the module doc).  Raises
    ``Caffe2MetalError`` for bad options, a mean whose count is neither 1 nor the
    input's channels, or options for a net without a 4-D input."""
    target = _image_input(model)
    if given(mean, scale, channel_order):
        means, s, order = options(mean, scale, channel_order)
        if target is None:
            raise Caffe2MetalError("--mean, --scale and --channel-order describe an image "
                                   "input, but the net has no 4-D (N,C,H,W) input",
                                   file=model.prototxt)
        name, c = target
        if means and len(means) not in (1, c):
            raise Caffe2MetalError(f"--mean has {len(means)} values; the net's input '{name}' "
                                   f"has {c} channel(s): give 1 or {c}", file=model.prototxt)
        rec = _known("options", name, means, s, order)
        rec["fold"] = fold_note(model, name, means, s)
        if model.data_transforms:
            rec["note"] = (f"the options replace the transform_param of layer "
                           f"'{model.data_transforms[0][0]}'")
        return rec
    for layer, _type, top, tp in model.data_transforms:
        if tp.get("mean_file"):
            return {"source": "none",
                    "note": f"the transform_param of layer '{layer}' subtracts a mean_file "
                            f"({tp['mean_file']}), which caffe2metal does not read: give "
                            "--mean, --scale and --channel-order to record the "
                            "preprocessing; nothing is assumed"}
        means = tuple(float(v) for v in tp.get("mean_value", []))
        s = float(tp.get("scale", 1.0))
        channels = target[1] if target is not None else None
        if (means and channels is not None and len(means) not in (1, channels)) \
                or not all(math.isfinite(v) for v in (*means, s)):
            return {"source": "none",
                    "note": f"the transform_param of layer '{layer}' (mean_value "
                            f"{list(means)}, scale {s:g}) does not fit the input: nothing "
                            "is assumed"}
        rec = _known("transform_param", top, means, s, "BGR")
        rec["layer"] = layer
        rec["fold"] = fold_note(model, top, means, s)
        crop = tp.get("crop_size") or tp.get("crop_h") or tp.get("crop_w")
        if crop:
            rec["note"] = ("Caffe center-crops the image to crop_size at test time; run and "
                           "verify resize the whole image instead")
        return rec
    return {"source": "none", "note": NONE_NOTE}


def fold_note(model, name: str, means, s: float) -> dict | None:
    """Whether the preprocessing can go into the first layer's weights, for an app that
    would rather not scale and subtract per pixel (derived from Caffe's convolution):
    the input must feed exactly one Convolution.  ``scale``: W * (s x) = (s W) * x, so
    multiplying its weights by s is exact in real arithmetic (in float32 each weight moves
    by at most half an ulp).  ``mean``: W * (x - m) = W * x - sum(W m), a bias change,
    only when every window lies inside the image: with zero padding Caffe pads the
    mean-subtracted input with zeros, i.e. the raw image with the mean, which a folded
    bias would not reproduce at the border."""
    from ..layers.convolution import conv_geometry
    g = model.graph
    blob = next((b for b in [*g.inputs, *(t for layer in g.layers if layer.type == "Input"
                                           for t in layer.tops)]
                 if g.blob_names.get(b, b) == name), None)
    # PriorBox reads only the image's size, and so does Crop from its second bottom
    readers = [r for r in (g.consumers().get(blob, []) if blob is not None else [])
               if r.type != "PriorBox" and not (r.type == "Crop" and r.bottoms[0] != blob)]
    if len(readers) != 1 or "convolution_param" not in readers[0].params \
            or readers[0].type == "Deconvolution":
        what = ", ".join(f"'{r.name}' ({r.type})" for r in readers) or "no layer"
        return {"layer": None, "scale": False, "mean": False,
                "note": f"the input's values feed {what}, not exactly one Convolution: "
                        "apply the preprocessing to the image"}
    first = readers[0]
    pad = tuple(int(p) for p in conv_geometry(first.params["convolution_param"])["pad"])
    mean_ok = not any(pad) or not means
    note = (f"scale: multiply the weights of '{first.name}' by {s:g} (exact in real "
            "arithmetic); ")
    if not means:
        note += "no mean to fold"
    elif mean_ok:
        note += (f"mean: subtract sum over its kernel of W[o][c] * mean[c] from bias[o] "
                 f"('{first.name}' has no padding, so every window lies inside the image)")
    else:
        note += (f"mean: not foldable, '{first.name}' pads by {list(pad)}: Caffe pads the "
                 "mean-subtracted image with zeros, i.e. the raw image with the mean; a "
                 "bias change would be wrong at the border")
    return {"layer": first.name, "scale": True, "mean": mean_ok, "note": note}


def _f32(v: float) -> float:
    """A float32 value (the prototxt's) as its shortest decimal: 0.007843, not 0.0078430002."""
    import numpy as np
    return float(str(np.float32(v)))


def _known(source: str, name: str, means, s: float, order: str) -> dict:
    f = _f32 if source == "transform_param" else float
    return {"source": source, "input": name, "resize": "bilinear", "channel_order": order,
            "mean": [f(m) for m in means], "scale": f(s)}


def from_manifest(manifest: dict) -> dict:
    """The manifest's record; ``{"source": "none"}`` for a manifest without one (version 1)."""
    rec = manifest.get("preprocessing") if isinstance(manifest, dict) else None
    if not isinstance(rec, dict) or rec.get("source") in (None, "none"):
        return {"source": "none", "note": (rec or {}).get("note", "the manifest records no "
                                                          "preprocessing")}
    return rec


def describe_source(rec: dict) -> str:
    """Where a record came from, for the report's input line."""
    if rec.get("source") == "options":
        return "convert's --mean/--scale/--channel-order"
    if rec.get("source") == "transform_param":
        return f"the transform_param of layer '{rec.get('layer')}'"
    return "nothing (the manifest records no preprocessing)"
