"""`run` on hand-edited manifests: one line naming the op and the field, exit status 2,
no traceback, and nothing allocated or computed first (runtime.checks checks the whole
plan before the first op runs).

Every case edits the plan of the built-in example (MobileNet-SSD, 107 ops) converted
once for the module.
"""
from __future__ import annotations

import json
import re
import shutil
import tracemalloc

import pytest

from caffe2metal.cli import main
from caffe2metal.examples import build
from caffe2metal.pipeline import convert
from caffe2metal.runtime import checks

ERROR = re.compile(r"caffe2metal: error: op '(?P<op>[^']*)': (?P<field>[^:]+): \S")
PEAK = 24 << 20      # bytes: the manifest parsed and checked; the run itself needs ~100 MB


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    d = tmp_path_factory.mktemp("example")
    proto, weights = build(d / "src")
    return convert(proto, weights, d / "out").out


def _op(m: dict, name: str) -> dict:
    return next(op for op in m["plan"] if op["name"] == name)


def _entry(m: dict, name: str) -> dict:
    return next(e for e in m["layers"] if e["name"] == name)


def _missing_file(m, out):
    (out / _entry(m, "conv1")["weights"]["file"]).unlink()


def _short_file(m, out):
    path = out / _entry(m, "conv1")["bias"]["file"]
    path.write_bytes(path.read_bytes()[:-4])


def _shapes_disagree(m, out):          # conv1/dw reads conv0/relu's top as 8 x 151 x 150
    _op(m, "conv1/dw")["shapes"]["conv0#3"] = [1, 8, 151, 150]


def _offset_out_of_range(m, out):
    _op(m, "conv1")["mps"]["offset"]["x"] = -10**9


def _cycle(m, out):                     # conv1/dw and conv0/relu swapped: each needs the other
    p = m["plan"]
    p[1], p[2] = p[2], p[1]


def _read_before_written(m, out):      # conv1 reads a blob an op writes much later
    _op(m, "conv1")["bottoms"] = ["conv5#3"]


def _absurd_shape(m, out):
    _op(m, "conv0/relu")["shapes"]["conv0#3"] = [1, 8, 2**20, 2**20]


def _negative_dim(m, out):
    _op(m, "conv0")["shapes"]["conv0#2"] = [1, 8, -150, 150]


def _non_int_dim(m, out):
    _op(m, "conv0")["shapes"]["conv0#2"] = [1, 8, "150", 150]


def _absurd_dilation(m, out):          # a padded source of 2e9 x 150 pixels
    _op(m, "conv1/dw")["mps"]["dilation"]["y"] = 10**9


def _absurd_destination(m, out):
    _op(m, "conv0")["mps"]["destination"]["height"] = 2**40


def _non_dict_op(m, out):
    m["plan"][3] = ["conv1/dw/relu"]


def _unknown_kernel(m, out):
    _op(m, "conv0/relu")["mps"]["kernel"] = "MPSCNNTeleport"


def _duplicate_top(m, out):            # conv1/dw/relu writes conv0/relu's top again
    _op(m, "conv1/dw/relu")["tops"] = ["conv0#3"]


def _kernel_not_weights(m, out):
    _op(m, "conv1")["mps"]["kernelSize"] = {"x": 3, "y": 3}


def _as_caffe(op: dict, caffe_type: str, params: dict) -> None:
    op.pop("mps", None)
    op["app"] = {"op": caffe_type.lower(), "caffe_type": caffe_type, "params": params}


def _huge_tile(m, out):                # a 2^40-fold copy of conv0's output
    _as_caffe(_op(m, "conv0/relu"), "Tile", {"tile_param": {"axis": 1, "tiles": 2**40}})


def _argmax_top_k(m, out):
    _as_caffe(_op(m, "conv0/relu"), "ArgMax", {"argmax_param": {"axis": 1, "top_k": 9}})


def _crop_outside(m, out):             # crop conv0 to conv1/dw's size, 5 rows down: outside
    op = _op(m, "conv0/relu")
    op["bottoms"] = ["conv0#2", "conv0#2"]
    _as_caffe(op, "Crop", {"crop_param": {"axis": 2, "offset": 5}})


