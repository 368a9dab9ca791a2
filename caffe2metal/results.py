"""The results of the Python API (``caffe2metal.api``): frozen dataclasses whose
``render()`` is exactly what the matching command prints.

The records inside are the pipeline's own: ``caffe2metal.fold.Fold`` and ``Kept``
(the fold plan), ``caffe2metal.verification.Report`` and ``Row`` (a verification),
``caffe2metal.verification.Comparison`` and ``ComparisonRow`` (a comparison).  The
modules that render them are imported when ``render()`` is called, so importing
this module stays cheap.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .fold import Fold, Kept
    from .verification import Comparison, ComparisonRow, Report, Row

PathLike = str | os.PathLike

__all__ = ["Conversion", "DirectoryComparison", "Example", "Inspection", "Run", "Skipped",
           "Verification", "cannot_verify"]


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
    dropped: list[dict] = dataclasses.field(default_factory=list)  # train/test net: {name,
                                      # type, reason} of the layers a deploy net does not have
    missing_inputs: list[str] = dataclasses.field(default_factory=list)  # why shapes are unknown

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
    plan: list[Row] = dataclasses.field(default_factory=list)   # the plan run from OUT
                                      # (numpy MPS model) vs the original, per net output

    @property
    def rows(self) -> list[Row]:
        return self.layers + self.outputs + self.plan

    @property
    def failures(self) -> list[Row]:
        return self.report.failures

    @property
    def unchecked(self) -> list[str]:
        """What verify could not hold to a tolerance: rows shown but not counted, and
        what the report lists as skipped.  Empty for a complete verification."""
        names = [r.name for r in self.rows if not r.counted and not r.informational]
        for s in getattr(self.report, "skipped", None) or []:   # (check, why) pairs
            name = str(s[0] if isinstance(s, tuple) else s)
            if name not in names:
                names.append(name)
        return names

    @property
    def complete(self) -> bool:
        """Every layer and output was checked against its tolerance."""
        return not self.unchecked

    def verdict(self) -> str:
        """The one line that ends ``convert --verify``: the outcome (``verify: PASS``,
        ``verify: FAIL (...)``, ``verify: INCOMPLETE (...)``)."""
        if not self.ok:
            names = ", ".join(r.name for r in self.failures[:3])
            more = " ..." if len(self.failures) > 3 else ""
            return f"verify: FAIL ({len(self.failures)} above tolerance: {names}{more})"
        worst = f", worst rel {self.worst.rel:.3g}" if self.worst is not None else ""
        if not self.complete:
            return (f"verify: INCOMPLETE (everything checked passed{worst}; "
                    f"{len(self.unchecked)} not checked: {', '.join(self.unchecked[:3])}"
                    f"{' ...' if len(self.unchecked) > 3 else ''})")
        return "verify: PASS"

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
    verification_error: str | None = None        # verify=True, but it could not run: why
    dropped: list[dict] = dataclasses.field(default_factory=list)  # train/test net: layers cut
    types: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)  # of folded
                                      # and kept layers: BatchNorm chains vs other Scale layers

    @property
    def ok(self) -> bool:
        """False only when a verification ran and failed."""
        return self.verification is None or self.verification.ok

    def render(self) -> str:
        """What ``caffe2metal convert`` (with ``--verify``) prints; with a verification,
        the last line is its outcome (:meth:`verdict`)."""
        from .pipeline import render
        text = render(self.prototxt, self.out, self.manifest, dropped=self.dropped,
                      types=self.types)
        if self.verification is not None:
            return f"{text}\n\n{self.verification.render()}\n{self.verdict()}"
        if self.verification_error is not None:
            return f"{text}\n{self.verdict()}"
        return text

    def verdict(self) -> str | None:
        """The outcome of the verification as one line (None: none was asked for)."""
        if self.verification is not None:
            return self.verification.verdict()
        if self.verification_error is not None:
            return cannot_verify(self.verification_error, self.out)
        return None


def cannot_verify(reason: str, out: PathLike) -> str:
    """The last line of ``convert --verify`` when the verification could not run."""
    return f"verify: could not run: {reason} (the conversion in {out} is complete)"


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

@dataclass(frozen=True)
class Run:
    """The plan of OUT executed (``caffe2metal.runtime``) in numpy or MLX: net outputs by blob
    name, and SSD's detections."""
    out: Path
    outputs: dict
    detections: list
    activations: str = "float32"
    input: str = ""                   # what was fed (an image: how it was preprocessed)
    backend: str = "numpy"
    device: str = "cpu"
    skipped: dict = field(default_factory=dict)
    """Ops not run (name -> why): an op convert marked ``unavailable`` and what reads it."""
    overflow: dict = field(default_factory=dict)
    """float16 activations: MPS ops whose output exceeds 65504 (name -> max |value|)."""

    @property
    def complete(self) -> bool:
        return not self.skipped

    def render(self) -> str:
        where = "numpy" if self.backend == "numpy" else f"{self.backend} ({self.device})"
        lines = [f"{self.out}: plan run in {where} (activations {self.activations})"]
        if self.input:
            lines.append(f"  input: {self.input}")
        for name, v in self.outputs.items():
            flat = v.reshape(-1)
            head = ", ".join(f"{x:.6g}" for x in flat[:6])
            lines.append(f"  {name} {list(v.shape)}: [{head}{', ...' if flat.size > 6 else ''}]")
        if self.detections:
            lines.append(f"  {len(self.detections)} detection(s):")
            lines.extend(f"    label {d['label']} score {d['score']:.4f} box "
                         f"[{', '.join(f'{b:.4f}' for b in d['box'])}]" for d in self.detections)
        if self.overflow:
            worst = max(self.overflow, key=lambda n: self.overflow[n])
            lines.append(f"  float16 overflow: {len(self.overflow)} MPS op(s) compute values "
                         f"beyond float16's 65504 (inf in a float16 MPSImage), the first "
                         f"{next(iter(self.overflow))!r}, the largest {worst!r} "
                         f"({self.overflow[worst]:.3g})")
        if self.skipped:
            lines.append(f"  not run: {len(self.skipped)} op(s), so their outputs are absent:")
            lines.extend(f"    {name}: {why}" for name, why in self.skipped.items())
        return "\n".join(lines)

    def to_json(self) -> str:
        import json
        return json.dumps({"outputs": {n: {"shape": list(v.shape), "data": v.reshape(-1).tolist()}
                                       for n, v in self.outputs.items()},
                           "detections": self.detections,
                           "skipped": [{"op": n, "reason": w} for n, w in self.skipped.items()],
                           "float16_overflow": [{"op": n, "max_abs": v}
                                                for n, v in self.overflow.items()]})
