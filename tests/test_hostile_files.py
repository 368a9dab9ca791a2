"""Hostile files and file systems for every command (red-team findings 3-5).

FIFOs where files belong (never a hang), hostile manifests for `verify` and
`compare` (one error line naming the file and the field), file names that are
not UTF-8, `example` targets (links, files, failures), the umask, parents made
for OUT, signals during the final swap and an input truncated while it is read.
Every failure is one ``caffe2metal: error: ...`` line, exit status 2, nothing
half-written.
"""
from __future__ import annotations

import copy
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from caffe2metal import api, examples
from caffe2metal.caffe.caffemodel import read_caffemodel
from caffe2metal.errors import Caffe2MetalError, ExportError
from caffe2metal.export.output import is_output_directory
from caffe2metal.pipeline import convert
from caffe2metal.verification import compare as compare_dirs
from caffe2metal.verification.files import load_manifest, read_array
from tests.test_hostile import (
    ROOT,
    assert_one_error_line,
    chain_text,
    listing,
    run_cli,
    write_model,
)
from tools.fuzz import _time_limit

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file semantics")


@pytest.fixture
def good(tmp_path):
    return write_model(tmp_path / "in", chain_text())


@pytest.fixture
def converted(tmp_path, good):
    proto, weights = good
    out = tmp_path / "out"
    convert(proto, weights, out)
    return proto, weights, out


def cli_fails(*args, needles=(), seconds=20) -> str:
    with _time_limit(seconds):
        status, _, err = run_cli(*args)
    assert status == 2, (status, err)
    return assert_one_error_line(err, *needles)


# ---------------------------------------------------------------- FIFOs: never a hang

