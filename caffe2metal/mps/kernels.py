"""(B) What the MPS kernels compute, in float64 numpy: NHWC, batch 1 (``x`` is [H][W][C]).

Consumes the arrays of ``layouts``; see the package doc for the formulas.
"""
import numpy as np


def _pair(v, name):
    """``3`` -> ``(3, 3)``; ``(a, b)`` -> ``(a, b)`` as ints."""
    if np.isscalar(v):
        return int(v), int(v)
    t = tuple(int(e) for e in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair (h, w), got {v!r}")
    return t


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
    n_out, kh, kw, cg = w.shape
    C = xp.shape[2]
    if groups < 1 or C % groups or n_out % groups:
        raise ValueError(
            f"groups={groups} must divide input channels {C} and output channels {n_out}")
    if C // groups != cg:
        raise ValueError(
            f"weights expect {cg} channels per group, input has {C} / {groups}")
    (sh, sw), (dh, dw), (Ho, Wo) = stride, dilation, out_hw
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"output size {Ho}x{Wo} is empty")
    og = n_out // groups
    wg = w.astype(np.float64, copy=False).reshape(groups, og, kh, kw, cg)
    acc = np.zeros((Ho, Wo, groups, og), np.float64)
    for p in range(kh):
        for q in range(kw):
            h0, w0 = p * dh, q * dw
            patch = xp[h0:h0 + sh * (Ho - 1) + 1:sh, w0:w0 + sw * (Wo - 1) + 1:sw]
            patch = patch.reshape(Ho, Wo, groups, cg)
            acc += np.einsum("hwgc,goc->hwgo", patch, wg[:, :, p, q, :])
    return acc.reshape(Ho, Wo, n_out)


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
    n_out, kh, kw, _ = w.shape
    H, Wd, _ = x.shape
    out_hw = (conv_output_size(H, kh, stride[0], pad[0], dilation[0]),
              conv_output_size(Wd, kw, stride[1], pad[1], dilation[1]))
    xp = _pad_hw(x, pad[0], pad[1])
    y = _correlate(xp, w, int(groups), stride, dilation, out_hw)
    y += _bias(bias, n_out)
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
    n_out, kh, kw, _ = w.shape
    H, Wd, C = x.shape
    xz = np.zeros((sh * (H - 1) + 1, sw * (Wd - 1) + 1, C), np.float64)
    xz[::sh, ::sw] = x
    xz = _pad_hw(xz, dil[0] * (kh - 1) - ph, dil[1] * (kw - 1) - pw)
    out_hw = (deconv_output_size(H, kh, sh, ph, dil[0]),
              deconv_output_size(Wd, kw, sw, pw, dil[1]))
    y = _correlate(xz, w, int(groups), (1, 1), dil, out_hw)
    y += _bias(bias, n_out)
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
