"""The Python API: the five commands as functions that return typed results.

Each function takes paths and options like its command and returns a frozen
dataclass instead of printing; ``result.render()`` is exactly the text the
command prints.  Bad input raises a :class:`~caffe2metal.errors.Caffe2MetalError`
subclass (``ModelFormatError``, ``GraphError``, ``ExportError``), the errors
the command line reports with exit status 2.

The records inside the results are the pipeline's own: ``caffe2metal.fold.Fold``
and ``Kept`` (the fold plan), ``caffe2metal.verification.Report`` and ``Row`` (a
verification), ``caffe2metal.verification.Comparison`` and ``ComparisonRow`` (a comparison).

This module imports nothing heavy: every function imports the part of the
pipeline it runs when it is called (numpy, and OpenCV for ``verify``), so
``import caffe2metal`` and ``caffe2metal --help`` stay fast.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ExportError

if TYPE_CHECKING:
    from .fold import Fold, Kept
    from .verification import Comparison, ComparisonRow, Report, Row

PathLike = str | os.PathLike
DTYPES = ("float32", "float16")
NAMINGS = ("apple", "forge")

__all__ = ["Conversion", "DirectoryComparison", "Example", "Inspection", "Skipped",
           "Verification", "compare", "convert", "example", "inspect", "verify"]


# ---------------------------------------------------------------- results

@dataclass(frozen=True)
class Inspection:
    """A net as ``caffe2metal inspect`` shows it."""
    prototxt: str
    caffemodel: str | None            # None: shapes and counts implied by the prototxt
    name: str                         # the net's name
    format: str                       # "modern" or "V1" (upgraded while reading)
    inputs: dict[str, list]           # input blob -> shape
    outputs: list[str]                # the net's output blobs
    layer_count: int                  # TEST-phase layers
    parameter_values: int
    size_mb: float                    # parameter_values as float32, in MB
    weights_loaded: bool              # counts from the caffemodel (else implied by the prototxt)
    folded: list[Fold]                # the fold plan: chains that fold into a producer...
    kept: list[Kept]                  # ...and chains that stay, with the reason
    info: dict                        # everything above and per layer, as ``--json`` prints it

    def render(self) -> str:
        """The table ``caffe2metal inspect`` prints."""
        from .describe import render
        return render(self.info)

    def to_json(self) -> str:
        """What ``caffe2metal inspect --json`` prints."""
        from .describe import as_json
        return as_json(self.info)


@dataclass(frozen=True)
class Skipped:
    """A layer with weights that got no Metal file (manifest ``metal.skipped``)."""
    name: str
    type: str
    reason: str


@dataclass(frozen=True)
class Verification:
    """Every Metal layer recomputed from its files and every net output end to end
    (see ``caffe2metal.verification``); ``report`` is the full record."""
    report: Report
    layers: list[Row]                 # per Metal layer (and priors.dat)
    outputs: list[Row]                # per net output, original vs merged model
    ok: bool                          # every counted row within its tolerance
    worst: Row | None                 # the counted row with the largest rel

    @property
    def rows(self) -> list[Row]:
        return self.layers + self.outputs

    @property
    def failures(self) -> list[Row]:
        return self.report.failures

    def render(self) -> str:
        """The report ``caffe2metal verify`` prints."""
        from .verification import render
        return render(self.report)


@dataclass(frozen=True)
class Conversion:
    """What ``convert`` wrote into ``out`` (which it replaced as a whole)."""
    prototxt: str
    caffemodel: str                   # the weights read (the .caffemodel next to it by default)
    out: Path
    files: list[Path]                 # every file written, under out, sorted
    folded: list[Fold]                # BatchNorm/Scale chains folded into their producer
    kept: list[Kept]                  # chains that stay in the merged model, and why
    skipped: list[Skipped]            # layers with weights and no Metal file
    manifest: dict                    # OUT/manifest.json
    verification: Verification | None = None     # with verify=True

    @property
    def ok(self) -> bool:
        """False only when a verification ran and failed."""
        return self.verification is None or self.verification.ok

    def render(self) -> str:
        """What ``caffe2metal convert`` (with ``--verify``) prints."""
        from .pipeline import render
        text = render(self.prototxt, self.out, self.manifest)
        return text if self.verification is None else f"{text}\n\n{self.verification.render()}"


@dataclass(frozen=True)
class DirectoryComparison:
    """The weights/bias files of two output directories, compared by name."""
    dir_a: str
    dir_b: str
    comparison: Comparison            # rows: ComparisonRow(file, dtype_a, dtype_b, count,
                                      # max_a, max_diff, note); only_a, only_b: file names

    @property
    def largest(self) -> float | None:
        """The largest max |A-B| of the files both have (None: no comparable file)."""
        deltas = [r.max_diff for r in self.comparison.rows if r.max_diff is not None]
        return max(deltas, default=None)

    def above(self, atol: float) -> list[ComparisonRow]:
        """The rows that differ by more than ``atol``, or in size or readability."""
        return [r for r in self.comparison.rows if r.max_diff is None or r.max_diff > atol]

    def render(self) -> str:
        """The table ``caffe2metal compare`` prints."""
        from .verification import render_comparison
        return render_comparison(self.comparison, self.dir_a, self.dir_b)


@dataclass(frozen=True)
class Example:
    """The built-in MobileNet-SSD-style example model."""
    prototxt: Path
    caffemodel: Path

    def render(self) -> str:
        return f"wrote {self.prototxt} and {self.caffemodel}"


# ---------------------------------------------------------------- functions

def inspect(prototxt: PathLike, caffemodel: PathLike | None = None) -> Inspection:
    """Read a net (and its weights, when given): layers, shapes, counts and fold plan."""
    # imported when called: reader, fold and describe bring in numpy (0.10 s, -X importtime)
    from . import fold
    from .describe import describe
    from .net.reader import read_model
    model = read_model(prototxt, caffemodel)
    plan = fold.plan(model.graph)
    info = describe(model, plan)
    s = info["summary"]
    return Inspection(prototxt=info["prototxt"], caffemodel=info["caffemodel"],
                      name=info["name"], format=info["format"],
                      inputs={i["name"]: i["shape"] for i in info["inputs"]},
                      outputs=list(info["outputs"]), layer_count=s["layers"],
                      parameter_values=s["parameter_values"], size_mb=s["size_mb"],
                      weights_loaded=s["weights_loaded"],
                      folded=list(plan.folds), kept=list(plan.kept), info=info)


def convert(prototxt: PathLike, caffemodel: PathLike | None = None, out: PathLike | None = None,
            *, dtype: str = "float32", naming: str = "apple", metal: bool = True,
            verify: bool = False, progress: bool | None = None) -> Conversion:
    """Fold BatchNorm/Scale and write OUT: the merged Caffe model, the Metal weights
    (``metal=False``: none) and ``manifest.json``.

    ``caffemodel``: default the ``.caffemodel`` next to ``prototxt``; ``out``: default
    ``out/<prototxt stem>``.  ``dtype``: Metal weight precision, "float32" or
    "float16" (bias stays float32); ``naming``: "apple" (weights_<name>.dat) or
    "forge" (<name>_w.bin).  ``verify=True`` then runs :func:`verify` on OUT
    (``result.verification``; a failed verification is a result, not an error).
    ``progress``: force the stderr progress bar on or off (default: on for big
    models when stderr is a terminal).
    """
    if dtype not in DTYPES:
        raise ExportError(f"unknown weight dtype '{dtype}' (use float32 or float16)")
    if naming not in NAMINGS:
        raise ExportError(f"unknown naming '{naming}' (use one of {', '.join(NAMINGS)})")
    # imported when called: the pipeline brings in numpy (0.10 s, -X importtime); OpenCV
    # and tqdm only come with verify=True and the progress bar
    from .pipeline import convert as run
    done = run(prototxt, caffemodel, out, metal=metal, dtype=dtype, naming=naming,
               progress=progress)
    checked = _verify(prototxt, done.model.caffemodel, done.out) if verify else None
    metal_part = done.manifest.get("metal") or {}
    return Conversion(prototxt=done.model.prototxt, caffemodel=str(done.model.caffemodel),
                      out=done.out, files=_files(done.out),
                      folded=list(done.plan.folds), kept=list(done.plan.kept),
                      skipped=[Skipped(s["name"], s["type"], s["reason"])
                               for s in metal_part.get("skipped", [])],
                      manifest=done.manifest, verification=checked)


def verify(prototxt: PathLike, caffemodel: PathLike | None, out: PathLike, *,
           image: PathLike | None = None, seed: int = 0) -> Verification:
    """Recompute every Metal layer in OUT from its files and compare it with the
    original model in OpenCV, then the merged model's outputs with the original's.

    ``caffemodel``: None means the ``.caffemodel`` next to ``prototxt``.  ``image``:
    the input (resized, BGR, no mean subtraction); default a deterministic uniform
    [-1, 1) input drawn with ``seed``.
    """
    return _verify(prototxt, caffemodel, out, image=image, seed=seed)


def _verify(prototxt, caffemodel, out, *, image=None, seed=0) -> Verification:
    # imported when called: verify brings in numpy (0.15 s, -X importtime), and OpenCV
    # (0.08 s more) at its first forward pass
    from .pipeline import default_weights
    from .verification import verify as run
    report = run(prototxt, caffemodel or default_weights(prototxt), out, image=image, seed=seed)
    counted = [r for r in report.layers + report.outputs if r.counted and not math.isnan(r.rel)]
    return Verification(report=report, layers=list(report.layers), outputs=list(report.outputs),
                        ok=report.ok, worst=max(counted, key=lambda r: r.rel, default=None))


def compare(dir_a: PathLike, dir_b: PathLike) -> DirectoryComparison:
    """Max |A - B| of every weights/bias file the two output directories share
    (matched by name, in DIR or DIR/metal), and the files only one has."""
    # imported when called: verify's comparison brings in numpy (0.15 s, -X importtime)
    from .verification import compare as run
    return DirectoryComparison(str(dir_a), str(dir_b), run(dir_a, dir_b))


def example(directory: PathLike) -> Example:
    """Write the built-in example model: ``<directory>/mobilenet_ssd_example.prototxt``
    and its ``.caffemodel`` (deterministic; calibrating it runs OpenCV)."""
    # imported when called: building the weights brings in numpy (0.10 s, -X importtime),
    # and OpenCV (0.08 s more) to calibrate them
    from .examples import build
    try:
        proto, weights = build(Path(directory))
    except OSError as e:        # an unwritable DIRECTORY is bad input, not a crash
        raise ExportError(f"cannot write the example: {e.strerror or e}",
                          file=e.filename or directory) from None
    return Example(Path(proto), Path(weights))


def _files(out: Path) -> list[Path]:
    found = []
    for top, dirs, names in os.walk(out):
        dirs.sort()
        found += [Path(top) / n for n in names]
    return sorted(found)
