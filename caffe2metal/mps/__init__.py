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

import numpy as np

__all__ = [
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


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def _pair(v, name):
    """``3`` -> ``(3, 3)``; ``(a, b)`` -> ``(a, b)`` as ints."""
    if np.isscalar(v):
        return int(v), int(v)
    t = tuple(int(e) for e in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair (h, w), got {v!r}")
    return t


def _check_4d(W, what):
    W = np.asarray(W)
    if W.ndim != 4:
        raise ValueError(f"{what} weights must be 4-D, got shape {W.shape}")
    return W


def _bias(bias, n):
    if bias is None:
        return np.zeros(n, np.float64)
    b = np.asarray(bias, np.float64).reshape(-1)
    if b.shape != (n,):
        raise ValueError(f"bias must have {n} values, got {b.size}")
    return b


def _x_hwc(x):
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"input must be [H][W][C], got shape {x.shape}")
    return x.astype(np.float64, copy=False)


def conv_output_size(size, k, stride, pad, dilation):
    """Caffe Convolution: ``(size + 2*pad - (dilation*(k-1) + 1)) // stride + 1``."""
    return (size + 2 * pad - (dilation * (k - 1) + 1)) // stride + 1


def deconv_output_size(size, k, stride, pad, dilation):
    """Caffe Deconvolution: ``stride*(size-1) + dilation*(k-1) + 1 - 2*pad``."""
    return stride * (size - 1) + dilation * (k - 1) + 1 - 2 * pad


def _pad_hw(x, ph, pw):
    """Zero-pad (or crop, when negative) an [H][W][C] array by ph/pw per side."""
    if ph < 0:
        x = x[-ph:x.shape[0] + ph]
    if pw < 0:
        x = x[:, -pw:x.shape[1] + pw]
    ph, pw = max(ph, 0), max(pw, 0)
    if ph or pw:
        x = np.pad(x, ((ph, ph), (pw, pw), (0, 0)))
    return x


def _correlate(xp, w, groups, stride, dilation, out_hw):
    """Grouped correlation of an already padded [H][W][C] float64 input.

    ``w`` is [out][kH][kW][in/groups]; loops over the kH*kW kernel positions
    only, each position being one einsum over (groups, in/groups).
    """
    O, kh, kw, cg = w.shape
    C = xp.shape[2]
    if groups < 1 or C % groups or O % groups:
        raise ValueError(
            f"groups={groups} must divide input channels {C} and output channels {O}")
    if C // groups != cg:
        raise ValueError(
            f"weights expect {cg} channels per group, input has {C} / {groups}")
    (sh, sw), (dh, dw), (Ho, Wo) = stride, dilation, out_hw
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"output size {Ho}x{Wo} is empty")
    og = O // groups
    wg = w.astype(np.float64, copy=False).reshape(groups, og, kh, kw, cg)
    acc = np.zeros((Ho, Wo, groups, og), np.float64)
    for p in range(kh):
        for q in range(kw):
            h0, w0 = p * dh, q * dw
            patch = xp[h0:h0 + sh * (Ho - 1) + 1:sh, w0:w0 + sw * (Wo - 1) + 1:sw]
            patch = patch.reshape(Ho, Wo, groups, cg)
            acc += np.einsum("hwgc,goc->hwgo", patch, wg[:, :, p, q, :])
    return acc.reshape(Ho, Wo, O)


# ---------------------------------------------------------------------------
# (A) layout converters, Caffe -> MPS
# ---------------------------------------------------------------------------

def conv_weights(W):
    """Caffe Convolution W [out][in/g][kH][kW] -> MPS [out][kH][kW][in/g] (any groups)."""
    W = _check_4d(W, "Convolution")
    return np.ascontiguousarray(W.transpose(0, 2, 3, 1))


def depthwise_weights(W, channels=None):
    """Caffe depthwise W [C][1][kH][kW] -> MPSCNNDepthWiseConvolution [C][kH][kW].

    Only channel multiplier 1 is supported (group == in == out): axis 1 must be
    1 and, when ``channels`` (the bottom's channel count) is given, axis 0 must
    equal it.  Otherwise ``ValueError``.
    """
    W = _check_4d(W, "depthwise")
    C, per, kh, kw = W.shape
    if per != 1:
        raise ValueError(
            f"depthwise weights must be [C][1][kH][kW], got {W.shape} "
            "(not a depthwise convolution)")
    if channels is not None and int(channels) != C:
        raise ValueError(
            f"depthwise with {C} outputs over {channels} inputs has channel "
            "multiplier != 1; MPSCNNDepthWiseConvolution supports multiplier 1 only")
    return np.ascontiguousarray(W.reshape(C, kh, kw))


