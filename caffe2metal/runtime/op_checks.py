"""The checks of one op: its ``mps`` kernel's parameters, or its ``app`` op."""
from __future__ import annotations

import math

from ..mps import KINDS
from ..mps.geometry import SLICE, slices, window_start
from .app_checks import _AppChecks
from .limits import (
    NEURONS,
    _short,
)


class _Op(_AppChecks):
    """One op's kind-specific checks: ``check`` returns the shapes of the arrays it computes."""

    # ---------------------------------------------------------------- kinds

    def check(self) -> list | None:
        """Raise for the first problem; the shapes of the arrays the op computes, one per
        top (None: only the data knows)."""
        op = self.op
        m, app = op.get("mps"), op.get("app")
        if "mps" in op and not isinstance(m, dict):
            self.fail("mps", f"{_short(m)} is not an object")
        if isinstance(m, dict):
            kernel = m.get("kernel")
            if "entry" in m:
                return [self.weighted(m)]
            if kernel in ("MPSCNNPoolingMax", "MPSCNNPoolingAverage"):
                return [self.pooling(m)]
            if kernel == "destinationFeatureChannelOffset":
                return [self.concat_channels(m)]
            if isinstance(kernel, str) and kernel.startswith("MPSCNNNeuron"):
                self.neuron(m, kernel)
                return [self.bottoms[0]] * len(self.tops)
            if kernel == "MPSCNNSoftMax":
                self.need_bottoms(1)
                return [self.bottoms[0]]
            if kernel in ("MPSCNNAdd", "MPSCNNMultiply"):
                self.eltwise(m, kernel)
                return [self.bottoms[0]]
            if app is None:
                self.fail("mps.kernel", f"{_short(kernel)} is not a kernel run executes")
        if not isinstance(app, dict):
            self.fail("app", "an op needs mps or app (an object)")
        return self.app(app)

    def geometry(self, m: dict, dilation: bool) -> tuple:
        def pair(key: str, low: int | None) -> tuple:
            v = m.get(key)
            if not isinstance(v, dict):
                self.fail(f"mps.{key}", f"{_short(v)} is not an object with x and y")
            return tuple(self.integer(v.get(a), f"mps.{key}.{a}", low) for a in "yx")
        k, s = pair("kernelSize", 1), pair("stride", 1)
        d = pair("dilation", 1) if dilation else (1, 1)
        o = pair("offset", None)
        dst = m.get("destination")
        if not isinstance(dst, dict):
            self.fail("mps.destination", f"{_short(dst)} is not an object")
        out = tuple(self.integer(dst.get(a), f"mps.destination.{a}", 1)
                    for a in ("height", "width"))
        src, top = self.nchw(0), self.nchw(0, top=True)
        if out != top[2:]:
            self.fail("mps.destination", f"{out[0]}x{out[1]} is not the top's {top[2]}x"
                      f"{top[3]}")
        if "featureChannels" in dst and dst["featureChannels"] != top[1]:
            self.fail("mps.destination.featureChannels", f"{_short(dst['featureChannels'])} "
                      f"is not the top's {top[1]} channels")
        padded = src[1]
        worst, field = 0.0, "mps.stride"
        for axis, a in enumerate("yx"):
            size, extent = src[2 + axis], d[axis] * (k[axis] - 1) + 1
            if abs(o[axis]) > size + extent:
                self.fail(f"mps.offset.{a}", f"{o[axis]} is beyond the {size}-pixel source "
                          f"and the {extent}-pixel kernel")
            need = (out[axis] - 1) * s[axis] + extent
            before = max(0, -window_start(o[axis], k[axis], d[axis]))
            span = max(need, before + size)
            padded *= span
            if span / max(size, 1) > worst:
                worst = span / max(size, 1)
                field = (f"mps.kernelSize.{a}" if extent * 2 >= need and d[axis] == 1 else
                         f"mps.dilation.{a}" if extent * 2 >= need else f"mps.stride.{a}")
        self.scratch(padded, field, "the padded source")
        return k, s, d, o, out, src, top

    def weighted(self, m: dict) -> tuple:
        self.need_bottoms(1)
        entry_name = m["entry"]
        entry = self.ctx.entries.get(entry_name) if isinstance(entry_name, str) else None
        if entry is None:
            self.fail("mps.entry", f"{_short(entry_name)} is not in the manifest's layers")
        w = self.file(entry.get("weights"), "weights")
        b = self.file(entry.get("bias"), "bias")
        kind = m.get("kind")
        if kind in ("convolution", "depthwise_convolution"):
            k, _, _, _, out, src, top = self.geometry(m, dilation=True)
            depthwise = kind == "depthwise_convolution"
            if len(w) != (3 if depthwise else 4):
                layout = "[C][kH][kW]" if depthwise else "[out][kH][kW][in/groups]"
                self.fail("weights.shape", f"{w} is not {layout}")
            if tuple(w[1:3]) != k:
                self.fail("mps.kernelSize", f"{list(k)} does not match the weights' {w[1:3]}")
            groups = src[1] if depthwise else self.integer(m.get("groups"), "mps.groups", 1)
            per_group = 1 if depthwise else w[3]
            if src[1] % groups or w[0] % groups or src[1] // groups != per_group:
                self.fail("mps.groups", f"{groups} groups: weights {w} for {src[1]} input "
                          "channels")
            if w[0] != top[1]:
                self.fail("weights.shape", f"{w[0]} outputs for the top's {top[1]} channels")
            if math.prod(b) != w[0]:
                self.fail("bias.shape", f"{b} for {w[0]} outputs")
            return (1, w[0], *out)
        if not isinstance(kind, str) or kind not in KINDS:
            self.fail("mps.kind", f"unknown kind {_short(kind)}")
        src = self.nchw(0)
        if kind == "fully_connected":
            if len(w) != 4 or tuple(w[1:]) != (src[2], src[3], src[1]):
                self.fail("weights.shape", f"{w} is not [out][H][W][C] of the source "
                          f"{list(src)}")
            if math.prod(b) != w[0]:
                self.fail("bias.shape", f"{b} for {w[0]} outputs")
            return (1, w[0], 1, 1)
        if kind == "channel_affine":
            if math.prod(w) != src[1] or math.prod(b) != src[1]:
                self.fail("weights.shape", f"{w} and {b} for {src[1]} channels")
            return src
        return self.transpose_geometry(entry, w, b, src)

    def transpose_geometry(self, entry: dict, w: list, b: list, src: tuple) -> tuple:
        if len(w) != 4:
            self.fail("weights.shape", f"{w} is not [out][kH][kW][in/groups]")
        for key, low in (("stride", 1), ("pad", 0), ("dilation", 1)):
            v = entry.get(key)
            if not isinstance(v, list) or len(v) != 2:
                self.fail(f"mps.entry.{key}", f"{_short(v)} is not two integers")
            for x in v:
                self.integer(x, f"mps.entry.{key}", low)
        groups = self.integer(entry.get("groups"), "mps.entry.groups", 1)
        if src[1] % groups or w[0] % groups or src[1] // groups != w[3]:
            self.fail("mps.entry.groups", f"{groups} groups: weights {w} for {src[1]} input "
                      "channels")
        (sh, sw), (ph, pw), (dh, dw) = entry["stride"], entry["pad"], entry["dilation"]
        oh = sh * (src[2] - 1) + dh * (w[1] - 1) + 1 - 2 * ph
        ow = sw * (src[3] - 1) + dw * (w[2] - 1) + 1 - 2 * pw
        if oh <= 0 or ow <= 0:
            self.fail("mps.entry.pad", f"an empty {oh}x{ow} output")
        zh = sh * (src[2] - 1) + 1 + 2 * max(0, dh * (w[1] - 1) - ph)
        zw = sw * (src[3] - 1) + 1 + 2 * max(0, dw * (w[2] - 1) - pw)
        self.scratch(zh * zw * src[1], "mps.entry.stride", "the zero-inserted source")
        if math.prod(b) != w[0]:
            self.fail("bias.shape", f"{b} for {w[0]} outputs")
        return (1, w[0], oh, ow)

    def pooling(self, m: dict) -> tuple:
        self.need_bottoms(1)
        _, _, _, _, out, src, _ = self.geometry(m, dilation=False)
        if m.get("edgeMode") != "clamp":
            self.fail("mps.edgeMode", f"{_short(m.get('edgeMode'))}: Caffe's pooling ignores "
                      "pixels outside the image (clamp)")
        if m["kernel"] == "MPSCNNPoolingAverage":
            for key in ("zeroPadSizeY", "zeroPadSizeX"):
                self.integer(m.get(key), f"mps.{key}", 0)
        return (1, src[1], *out)

    def neuron(self, m: dict, kernel: str) -> None:
        self.need_bottoms(1)
        if kernel == "MPSCNNNeuronPReLU":
            slopes = self.file(m.get("slopes"), "mps.slopes")
            src = self.bottoms[0]
            c = src[1] if src is not None and len(src) > 1 else None
            n = math.prod(slopes)
            if c is not None and n not in ((1,) if m.get("channelShared") else (c,)):
                self.fail("mps.slopes", f"{n} slopes for {c} channels")
            return
        if m.get("neuronType") not in NEURONS:
            self.fail("mps.neuronType", f"{_short(m.get('neuronType'))} is not a neuron run "
                      "knows")
        for key in "abc":
            if key in m:
                self.number(m[key], f"mps.{key}")

    def eltwise(self, m: dict, kernel: str) -> None:
        self.need_bottoms(1)
        self.same_bottoms("bottoms")
        if kernel == "MPSCNNAdd":
            self.number(m.get("primaryScale", 1.0), "mps.primaryScale")
            rest = m.get("secondaryScale", [])
            if not isinstance(rest, list) or len(rest) + 1 != len(self.bottoms):
                self.fail("mps.secondaryScale", f"{_short(rest)}: not {len(self.bottoms) - 1} "
                          "scales")
            for c in rest:
                self.number(c, "mps.secondaryScale")

    def concat_channels(self, m: dict) -> tuple:
        self.need_bottoms(1)
        srcs = [self.nchw(i) for i in range(len(self.bottoms))]
        if any(s[2:] != srcs[0][2:] for s in srcs):
            self.fail("bottoms", "the sources' heights and widths differ")
        offsets = m.get("destinationFeatureChannelOffsets")
        if not isinstance(offsets, list) or len(offsets) != len(srcs):
            self.fail("mps.destinationFeatureChannelOffsets", f"expected {len(srcs)} offsets")
        room = sum(slices(s[1]) for s in srcs) * SLICE
        for o, s in zip(offsets, srcs, strict=True):
            o = self.integer(o, "mps.destinationFeatureChannelOffsets", 0)
            if o % SLICE or o + s[1] > room:
                self.fail("mps.destinationFeatureChannelOffsets", f"{o} is not a multiple of "
                          f"4 within the {room} channels of the sources' slices")
        return (1, sum(s[1] for s in srcs), *srcs[0][2:])
