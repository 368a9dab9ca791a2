"""Caffe -> Metal Performance Shaders weight layouts, and a numpy model of MPS.

Two halves:

(A) layout converters that turn Caffe blobs into the arrays an MPS kernel
    reads (each returns a new C-contiguous array; dtype is preserved, so
    ``.tobytes()`` is exactly what goes into a ``.dat`` file);
(B) a float64-accumulating numpy implementation of what the MPS kernels
    compute, in NHWC with batch 1 (``x`` is ``[H][W][C]``), that consumes the
    arrays from (A).  ``verify`` uses (B) to prove the exported files.

Layouts (``g`` = groups, ``K`` = C*H*W of the InnerProduct bottom)::

  kind            Caffe blob                MPS array                   numpy (Caffe -> MPS)
  --------------  ------------------------  --------------------------  ------------------------------------------
  Convolution     W [out][in/g][kH][kW]     [out][kH][kW][in/g]         W.transpose(0, 2, 3, 1)
  Depthwise       W [C][1][kH][kW]          [C][kH][kW]                 W.reshape(C, kH, kW)  (multiplier 1 only)
  InnerProduct    W [out][K] (K=C*H*W)      [out][H][W][C]              W.reshape(out, C, H, W).transpose(0, 2, 3, 1)
    transpose:    W [K][out]                [out][H][W][C]              same, applied to W.T
  Deconvolution   W [in][out/g][kH][kW]     [out][kH][kW][in/g]         per group: flip kH, kW and swap in/out:
                                                                        W.reshape(g, in/g, out/g, kH, kW)
                                                                         [:, :, :, ::-1, ::-1]
                                                                         .transpose(0, 2, 3, 4, 1)
                                                                         .reshape(out, kH, kW, in/g)
                                                                        (g == 1: np.flip(W, (2, 3)).transpose(1, 2, 3, 0))
  Bias            b [out] (absent -> 0)     [out] float32

What (B) computes (``xp`` = x zero-padded by ``pad`` on each side, ``s``
stride, ``d`` dilation, output channel ``o`` belongs to group ``G = o // (out/g)``
and reads input channels ``G*(in/g) + c``, c < in/g)::

  conv2d          y[i,j,o] = b[o] + sum_{p,q,c} xp[i*s_h + p*d_h, j*s_w + q*d_w, G*(in/g) + c] * w[o,p,q,c]
                  H_out = (H + 2*pad_h - (d_h*(kH-1) + 1)) // s_h + 1       (Caffe; same for W)
  depthwise       y[i,j,c] = b[c] + sum_{p,q} xp[i*s_h + p*d_h, j*s_w + q*d_w, c] * w[c,p,q]
  fully conn.     y[o]     = b[o] + sum_{h,w,c} x[h,w,c] * w[o,h,w,c]        (kernel = whole source)
  conv transpose  xz = x with (s-1) zeros inserted between pixels, then padded by d*(k-1) - pad on
                  each side (negative = crop); y = conv2d(xz, w, stride 1, dilation d, groups g),
                  the kernel used as-is (MPS does not rotate it: the converter flips it).
                  H_out = s_h*(H-1) + d_h*(kH-1) + 1 - 2*pad_h                 (Caffe Deconvolution)
  channel affine  y[h,w,c] = x[h,w,c] * scale[c] + shift[c]

Deconvolution group layout (derived): Caffe's Deconvolution is the adjoint
of a grouped Convolution; group ``G`` reads input channels
``[G*in/g, (G+1)*in/g)`` and writes output channels ``[G*out/g, (G+1)*out/g)``,
and output channel ``G*out/g + o`` uses ``W[G*in/g + c][o]``.  MPS groups
(like Convolution) are consecutive output-channel blocks, each reading the
matching consecutive input-channel block.  So the MPS array is group-major:
row ``G*out/g + o`` holds ``flip(W[G*in/g : (G+1)*in/g, o])`` with in/g
innermost.  The group-1 formula ``transpose(1, 2, 3, 0)`` applied to a grouped
blob would give ``[out/g][kH][kW][in]`` -- wrong shape and wrong mixing --
so ``deconv_weights`` must be told ``group``.

Everything accumulates in float64 and returns float32 (MPS itself computes in
float16, so comparisons against a real device need a looser tolerance).
"""
from .kernels import (
    channel_affine_nhwc,
    conv2d_nhwc,
    conv_output_size,
    conv_transpose_nhwc,
    deconv_output_size,
    depthwise_nhwc,
    fully_connected_nhwc,
)
from .kinds import KINDS, Kind
from .layouts import conv_weights, deconv_weights, depthwise_weights, fc_weights

__all__ = [
    "KINDS",
    "Kind",
    "conv_weights",
    "depthwise_weights",
    "fc_weights",
    "deconv_weights",
    "conv2d_nhwc",
    "depthwise_nhwc",
    "fully_connected_nhwc",
    "conv_transpose_nhwc",
    "channel_affine_nhwc",
    "conv_output_size",
    "deconv_output_size",
]