def fc_weights(W, in_chw, transpose=False):
    """Caffe InnerProduct W [out][K] -> MPSCNNFullyConnected [out][H][W][C].

    ``in_chw`` is the inferred bottom shape (C, H, W) (an int or 1-tuple means
    (C, 1, 1)); K must equal C*H*W.  With ``transpose=True`` the Caffe blob is
    [K][out] (``inner_product_param.transpose``).
    """
    W = np.asarray(W)
    if W.ndim != 2:
        # Old caffemodels store InnerProduct as [1][1][out][K].
        if W.ndim == 4 and W.shape[0] == W.shape[1] == 1:
            W = W.reshape(W.shape[2], W.shape[3])
        else:
            raise ValueError(f"InnerProduct weights must be 2-D, got shape {W.shape}")
    if transpose:
        W = W.T
    chw = (int(in_chw),) if np.isscalar(in_chw) else tuple(int(v) for v in in_chw)
    if len(chw) == 1:
        chw = (chw[0], 1, 1)
    if len(chw) != 3:
        raise ValueError(f"in_chw must be (C, H, W), got {in_chw!r}")
    C, H, Wd = chw
    out, K = W.shape
    if K != C * H * Wd:
        raise ValueError(
            f"InnerProduct weights have K={K} inputs but the bottom is "
            f"{C}x{H}x{Wd} = {C * H * Wd}")
    return np.ascontiguousarray(W.reshape(out, C, H, Wd).transpose(0, 2, 3, 1))


def deconv_weights(W, group=1):
    """Caffe Deconvolution W [in][out/g][kH][kW] -> MPSCNNConvolutionTranspose [out][kH][kW][in/g].

    Per group: flip the kernel spatially and swap in/out.  Output channels are
    group-major (channel ``G*out/g + o`` is output ``o`` of group ``G``, the
    same numbering Caffe uses), which is what ``conv_transpose_nhwc`` with
    ``groups=group`` consumes.
    """
    W = _check_4d(W, "Deconvolution")
    group = int(group)
    cin, og, kh, kw = W.shape
    if group < 1 or cin % group:
        raise ValueError(
            f"Deconvolution group={group} does not divide its {cin} input channels")
    cg = cin // group
    Wg = W.reshape(group, cg, og, kh, kw)[:, :, :, ::-1, ::-1]
    return np.ascontiguousarray(
        Wg.transpose(0, 2, 3, 4, 1).reshape(group * og, kh, kw, cg))


# ---------------------------------------------------------------------------
# (B) what MPS computes, NHWC, batch 1
# ---------------------------------------------------------------------------

def conv2d_nhwc(x, w_mps, bias, *, stride=(1, 1), pad=(0, 0), dilation=(1, 1), groups=1):
    """MPSCNNConvolution: x [H][W][C], w_mps [out][kH][kW][C/groups] -> [H'][W'][out] float32.

    ``pad`` is Caffe's symmetric zero padding (pad_h, pad_w); output size as
    Caffe computes it (floor).
    """
    x = _x_hwc(x)
    w = np.asarray(w_mps)
    if w.ndim != 4:
        raise ValueError(f"MPS convolution weights must be 4-D, got shape {w.shape}")
    stride, pad, dilation = _pair(stride, "stride"), _pair(pad, "pad"), _pair(dilation, "dilation")
    O, kh, kw, _ = w.shape
    H, Wd, _ = x.shape
    out_hw = (conv_output_size(H, kh, stride[0], pad[0], dilation[0]),
              conv_output_size(Wd, kw, stride[1], pad[1], dilation[1]))
    xp = _pad_hw(x, pad[0], pad[1])
    y = _correlate(xp, w, int(groups), stride, dilation, out_hw)
    y += _bias(bias, O)
    return y.astype(np.float32)


