"""MPS geometry from Caffe's: the small pure functions the plan's numbers come from.

Sources (quoted in /work/shared/docs/caffe-and-metal-facts.md, "MPS geometry"):

* MPSCNNKernel.h, ``offset``: "the position of the kernel's centre in the source
  for destination pixel (0, 0)".  PyTorch's
  ``aten/src/ATen/native/metal/mpscnn/MPSCNNUtils.h`` (``computeMPSAlignOffset``)
  and caffe2's ``mobile/contrib/ios/mpscnn/mpscnn.mm`` set ``offset = k/2 - pad``
  for Caffe-style explicit zero padding (``edgeMode = .zero``).
* The window of destination pixel ``i`` then starts at source position
  ``offset + i*stride - d*floor(k/2)``; with dilation ``d`` the centre term is
  ``d*floor(k/2)`` (derived, not read from a source).
* Caffe's pooling output size (pooling_layer.cpp Reshape) is ``layers.pooling``'s
  shape rule; its padded windows: max pooling ignores padded pixels (MPS
  ``.clamp`` edges), average pooling divides by the window clipped to the padded
  image (``MPSCNNPoolingAverage.zeroPadSizeX/Y = pad``).
* MPSCNNKernel.h, ``destinationFeatureChannelOffset``: "must be a multiple of 4";
  MPSNNConcatenationNode pads each source to 4 channels.
"""
from __future__ import annotations

SLICE = 4
"""Feature channels per MPSImage slice (one RGBA texel)."""


def mps_offset(kernel: int, pad: int, dilation: int = 1) -> int:
    """MPSCNNKernel.offset on one axis for Caffe's explicit ``pad``: ``d*floor(k/2) - pad``."""
    return dilation * (kernel // 2) - pad


def window_start(offset: int, kernel: int, dilation: int = 1) -> int:
    """The source position of the first tap of destination pixel 0: ``offset - d*floor(k/2)``
    (the inverse of :func:`mps_offset`: ``-pad`` for Caffe's geometry)."""
    return offset - dilation * (kernel // 2)


def slices(channels: int) -> int:
    """MPSImage texture slices holding ``channels`` feature channels."""
    return -(-channels // SLICE)


def concat_offsets(channels: list[int]) -> tuple[list[int], int]:
    """destinationFeatureChannelOffset of each source of a channel concatenation, each
    source starting on a slice boundary (MPSNNConcatenationNode's padding), and the
    destination's channel count with that padding (a multiple of 4 unless the last
    source is not: then its own count)."""
    offsets, at = [], 0
    for c in channels:
        offsets.append(at)
        at += slices(c) * SLICE
    total = offsets[-1] + channels[-1] if channels else 0
    return offsets, total


def channel_map(channels: list[int], offsets: list[int]) -> list[int]:
    """The destination channel of each of Caffe's concatenated channels, in order."""
    return [o + c for n, o in zip(channels, offsets, strict=True) for c in range(n)]
