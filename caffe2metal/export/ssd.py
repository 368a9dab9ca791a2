"""SSD in the manifest: priors.dat (Caffe's concatenated PriorBox output), the heads
in priors order, and DetectionOutput's parameters (Caffe's defaults filled in)."""
from __future__ import annotations

import numpy as np

from ..arrays import first_nonfinite
from ..errors import ExportError
from ..graph import Graph, Layer
from ..layers.priorbox import MAX_PRIORS, prior_boxes, priors_per_cell
from .files import Writer, json_float


def _param(layer: Layer, key: str) -> dict:
    return layer.params.get(key, {})


def describe_ssd(model, merged: Graph, writer: Writer) -> dict | None:
    """Write ``priors.dat`` and return the manifest's ``ssd`` key (None: no PriorBox)."""
    priorboxes = [layer for layer in merged.layers if layer.type == "PriorBox"]
    if not priorboxes:
        return None
    shapes = model.shapes.blobs
    producers = merged.producers()
    det = next((layer for layer in merged.layers if layer.type == "DetectionOutput"), None)
    concat, order = _priorbox_order(merged, producers, priorboxes, det)
    priors, heads, image_size = _priors(order, concat, shapes)
    num_priors = sum(h["num_priors"] for h in heads)
    if det is not None:
        _check_prior_counts(det, num_priors, shapes)
    bad = first_nonfinite(priors)    # prior_boxes refuses these: never written
    if bad is not None:
        raise ExportError(f"priors.dat would hold {priors.reshape(-1)[bad]} at element {bad}",
                          layer=priorboxes[0].name)
    spec = writer.write("priors.dat", "priors", priors, "float32",
                        "[2][num_priors*4]: xmin, ymin, xmax, ymax of every prior, "
                        "then their variances")
    loc_concat = conf_concat = None
    loc_order: list = []
    conf_order: list = []
    if det is not None:
        loc_concat, loc_order = _head_order(producers, det.bottoms[0])
        conf_concat, conf_order = _head_order(producers, det.bottoms[1])
        for i, h in enumerate(heads):
            if len(loc_order) == len(heads):
                h["loc"] = loc_order[i]
            if len(conf_order) == len(heads):
                h["conf"] = conf_order[i]
    return {"priors": spec, "num_priors": num_priors, "image_size": image_size,
            "priorbox_concat": None if concat is None else concat.name,
            "loc_concat": None if loc_concat is None else loc_concat.name,
            "conf_concat": None if conf_concat is None else conf_concat.name,
            "loc_order": loc_order, "conf_order": conf_order, "heads": heads,
            "detection_output": None if det is None else _detection_params(det)}


def _source(producers: dict[str, Layer], blob: str) -> Layer | None:
    """The layer that computed ``blob``, looking through reshapes and softmax."""
    layer = producers.get(blob)
    while layer is not None and layer.type in _PASS_THROUGH and len(layer.bottoms) == 1:
        layer = producers.get(layer.bottoms[0])
    return layer


def _concat_of(producers: dict[str, Layer], blob: str,
               member_type: str | None = None) -> Layer | None:
    """The Concat behind ``blob`` (all of whose inputs are ``member_type``, if given)."""
    layer = _source(producers, blob)
    if layer is None or layer.type != "Concat":
        return None
    if member_type and not _all_of_type(producers, layer, member_type):
        return None
    return layer


def _all_of_type(producers: dict[str, Layer], layer: Layer, member_type: str) -> bool:
    return all(producers.get(b) is not None and producers[b].type == member_type
               for b in layer.bottoms)


def _priorbox_order(merged: Graph, producers: dict[str, Layer], priorboxes: list[Layer],
                    det: Layer | None) -> tuple[Layer | None, list[Layer]]:
    """The Concat of the PriorBox outputs (if any) and the PriorBox layers in its order."""
    concat = None
    if det is not None and len(det.bottoms) >= 3:
        concat = _concat_of(producers, det.bottoms[2], "PriorBox")
        if concat is None and producers.get(det.bottoms[2]) in priorboxes:
            priorboxes = [producers[det.bottoms[2]]]
    if concat is None and (det is None or len(priorboxes) > 1):
        concat = next((layer for layer in merged.layers if layer.type == "Concat"
                       and _all_of_type(producers, layer, "PriorBox")), None)
    order = [producers[b] for b in concat.bottoms] if concat is not None else priorboxes
    return concat, order


