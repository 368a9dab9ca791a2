"""caffe2metal.mps: Caffe -> MPS layouts and the numpy model of MPS.

Every case draws random x and Caffe-layout weights, runs an independent
Caffe-semantics reference in NCHW (written here, differently from the
package: im2col gather for Convolution, col2im scatter-add for
Deconvolution, a flat matmul for InnerProduct), runs the package's NHWC
MPS model on the converted weights, and compares.  The references themselves
are cross-checked against OpenCV's dnn Caffe importer on one-layer nets whose
caffemodel is hand-encoded protobuf.

Tolerances: (B) accumulates in float64 and rounds to float32, the references
are float64, so model-vs-reference uses rtol=1e-6, atol=1e-5 (outputs are
O(10); float32 rounding is ~1e-6).  OpenCV computes in float32 with its own
summation order: rtol=1e-4, atol=1e-4.
"""


import cv2
import numpy as np
import pytest

from caffe2metal import mps

RTOL, ATOL = 1e-6, 1e-5
CV_RTOL, CV_ATOL = 1e-4, 1e-4

# Max |difference| per case, printed at the end with `pytest -s`.
MAX_DIFFS = {}


def _pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


def _check(case, actual, expected, rtol=RTOL, atol=ATOL):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (case, actual.shape, expected.shape)
    MAX_DIFFS[case] = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=case)


