"""`run` on the real architectures: the plan executed from OUT alone (float32 weights)
against OpenCV's forward of the original model with the same synthetic weights
(test_real_models' ``_prepare``) and verify's input: max|diff| / max|ref| <= 1e-4 on
every net output; for SSD on DetectionOutput's inputs, and its detections compared as
sets (test_run's ``same_detections``).  The input of a Softmax/Sigmoid computing a
compared blob (a classifier's logits, SSD's conf before its squashing) is compared too,
and the squashed blob is held to 1e-4 plus what the logits' measured difference can become
through the layer (slope <= 1/2 for softmax, 1/4 for the logistic: the mean value
theorem), as verify's plan rows do: the calibrated weights can make a softmax one-hot
(hiding everything), and logits in the hundreds make float32 rounding visible after it.
The same for ``run --backend mlx`` (Apple's MLX, CPU build), which is also held to the
numpy backend.
"""
from __future__ import annotations

import numpy as np
import pytest

from caffe2metal.cli import main
from caffe2metal.pipeline import convert
from caffe2metal.runtime import default_feed, load_plan, run_plan
from caffe2metal.verification import PLAN_TOLERANCE, fork_layers
from caffe2metal.verification.opencv import opencv_text
from conftest import mark_slow, model_id, opencv_run
from test_real_models import RUNNABLE, _compared_outputs, _drop, _prepare
from test_run import same_detections

TOL = 1e-4
# mobilenetv2_ssd's sigmoid scores (mbox_conf_flatten) differ by 1.05e-4 of max while its
# logits differ by 1.4e-6 of their max (1137): 0.25 x 1.6e-3 = 4e-4 allowed.  Measured
# (tools/precision-style perturbation): a random one-ulp relative change of every weight
# moves those scores by 2.3e-4, its logits by 6e-6: float32 rounding, not the plan.
# (MLX: 2.4e-4 from OpenCV, 1.7e-4 from numpy on those scores; logits 1.4e-6 apart.)
SLOPE = {"Softmax": 0.5, "Sigmoid": 0.25}
# MLX (float32 throughout) against the numpy backend (float64 per op, rounded to float32):
# worst measured 4.8e-5 (mobilenetv2_ssdlite's heads), the rest <= 1.8e-5.
MLX_VS_NUMPY = 1e-4

# The reference is OpenCV with verify's numpy layers registered where OpenCV lacks a type or
# computes it wrongly (fork_layers): arcface_lresnet_se's Axpy (OpenCV 4.14 computes
# bottom0*bottom2 + bottom1 where Axpy is bottom0*bottom1 + bottom2).  FaceBoxes' priors are
# not SSD's PriorBox (it densifies anchors): its PriorBox ops compute Caffe's PriorBox, and
# its DetectionOutput is `unavailable` in the plan (metal.skipped says why): `run` skips it
# and says so, OpenCV cannot run it either (test_real_models' DROP_DETECTION_OUTPUT).
# Cheap enough (under ~2 s) for `make test-fast`.
FAST = {"mobilenet_ssd"}

RUN = RUNNABLE


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a).reshape(b.shape) - b).max() / np.abs(b).max())


def _squashing(graph, blob):
    """The Softmax/Sigmoid computing ``blob`` through Flatten/Reshape, or None."""
    layer = graph.producers().get(blob)
    while layer is not None and layer.type in ("Flatten", "Reshape"):
        layer = graph.producers().get(layer.bottoms[0])
    return layer if layer is not None and layer.type in SLOPE else None


def _blobs(graph) -> list[str]:
    blobs = _compared_outputs(graph)
    extra = [s.bottoms[0] for b in blobs if (s := _squashing(graph, b)) is not None]
    return blobs + [x for x in extra if x not in blobs]


@pytest.mark.parametrize("path", mark_slow(RUN, {model_id(p) for p in RUN} - FAST,
                                           key=model_id), ids=model_id)