def _priors_absurd(m, out):            # 361 cells x 5000 sizes x 41 ratios: 7.4e7 priors
    op = next(o for o in m["plan"] if o.get("type") == "PriorBox")
    _as_caffe(op, "PriorBox", {"prior_box_param": {
        "min_size": [1.0] * 5000, "aspect_ratio": [float(r) for r in range(2, 22)]}})


def _unavailable_without_reason(m, out):
    _op(m, "conv0/relu")["app"] = {"op": "unavailable", "reason": 7}
    _op(m, "conv0/relu").pop("mps", None)


def _weights_escape(m, out):
    _entry(m, "conv1")["weights"]["file"] = "../../../etc/passwd"


CASES = {
    # name: (edit, op, field)
    "missing_weights_file": (_missing_file, "conv1", "weights.file"),
    "short_bias_file": (_short_file, "conv1", "bias.file"),
    "weights_file_leaves_out": (_weights_escape, "conv1", "weights.file"),
    "bottom_shape_disagrees_with_producer": (_shapes_disagree, "conv1/dw", "shapes.conv0#3"),
    "offset_out_of_range": (_offset_out_of_range, "conv1", "mps.offset.x"),
    "kernel_size_not_the_weights": (_kernel_not_weights, "conv1", "mps.kernelSize"),
    "cycle": (_cycle, "conv1/dw", "bottoms"),
    "read_before_written": (_read_before_written, "conv1", "bottoms"),
    "absurd_shape": (_absurd_shape, "conv0/relu", "shapes.conv0#3"),
    "negative_dim": (_negative_dim, "conv0", "shapes.conv0#2"),
    "non_int_dim": (_non_int_dim, "conv0", "shapes.conv0#2"),
    "absurd_dilation": (_absurd_dilation, "conv1/dw", "mps.dilation.y"),
    "absurd_destination": (_absurd_destination, "conv0", "mps.destination"),
    "non_dict_op": (_non_dict_op, "#3", "name"),
    "unknown_kernel": (_unknown_kernel, "conv0/relu", "mps.kernel"),
    "duplicate_top": (_duplicate_top, "conv1/dw/relu", "tops"),
    "huge_tile": (_huge_tile, "conv0/relu", "shapes.conv0#3"),
    "argmax_top_k_beyond_the_axis": (_argmax_top_k, "conv0/relu", "app.params"),
    "crop_outside_the_input": (_crop_outside, "conv0/relu", "app.params"),
    "absurd_prior_count": (_priors_absurd, "conv8_mbox_priorbox", "app.params"),
    "unavailable_without_a_reason": (_unavailable_without_reason, "conv0/relu", "app.reason"),
}


def _hostile(example, tmp_path, edit) -> str:
    out = tmp_path / "out"
    shutil.copytree(example, out)
    m = json.loads((out / "manifest.json").read_text())
    edit(m, out)
    (out / "manifest.json").write_text(json.dumps(m))
    return str(out)


def _run(out: str, capsys) -> tuple[int, str, int]:
    capsys.readouterr()
    tracemalloc.start()
    try:
        status = main(["run", out])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    captured = capsys.readouterr()
    assert captured.out == ""
    return status, captured.err, peak


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_hostile_manifest_is_one_line_naming_op_and_field(example, tmp_path, capsys, case):
    edit, op, field = CASES[case]
    status, err, peak = _run(_hostile(example, tmp_path, edit), capsys)
    assert status == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    found = ERROR.match(err)
    assert found, err
    assert (found["op"], found["field"]) == (op, field), err
    assert peak < PEAK, f"{peak} bytes allocated before the refusal"


def test_too_many_ops(example, tmp_path, capsys):
    """More than MAX_OPS ops: refused by count, before any op is looked at."""
    def edit(m, out):
        m["plan"] = m["plan"] + [{}] * (checks.MAX_OPS + 1 - len(m["plan"]))
    out = _hostile(example, tmp_path, edit)
    status, err, _ = _run(out, capsys)
    assert status == 2
    assert err.count("\n") == 1 and f"plan: {checks.MAX_OPS + 1} ops, more than" in err, err


def test_unedited_example_runs(example, capsys):
    """The checks refuse none of the real plan's ops."""
    assert main(["run", str(example), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["detections"]