def _priors(order: list[Layer], concat: Layer | None,
            shapes) -> tuple[np.ndarray, list[dict], list | None]:
    """Caffe's concatenated PriorBox output [2][num_priors*4], the heads, the image size."""
    parts, heads, first = [], [], 0
    image_size = None
    total = 0
    for pb in order:                # the count first: nothing big is computed past the limit
        feat = shapes.get(pb.bottoms[0])
        if feat and len(feat) == 4 and None not in feat:
            try:
                total += feat[2] * feat[3] * priors_per_cell(**_param(pb, "prior_box_param"))
            except (TypeError, ValueError) as e:
                raise ExportError(str(e), layer=pb.name) from None
        if total > MAX_PRIORS:
            raise ExportError(f"the PriorBox layers up to this one give {total} priors, more "
                              f"than {MAX_PRIORS} (priors.dat would take {total * 32:,} bytes)",
                              layer=pb.name)
    for pb in order:
        params = dict(_param(pb, "prior_box_param"))
        feat = shapes.get(pb.bottoms[0])
        img = shapes.get(pb.bottoms[1]) if len(pb.bottoms) > 1 else None
        if not feat or len(feat) != 4 or not img or len(img) != 4 or None in feat + img:
            raise ExportError("PriorBox needs known 4-D shapes of its feature map and image "
                              f"(have {feat} and {img})", layer=pb.name)
        try:
            boxes = prior_boxes(feat[2:], img[2:], **params)
            per_cell = priors_per_cell(**params)
        except (TypeError, ValueError, OverflowError) as e:
            raise ExportError(str(e), layer=pb.name) from None
        parts.append(boxes[None])
        n = feat[2] * feat[3] * per_cell
        heads.append({"priorbox": pb.name, "loc": None, "conf": None,
                      "feature_map": [feat[2], feat[3]], "priors_per_cell": per_cell,
                      "num_priors": n, "first_prior": first})
        first += n
        image_size = image_size or [img[2], img[3]]
    axis = 2 if concat is None else _param(concat, "concat_param").get(
        "axis", _param(concat, "concat_param").get("concat_dim", 1))
    try:
        priors = np.concatenate(parts, axis=axis)[0]
    except (ValueError, IndexError) as e:
        raise ExportError(f"cannot concatenate the PriorBox outputs on axis {axis}: {e}",
                          layer=None if concat is None else concat.name) from None
    return priors, heads, image_size


def _head_order(producers: dict[str, Layer], blob: str) -> tuple[Layer | None, list]:
    """The Concat gathering the heads into ``blob`` (or None) and the head layers in order."""
    concat = _concat_of(producers, blob)
    sources = concat.bottoms if concat is not None else [blob]
    return concat, [_name(_source(producers, b)) for b in sources]


def _name(layer: Layer | None) -> str | None:
    return None if layer is None else layer.name


_PASS_THROUGH = ("Flatten", "Reshape", "Permute", "Softmax", "Sigmoid")


class NotSSDPriors(Exception):
    """PriorBox layers whose count does not match the heads: not SSD's PriorBox semantics."""


def _check_prior_counts(det: Layer, num_priors: int, shapes) -> None:
    """The loc and conf inputs of DetectionOutput must hold exactly one entry per prior."""
    p = _param(det, "detection_output_param")
    classes = p.get("num_classes")
    loc_classes = 1 if p.get("share_location", True) else classes
    for blob, per_prior, what in ((det.bottoms[0], 4 * (loc_classes or 0), "loc"),
                                  (det.bottoms[1], classes or 0, "conf")):
        shape = shapes.get(blob)
        if shape is None or None in shape or not per_prior:
            continue
        have = int(np.prod(shape[1:]))
        if have != num_priors * per_prior:
            raise NotSSDPriors(
                f"the PriorBox layers give {num_priors} priors, so DetectionOutput's {what} "
                f"input should hold {num_priors * per_prior} values per image, but it holds "
                f"{have}: this net's prior boxes are not SSD's PriorBox (e.g. FaceBoxes "
                "densifies anchors); no priors.dat is written")


def _detection_params(det: Layer) -> dict:
    p = _param(det, "detection_output_param")
    nms = p.get("nms_param", {})
    return {
        "layer": det.name,
        "num_classes": p.get("num_classes"),
        "share_location": bool(p.get("share_location", True)),
        "background_label_id": int(p.get("background_label_id", 0)),
        "nms_threshold": json_float(nms.get("nms_threshold", 0.3), det.name,
                                    "nms_param.nms_threshold"),
        "top_k": nms.get("top_k"),
        "eta": json_float(nms.get("eta", 1.0), det.name, "nms_param.eta"),
        "keep_top_k": int(p.get("keep_top_k", -1)),
        "confidence_threshold": json_float(p.get("confidence_threshold"), det.name,
                                   "confidence_threshold"),
        "code_type": p.get("code_type", "CORNER"),
        "variance_encoded_in_target": bool(p.get("variance_encoded_in_target", False)),
    }
