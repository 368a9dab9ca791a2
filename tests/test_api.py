"""The Python API (caffe2metal.api): typed results, render() == what the CLI prints,
the README example runs, and `import caffe2metal` stays cheap."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

import caffe2metal
from caffe2metal import cli
from caffe2metal.fold import Fold, Kept
from caffe2metal.verification import Comparison, Report, Row

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return caffe2metal.example(tmp_path_factory.mktemp("example"))


@pytest.fixture(scope="module")
def converted(built, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "out"
    return caffe2metal.convert(built.prototxt, out=out, verify=True)


def _cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    status = cli.main([str(a) for a in argv])
    return status, capsys.readouterr().out


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert match, "no ```python block in README's '## Python API' section"
    return match.group(1)


# ---------------------------------------------------------------- the README example

def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "folded conv0/bn + conv0/scale into conv0" in out
    assert re.search(r"^worst rel \S+ \(.+\): PASS$", out, re.M), out


# ---------------------------------------------------------------- typed results

def test_example(built, capsys, tmp_path):
    assert isinstance(built, caffe2metal.Example)
    assert built.prototxt.is_file() and built.caffemodel.is_file()
    status, out = _cli(capsys, "example", built.prototxt.parent)
    assert (status, out) == (0, built.render() + "\n")


def test_inspect_is_typed_and_the_cli_prints_its_render(built, capsys):
    info = caffe2metal.inspect(built.prototxt, built.caffemodel)
    assert isinstance(info, caffe2metal.Inspection)
    assert info.weights_loaded and info.caffemodel == str(built.caffemodel)
    assert info.layer_count == len(info.info["layers"]) > 0
    assert info.parameter_values > 0 and info.format == "modern"
    assert list(info.inputs) == ["data"] and info.outputs == ["detection_out"]
    assert info.folded and all(isinstance(f, Fold) for f in info.folded)
    assert all(isinstance(k, Kept) for k in info.kept)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "x"  # type: ignore[misc]
    status, out = _cli(capsys, "inspect", built.prototxt, built.caffemodel)
    assert (status, out) == (0, info.render() + "\n")
    status, out = _cli(capsys, "inspect", built.prototxt, built.caffemodel, "--json")
    assert (status, out) == (0, info.to_json() + "\n")
    # without weights: the counts the prototxt implies
    bare = caffe2metal.inspect(built.prototxt)
    assert bare.caffemodel is None and not bare.weights_loaded


def test_convert_is_typed(converted):
    assert isinstance(converted, caffe2metal.Conversion)
    out = converted.out
    names = {p.relative_to(out).as_posix() for p in converted.files}
    assert {"manifest.json", "mobilenet_ssd_example_merged.prototxt",
            "mobilenet_ssd_example_merged.caffemodel", "metal/weights_conv0.dat"} <= names
    assert names == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert len(converted.folded) == len(converted.manifest["folds"]) == 29
    assert all(isinstance(f, Fold) for f in converted.folded)
    assert converted.kept == [] and converted.skipped == []
    assert converted.manifest["format"] == "caffe2metal"
    check = converted.verification
    assert isinstance(check, caffe2metal.Verification) and check.ok and converted.ok
    assert isinstance(check.report, Report) and all(isinstance(r, Row) for r in check.rows)
    assert check.worst is max((r for r in check.rows if r.counted), key=lambda r: r.rel)
    assert f"worst rel {check.worst.rel:.3g} ({check.worst.name})" in check.render()


def test_the_cli_prints_the_render_of_convert(converted, capsys):
    # the same OUT again (convert replaces it): the same paths, so the same text
    status, out = _cli(capsys, "convert", converted.prototxt, "-o", converted.out, "--verify")
    assert (status, out) == (0, converted.render() + "\n")
    again = caffe2metal.convert(converted.prototxt, out=converted.out, metal=False)
    assert again.verification is None and again.manifest["layers"] == []
    status, out = _cli(capsys, "convert", converted.prototxt, "-o", converted.out, "--no-metal")
    assert (status, out) == (0, again.render() + "\n")


def test_verify_and_compare(built, tmp_path, capsys):
    a = caffe2metal.convert(built.prototxt, built.caffemodel, tmp_path / "a")
    b = caffe2metal.convert(built.prototxt, None, tmp_path / "b", dtype="float16",
                            naming="forge")
    check = caffe2metal.verify(built.prototxt, None, b.out, seed=1)
    assert isinstance(check, caffe2metal.Verification) and check.ok
    assert check.rows == check.report.rows and not check.failures
    status, out = _cli(capsys, "verify", built.prototxt, b.out, "--seed", "1")
    assert (status, out) == (0, check.render() + "\n")

    c = caffe2metal.compare(a.out, b.out)
    assert isinstance(c, caffe2metal.DirectoryComparison)
    assert isinstance(c.comparison, Comparison)
    assert c.comparison.only_a and c.comparison.only_b   # apple vs forge file names
    assert [r.file for r in c.comparison.rows] == ["priors.dat"]   # the one name in common
    assert c.largest == 0 and c.above(0.0) == []
    same = caffe2metal.compare(a.out, a.out)
    assert same.largest == 0 and same.above(0.0) == []
    status, out = _cli(capsys, "compare", a.out, a.out, "--atol", "0")
    assert (status, out) == (0, same.render() + "\n")


def test_run_and_verify_with_float16_activations(built, tmp_path, capsys):
    a = caffe2metal.convert(built.prototxt, built.caffemodel, tmp_path / "a")
    ran = caffe2metal.run(a.out)
    assert isinstance(ran, caffe2metal.Run) and ran.outputs
    status, out = _cli(capsys, "run", a.out)
    assert (status, out) == (0, ran.render() + "\n")
    on_mlx = caffe2metal.run(a.out, backend="mlx", device="cpu")
    assert on_mlx.backend == "mlx" and on_mlx.outputs.keys() == ran.outputs.keys()
    half = caffe2metal.run(a.out, activations="float16")
    assert half.activations == "float16" and half.outputs.keys() == ran.outputs.keys()

    check = caffe2metal.verify(built.prototxt, None, a.out, activations="float16")
    assert check.ok and check.report.plan_activations == "float16"
    values = [r for r in check.plan if r.counted]
    assert values and all(r.tolerance >= 0.2 and 1e-5 < r.rel < 0.1 for r in values)
    assert "numpy MPS model, float16 activations" in check.render()
    status, out = _cli(capsys, "verify", built.prototxt, a.out, "--activations", "float16")
    assert (status, out) == (0, check.render() + "\n")
    with pytest.raises(caffe2metal.Caffe2MetalError, match="--activations 'float64'"):
        caffe2metal.verify(built.prototxt, None, a.out, activations="float64")


# ---------------------------------------------------------------- errors

def test_errors_are_caffe2metal_errors(tmp_path, built):
    assert issubclass(caffe2metal.ModelFormatError, caffe2metal.Caffe2MetalError)
    with pytest.raises(caffe2metal.ModelFormatError, match="no such file"):
        caffe2metal.convert(tmp_path / "missing.prototxt")
    with pytest.raises(caffe2metal.ModelFormatError):
        caffe2metal.inspect(tmp_path / "missing.prototxt")
    with pytest.raises(caffe2metal.ExportError, match="dtype"):
        caffe2metal.convert(built.prototxt, out=tmp_path / "o", dtype="float64")
    with pytest.raises(caffe2metal.ExportError, match="naming"):
        caffe2metal.convert(built.prototxt, out=tmp_path / "o", naming="keras")
    assert not (tmp_path / "o").exists()
    with pytest.raises(caffe2metal.Caffe2MetalError, match="is not a directory"):
        caffe2metal.compare(tmp_path / "nope", tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(caffe2metal.ExportError, match="cannot write the example"):
        caffe2metal.example(tmp_path / "file" / "sub")


# ---------------------------------------------------------------- the package

def test_api_functions_are_plain_functions_beside_their_subpackages():
    import inspect
    import types
    for name in ("inspect", "convert", "verify", "run", "compare", "example"):
        assert isinstance(getattr(caffe2metal, name), types.FunctionType), name
    assert list(inspect.signature(caffe2metal.convert).parameters)[:3] == \
        ["prototxt", "caffemodel", "out"]
    assert "float16" in caffe2metal.convert.__doc__
    import importlib
    for sub in ("examples", "pipeline", "verification"):
        importlib.import_module(f"caffe2metal.{sub}")
    assert isinstance(caffe2metal.convert, types.FunctionType)    # importing did not rebind it
    assert importlib.import_module("caffe2metal.verification").Report is Report


def test_import_is_cheap():
    code = ("import sys, caffe2metal\n"
            "heavy = [m for m in ('numpy', 'cv2', 'tqdm', 'caffe2metal.api',"
            " 'caffe2metal.verification', 'caffe2metal.pipeline', 'dataclasses')"
            " if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "caffe2metal.Conversion\n"
            "assert 'numpy' not in sys.modules\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "Command line: caffe2metal {inspect,convert,verify,compare,example}." in out
    assert "``" not in out