def _fifo(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def test_fifo_as_prototxt_or_caffemodel_is_refused(tmp_path, good):
    proto, weights = good
    fifo = _fifo(tmp_path / "pipe")
    cli_fails("convert", fifo, weights, "-o", tmp_path / "o", needles=(str(fifo), "FIFO"))
    cli_fails("convert", proto, fifo, "-o", tmp_path / "o", needles=(str(fifo), "FIFO"))
    cli_fails("inspect", fifo, needles=("FIFO",))
    assert not (tmp_path / "o").exists()


def test_fifo_as_an_earlier_manifest_is_no_earlier_output(tmp_path, good):
    proto, weights = good
    out = tmp_path / "out"
    out.mkdir()
    _fifo(out / "manifest.json")
    with _time_limit(10):
        assert not is_output_directory(out)
    cli_fails("convert", proto, weights, "-o", out, needles=("not an earlier caffe2metal",))


@pytest.mark.parametrize("which", ["manifest", "weights", "merged"])
def test_fifo_in_out_is_refused_by_verify(converted, which):
    proto, weights, out = converted
    m = json.loads((out / "manifest.json").read_text())
    target = {"manifest": out / "manifest.json",
              "weights": out / m["layers"][0]["weights"]["file"],
              "merged": out / m["merged"]["caffemodel"]}[which]
    _fifo(target)
    cli_fails("verify", proto, weights, out, needles=("FIFO",))


def test_fifo_in_out_is_refused_by_compare(converted, tmp_path):
    _, _, out = converted
    import shutil
    shutil.copytree(out, tmp_path / "b")
    _fifo(tmp_path / "b" / "manifest.json")
    cli_fails("compare", out, tmp_path / "b", needles=("FIFO",))
    shutil.rmtree(tmp_path / "b")
    shutil.copytree(out, tmp_path / "b")
    name = sorted((tmp_path / "b" / "metal").iterdir())[0]
    _fifo(name)           # not a regular file: not compared (only in A), never opened
    with _time_limit(10):
        status, text, _ = run_cli("compare", out, tmp_path / "b")
    assert status == 0 and name.name in text


# ---------------------------------------------------------------- hostile manifests

_EDITS = {
    "layers_object": lambda c: c.update(layers={"a": 1}),
    "entry_list": lambda c: c["layers"].__setitem__(0, [1, 2]),
    "entry_no_weights": lambda c: c["layers"][0].pop("weights"),
    "weights_string": lambda c: c["layers"][0].__setitem__("weights", "w.bin"),
    "shape_strings": lambda c: c["layers"][0]["weights"].__setitem__("shape", ["4"]),
    "shape_negative": lambda c: c["layers"][0]["weights"].__setitem__("shape", [-4, 3, 3, 3]),
    "shape_huge": lambda c: c["layers"][0]["weights"].__setitem__("shape", [10**6] * 4),
    "shape_bool": lambda c: c["layers"][0]["weights"].__setitem__("shape", [True, 3, 3, 3]),
    "shape_axes": lambda c: c["layers"][0]["weights"].__setitem__("shape", [4, 27]),
    "dtype": lambda c: c["layers"][0]["weights"].__setitem__("dtype", "int8"),
    "traversal": lambda c: c["layers"][0]["weights"].__setitem__("file", "../../etc/passwd"),
    "absolute": lambda c: c["layers"][0]["bias"].__setitem__("file", "/etc/passwd"),
    "kind": lambda c: c["layers"][0].__setitem__("kind", ["convolution"]),
    "stride_zero": lambda c: c["layers"][0].__setitem__("stride", [0, 0]),
    "pad_huge": lambda c: c["layers"][0].__setitem__("pad", [10**12, 1]),
    "groups_float": lambda c: c["layers"][0].__setitem__("groups", 1.5),
    "merged_traversal": lambda c: c["merged"].__setitem__("caffemodel", "../x"),
    "merged_missing": lambda c: c.pop("merged"),
    "metal_null": lambda c: c.__setitem__("metal", None),
    "skipped_strings": lambda c: c.__setitem__("metal", {"skipped": ["x"]}),
    "ssd_list": lambda c: c.__setitem__("ssd", [1]),
    "huge_number": lambda c: c["layers"][0].__setitem__("groups", 10**400),
}
DEEP = "[" * 100_000 + "]" * 100_000


def _hostile_text(m: dict, name: str) -> str:
    if name == "list_top":
        return json.dumps([m])
    if name == "deep":
        return json.dumps(m)[:-1] + ', "extra": ' + DEEP + "}"
    if name == "deep_layers":
        return json.dumps({k: v for k, v in m.items() if k != "layers"})[:-1] + \
            ', "layers": ' + DEEP + "}"
    c = copy.deepcopy(m)
    _EDITS[name](c)
    return json.dumps(c)


@pytest.mark.parametrize("name", sorted(_EDITS) + ["list_top", "deep", "deep_layers"])
def test_hostile_manifest_is_one_error_in_verify_and_compare(converted, tmp_path, name):
    proto, weights, out = converted
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(_hostile_text(m, name))
    before = listing(tmp_path)
    cli_fails("verify", proto, weights, out, needles=(str(out / "manifest.json"),))
    with _time_limit(20):
        status, _, err = run_cli("compare", out, out)
    assert status in (0, 2), err
    if status == 2:
        assert_one_error_line(err, "manifest.json")
    assert listing(tmp_path) == before


def test_manifest_errors_name_the_field(converted):
    proto, weights, out = converted
    m = json.loads((out / "manifest.json").read_text())
    m["layers"][0]["weights"]["shape"] = ["4"]
    (out / "manifest.json").write_text(json.dumps(m))
    cli_fails("verify", proto, weights, out, needles=("layers[0].weights.shape",))


def test_huge_manifest_is_refused_unread(converted):
    proto, weights, out = converted
    with open(out / "manifest.json", "r+b") as f:
        f.truncate(1 << 40)                  # sparse: a terabyte that takes no space
    cli_fails("verify", proto, weights, out, needles=("manifest", "bytes"))
    cli_fails("compare", out, out, needles=("manifest", "bytes"))


def test_weight_file_larger_than_its_shape_is_refused_before_reading(converted):
    _, _, out = converted
    m = load_manifest(out)
    spec = m["layers"][0]["weights"]
    with open(out / spec["file"], "r+b") as f:
        f.truncate(1 << 40)
    import tracemalloc
    tracemalloc.start()
    try:
        with pytest.raises(Caffe2MetalError, match="bytes; shape"):
            read_array(out, spec, "conv")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_weight_file_link_leaving_out_is_refused(converted, tmp_path):
    _, _, out = converted
    m = load_manifest(out)
    spec = m["layers"][0]["weights"]
    outside = tmp_path / "outside.bin"
    outside.write_bytes((out / spec["file"]).read_bytes())
    (out / spec["file"]).unlink()
    (out / spec["file"]).symlink_to(outside)
    with pytest.raises(Caffe2MetalError, match="outside the output directory"):
        read_array(out, spec, "conv")


# ---------------------------------------------------------------- compare and NaN

def test_nan_is_never_within_tolerance(tmp_path):
    for d, values in (("a", [1.0, np.nan, 3.0]), ("b", [1.0, 2.0, 3.0])):
        (tmp_path / d).mkdir()
        np.array(values, "<f4").tofile(tmp_path / d / "w.bin")
    c = api.compare(tmp_path / "a", tmp_path / "b")
    (row,) = c.comparison.rows
    assert row.max_diff == float("inf") and "NaN" in row.note
    assert c.above(1e30) == [row]
    same = api.compare(tmp_path / "a", tmp_path / "a")
    assert same.above(1e30), "NaN against NaN is no agreement either"
    assert "inf" in same.render()


def test_compare_reads_in_blocks(tmp_path, monkeypatch):
    mod = sys.modules["caffe2metal.verification.compare"]
    monkeypatch.setattr(mod, "_BLOCK", 3)
    a = np.arange(10, dtype="<f4")
    b = a.copy()
    b[8] += 0.5
    for d, v in (("a", a), ("b", b)):
        (tmp_path / d).mkdir()
        v.tofile(tmp_path / d / "w.dat")
    (row,) = compare_dirs(tmp_path / "a", tmp_path / "b").rows
    assert row.values == 10 and row.max_diff == pytest.approx(0.5) and row.max_a == 9


# ---------------------------------------------------------------- file names

def test_file_names_that_are_not_utf8_are_refused(tmp_path, good):
    proto, weights = good
    d = os.fsencode(tmp_path)
    bad_proto = d + b"/n\xff.prototxt"            # as the command line gets them: str with
    bad_weights = d + b"/n\xff.caffemodel"        # surrogate escapes (os.fsdecode)
    with open(bad_proto, "wb") as f:
        f.write(proto.read_bytes())
    with open(bad_weights, "wb") as f:
        f.write(weights.read_bytes())
    out = tmp_path / "o"
    for args in ((os.fsdecode(bad_proto), weights), (proto, os.fsdecode(bad_weights))):
        with pytest.raises(Caffe2MetalError, match="not valid UTF-8"):
            convert(args[0], args[1], out)
        cli_fails("convert", os.fsdecode(args[0]), os.fsdecode(args[1]), "-o", out,
                  needles=("not valid UTF-8",))
    assert not out.exists()
    # a UTF-8 name that is not ASCII is fine, and the manifest stays valid UTF-8 JSON
    ok_proto = tmp_path / "né.prototxt"
    ok_proto.write_bytes(proto.read_bytes())
    convert(ok_proto, weights, out)
    raw = (out / "manifest.json").read_bytes()
    raw.decode("utf-8")
    json.loads(raw)


# ---------------------------------------------------------------- example

def test_example_never_writes_through_a_planted_link(tmp_path):
    d = tmp_path / "ex"
    d.mkdir()
    (d / "mine.txt").write_text("keep")
    victim = tmp_path / "victim"
    victim.write_text("secret")
    (d / f"{examples.STEM}.prototxt").symlink_to(victim)
    (d / f"{examples.STEM}.caffemodel").symlink_to(tmp_path / "nowhere")
    status, _, err = run_cli("example", d)
    assert status == 0, err
    assert victim.read_text() == "secret"
    assert not (tmp_path / "nowhere").exists()
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted([f"{examples.STEM}.caffemodel", f"{examples.STEM}.prototxt",
                            "mine.txt"])
    assert not any(p.is_symlink() for p in d.iterdir())
    assert read_caffemodel(d / f"{examples.STEM}.caffemodel")


def test_example_target_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    cli_fails("example", tmp_path / "f", needles=(str(tmp_path / "f"), "not a directory"))
    cli_fails("example", tmp_path / "f" / "sub", needles=("cannot write the example",))
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("existing", [False, True])
def test_example_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch, existing):
    import caffe2metal.export.caffe as export_caffe

    def full(path, *a, **k):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(export_caffe, "write_merged_caffemodel", full)
    d = tmp_path / "a" / "b" / "ex"
    if existing:
        d.mkdir(parents=True)
        (d / "mine.txt").write_text("keep")
    before = listing(tmp_path)
    line = cli_fails("example", d, needles=("No space left", str(d)))
    assert ".partial-" not in line and ".tmp" not in line
    assert listing(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_example_into_a_read_only_directory(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        cli_fails("example", d, needles=("Permission denied",))
        assert list(d.iterdir()) == []
    finally:
        d.chmod(0o755)


# ---------------------------------------------------------------- OUT and its parents

def test_failed_convert_removes_the_parents_it_made(tmp_path, good):
    proto, _ = good
    _, nan = write_model(tmp_path / "nan", chain_text(),
                         lambda n, b: b[0].reshape(-1).__setitem__(0, np.nan) if n == "fc" else 0)
    before = listing(tmp_path)
    cli_fails("convert", proto, nan, "-o", tmp_path / "x" / "y" / "out", needles=("fc",))
    assert listing(tmp_path) == before


def test_errors_name_out_not_the_staging_directory(tmp_path, good, monkeypatch):
    import caffe2metal.pipeline as pipe
    proto, weights = good
    out = tmp_path / "out"

    def refuse(path, text):
        raise ExportError(f"{path} already exists", file=path)
    monkeypatch.setattr(pipe, "write_prototxt", refuse)
    line = cli_fails("convert", proto, weights, "-o", out)
    assert ".partial-" not in line and str(out / "net_merged.prototxt") in line

    def oserror(path, text):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
    monkeypatch.setattr(pipe, "write_prototxt", oserror)
    line = cli_fails("convert", proto, weights, "-o", out)
    assert ".partial-" not in line and str(out / "net_merged.prototxt") in line


@pytest.mark.parametrize("mask", [0o077, 0o777])
def test_restrictive_umask(tmp_path, good, mask):
    proto, weights = good
    old = os.umask(mask)
    try:
        convert(proto, weights, tmp_path / "out")
        convert(proto, weights, tmp_path / "out")          # replaces its own output
        _, nan = write_model(tmp_path / "nan", chain_text(),
                             lambda n, b: b[0].reshape(-1).__setitem__(0, np.nan)
                             if n == "fc" else 0)
        with pytest.raises(Caffe2MetalError):
            convert(proto, nan, tmp_path / "out2")
        examples.build(tmp_path / "ex")
    finally:
        os.umask(old)
    assert os.umask(old) == old
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ex", "in", "nan", "out"], names
    assert (tmp_path / "out").stat().st_mode & 0o700 == 0o700
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["format"] == "caffe2metal"


# ---------------------------------------------------------------- signals, truncation

def _script(body: str, *argv) -> list[str]:
    return [sys.executable, "-c", body, *map(str, argv)]


_SLOW_SWAP = """import sys, time, runpy
import caffe2metal.export.output as o
orig = o._swap_in
flag = sys.argv[4]
def slow(*a, **k):
    open(flag, "w").close()
    time.sleep(1.5)
    orig(*a, **k)
o._swap_in = slow
sys.argv = ['caffe2metal', 'convert', sys.argv[1], sys.argv[2], '-o', sys.argv[3]]
runpy.run_module('caffe2metal', run_name='__main__')
"""


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("signals", [(signal.SIGINT, signal.SIGINT),
                                     (signal.SIGINT, signal.SIGTERM)])
def test_second_signal_during_the_swap(tmp_path, good, existing, signals):
    """Signals during the swap wait for it; then the run ends interrupted (never 0),
    and OUT is a complete tree (the new one: the swap had begun)."""
    proto, weights = good
    out = tmp_path / "out"
    if existing:
        convert(proto, weights, out)
    flag = tmp_path / "swapping"
    proc = subprocess.Popen(_script(_SLOW_SWAP, proto, weights, out, flag),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.2)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (130, 143), err
    assert b"Traceback" not in err
    assert (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out", "swapping"]


_TRUNCATE = """import os, sys, runpy
import caffe2metal.pipeline as p
orig = p.read_model
def read_then_truncate(*a, **k):
    m = orig(*a, **k)
    os.truncate(sys.argv[2], 10)            # the caffemodel, while the conversion runs
    return m
p.read_model = read_then_truncate
sys.argv = ['caffe2metal', 'convert', sys.argv[1], sys.argv[2], '-o', sys.argv[3]]
runpy.run_module('caffe2metal', run_name='__main__')
"""


def test_caffemodel_truncated_during_the_conversion(tmp_path, good):
    """No SIGBUS: the caffemodel was read into memory, the conversion is what it read."""
    proto, weights = good
    out = tmp_path / "out"
    r = subprocess.run(_script(_TRUNCATE, proto, weights, out), capture_output=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode in (0, 2), (r.returncode, r.stderr)
    assert b"Traceback" not in r.stderr
    if r.returncode == 0:
        assert (out / "manifest.json").is_file()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == (["in", "out"] if r.returncode == 0 else ["in"]), names


@pytest.mark.parametrize("edit", ["priorbox_concat", "heads"])
def test_manifest_naming_a_layer_the_model_lacks_is_one_error(tmp_path, edit):
    """An SSD manifest whose priors Concat or a head's PriorBox is not in the model."""
    from caffe2metal.examples import build
    proto, weights = build(tmp_path / "ex")
    out = tmp_path / "out"
    convert(proto, weights, out)
    manifest = json.loads((out / "manifest.json").read_text())
    if edit == "priorbox_concat":
        manifest["ssd"]["priorbox_concat"] = "no_such_layer"
    else:
        manifest["ssd"]["heads"][0]["priorbox"] = "no_such_layer"
    (out / "manifest.json").write_text(json.dumps(manifest))
    cli_fails("verify", proto, weights, out,
              needles=("manifest.json", "names layer 'no_such_layer'", "does not have"))
