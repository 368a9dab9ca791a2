"""`caffe2metal run`: the plan executed from OUT alone against the original model in OpenCV."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from caffe2metal.cli import main
from caffe2metal.runtime import default_feed, load_plan, run_plan
from conftest import opencv_run

HEADS = ["mbox_loc", "mbox_conf_flatten"]


def _iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _same_box(a, b, coord_tol: float) -> bool:
    if _iou(a, b) >= 0.99:
        return True
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return coord_tol > 0 and float(np.abs(a - b).max()) <= coord_tol * float(np.abs(a).max())


def same_detections(mine: list[dict], rows: np.ndarray, score_tol: float = 1e-3,
                    coord_tol: float = 0.0) -> bool:
    """Detections as sets: every one matches one of the other (same label, score within
    ``score_tol``, IoU >= 0.99, or with ``coord_tol`` every coordinate within that fraction
    of the box's largest |coordinate|: a box 1e5 wide and 1e-5 high, decoded from synthetic
    weights' huge loc values, has an IoU that measures float32 rounding), and the counts
    agree."""
    theirs = [r for r in rows.reshape(-1, 7) if r[1] >= 0]
    if len(theirs) != len(mine):
        return False
    free = list(range(len(theirs)))
    for d in mine:
        hit = next((i for i in free if int(theirs[i][1]) == d["label"]
                    and abs(theirs[i][2] - d["score"]) <= score_tol
                    and _same_box(theirs[i][3:7], d["box"], coord_tol)), None)
        if hit is None:
            return False
        free.remove(hit)
    return True


@pytest.fixture(scope="module")
def example(example_outputs):
    return example_outputs


def _opencv(ex, out):
    feed = default_feed(load_plan(out))
    return opencv_run(ex.prototxt, ex.caffemodel, feed, HEADS + ["detection_out"])


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_example_float32_weights_matches_opencv_end_to_end(example):
    ex, outs = example
    *heads, rows = _opencv(ex, outs["float32"])
    r = run_plan(outs["float32"])
    for name, ref in zip(HEADS, heads, strict=True):
        assert _rel(r.values[name], ref) <= 1e-4, name          # measured 6.3e-6, 2.7e-5
    assert set(r.outputs) == {"detection_out"}
    assert same_detections(r.detections, rows)
    assert len(r.detections) > 0


def test_example_float16_weights_matches_opencv_end_to_end(example):
    """float16 weights (rounded to 11 significant bits each), measured against OpenCV on the
    float32 original: mbox_loc rel 1.6e-2, softmaxed mbox_conf 7.1e-2 (synthetic weights,
    random input, 30 layers deep); the bounds are those with ~1.5x headroom.  The detection
    sets are NOT identical (near-tied scores around keep_top_k), only their count is."""
    ex, outs = example
    *heads, rows = _opencv(ex, outs["float32"])
    r = run_plan(outs["float16"])
    for name, ref in zip(HEADS, heads, strict=True):
        assert _rel(r.values[name], ref) <= {"mbox_loc": 3e-2, "mbox_conf_flatten": 1e-1}[name]
    assert len(r.detections) == len([x for x in rows.reshape(-1, 7) if x[1] >= 0])


def test_activations_float16_rounds_every_mps_output(example):
    _, outs = example
    a = run_plan(outs["float32"])
    b = run_plan(outs["float32"], activations="float16")
    for name in HEADS:
        rel = _rel(b.values[name], a.values[name])
        assert 0 < rel <= 2e-2, (name, rel)              # measured 2.7e-3, 1.1e-2


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_float16_overflow_is_reported(example, backend):
    """An input 1e5 times verify's drives conv0 beyond float16's 65504: each MPS op that
    overflows is named with its largest value (inf in a float16 MPSImage)."""
    from caffe2metal.results import Run
    from caffe2metal.runtime import default_feed, load_plan
    _, outs = example
    feed = {k: v * 1e5 for k, v in default_feed(load_plan(outs["float32"])).items()}
    plain = run_plan(outs["float32"], feed, backend=backend)
    assert plain.overflow == {}                          # float32 activations: nothing to say
    r = run_plan(outs["float32"], feed, activations="float16", backend=backend)
    assert next(iter(r.overflow)) == "conv0"
    biggest = float(np.abs(plain.values["conv0#2"]).max())
    assert biggest > 65504 and r.overflow["conv0"] == pytest.approx(biggest, rel=1e-5)
    assert np.isinf(r.values["conv0#2"]).any() and not np.isinf(plain.values["conv0#2"]).any()
    text = Run(outs["float32"], r.outputs, r.detections, "float16", overflow=r.overflow).render()
    assert f"float16 overflow: {len(r.overflow)} MPS op(s) compute values beyond float16's " \
           "65504 (inf in a float16 MPSImage), the first 'conv0'" in text


def test_run_cli_prints_json_with_detections(example, capsys):
    _, outs = example
    assert main(["run", str(outs["float32"]), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["outputs"]["detection_out"]["shape"][-1] == 7
    d = doc["detections"][0]
    assert set(d) == {"label", "score", "box"} and len(d["box"]) == 4


@pytest.mark.parametrize("edit, field", [
    (lambda p: p[0].update(bottoms=["nowhere"]), "bottoms"),
    (lambda p: p[0]["mps"].update(offset={"x": "a", "y": 0}), "mps.offset.x"),
    (lambda p: p[0]["mps"].update(entry="ghost"), "mps.entry"),
    (lambda p: p[-1]["app"].update(op="teleport"), "app.op"),
    (lambda p: p[0].update(tops="x"), "tops"),
])
def test_hostile_plans_are_one_line_errors_naming_op_and_field(example, tmp_path, capsys,
                                                                edit, field):
    _, outs = example
    bad = tmp_path / "bad"
    shutil.copytree(outs["float32"], bad)
    m = json.loads((bad / "manifest.json").read_text())
    edit(m["plan"])
    (bad / "manifest.json").write_text(json.dumps(m))
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f": {field}:" in err and "op '" in err
