"""`caffe2metal convert`: read -> fold -> write merged Caffe model (+ Metal) -> manifest.

The pipeline, in order:
1. ``reader.read_model``      prototxt + caffemodel -> Graph (TEST phase), blobs checked
2. ``fold.plan``              which BatchNorm/Scale chains fold into which producer, and why not
3. ``fold.apply(lazy=True)``  the folded Graph; folded weights are ``FoldedWeights``
                              (float64 arithmetic, float32 blobs), computed as written
4. ``write_caffe``            merged prototxt (edits of the user's text) + merged caffemodel,
                              folded 2 MiB at a time; ``metal.stream_folded`` writes the Metal
                              files of folded layers from the same blocks
5. ``metal`` (optional)       the other .dat weights in MPS layout + manifest layer entries
6. ``manifest.json``          the contract for everything written, with the image
                              preprocessing (``export.preprocessing``)
Everything is written to a sibling of OUT that replaces OUT only on success.  For
caffemodels of 16 MiB and more, file writes and sha256 run on two more threads
(``writeback.WriteBehind``) while the main thread folds and lays out the next block:
memory holds the memory-mapped source plus at most 64 MiB in flight.

Conversions of big models (a caffemodel of 64 MiB or more) show a progress bar
on stderr when stderr is a terminal, and are quiet otherwise; tqdm is imported
only then.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import fold
from .errors import ExportError, ModelFormatError
from .export import preprocessing
from .export.caffe import merged_prototxt, write_merged_caffemodel, write_prototxt
from .export.output import atomic_directory
from .export.writeback import WriteBehind
from .net.reader import InputShapes, Model, read_model

FORMAT, VERSION = "caffe2metal", 2
PROGRESS_MIN_BYTES = 64 << 20          # smaller caffemodels convert in well under a second
WRITE_BEHIND_MIN_BYTES = 16 << 20      # from here on a writer thread overlaps compute and I/O


@dataclass
class Result:
    out: Path
    manifest: dict
    model: Model
    plan: fold.Plan


def default_weights(prototxt: str | os.PathLike) -> Path:
    p = Path(prototxt)
    if not p.is_file():
        raise ModelFormatError("no such file" if not p.exists() else "is not a file", file=p)
    candidate = p.with_suffix(".caffemodel")
    if not candidate.exists():
        raise ModelFormatError(f"no weights given and {candidate} does not exist: pass the "
                               ".caffemodel as the second argument", file=p)
    return candidate


def default_out(prototxt: str | os.PathLike) -> Path:
    return Path("out") / Path(prototxt).stem


def convert(prototxt, caffemodel=None, out=None, *, metal: bool = True, dtype: str = "float32",
            naming: str = "apple", progress: bool | None = None,
            input_shapes: InputShapes | None = None, mean=None, scale: float | None = None,
            channel_order: str | None = None) -> Result:
    """Run the pipeline (see the module doc) and return what was written.

    ``mean``, ``scale``, ``channel_order``: the model's image preprocessing, recorded in
    the manifest (``export.preprocessing``; without any, the prototxt's transform_param,
    else "none").

    ``progress``: True/False force the stderr progress bar on/off; None (the
    default) shows it for big caffemodels when stderr is a terminal.
    ``input_shapes``: shapes for inputs the prototxt does not give (``read_model``).
    """
    caffemodel = caffemodel or default_weights(prototxt)
    out = Path(out) if out else default_out(prototxt)
    bar = _Progress(caffemodel, steps=3 if metal else 2, enabled=progress)
    try:
        return _convert(prototxt, caffemodel, out, metal, dtype, naming, bar, input_shapes,
                        dict(mean=mean, scale=scale, channel_order=channel_order))
    finally:
        bar.close()


def _convert(prototxt, caffemodel, out, metal, dtype, naming, bar, input_shapes,
             image_options) -> Result:
    bar.stage("reading")
    model = read_model(prototxt, caffemodel, input_shapes=input_shapes)
    pre = preprocessing.record(model, **image_options)      # bad options: before any writing
    graph = model.graph
    the_plan = fold.plan(graph)
    merged = fold.apply(graph, the_plan, lazy=True)     # folded as written, block by block
    stem = Path(prototxt).stem
    names = {"prototxt": f"{stem}_merged.prototxt", "caffemodel": f"{stem}_merged.caffemodel"}
    text = merged_prototxt(model, merged, the_plan)
    blob = graph.blob_names.get
    manifest = {
        "format": FORMAT, "version": VERSION,
        "source": {"prototxt": str(prototxt), "caffemodel": str(caffemodel)},
        "inputs": [{"name": blob(b, b), "shape": list(s)} for b, s in graph.inputs.items()]
                  + [{"name": blob(t, t), "shape": list(model.shapes.blobs[t] or [])}
                     for layer in graph.layers if layer.type == "Input" for t in layer.tops],
        "merged": names,
        "folds": [{"producer": f.producer, "layers": f.layers, "top": blob(f.top, f.top),
                   "eps": f.eps, "scale_factor": f.scale_factor} for f in the_plan.folds],
        "kept": [{"layers": k.layers, "reason": k.reason} for k in the_plan.kept],
        "preprocessing": pre,
        "layers": [],
    }
    with atomic_directory(out) as tmp:
        write_prototxt(tmp / names["prototxt"], text)
        with contextlib.ExitStack() as stack:
            io = stack.enter_context(WriteBehind(enabled=bar.size >= WRITE_BEHIND_MIN_BYTES))
            if metal:               # Metal files of folded layers: from the same folded blocks
                from .export import metal as mtl
                streams = stack.enter_context(mtl.stream_folded(model, merged, tmp, dtype=dtype,
                                                                io=io))
            bar.stage("folding and writing the merged caffemodel")
            write_merged_caffemodel(tmp / names["caffemodel"], merged, progress=bar.advance,
                                    io=io)
            if metal:
                bar.stage("writing Metal weights")
                manifest.update(mtl.export(model, merged, the_plan, tmp, dtype=dtype,
                                           naming=naming, io=io, streams=streams))
                from .export.plan import blob_names, build_plan
                manifest["blob_names"] = blob_names(merged)
                manifest["plan"] = build_plan(model, merged, manifest)
        bar.stage("finishing")
        try:
            text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
        except ValueError as e:         # a non-finite number no earlier check caught
            raise ExportError(f"manifest.json would not be valid JSON: {e}") from None
        (tmp / "manifest.json").write_text(text)
    return Result(out=out, manifest=manifest, model=model, plan=the_plan)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class _Progress:
    """A tqdm bar on stderr counting the bytes of weights handled, one caffemodel's
    size per step (read + fold, merged caffemodel, Metal weights).  Disabled (every
    method a no-op, tqdm not imported) unless asked for or, by default, unless the
    caffemodel is big and stderr is a terminal."""

    def __init__(self, caffemodel, steps: int, enabled: bool | None = None):
        self.bar: Any = None                    # a tqdm bar (imported only when shown)
        self.step = -1
        try:
            self.size = max(1, os.stat(caffemodel).st_size)
        except OSError:
            self.size = 1                       # read_model reports the real problem
        if enabled is None:
            enabled = self.size >= PROGRESS_MIN_BYTES and _isatty(sys.stderr)
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=self.size * steps, unit="B", unit_scale=True,
                            unit_divisor=1024, file=sys.stderr, leave=False,
                            dynamic_ncols=True, desc="caffe2metal")

    def stage(self, description: str) -> None:
        """Start the next step: the bar jumps to the end of the previous one."""
        self.step += 1
        if self.bar is not None:
            self.bar.set_description(description, refresh=False)
            self._goto(self.step * self.size)
            self.bar.refresh()                  # show the new stage now, whatever mininterval

    def advance(self, nbytes: int) -> None:
        """Progress within the current step (never past its end)."""
        if self.bar is not None:
            self._goto(min(self.bar.n + nbytes, (self.step + 1) * self.size))

    def _goto(self, n: int) -> None:
        n = min(n, self.bar.total)
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def report(result: Result) -> str:
    """What ``caffe2metal convert`` prints about ``result``."""
    return render(result.model.prototxt, result.out, result.manifest,
                  types={layer.name: layer.type for layer in result.model.graph.layers})


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def render(prototxt: str | os.PathLike, out: str | os.PathLike, manifest: dict,
           dropped: list[dict] | None = None, types: dict[str, str] | None = None) -> str:
    """The conversion report: what was folded, kept and skipped, and what was written.

    BatchNorm chains (a BatchNorm, with its Scale) and other Scale layers (an SE
    gate, a Scale after a Concat, ...) are counted apart (``types``: layer name ->
    type; without it a one-layer chain counts as a Scale layer), and each layer
    with no Metal file is listed once, with every reason it has."""
    m, lines = manifest, []
    folds, kept = m["folds"], m["kept"]
    skipped = {s["name"]: s for s in m.get("metal", {}).get("skipped", [])}
    types = types or {}

    def batchnorm(chain: dict) -> bool:
        return any(types.get(n, "Scale" if len(chain["layers"]) == 1 else "BatchNorm")
                   == "BatchNorm" for n in chain["layers"])

    bn_folds = sum(map(batchnorm, folds))
    bn_kept = sum(map(batchnorm, kept))
    parts = [_count(bn_folds, "BatchNorm chain") + " folded"]
    if len(folds) > bn_folds:
        parts.append(_count(len(folds) - bn_folds, "lone Scale layer") + " folded")
    if bn_kept:
        parts.append(_count(bn_kept, "BatchNorm chain") + " kept")
    if len(kept) > bn_kept:
        parts.append(_count(len(kept) - bn_kept, "other Scale layer") + " kept")
    lines.append(f"{prototxt}: {', '.join(parts)}")
    for f in folds:
        lines.append(f"  folded  {' + '.join(f['layers'])} -> {f['producer']}")
    for k in kept:
        no_file = [skipped.pop(n) for n in k["layers"] if n in skipped]
        note = " (no Metal file)" if no_file else ""
        lines.append(f"  kept    {' + '.join(k['layers'])}{note}: {k['reason']}")
    for s in skipped.values():
        lines.append(f"  no Metal file for {s['name']} ({s['type']}): {s['reason']}")
    for d in dropped or []:
        lines.append(f"  dropped {d['name']} ({d['type']}): {d['reason']}")
    lines.append(f"wrote {out}/: {m['merged']['prototxt']}, {m['merged']['caffemodel']}, "
                 f"manifest.json" + (f", {len(m['layers'])} Metal layer(s) in metal/"
                                     if m["layers"] else ""))
    return "\n".join(lines)