def test_run_matches_opencv_on_real_architectures(path, tmp_path):
    name = model_id(path)
    model, weights = _prepare(path, tmp_path)
    out = convert(model.prototxt, weights, tmp_path / "out").out
    manifest = load_plan(out)
    feed = default_feed(manifest)
    result = run_plan(out, feed)
    mlx = run_plan(out, feed, backend="mlx")

    graph, names = model.graph, model.graph.blob_names
    blobs = _blobs(graph)
    det = [layer for layer in graph.layers if layer.type == "DetectionOutput"
           and layer.type not in _drop(name)]
    wanted = [(graph.producers()[b].name, names[b]) for b in blobs]
    if det:
        wanted.append(det[0].name)
    forks = fork_layers.plan(graph, _drop(name))
    assert not forks.cut, forks.cut
    with fork_layers.registered(forks):
        proto = tmp_path / "reference.prototxt"
        proto.write_text(opencv_text(model, _drop(name), rename=forks.rename))
        ref = opencv_run(proto, weights, feed, wanted)
    for r in (result, mlx):
        assert list(r.skipped) == [layer.name for layer in graph.layers
                                   if layer.type in _drop(name)]

    # the value of a file blob name is the last op's that wrote it
    file_name = manifest.get("blob_names") or {}
    last = {file_name.get(t, t): t for op in manifest["plan"] for t in op["tops"]}
    refs = dict(zip(blobs, ref, strict=False))
    runs = {k: {b: np.asarray(r.values[last[names[b]]]).reshape(refs[b].shape) for b in blobs}
            for k, r in (("numpy", result), ("mlx", mlx))}

    def allowed(b, base, mine, theirs):
        squash = _squashing(graph, b)
        if squash is None:
            return base
        x = squash.bottoms[0]     # base plus the logits' difference through the layer
        return base + SLOPE[squash.type] * np.abs(mine[x] - theirs[x]).max() / \
            np.abs(theirs[b]).max()

    for b in blobs:
        for k in runs:
            rel, tol = _rel(runs[k][b], refs[b]), allowed(b, TOL, runs[k], refs)
            assert rel <= tol, f"{name}: {names[b]}: {k} rel {rel:.3g} > {tol:.3g}"
        rel = _rel(runs["mlx"][b], runs["numpy"][b])
        tol = allowed(b, MLX_VS_NUMPY, runs["mlx"], runs["numpy"])
        assert rel <= tol, f"{name}: {names[b]}: mlx vs numpy {rel:.3g} > {tol:.3g}"
    _float16(name, model, weights, tmp_path, feed, blobs, refs, graph, last)
    if det:
        rows = ref[-1].reshape(-1, 7)          # OpenCV pads with zero rows of label 0
        background = manifest["ssd"]["detection_output"]["background_label_id"]
        rows = rows[(rows[:, 1] >= 0) & (rows[:, 1] != background)]
        assert len(result.detections) == len(rows) > 0, name
        # synthetic weights saturate many scores (ties at 1.0): which of the tied boxes
        # keep_top_k keeps is an ordering accident, so the sets are compared above the
        # lowest kept score only (both sides), and the count overall
        cut = float(rows[:, 2].min()) + 1e-3
        mine = [d for d in result.detections if d["score"] > cut]
        # res10_ssd_face decodes boxes 1e5 wide and 1e-6 high (IoU ill-conditioned): those
        # match by coordinates, measured within 7.5e-6 of the box's largest
        assert same_detections(mine, rows[rows[:, 2] > cut], coord_tol=2e-5), name
        assert len(mlx.detections) == len(rows), name
        mine = [d for d in mlx.detections if d["score"] > cut]
        assert same_detections(mine, rows[rows[:, 2] > cut], coord_tol=2e-5), name


def _float16(name, model, weights, tmp_path, feed, blobs, refs, graph, last):
    """float16 weight files, and float16 activations, held to verify's float16 plan
    tolerance on every compared blob that no Softmax/Sigmoid computes (those follow their
    logits: see above); `python -m tools.precision` measured the worst at 0.10.  An
    activation beyond float16's range is reported by name, and only there may a blob be
    inf (vgg_ssd300's synthetic heads reach 3e7)."""
    tol = PLAN_TOLERANCE["float16"]
    names = graph.blob_names
    out16 = convert(model.prototxt, weights, tmp_path / "out16", dtype="float16").out
    for label, r in (("float16 weights", run_plan(out16, feed)),
                     ("float16 activations", run_plan(tmp_path / "out", feed,
                                                      activations="float16"))):
        for b in blobs:
            if _squashing(graph, b) is not None:
                continue
            mine = np.asarray(r.values[last[names[b]]]).reshape(refs[b].shape)
            if r.overflow and not np.isfinite(mine).all():
                continue
            rel = _rel(mine, refs[b])
            assert rel <= tol, f"{name}: {names[b]}: {label} rel {rel:.3g} > {tol}"


def test_faceboxes_runs_all_but_its_detection_output(tmp_path, capsys):
    """The op convert marked `unavailable` (and what reads it) is skipped and named: exit 3."""
    path = next((p for p in RUNNABLE if model_id(p) == "faceboxes"), None)
    if path is None:
        pytest.skip("../shared/models/faceboxes is absent")
    model, weights = _prepare(path, tmp_path)
    out = convert(model.prototxt, weights, tmp_path / "out").out
    result = run_plan(out)
    assert result.skipped == {"detection_out": "DetectionOutput without SSD priors (see "
                                                "metal.skipped)"}
    assert set(result.outputs) == {"mbox_loc", "mbox_conf_flatten", "mbox_priorbox"}
    assert main(["run", str(out)]) == 3
    text = capsys.readouterr().out
    assert text.endswith("not run: 1 op(s), so their outputs are absent:\n    detection_out: "
                         "DetectionOutput without SSD priors (see metal.skipped)\n")