def _differs(actual, expected, rtol=RTOL, atol=ATOL):
    """True when a deliberately wrong layout is caught (shape or values)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    return actual.shape != expected.shape or not np.allclose(actual, expected, rtol=rtol, atol=atol)


@pytest.fixture(scope="session", autouse=True)
def _report_max_diffs():
    yield
    if MAX_DIFFS:
        print("\nmax |diff| per case:")
        for k in sorted(MAX_DIFFS):
            print(f"  {k:55s} {MAX_DIFFS[k]:.3e}")


def nchw_to_hwc(x):
    return np.ascontiguousarray(x[0].transpose(1, 2, 0))


def hwc_to_nchw(y):
    return np.ascontiguousarray(y.transpose(2, 0, 1)[None])


# ---------------------------------------------------------------------------
# (C) independent Caffe-semantics references, NCHW, float64
# ---------------------------------------------------------------------------

def ref_conv_nchw(x, W, b, stride=1, pad=0, dilation=1, group=1):
    """Caffe Convolution by explicit im2col gather (index arrays), then a
    per-group matmul.  x [N][C][H][W], W [out][C/group][kH][kW]."""
    x = np.asarray(x, np.float64)
    W = np.asarray(W, np.float64)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(pad), _pair(dilation)
    N, C, H, Wd = x.shape
    Cout, cg, kh, kw = W.shape
    assert cg * group == C and Cout % group == 0
    Ho = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    Wo = (Wd + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    xp = np.zeros((N, C, H + 2 * ph, Wd + 2 * pw))
    xp[:, :, ph:ph + H, pw:pw + Wd] = x
    rows = (np.arange(Ho) * sh)[:, None] + (np.arange(kh) * dh)[None, :]   # [Ho][kH]
    cols = (np.arange(Wo) * sw)[:, None] + (np.arange(kw) * dw)[None, :]   # [Wo][kW]
    # col[n, c, i, p, j, q] = xp[n, c, rows[i, p], cols[j, q]]
    col = xp[:, :, rows[:, :, None, None], cols[None, None, :, :]]
    # im2col matrix: [N][group][cg*kH*kW][Ho*Wo]
    col = col.transpose(0, 1, 3, 5, 2, 4).reshape(N, group, cg * kh * kw, Ho * Wo)
    Wm = W.reshape(group, Cout // group, cg * kh * kw)
    y = np.matmul(Wm[None], col).reshape(N, Cout, Ho, Wo)
    if b is not None:
        y = y + np.asarray(b, np.float64)[None, :, None, None]
    return y


def ref_deconv_nchw(x, W, b, stride=1, pad=0, dilation=1, group=1):
    """Caffe Deconvolution as the col2im scatter-add of x times
    W [in][out/group][kH][kW] (loop over kernel positions)."""
    x = np.asarray(x, np.float64)
    W = np.asarray(W, np.float64)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(pad), _pair(dilation)
    N, C, H, Wd = x.shape
    cin, og, kh, kw = W.shape
    assert cin == C and C % group == 0
    cg = C // group
    Cout = og * group
    full_h = sh * (H - 1) + dh * (kh - 1) + 1
    full_w = sw * (Wd - 1) + dw * (kw - 1) + 1
    full = np.zeros((N, Cout, full_h, full_w))
    xg = x.reshape(N, group, cg, H, Wd)
    Wg = W.reshape(group, cg, og, kh, kw)
    for p in range(kh):
        for q in range(kw):
            # column value for (group, out, pixel) at this kernel position
            contrib = np.einsum("ngchw,gco->ngohw", xg, Wg[:, :, :, p, q]).reshape(N, Cout, H, Wd)
            full[:, :, p * dh:p * dh + sh * (H - 1) + 1:sh,
                 q * dw:q * dw + sw * (Wd - 1) + 1:sw] += contrib
    Ho, Wo = full_h - 2 * ph, full_w - 2 * pw
    y = full[:, :, ph:ph + Ho, pw:pw + Wo]
    if b is not None:
        y = y + np.asarray(b, np.float64)[None, :, None, None]
    return y


def ref_fc(x, W, b):
    """Caffe InnerProduct (axis 1): flatten NCHW in C,H,W order; W [out][K]."""
    x = np.asarray(x, np.float64)
    y = x.reshape(x.shape[0], -1) @ np.asarray(W, np.float64).T
    if b is not None:
        y = y + np.asarray(b, np.float64)
    return y


# ---------------------------------------------------------------------------
# the reference brute-forced once more on a tiny case (sanity of the sanity)
# ---------------------------------------------------------------------------

def test_ref_conv_matches_definition_on_tiny_case():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, 5, 6))
    W = rng.standard_normal((4, 2, 2, 3))
    y = ref_conv_nchw(x, W, None, stride=(2, 1), pad=(1, 2), dilation=(1, 2), group=2)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (2, 2)))
    exp = np.zeros_like(y)
    for o in range(4):
        g = o // 2
        for i in range(y.shape[2]):
            for j in range(y.shape[3]):
                for c in range(2):
                    for p in range(2):
                        for q in range(3):
                            exp[0, o, i, j] += (xp[0, g * 2 + c, 2 * i + p, j + 2 * q]
                                                * W[o, c, p, q])
    _check("ref_conv vs loops (tiny)", y, exp, rtol=1e-12, atol=1e-12)


def test_ref_deconv_is_adjoint_of_ref_conv():
    # <conv(x), y> == <x, deconv(y)> with the same W (bias-free), grouped,
    # strided, padded, dilated: Caffe's Deconvolution is the conv's backward.
    rng = np.random.default_rng(2)
    W = rng.standard_normal((6, 2, 3, 2))          # conv: out 6, in 4, group 2
    # sizes chosen so (H + 2*pad - dilation*(k-1) - 1) is a multiple of the
    # stride: only then is the deconv output exactly the conv input
    x = rng.standard_normal((1, 4, 9, 9))
    kw = dict(stride=(2, 3), pad=(1, 1), dilation=(2, 1), group=2)
    cx = ref_conv_nchw(x, W, None, **kw)
    yy = rng.standard_normal(cx.shape)
    dy = ref_deconv_nchw(yy, W, None, **kw)        # deconv W [in=6][out/g=2]...
    assert dy.shape == x.shape
    lhs = np.sum(cx * yy)
    rhs = np.sum(x * dy)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10)


# ---------------------------------------------------------------------------
# convolution cases: ref (NCHW, Caffe W) vs MPS model (NHWC, converted W)
# ---------------------------------------------------------------------------

CONV_CASES = {
    # name: (in, out, (H, W), (kH, kW), stride, pad, dilation, group)
    "plain 3x3": (8, 16, (9, 11), (3, 3), 1, 1, 1, 1),
    "grouped g2": (8, 12, (9, 11), (3, 3), 1, 1, 1, 2),
    "grouped g4": (16, 8, (10, 7), (3, 3), 1, 1, 1, 4),
    "dilated 2": (8, 8, (13, 12), (3, 3), 1, 2, 2, 1),
    "strided 2": (8, 16, (12, 9), (3, 3), 2, 1, 1, 1),
    "kernel 1x3": (8, 8, (7, 9), (1, 3), 1, (0, 1), 1, 1),
    "kernel 3x1": (8, 8, (7, 9), (3, 1), 1, (1, 0), 1, 1),
    "kernel 7x6": (4, 8, (15, 13), (7, 6), (2, 1), (3, 2), 1, 1),
    "pad asym (2,0)": (8, 8, (7, 9), (3, 3), 1, (2, 0), 1, 1),
    "pad asym (0,3)": (8, 8, (7, 9), (3, 5), (1, 2), (0, 3), 1, 1),
    "first layer in=3": (3, 32, (16, 15), (3, 3), 2, 1, 1, 1),
    "grouped+dilated+strided": (8, 12, (14, 13), (3, 3), 2, 2, 2, 4),
    "1x1 pointwise": (16, 8, (5, 6), (1, 1), 1, 0, 1, 1),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv(case):
    cin, cout, (H, Wd), (kh, kw), stride, pad, dil, group = CONV_CASES[case]
    rng = np.random.default_rng(10 + sorted(CONV_CASES).index(case))
    x = rng.standard_normal((1, cin, H, Wd)).astype(np.float32)
    W = rng.standard_normal((cout, cin // group, kh, kw)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    ref = ref_conv_nchw(x, W, b, stride, pad, dil, group)
    w_mps = mps.conv_weights(W)
    assert w_mps.shape == (cout, kh, kw, cin // group)
    y = mps.conv2d_nhwc(nchw_to_hwc(x), w_mps, b, stride=_pair(stride), pad=_pair(pad),
                        dilation=_pair(dil), groups=group)
    assert y.dtype == np.float32
    _check(f"conv {case}", hwc_to_nchw(y), ref)


@pytest.mark.parametrize("stride,pad,dil",
                         [(1, 1, 1), (2, 1, 1), (1, 2, 2), ((2, 1), (0, 2), (1, 2))])
def test_depthwise(stride, pad, dil):
    C, H, Wd = 8, 11, 10
    rng = np.random.default_rng(20)
    x = rng.standard_normal((1, C, H, Wd)).astype(np.float32)
    W = rng.standard_normal((C, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    ref = ref_conv_nchw(x, W, b, stride, pad, dil, group=C)
    w_dw = mps.depthwise_weights(W, channels=C)
    assert w_dw.shape == (C, 3, 3)
    y = mps.depthwise_nhwc(nchw_to_hwc(x), w_dw, b, stride=_pair(stride), pad=_pair(pad),
                           dilation=_pair(dil))
    _check(f"depthwise s={stride} p={pad} d={dil}", hwc_to_nchw(y), ref)
    # the same layer as a grouped MPSCNNConvolution agrees too
    y2 = mps.conv2d_nhwc(nchw_to_hwc(x), mps.conv_weights(W), b, stride=_pair(stride),
                         pad=_pair(pad), dilation=_pair(dil), groups=C)
    _check(f"depthwise-as-grouped s={stride} p={pad} d={dil}", hwc_to_nchw(y2), ref)


# ---------------------------------------------------------------------------
# deconvolution
# ---------------------------------------------------------------------------

DECONV_CASES = {
    # name: (in, out, (H, W), (kH, kW), stride, pad, dilation, group)
    "g1 s2 p1 k4": (8, 6, (5, 7), (4, 4), 2, 1, 1, 1),
    "g1 s2 p1 k3": (8, 6, (5, 7), (3, 3), 2, 1, 1, 1),
    "g2 s2 p1 k4": (8, 12, (5, 7), (4, 4), 2, 1, 1, 2),
    "g2 s2 p1 k3x2": (8, 4, (6, 5), (3, 2), 2, 1, 1, 2),
    "g4 s2 p1 k4": (16, 8, (4, 5), (4, 4), 2, 1, 1, 4),
    "dilation 2": (8, 6, (5, 6), (3, 3), 1, 1, 2, 1),
    "dilation 2 s2 g2": (8, 8, (5, 6), (3, 3), 2, 2, 2, 2),
    "asym stride/pad/dil": (4, 8, (6, 5), (3, 4), (2, 3), (2, 1), (1, 2), 2),
    "pad > dil*(k-1)": (4, 4, (6, 6), (2, 2), 3, 2, 1, 1),
}


@pytest.mark.parametrize("case", sorted(DECONV_CASES))
def test_deconv(case):
    cin, cout, (H, Wd), (kh, kw), stride, pad, dil, group = DECONV_CASES[case]
    rng = np.random.default_rng(40 + sorted(DECONV_CASES).index(case))
    x = rng.standard_normal((1, cin, H, Wd)).astype(np.float32)
    W = rng.standard_normal((cin, cout // group, kh, kw)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    ref = ref_deconv_nchw(x, W, b, stride, pad, dil, group)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(pad), _pair(dil)
    assert ref.shape[2:] == (sh * (H - 1) + dh * (kh - 1) + 1 - 2 * ph,
                             sw * (Wd - 1) + dw * (kw - 1) + 1 - 2 * pw)
    w_t = mps.deconv_weights(W, group)
    assert w_t.shape == (cout, kh, kw, cin // group)
    y = mps.conv_transpose_nhwc(nchw_to_hwc(x), w_t, b, stride=_pair(stride), pad=_pair(pad),
                                dilation=_pair(dil), groups=group)
    _check(f"deconv {case}", hwc_to_nchw(y), ref)


def test_deconv_group1_matches_documented_formula():
    rng = np.random.default_rng(60)
    W = rng.standard_normal((8, 6, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(mps.deconv_weights(W, 1),
                                  np.flip(W, (2, 3)).transpose(1, 2, 3, 0))


def test_deconv_group_layout_is_group_major():
    # Row G*out/g + o of the MPS array is flip(W[G*in/g:(G+1)*in/g, o]) with
    # the in/g channels innermost.
    rng = np.random.default_rng(61)
    g, ing, og, kh, kw = 3, 4, 2, 3, 2
    W = rng.standard_normal((g * ing, og, kh, kw)).astype(np.float32)
    w_t = mps.deconv_weights(W, g)
    for G in range(g):
        for o in range(og):
            blk = W[G * ing:(G + 1) * ing, o, ::-1, ::-1]           # [in/g][kH][kW]
            np.testing.assert_array_equal(w_t[G * og + o], blk.transpose(1, 2, 0))


# ---------------------------------------------------------------------------
# wrong layouts must be caught (the comparisons can fail)
# ---------------------------------------------------------------------------

def test_wrong_deconv_layouts_are_detected():
    cin, cout, group, k = 8, 12, 2, 4
    rng = np.random.default_rng(70)
    x = rng.standard_normal((1, cin, 5, 7)).astype(np.float32)
    W = rng.standard_normal((cin, cout // group, k, k)).astype(np.float32)
    ref = ref_deconv_nchw(x, W, None, 2, 1, 1, group)
    xh = nchw_to_hwc(x)

    def run(w):
        return hwc_to_nchw(mps.conv_transpose_nhwc(xh, w, None, stride=2, pad=1, groups=group))

    # correct
    _check("deconv mutation baseline", run(mps.deconv_weights(W, group)), ref)
    cg, og = cin // group, cout // group
    # no spatial flip
    no_flip = W.reshape(group, cg, og, k, k).transpose(0, 2, 3, 4, 1).reshape(cout, k, k, cg)
    assert _differs(run(no_flip), ref)
    # in-major (output channels o*group + G instead of G*og + o)
    good = mps.deconv_weights(W, group)
    in_major = good.reshape(group, og, k, k, cg).transpose(1, 0, 2, 3, 4).reshape(cout, k, k, cg)
    assert _differs(run(in_major), ref)
    # group-1 formula on a grouped blob: wrong shape, the simulator refuses it
    naive = np.ascontiguousarray(np.flip(W, (2, 3)).transpose(1, 2, 3, 0))
    assert naive.shape == (og, k, k, cin)
    with pytest.raises(ValueError):
        run(naive)
    # "group-1 formula, then reshape to the right shape" is also wrong
    assert _differs(run(naive.reshape(cout, k, k, cg)), ref)


def test_wrong_conv_and_fc_layouts_are_detected():
    rng = np.random.default_rng(71)
    x = rng.standard_normal((1, 8, 7, 9)).astype(np.float32)
    W = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    ref = ref_conv_nchw(x, W, None, 1, 1, 1, 1)
    swapped = np.ascontiguousarray(W.transpose(0, 3, 2, 1))      # [out][kW][kH][in]
    y = mps.conv2d_nhwc(nchw_to_hwc(x), swapped, None, pad=1)
    assert _differs(hwc_to_nchw(y), ref)
    # grouped conv with groups forgotten at compute time: shape mismatch refused
    Wg = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    with pytest.raises(ValueError):
        mps.conv2d_nhwc(nchw_to_hwc(x), mps.conv_weights(Wg), None, pad=1, groups=1)

    xf = rng.standard_normal((1, 8, 3, 5)).astype(np.float32)
    Wf = rng.standard_normal((10, 8 * 3 * 5)).astype(np.float32)
    ref_f = ref_fc(xf, Wf, None)[0]
    chw_order = Wf.reshape(10, 3, 5, 8)                            # treats K as H,W,C
    assert _differs(mps.fully_connected_nhwc(nchw_to_hwc(xf), chw_order, None), ref_f)


# ---------------------------------------------------------------------------
# fully connected
# ---------------------------------------------------------------------------

def test_fc_after_conv():
    rng = np.random.default_rng(80)
    x = rng.standard_normal((1, 4, 6, 10)).astype(np.float32)
    Wc = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    bc = rng.standard_normal(8).astype(np.float32)
    # conv 3x3 stride 2 pad 1 on 6x10 -> [8, 3, 5]
    ref_c = ref_conv_nchw(x, Wc, bc, 2, 1, 1, 1)
    assert ref_c.shape == (1, 8, 3, 5)
    Wf = rng.standard_normal((10, 8 * 3 * 5)).astype(np.float32)
    bf = rng.standard_normal(10).astype(np.float32)
    ref = ref_fc(ref_c, Wf, bf)[0]
    yc = mps.conv2d_nhwc(nchw_to_hwc(x), mps.conv_weights(Wc), bc, stride=2, pad=1)
    w_fc = mps.fc_weights(Wf, (8, 3, 5))
    assert w_fc.shape == (10, 3, 5, 8)
    y = mps.fully_connected_nhwc(yc, w_fc, bf)
    assert y.shape == (10,) and y.dtype == np.float32
    _check("fc after conv [8,3,5]", y, ref, atol=1e-4)   # two float32 roundings chained


def test_fc_transpose():
    rng = np.random.default_rng(81)
    x = rng.standard_normal((1, 8, 3, 5)).astype(np.float32)
    Wk = rng.standard_normal((8 * 3 * 5, 7)).astype(np.float32)     # [K][out]
    b = rng.standard_normal(7).astype(np.float32)
    ref = ref_fc(x, Wk.T, b)[0]
    w_fc = mps.fc_weights(Wk, (8, 3, 5), transpose=True)
    assert w_fc.shape == (7, 3, 5, 8) and w_fc.flags.c_contiguous
    _check("fc transpose=True [8,3,5]", mps.fully_connected_nhwc(nchw_to_hwc(x), w_fc, b), ref)


def test_fc_1x1():
    rng = np.random.default_rng(82)
    x = rng.standard_normal((1, 64, 1, 1)).astype(np.float32)
    W = rng.standard_normal((20, 64)).astype(np.float32)
    b = rng.standard_normal(20).astype(np.float32)
    ref = ref_fc(x, W, b)[0]
    w_fc = mps.fc_weights(W, (64, 1, 1))
    assert w_fc.shape == (20, 1, 1, 64)
    # for a 1x1 source the layout is the Caffe blob, byte for byte
    assert w_fc.tobytes() == W.tobytes()
    np.testing.assert_array_equal(mps.fc_weights(W, 64), w_fc)
    _check("fc 1x1 (64 -> 20)", mps.fully_connected_nhwc(nchw_to_hwc(x), w_fc, b), ref)


def test_channel_affine():
    rng = np.random.default_rng(83)
    x = rng.standard_normal((1, 6, 4, 5)).astype(np.float32)
    s = rng.standard_normal(6).astype(np.float32)
    t = rng.standard_normal(6).astype(np.float32)
    ref = x.astype(np.float64) * s[None, :, None, None] + t[None, :, None, None]
    _check("channel affine", hwc_to_nchw(mps.channel_affine_nhwc(nchw_to_hwc(x), s, t)), ref)


# ---------------------------------------------------------------------------
# bytes, dtype, contiguity, errors
# ---------------------------------------------------------------------------

def test_first_layer_bytes_have_no_padding():
    out, kh, kw = 32, 3, 3
    W = np.random.default_rng(90).standard_normal((out, 3, kh, kw)).astype(np.float32)
    w = mps.conv_weights(W)
    assert len(w.tobytes()) == out * kh * kw * 3 * 4
    assert w.flags.c_contiguous
    # and the bytes are exactly the transposed blob, little-endian float32
    assert w.tobytes() == W.transpose(0, 2, 3, 1).astype("<f4").tobytes()


def test_depthwise_bytes_equal_conv_transpose():
    W = np.random.default_rng(91).standard_normal((16, 1, 3, 3)).astype(np.float32)
    assert mps.depthwise_weights(W).tobytes() == mps.conv_weights(W).tobytes()
    assert mps.depthwise_weights(W).tobytes() == W.transpose(0, 2, 3, 1).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_converters_preserve_dtype_and_are_contiguous(dtype):
    rng = np.random.default_rng(92)
    outs = [
        mps.conv_weights(rng.standard_normal((8, 4, 3, 2)).astype(dtype)),
        mps.depthwise_weights(rng.standard_normal((8, 1, 3, 3)).astype(dtype)),
        mps.fc_weights(rng.standard_normal((5, 24)).astype(dtype), (2, 3, 4)),
        mps.fc_weights(rng.standard_normal((24, 5)).astype(dtype), (2, 3, 4), transpose=True),
        mps.deconv_weights(rng.standard_normal((8, 3, 4, 4)).astype(dtype), 2),
    ]
    for a in outs:
        assert a.dtype == dtype
        assert a.flags.c_contiguous


def test_converter_errors():
    with pytest.raises(ValueError):
        mps.depthwise_weights(np.zeros((8, 2, 3, 3), np.float32))       # not [C][1]
    with pytest.raises(ValueError):
        mps.depthwise_weights(np.zeros((16, 1, 3, 3), np.float32), channels=8)  # multiplier 2
    with pytest.raises(ValueError):
        mps.fc_weights(np.zeros((10, 100), np.float32), (8, 3, 5))     # K mismatch
    with pytest.raises(ValueError):
        mps.deconv_weights(np.zeros((6, 2, 3, 3), np.float32), 4)      # group ∤ in
    with pytest.raises(ValueError):
        mps.conv_weights(np.zeros((8, 3, 3), np.float32))


# ---------------------------------------------------------------------------
# cross-check the references against OpenCV dnn (hand-encoded caffemodel)
# ---------------------------------------------------------------------------

def _varint(n):
    n &= (1 << 64) - 1          # int64 two's complement, as protobuf does
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _ld(field, payload):
    """Length-delimited field (wire type 2)."""
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def _blob(arr):
    """BlobProto {7: shape BlobShape {1: packed int64 dim}, 5: packed float data}."""
    arr = np.asarray(arr, np.float32)
    shape = _ld(1, b"".join(_varint(d) for d in arr.shape))
    return _ld(7, shape) + _ld(5, arr.astype("<f4").tobytes())


def _caffemodel(layers):
    """NetParameter with field 100 = LayerParameter {1: name, 2: type, 7: blobs}."""
    out = b""
    for name, typ, blobs in layers:
        lp = (_ld(1, name.encode()) + _ld(2, typ.encode())
              + b"".join(_ld(7, _blob(b)) for b in blobs))
        out += _ld(100, lp)
    return out


def _opencv_forward(tmp_path, prototxt, layers, x):
    proto = tmp_path / "net.prototxt"
    model = tmp_path / "net.caffemodel"
    proto.write_text(prototxt)
    model.write_bytes(_caffemodel(layers))
    net = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    net.setInput(np.ascontiguousarray(x, np.float32))
    return net.forward()


def _input_layer(shape):
    dims = " ".join(f"dim: {d}" for d in shape)
    return (f'layer {{ name: "data" type: "Input" top: "data" '
            f'input_param {{ shape {{ {dims} }} }} }}\n')


def test_varint_encoder():
    assert _varint(1) == b"\x01"
    assert _varint(300) == b"\xac\x02"
    assert _varint(-1) == b"\xff" * 9 + b"\x01"


def test_opencv_conv_grouped_dilated_strided(tmp_path):
    rng = np.random.default_rng(100)
    cin, cout, group, H, Wd = 8, 12, 4, 14, 13
    x = rng.standard_normal((1, cin, H, Wd)).astype(np.float32)
    W = rng.standard_normal((cout, cin // group, 3, 3)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    proto = _input_layer(x.shape) + """layer {
  name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 12 kernel_size: 3 stride_h: 2 stride_w: 1
                      pad_h: 2 pad_w: 1 dilation: 2 group: 4 }
}
"""
    got = _opencv_forward(tmp_path, proto, [("conv", "Convolution", [W, b])], x)
    ref = ref_conv_nchw(x, W, b, stride=(2, 1), pad=(2, 1), dilation=2, group=group)
    _check("opencv conv g4 d2 s(2,1) p(2,1) vs ref", got, ref, CV_RTOL, CV_ATOL)


def test_opencv_conv_nonsquare_kernel(tmp_path):
    rng = np.random.default_rng(101)
    x = rng.standard_normal((1, 4, 15, 13)).astype(np.float32)
    W = rng.standard_normal((8, 4, 7, 6)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    proto = _input_layer(x.shape) + """layer {
  name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 8 kernel_h: 7 kernel_w: 6
                      stride_h: 2 stride_w: 1 pad_h: 3 pad_w: 2 }
}
"""
    got = _opencv_forward(tmp_path, proto, [("conv", "Convolution", [W, b])], x)
    ref = ref_conv_nchw(x, W, b, stride=(2, 1), pad=(3, 2))
    _check("opencv conv 7x6 vs ref", got, ref, CV_RTOL, CV_ATOL)


@pytest.mark.parametrize("group", [1, 2])
def test_opencv_deconv_stride2(tmp_path, group):
    rng = np.random.default_rng(102 + group)
    cin, cout, H, Wd, k = 8, 12, 5, 7, 4
    x = rng.standard_normal((1, cin, H, Wd)).astype(np.float32)
    W = rng.standard_normal((cin, cout // group, k, k)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    proto = _input_layer(x.shape) + f"""layer {{
  name: "up" type: "Deconvolution" bottom: "data" top: "up"
  convolution_param {{ num_output: {cout} kernel_size: {k} stride: 2 pad: 1 group: {group} }}
}}
"""
    got = _opencv_forward(tmp_path, proto, [("up", "Deconvolution", [W, b])], x)
    ref = ref_deconv_nchw(x, W, b, stride=2, pad=1, group=group)
    _check(f"opencv deconv g{group} s2 p1 vs ref", got, ref, CV_RTOL, CV_ATOL)
    # and the MPS model agrees with OpenCV directly
    y = mps.conv_transpose_nhwc(nchw_to_hwc(x), mps.deconv_weights(W, group), b,
                                stride=2, pad=1, groups=group)
    _check(f"opencv deconv g{group} s2 p1 vs mps model", hwc_to_nchw(y), got, CV_RTOL, CV_ATOL)


def test_opencv_inner_product(tmp_path):
    rng = np.random.default_rng(105)
    x = rng.standard_normal((1, 8, 3, 5)).astype(np.float32)
    W = rng.standard_normal((10, 8 * 3 * 5)).astype(np.float32)
    b = rng.standard_normal(10).astype(np.float32)
    proto = _input_layer(x.shape) + """layer {
  name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
  inner_product_param { num_output: 10 }
}
"""
    got = _opencv_forward(tmp_path, proto, [("fc", "InnerProduct", [W, b])], x)
    ref = ref_fc(x, W, b)
    _check("opencv InnerProduct [8,3,5] vs ref", got.reshape(ref.shape), ref, CV_RTOL, CV_ATOL)
    y = mps.fully_connected_nhwc(nchw_to_hwc(x), mps.fc_weights(W, (8, 3, 5)), b)
    _check("opencv InnerProduct [8,3,5] vs mps model", y, got.reshape(-1), CV_RTOL, CV_ATOL)


def test_opencv_catches_a_wrong_reference(tmp_path):
    # The OpenCV comparison is sensitive: a reference with W's kernel flipped
    # (i.e. true convolution instead of Caffe's correlation) is rejected.
    rng = np.random.default_rng(106)
    x = rng.standard_normal((1, 4, 8, 9)).astype(np.float32)
    W = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    proto = _input_layer(x.shape) + """layer {
  name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 bias_term: false }
}
"""
    got = _opencv_forward(tmp_path, proto, [("conv", "Convolution", [W])], x)
    _check("opencv conv no-bias vs ref", got, ref_conv_nchw(x, W, None, 1, 1), CV_RTOL, CV_ATOL)
    assert _differs(got, ref_conv_nchw(x, np.flip(W, (2, 3)), None, 1, 1), CV_RTOL, CV_ATOL)
