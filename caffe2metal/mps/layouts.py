"""(A) Caffe blobs -> the arrays MPS kernels read (see the package doc for the table).

Each converter returns a new C-contiguous array and keeps the dtype, so
``.tobytes()`` is exactly what goes into a ``.dat`` file.
"""
import numpy as np


def _check_4d(W, what):
    W = np.asarray(W)
    if W.ndim != 4:
        raise ValueError(f"{what} weights must be 4-D, got shape {W.shape}")
    return W


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
    out, n_in = W.shape
    if n_in != C * H * Wd:
        raise ValueError(
            f"InnerProduct weights have K={n_in} inputs but the bottom is "
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
