"""The MPS kinds: one row per kind of exported layer.

A kind is what ``manifest.json`` calls ``layers[].kind``.  Each row gives the
MPS kernel an app builds, the layout of its weights file (the manifest's
``layout`` text), the layout of its bias file, and the numpy kernel that
computes what MPS computes from those files (``kernels``; ``verify`` runs it).
The manifest schema's ``kind`` enum must list exactly these rows
(``tests/test_mps.py`` checks it).

MPS kernel classes: Apple's MPSCNNConvolution.h (MPSCNNConvolution,
MPSCNNDepthWiseConvolution, MPSCNNFullyConnected, MPSCNNConvolutionTranspose).
``channel_affine`` is an unfolded BatchNorm/Scale chain, y = x*scale + shift:
MPSCNNBatchNormalization or any per-channel multiply-add realises it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import kernels


@dataclass(frozen=True)
class Kind:
    name: str
    mps_kernel: str
    layout: str            # of the weights file
    bias_layout: str
    run: Callable[[dict, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    """(manifest entry, x [H][W][C], weights, bias) -> y [H][W][C] float32."""


def _geometry(entry: dict) -> dict:
    return dict(stride=tuple(entry["stride"]), pad=tuple(entry["pad"]),
                dilation=tuple(entry["dilation"]))


_ROWS = (
    Kind("convolution", "MPSCNNConvolution", "[out][kH][kW][in/groups]", "[out]",
         lambda e, x, w, b: kernels.conv2d_nhwc(x, w, b, groups=e["groups"], **_geometry(e))),
    Kind("depthwise_convolution", "MPSCNNDepthWiseConvolution", "[C][kH][kW]", "[out]",
         lambda e, x, w, b: kernels.depthwise_nhwc(x, w, b, **_geometry(e))),
    Kind("fully_connected", "MPSCNNFullyConnected", "[out][H][W][C]", "[out]",
         lambda e, x, w, b: kernels.fully_connected_nhwc(x, w, b).reshape(1, 1, -1)),
    Kind("convolution_transpose", "MPSCNNConvolutionTranspose",
         "[out][kH][kW][in/groups], kernel flipped", "[out]",
         lambda e, x, w, b: kernels.conv_transpose_nhwc(x, w, b, groups=e["groups"],
                                                        **_geometry(e))),
    Kind("channel_affine", "MPSCNNBatchNormalization", "[C] scale", "[C] shift",
         lambda e, x, w, b: kernels.channel_affine_nhwc(x, w, b)),
)

KINDS: dict[str, Kind] = {k.name: k for k in _ROWS}
