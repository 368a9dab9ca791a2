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


# float64 values of weights converted at a time (fully connected; 2 MiB, one reused buffer
# that stays in cache: measured 0.12 s for VGG's fc6 against 0.4-1.1 s for 8-128 MiB blocks
# and 1.3 s for one whole float64 copy, which would also be 822 MB)
_BLOCK_VALUES = 1 << 18
_COLUMN_VALUES = 1 << 21         # float64 values of gathered convolution patches (16 MiB)


def _correlate(xp, w, groups, stride, dilation, out_hw):
    """Grouped correlation of an already padded [H][W][C] float64 input.

    ``w`` is [out][kH][kW][in/groups]; float64 matrix products (BLAS) over
    blocks of output rows, or for groups > 1 one einsum per kernel position
    over (groups, in/groups) (faster for depthwise's 1x1 products): memory
    beyond the output is one ~16 MiB buffer.
    """
    n_out, kh, kw, cg = w.shape
    C = xp.shape[2]
    if groups < 1 or C % groups or n_out % groups:
        raise ValueError(
            f"groups={groups} must divide input channels {C} and output channels {n_out}")
    if C // groups != cg:
        raise ValueError(
            f"weights expect {cg} channels per group, input has {C} / {groups}")
    Ho, Wo = out_hw
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"output size {Ho}x{Wo} is empty")
    if groups > 1:          # grouped (depthwise: 1x1 products): one einsum per position
        og = n_out // groups
        wg = w.astype(np.float64, copy=False).reshape(groups, og, kh, kw, cg)
        acc = np.zeros((Ho, Wo, groups, og), np.float64)
        for p, q, patch in _positions(xp, kh, kw, stride, dilation, out_hw):
            acc += np.einsum("hwgc,goc->hwgo", patch.reshape(Ho, Wo, groups, cg),
                             wg[:, :, p, q, :])
        return acc.reshape(Ho, Wo, n_out)
    # one matrix product [rows*Wo][kH*kW*C] x [kH*kW*C][out] per block of output rows, the
    # block's patches gathered into one reused float64 buffer of ~16 MiB (measured on
    # VGG16's convolutions: 1.4 s against 1.8 s for one product per kernel position)
    k = kh * kw * cg
    wm = w.reshape(n_out, k).T.astype(np.float64)
    y = np.empty((Ho, Wo, n_out), np.float64)
    rows = max(1, min(Ho, _COLUMN_VALUES // (Wo * k)))
    col = np.empty((rows, Wo, kh, kw, cg), np.float64)
    sh = stride[0]
    for r in range(0, Ho, rows):
        n = min(rows, Ho - r)
        band = xp[r * sh:]
        for p, q, patch in _positions(band, kh, kw, stride, dilation, (n, Wo)):
            col[:n, :, p, q, :] = patch
        np.matmul(col[:n].reshape(n * Wo, k), wm, out=y[r:r + n].reshape(n * Wo, n_out))
    return y


def _positions(xp, kh, kw, stride, dilation, out_hw):
    """(p, q, the input pixels kernel position (p, q) reads for every output pixel)."""
    (sh, sw), (dh, dw), (Ho, Wo) = stride, dilation, out_hw
    for p in range(kh):
        for q in range(kw):
            h0, w0 = p * dh, q * dw
            yield p, q, xp[h0:h0 + sh * (Ho - 1) + 1:sh, w0:w0 + sw * (Wo - 1) + 1:sw]


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
    w2 = w.reshape(w.shape[0], -1)
    xv = x.reshape(-1)
    rows = max(1, _BLOCK_VALUES // max(1, xv.size))
    y = np.empty(w.shape[0], np.float64)
    buf = np.empty((min(rows, len(w2)), xv.size), np.float64)
    for i in range(0, len(w2), rows):             # float64 a block of rows at a time
        block = buf[:len(w2[i:i + rows])]
        np.copyto(block, w2[i:i + rows])
        np.matmul(block, xv, out=y[i:i + len(block)])
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
