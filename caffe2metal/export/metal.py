"""Write Metal Performance Shaders weight files and describe them in the manifest.

Input: the folded graph (``fold.apply``) and the plan.  Output: raw weight and
bias files under ``OUT/metal/``, SSD priors when the net has PriorBox layers,
and the manifest keys ``layers``, ``metal`` and (SSD only) ``ssd``.

Which Caffe layer becomes which MPS kind is each type's ``export`` role in
``layers`` (convolution, deconvolution, inner_product); the kinds and their
layouts are ``mps.KINDS``.  An unfoldable BatchNorm/Scale chain becomes one
``channel_affine``.  SSD's Normalize has no MPS kind: its learned scale is one
float32 file (``[C] scale``, ``[1] scale`` when channel_shared), listed in
``metal.normalize`` for the plan's ``normalize`` app op.  Other layers with
parameters (a PReLU that does not follow an exported layer, a Scale that
multiplies by a second bottom, ...) are listed in ``metal.skipped`` with the
reason, never silently dropped.

The manifest format is specified once, in the README ("Output: OUT/manifest.json
and OUT/metal/"), and machine-readably in ``manifest.schema.json`` beside this
module.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import fold, mps
from ..errors import ExportError
from ..graph import Graph, Layer
from ..layers import registry
from ..layers.activations import MPS_NEURONS
from ..layers.affine import affine_problem, chain_affine
from ..mps.rows import RowBlocks
from .files import DTYPES, METAL_DIR, NAMINGS, Writer, cast, file_names, finite32, json_float
from .ssd import NotSSDPriors, describe_ssd
from .streams import Streams, stream_folded

__all__ = ["DTYPES", "METAL_DIR", "NAMINGS", "Streams", "export", "file_names", "stream_folded"]


def _param(layer: Layer, key: str) -> dict:
    return layer.params.get(key, {})


def export(model, merged: Graph, plan: fold.Plan, out, *, dtype: str = "float32",
           naming: str = "apple", io=None, streams: Streams | None = None) -> dict:
    """Write OUT/metal/* and return the manifest keys ``layers``, ``metal`` (and ``ssd``).

    ``merged`` may hold ``fold.FoldedWeights`` (``fold.apply(lazy=True)``): big
    fully connected layers are then folded, laid out and written a block of
    rows at a time.  ``io``: a ``writeback.WriteBehind`` for the file writes;
    ``streams``: from :func:`stream_folded`, the files already written."""
    if dtype not in DTYPES:
        raise ExportError(f"unknown weight dtype '{dtype}' (use float32 or float16)")
    if naming not in NAMINGS:
        raise ExportError(f"unknown naming '{naming}' (use one of {', '.join(NAMINGS)})")
    writer = Writer(Path(out), io, streams)
    return _Export(model, merged, plan, writer, dtype, naming).run()


class _Export:
    """One export: the layers in net order, each written and described by one method."""

    def __init__(self, model, merged: Graph, plan: fold.Plan, writer: Writer, dtype: str,
                 naming: str):
        self.model, self.merged, self.writer = model, merged, writer
        self.dtype, self.naming = dtype, naming
        self.graph, self.shapes = model.graph, model.shapes.blobs
        self.folded = {f.producer: f.layers for f in plan.folds}
        self.kept_first = {k.layers[0]: k for k in plan.kept}
        self.in_kept = {n for k in plan.kept for n in k.layers}
        self.users = merged.consumers()
        self.outputs = set(merged.outputs())
        self.entries: list[dict] = []
        self.skipped: list[dict] = []
        self.normalize: list[dict] = []
        self.slopes_done: set[str] = set()

    def run(self) -> dict:
        for layer in self.merged.layers:
            spec = registry.get(layer.type)
            if spec is not None and spec.export is not None and layer.blobs:
                self._producer(layer, spec)
            elif layer.name in self.kept_first:
                self._kept_chain(layer)
            elif layer.name in self.in_kept:
                continue                              # written with its chain's first layer
            elif layer.type == "Normalize" and len(layer.blobs) == 1:
                self._normalize(layer)
            elif layer.blobs and layer.name not in self.slopes_done:
                self.skipped.append({"name": layer.name, "type": layer.type,
                                     "reason": _skip_reason(layer)})
        metal: dict = {"directory": METAL_DIR, "naming": self.naming,
                       "weights_dtype": self.dtype, "bias_dtype": "float32",
                       "byte_order": "little", "skipped": self.skipped}
        if self.normalize:
            metal["normalize"] = self.normalize
        result: dict = {"layers": self.entries, "metal": metal}
        try:
            ssd = describe_ssd(self.model, self.merged, self.writer)
        except NotSSDPriors as e:
            det = next(layer for layer in self.merged.layers if layer.type == "DetectionOutput")
            self.skipped.append({"name": det.name, "type": det.type, "reason": str(e)})
            ssd = None
        if ssd is not None:
            result["ssd"] = ssd
        return result

    def _blob(self, b: str) -> dict:
        s = self.shapes.get(b)
        return {"blob": self.merged.blob_names.get(b, b), "shape": None if s is None else list(s)}

    def _files(self, entry_name: str, kind: str, weights, bias, owner: str,
               checked: bool = False) -> tuple[dict, dict]:
        dtype = self.dtype
        wfile, bfile = file_names(entry_name, self.naming)
        data: RowBlocks | np.ndarray
        if isinstance(weights, RowBlocks):
            done = [0]                       # rows cast so far: errors name the layer's row

            def cast_block(b):
                first, done[0] = done[0], done[0] + len(b)
                return cast(b, dtype, owner, checked, first)
            data = weights.map(cast_block)
        else:
            data = cast(weights, dtype, owner, checked)
        wspec = self.writer.write(wfile, owner, data, dtype, mps.KINDS[kind].layout)
        bspec = self.writer.write(bfile, owner, finite32(bias, owner), "float32",
                                  mps.KINDS[kind].bias_layout)
        return wspec, bspec

    def _activation(self, layer: Layer, top: str) -> dict | None:
        return _activation(layer, top, self.users, self.outputs, self.writer, self.naming,
                           self.slopes_done)

    def _producer(self, layer: Layer, spec) -> None:
        """A layer with an MPS kernel of its own (its ``export`` role)."""
        if len(layer.bottoms) != 1 or len(layer.tops) != 1:
            raise ExportError(f"has {len(layer.bottoms)} bottoms and {len(layer.tops)} tops; "
                              "MPS kernels take one input and one output", layer=layer.name)
        geo = spec.export(layer, self.shapes.get(layer.bottoms[0]))
        n_out = geo["output_channels"]
        bias = (np.asarray(layer.blobs[1], np.float32).reshape(-1) if len(layer.blobs) > 1
                else np.zeros(n_out, np.float32))
        if bias.size != n_out:
            raise ExportError(f"has {bias.size} bias values for {n_out} outputs",
                              layer=layer.name)
        wspec, bspec = self._files(layer.name, geo["kind"], geo.pop("weights"), bias,
                                   layer.name,
                                   checked=isinstance(layer.blobs[0], fold.FoldedWeights))
        top = layer.tops[0]
        act = self._activation(layer, top)
        self.entries.append(_entry(layer.name, layer.type, geo, wspec, bspec,
                                   self.folded.get(layer.name, []), [],
                                   self._blob(layer.bottoms[0]), self._blob(top), act))

    def _kept_chain(self, layer: Layer) -> None:
        """A BatchNorm/Scale chain that could not fold: one ``channel_affine``."""
        chain = [self.graph.layer(n) for n in self.kept_first[layer.name].layers]
        why = affine_problem(chain, self.shapes)
        if why:
            self.skipped.extend({"name": layer.name, "type": layer.type, "reason": why}
                                for layer in chain)
            return
        k, c = chain_affine(self.graph, chain)
        channels = k.size
        geo = dict(kind="channel_affine", kernel=[1, 1], stride=[1, 1], pad=[0, 0],
                   dilation=[1, 1], groups=1, dense_from_groups=None,
                   input_channels=channels, output_channels=channels)
        wspec, bspec = self._files(layer.name, "channel_affine", k, c, layer.name)
        top = chain[-1].tops[0]
        act = self._activation(chain[-1], top)
        self.entries.append(_entry(layer.name, layer.type, geo, wspec, bspec, [],
                                   [layer.name for layer in chain], self._blob(chain[0].bottoms[0]),
                                   self._blob(top), act))

    def _normalize(self, layer: Layer) -> None:
        """SSD's Normalize: its scale (one per channel, or one) for the plan's app op."""
        scale = np.asarray(layer.blobs[0], np.float32).reshape(-1)
        shared = bool(_param(layer, "norm_param").get("channel_shared", True))
        spec = self.writer.write(file_names(layer.name, self.naming)[0], layer.name,
                                 finite32(scale, layer.name), "float32",
                                 "[1] scale" if shared else "[C] scale")
        self.normalize.append({"name": layer.name, "scale": spec})


def _entry(name, caffe_type, geo, wspec, bspec, folded, chain, inp, outp, act) -> dict:
    return {"name": name, "type": caffe_type, "kind": geo["kind"], "weights": wspec,
            "bias": bspec, "folded": list(folded), "chain": chain,
            "kernel": geo["kernel"], "stride": geo["stride"], "pad": geo["pad"],
            "dilation": geo["dilation"], "groups": geo["groups"],
            "dense_from_groups": geo["dense_from_groups"],
            "input_channels": int(geo["input_channels"]),
            "output_channels": int(geo["output_channels"]),
            "input": inp, "output": outp, "activation": act}


def _skip_reason(layer: Layer) -> str:
    if layer.type == "PReLU":
        return ("PReLU that does not follow an exported layer (MPS: MPSCNNNeuronPReLU; slopes "
                "in the caffemodel)")
    return f"{layer.type} has no MPS weight export"


def _activation(layer, top, users, outputs, writer, naming, slopes_done) -> dict | None:
    readers = users.get(top, [])
    if len(readers) != 1 or top in outputs or readers[0].type not in MPS_NEURONS:
        return None
    act = readers[0]
    out = {"layer": act.name, "type": act.type}
    if act.type == "ReLU":
        out["negative_slope"] = json_float(_param(act, "relu_param").get("negative_slope", 0.0),
                                   act.name, "relu_param.negative_slope")
    elif act.type == "ELU":
        out["alpha"] = json_float(_param(act, "elu_param").get("alpha", 1.0), act.name,
                                  "elu_param.alpha")
    elif act.type == "Clip":
        p = _param(act, "clip_param")
        out["min"] = json_float(p["min"], act.name, "clip_param.min")
        out["max"] = json_float(p["max"], act.name, "clip_param.max")
    elif act.type == "PReLU":
        if not act.blobs:
            return None
        slopes = np.asarray(act.blobs[0], np.float32).reshape(-1)
        out["channel_shared"] = bool(_param(act, "prelu_param").get("channel_shared", False))
        out["slopes"] = writer.write(file_names(act.name, naming)[0], act.name,
                                     finite32(slopes, act.name), "float32", "[C] slope")
        slopes_done.add(act.name)
    return out
