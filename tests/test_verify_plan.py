"""verify's section "end to end: the plan run from OUT (numpy MPS model)": the manifest's plan
executed by caffe2metal.runtime from OUT alone against the original model in OpenCV."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from caffe2metal import api
from caffe2metal.cli import main
from caffe2metal.verification import PLAN_TOLERANCE

HEADS = ["mbox_loc", "mbox_conf_flatten"]
ROWS = ["mbox_loc", "mbox_conf_reshape", "mbox_conf_flatten"]     # the softmax's input too
TINY = """name: "tiny"
input: "data"
input_shape { dim: 1 dim: 3 dim: 24 dim: 32 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool" type: "Pooling" bottom: "conv1" top: "pool"
        pooling_param { pool: AVE global_pooling: true } }
"""


@pytest.fixture(scope="module")
def example(example_outputs):
    return example_outputs


def test_float32_plan_rows_match_opencv_and_detections_are_equal_sets(example):
    ex, outs = example
    check = api.verify(ex.prototxt, ex.caffemodel, outs["float32"])
    assert [r.name for r in check.plan] == [*ROWS, "detections"]
    assert check.ok and check.complete and check.verdict() == "verify: PASS"
    for r in check.plan:
        assert r.counted and r.ok, (r.name, r.rel, r.note)
    for r in check.plan[:3]:
        assert r.rel <= 1e-4                      # measured 6.3e-6, 2.7e-5
    loc, logits, scores = check.plan[:3]
    assert loc.tolerance == logits.tolerance == PLAN_TOLERANCE["float32"] == 1e-4
    # the softmaxed row: 1e-4 plus half the logits' difference, of max|scores|, 2 digits up
    bound = 1e-4 + 0.5 * logits.max_diff / scores.max_ref
    assert bound <= scores.tolerance <= bound * 1.1 and "Softmax of the row above" in scores.note
    det = check.plan[3]
    # synthetic weights saturate the scores: nearly all tie within 1e-3, counted only
    assert det.shape == (100,) and "compared by count only" in det.note
    text = check.render()
    assert "end to end: the plan run from OUT (numpy MPS model) vs the original model in " \
           "OpenCV" in text
    assert "42 layer check(s), 1 output(s), 4 plan run row(s)" in text


def test_float16_plan_rows_use_the_measured_tolerance(example):
    ex, outs = example
    check = api.verify(ex.prototxt, ex.caffemodel, outs["float16"])
    assert check.ok and check.complete, check.render()
    heads = {r.name: r for r in check.plan[:3]}
    assert list(heads) == ROWS
    for r in heads.values():
        assert r.counted and r.tolerance >= PLAN_TOLERANCE["float16"] == 2e-1
    assert 1e-3 < heads["mbox_loc"].rel <= 3e-2             # measured 1.6e-2
    assert 1e-2 < heads["mbox_conf_flatten"].rel <= 1e-1     # measured 7.1e-2
    det = check.plan[3]
    assert det.informational and not det.counted and "float16: shown for information" in det.note
    assert "info  " in check.render()


def _edited(src, tmp_path, edit):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    m = json.loads((bad / "manifest.json").read_text())
    edit(m["plan"])
    (bad / "manifest.json").write_text(json.dumps(m))
    return bad


def test_an_op_run_cannot_execute_is_cut_with_what_follows(example, tmp_path, capsys):
    ex, outs = example

    def unknown_op(plan):
        op = next(o for o in plan if "mbox_conf_flatten" in o["tops"])
        op.pop("mps", None)
        op["app"] = {"op": "teleport"}
    bad = _edited(outs["float32"], tmp_path, unknown_op)
    check = api.verify(ex.prototxt, ex.caffemodel, bad)
    rows = {r.name: r for r in check.plan}
    assert rows["mbox_loc"].counted and rows["mbox_loc"].ok
    for name in ("mbox_conf_flatten", "detections"):
        assert not rows[name].counted and "teleport" in rows[name].note
        assert rows[name].note.startswith("skipped: run cannot execute op ")
    assert ("plan: detections", rows["detections"].note.removeprefix("skipped: ")) \
        in check.report.skipped
    assert check.ok and not check.complete
    assert check.verdict().startswith("verify: INCOMPLETE (everything checked passed")
    assert main(["verify", str(ex.prototxt), str(ex.caffemodel), str(bad)]) == 3
    assert "1 output(s), 4 plan run row(s)" in capsys.readouterr().out


def test_a_wrong_plan_fails(example, tmp_path):
    ex, outs = example

    def swap_concat(plan):
        op = next(o for o in plan if "mbox_loc" in o["tops"])
        op["bottoms"] = op["bottoms"][1:] + op["bottoms"][:1]
    check = api.verify(ex.prototxt, ex.caffemodel, _edited(outs["float32"], tmp_path,
                                                           swap_concat))
    assert not check.ok
    assert "mbox_loc" in [r.name for r in check.failures]


def test_a_softmax_over_the_wrong_axis_fails_though_its_logits_match(example, tmp_path):
    """The softmaxed row's tolerance grows only with the logits' measured difference: a wrong
    softmax (over all priors' channels, MPSCNNSoftMax's way, not per prior) still fails."""
    ex, outs = example

    def whole_axis(plan):
        op = next(o for o in plan if o.get("type") == "Softmax")
        op["app"]["axis"] = 1
    check = api.verify(ex.prototxt, ex.caffemodel, _edited(outs["float32"], tmp_path,
                                                           whole_axis))
    rows = {r.name: r for r in check.plan}
    assert rows["mbox_conf_reshape"].ok and rows["mbox_conf_reshape"].rel <= 1e-4
    assert not rows["mbox_conf_flatten"].ok and rows["mbox_conf_flatten"].rel > 0.5
    assert rows["mbox_conf_flatten"].tolerance < 1e-3 and not check.ok


def test_a_net_without_detections_has_one_row_per_output(tmp_path):
    from conftest import with_weights, write_net
    proto = write_net(tmp_path, TINY)
    _, weights = with_weights(proto)
    out = api.convert(proto, weights, tmp_path / "o", verify=True)
    rows = out.verification.plan
    assert [(r.name, r.kind, r.counted, r.ok) for r in rows] == [("pool", "Pooling", True, True)]
    assert rows[0].rel <= 1e-4


def test_no_plan_no_rows(tmp_path):
    from conftest import with_weights, write_net
    proto = write_net(tmp_path, TINY)
    _, weights = with_weights(proto)
    out = api.convert(proto, weights, tmp_path / "o", metal=False, verify=True)
    assert out.verification.plan == [] and out.verification.complete
    assert "plan run" not in out.render()


def test_detections_match_as_sets_ties_by_count():
    from caffe2metal.verification.plan_run import _iou, _match, _tied
    ref = [[0, 1, 0.9, 0.1, 0.1, 0.5, 0.5], [0, 2, 0.5, 0.2, 0.2, 0.6, 0.6]]
    mine = [{"label": 2, "score": 0.5004, "box": [0.2, 0.2, 0.6, 0.6001]},
            {"label": 1, "score": 0.8999, "box": [0.1, 0.1, 0.5, 0.5]}]
    assert _match(mine, ref)[0] == 2                       # order is no contract
    assert _match([{**mine[0], "label": 1}, mine[1]], ref)[0] == 1    # label differs
    assert _match([{**mine[0], "score": 0.502}, mine[1]], ref)[0] == 1   # score 2e-3 off
    assert _match([{**mine[0], "box": [0.2, 0.2, 0.6, 0.64]}, mine[1]], ref)[0] == 1  # IoU
    assert _tied([(1, 0.9), (1, 0.9005), (2, 0.9), (1, 0.5)]) == [True, True, False, False]
    inf = float("inf")
    assert _iou([1, -inf, 1, inf], [1, -inf, 1, inf]) == 1.0      # no area: coordinates
    assert _iou([1, -inf, 1, inf], [1, inf, 1, inf]) == 0.0


def test_the_squashed_tolerance_ignores_non_finite_references():
    from caffe2metal.verification.plan_run import _through
    from caffe2metal.verification.report import Row
    above = Row("logits", "Reshape", (3,), max_diff=2e-3, counted=True)
    probs = np.array([0.5, np.nan, np.inf, 0.25])
    assert _through(0.5, 1e-4, above, probs) == pytest.approx(2.1e-3)   # 1e-4 + 0.5*2e-3/0.5
    assert _through(0.5, 1e-4, above, np.array([np.nan])) == 1e-4
    assert _through(0.5, 1e-4, Row("x", "y", (1,), max_diff=float("inf")), probs) == 1e-4