def depthwise_nhwc(x, w_dw, bias, *, stride=(1, 1), pad=(0, 0), dilation=(1, 1)):
    """MPSCNNDepthWiseConvolution (multiplier 1): x [H][W][C], w_dw [C][kH][kW] -> [H'][W'][C]."""
    x = _x_hwc(x)
    w = np.asarray(w_dw)
    if w.ndim != 3:
        raise ValueError(f"depthwise weights must be [C][kH][kW], got shape {w.shape}")
    C, kh, kw = w.shape
    if x.shape[2] != C:
        raise ValueError(f"depthwise weights have {C} channels, input has {x.shape[2]}")
    (sh, sw) = _pair(stride, "stride")
    (ph, pw) = _pair(pad, "pad")
    (dh, dw) = _pair(dilation, "dilation")
    Ho = conv_output_size(x.shape[0], kh, sh, ph, dh)
    Wo = conv_output_size(x.shape[1], kw, sw, pw, dw)
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"output size {Ho}x{Wo} is empty")
    xp = _pad_hw(x, ph, pw)
    w = w.astype(np.float64, copy=False)
    acc = np.zeros((Ho, Wo, C), np.float64)
    for p in range(kh):
        for q in range(kw):
            h0, w0 = p * dh, q * dw
            acc += xp[h0:h0 + sh * (Ho - 1) + 1:sh, w0:w0 + sw * (Wo - 1) + 1:sw] * w[:, p, q]
    acc += _bias(bias, C)
    return acc.astype(np.float32)


def fully_connected_nhwc(x, w_fc, bias):
    """MPSCNNFullyConnected: x [H][W][C], w_fc [out][H][W][C] -> [out] float32."""
    x = _x_hwc(x)
    w = np.asarray(w_fc)
    if w.ndim != 4 or w.shape[1:] != x.shape:
        raise ValueError(
            f"fully connected weights {w.shape} do not match input {x.shape} "
            "(the MPS kernel covers the whole source image)")
    y = np.tensordot(w.astype(np.float64, copy=False), x, axes=3)
    y += _bias(bias, w.shape[0])
    return y.astype(np.float32)


def conv_transpose_nhwc(x, w_mps_t, bias, *, stride=(1, 1), pad=(0, 0), dilation=(1, 1), groups=1):
    """MPSCNNConvolutionTranspose: x [H][W][in], w_mps_t [out][kH][kW][in/groups] -> [H'][W'][out].

    Zero-insert (stride-1 zeros between pixels), pad each side by
    ``dilation*(k-1) - pad`` (crop if negative), then a plain stride-1
    correlation with the kernel as given (no rotation).  H' is Caffe
    Deconvolution's ``stride*(H-1) + dilation*(kH-1) + 1 - 2*pad``.
    """
    x = _x_hwc(x)
    w = np.asarray(w_mps_t)
    if w.ndim != 4:
        raise ValueError(f"MPS transpose weights must be 4-D, got shape {w.shape}")
    (sh, sw) = _pair(stride, "stride")
    (ph, pw) = _pair(pad, "pad")
    dil = _pair(dilation, "dilation")
    O, kh, kw, _ = w.shape
    H, Wd, C = x.shape
    xz = np.zeros((sh * (H - 1) + 1, sw * (Wd - 1) + 1, C), np.float64)
    xz[::sh, ::sw] = x
    xz = _pad_hw(xz, dil[0] * (kh - 1) - ph, dil[1] * (kw - 1) - pw)
    out_hw = (deconv_output_size(H, kh, sh, ph, dil[0]),
              deconv_output_size(Wd, kw, sw, pw, dil[1]))
    y = _correlate(xz, w, int(groups), (1, 1), dil, out_hw)
    y += _bias(bias, O)
    return y.astype(np.float32)


def channel_affine_nhwc(x, scale, shift):
    """Per-channel affine (unfolded BatchNorm/Scale): y = x*scale[c] + shift[c], float32."""
    x = np.asarray(x, np.float64)
    C = x.shape[-1]
    s = np.asarray(scale, np.float64).reshape(-1)
    t = np.asarray(shift, np.float64).reshape(-1)
    if s.shape != (C,) or t.shape != (C,):
        raise ValueError(
            f"scale/shift must have {C} values, got {s.size} and {t.size}")
    return (x * s + t).astype(np.float32)
