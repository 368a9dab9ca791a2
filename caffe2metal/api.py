"""The Python API: the five commands as functions that return typed results.

Each function takes paths and options like its command and returns a frozen
dataclass instead of printing; ``result.render()`` is exactly the text the
command prints.  Bad input raises a :class:`~caffe2metal.errors.Caffe2MetalError`
subclass (``ModelFormatError``, ``GraphError``, ``ExportError``), the errors
the command line reports with exit status 2.  A verification that cannot run
although its input is fine (OpenCV cannot load or run the model, OpenCV
missing, out of memory) raises :class:`VerificationUnavailable` (a
``Caffe2MetalError`` too; exit status 3); ``convert(verify=True)`` never raises
after OUT is complete: the reason is ``Conversion.verification_error``.

``input_shapes`` (inspect, convert, verify): ``--input-shape`` values,
``["1,3,224,224"]`` or ``["data=1,3,224,224"]``, or a dict ``{name: shape}``
(name ``""``: the only input).  It gives a train/test prototxt (a ``Data``
layer instead of an input) its input shape; see ``caffe2metal.net.reader``.

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
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import Caffe2MetalError, ExportError, VerificationUnavailable
from .results import (
    Conversion,
    DirectoryComparison,
    Example,
    Inspection,
    Run,
    Skipped,
    Verification,
    cannot_verify,
)

if TYPE_CHECKING:
    pass

PathLike = str | os.PathLike
DTYPES = ("float32", "float16")
NAMINGS = ("apple", "forge")

__all__ = ["Conversion", "DirectoryComparison", "Example", "Inspection", "Run", "Skipped",
           "Verification", "VerificationUnavailable", "cannot_verify", "compare", "convert",
           "example", "inspect", "run", "verify"]





def inspect(prototxt: PathLike, caffemodel: PathLike | None = None, *,
            input_shapes=None) -> Inspection:
    """Read a net (and its weights, when given): layers, shapes, counts and fold plan.
    A net input without a shape is no error here: its shapes show as unknown and
    ``missing_inputs`` says why."""
    # imported when called: reader, fold and describe bring in numpy (0.10 s, -X importtime)
    from . import fold
    from .describe import describe
    from .net.reader import read_model
    model = read_model(prototxt, caffemodel, input_shapes=_input_shapes(input_shapes),
                       allow_unknown_inputs=True)
    plan = fold.plan(model.graph)
    info = describe(model, plan)
    s = info["summary"]
    return Inspection(prototxt=info["prototxt"], caffemodel=info["caffemodel"],
                      name=info["name"], format=info["format"],
                      inputs={i["name"]: i["shape"] for i in info["inputs"]},
                      outputs=list(info["outputs"]), layer_count=s["layers"],
                      parameter_values=s["parameter_values"], size_mb=s["size_mb"],
                      weights_loaded=s["weights_loaded"],
                      folded=list(plan.folds), kept=list(plan.kept), info=info,
                      dropped=list(info["dropped_layers"]),
                      missing_inputs=list(info["missing_inputs"]))


def convert(prototxt: PathLike, caffemodel: PathLike | None = None, out: PathLike | None = None,
            *, dtype: str = "float32", naming: str = "apple", metal: bool = True,
            verify: bool = False, progress: bool | None = None, input_shapes=None,
            image: PathLike | None = None, mean=None, scale: float | None = None,
            channel_order: str | None = None, seed: int = 0) -> Conversion:
    """Fold BatchNorm/Scale and write OUT: the merged Caffe model, the Metal weights
    (``metal=False``: none) and ``manifest.json``.

    ``mean``, ``scale``, ``channel_order``: the model's image preprocessing, recorded as
    the manifest's ``preprocessing`` (any of them given: those, the others' defaults; none:
    the prototxt's ``transform_param``, else recorded as unknown); the verification
    (``verify=True`` with an ``image``) applies that record.

    ``caffemodel``: default the ``.caffemodel`` next to ``prototxt``; ``out``: default
    ``out/<prototxt stem>``.  ``dtype``: Metal weight precision, "float32" or
    "float16" (bias stays float32); ``naming``: "apple" (weights_<name>.dat) or
    "forge" (<name>_w.bin).  ``verify=True`` then runs :func:`verify` on OUT
    (``result.verification``; a failed verification is a result, not an error), with
    ``image``, ``mean``, ``scale``, ``channel_order`` and ``seed`` as :func:`verify`
    takes them; these are checked before anything is written.  A verification that
    cannot run once OUT is complete is no error either: ``result.verification_error``
    says why.  ``progress``: force the stderr progress bar on or off (default: on for
    big models when stderr is a terminal).
    """
    if dtype not in DTYPES:
        raise ExportError(f"unknown weight dtype '{dtype}' (use float32 or float16)")
    if naming not in NAMINGS:
        raise ExportError(f"unknown naming '{naming}' (use one of {', '.join(NAMINGS)})")
    shapes = _input_shapes(input_shapes)
    spec = None
    if verify:                      # the verification's options: bad ones before any writing
        spec = check_convert_options(prototxt, image=image, mean=mean, scale=scale,
                                     channel_order=channel_order, seed=seed,
                                     input_shapes=shapes)
    elif image is not None:
        raise ExportError("--image only applies with --verify")
    # imported when called: the pipeline brings in numpy (0.10 s, -X importtime); OpenCV
    # and tqdm only come with verify=True and the progress bar
    from .pipeline import convert as run
    done = run(prototxt, caffemodel, out, metal=metal, dtype=dtype, naming=naming,
               progress=progress, input_shapes=shapes, mean=mean, scale=scale,
               channel_order=channel_order)
    checked, error = None, None
    if verify:
        if spec is not None and not _options_given(mean, scale, channel_order):
            from .verification.inputs import manifest_image_input
            spec = manifest_image_input(spec.path, done.manifest)   # e.g. the transform_param
        try:
            # the model convert read and checked: not read again, and its blobs released
            # before OpenCV loads its own copy (peak memory)
            checked = _verify(prototxt, done.model.caffemodel, done.out, image=spec, seed=seed,
                              input_shapes=shapes, model=done.model)
        except Caffe2MetalError as e:       # OUT is complete: never reported as bad input
            error = str(e)
    metal_part = done.manifest.get("metal") or {}
    return Conversion(prototxt=done.model.prototxt, caffemodel=str(done.model.caffemodel),
                      out=done.out, files=_files(done.out),
                      folded=list(done.plan.folds), kept=list(done.plan.kept),
                      skipped=[Skipped(s["name"], s["type"], s["reason"])
                               for s in metal_part.get("skipped", [])],
                      manifest=done.manifest, verification=checked, verification_error=error,
                      dropped=[{"name": n, "type": t, "reason": r}
                               for n, t, r in done.model.dropped],
                      types={n: done.model.graph.layer(n).type
                             for chain in [*done.plan.folds, *done.plan.kept]
                             for n in chain.layers})     # type: ignore[attr-defined]


def verify(prototxt: PathLike, caffemodel: PathLike | None, out: PathLike, *,
           image: PathLike | None = None, seed: int = 0, mean=None, scale: float | None = None,
           channel_order: str | None = None, input_shapes=None,
           activations: str = "float32") -> Verification:
    """Recompute every Metal layer in OUT from its files and compare it with the
    original model in OpenCV, then the merged model's outputs with the original's.

    ``caffemodel``: None means the ``.caffemodel`` next to ``prototxt``.  ``image``:
    the input, resized with ``cv2.resize`` INTER_LINEAR (as ``cv2.dnn.blobFromImage``),
    in ``channel_order`` ("BGR", as read, or "RGB"), then ``(pixel - mean) * scale``
    (``mean``: one value or one per channel, in the model's channel order); with none
    of ``mean``, ``scale``, ``channel_order`` given, as OUT's manifest records it
    (``preprocessing``; nothing applied when it records nothing).  Default input: a
    deterministic uniform [-1, 1) input drawn with ``seed`` (>= 0).
    ``activations="float16"``: the plan run from OUT stores every MPS op's output as
    float16 (as an app with float16 MPSImages does), held to the float16 tolerance.
    Raises :class:`VerificationUnavailable` when the check cannot run although its
    input is fine (OpenCV cannot load or run the model).
    """
    from .verification.inputs import check_seed, image_input
    check_seed(seed)
    if activations not in ("float32", "float16"):
        raise Caffe2MetalError(f"--activations {activations!r}: use float32 or float16")
    spec = image_input(image, mean=mean, scale=scale, channel_order=channel_order)
    if spec is not None and not _options_given(mean, scale, channel_order):
        from .verification.files import load_manifest
        from .verification.inputs import manifest_image_input
        spec = manifest_image_input(spec.path, load_manifest(Path(out)),
                                    Path(out) / "manifest.json")
    return _verify(prototxt, caffemodel, out, image=spec, seed=seed,
                   input_shapes=_input_shapes(input_shapes), activations=activations)


def _input_shapes(given) -> dict[str, tuple[int, ...]] | None:
    """``--input-shape`` values (strings, or a dict) as {name or "": shape}."""
    if not given:
        return None
    from .net.reader import parse_input_shape
    if isinstance(given, dict):
        return {str(k): tuple(int(d) for d in v) for k, v in given.items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for text in given:
        name, shape = parse_input_shape(str(text))
        if name in shapes:
            raise ExportError(f"--input-shape given twice for {name or 'the input'}")
        shapes[name] = shape
    return shapes


def check_verify_options(prototxt: PathLike, *, image: PathLike | None = None, mean=None,
                         scale: float | None = None, channel_order: str | None = None,
                         seed: int = 0, input_shapes=None):
    """The options of a verification, checked before a conversion writes anything:
    the image decoded, the mean against the net's channels, the seed.  Raises
    ``Caffe2MetalError`` (bad input); returns the image input (None: random)."""
    from .net.reader import read_prototxt
    from .verification.inputs import check_image, check_seed, image_input, image_target
    check_seed(seed)
    shapes = _input_shapes(input_shapes)
    spec = image_input(image, mean=mean, scale=scale, channel_order=channel_order)
    if spec is not None:
        check_image(spec)
        image_target(read_prototxt(prototxt, input_shapes=shapes), spec)
    return spec


def _options_given(mean, scale, channel_order) -> bool:
    return any(v is not None for v in (mean, scale, channel_order))


def check_convert_options(prototxt: PathLike, *, image: PathLike | None = None, mean=None,
                          scale: float | None = None, channel_order: str | None = None,
                          seed: int = 0, input_shapes=None):
    """``convert --verify``'s options, checked before anything is written: the image
    options as :func:`check_verify_options` checks them, except that ``mean``, ``scale``
    and ``channel_order`` need no image (they define the manifest's preprocessing)."""
    if image is None:
        from .export.preprocessing import options
        options(mean, scale, channel_order)
        return check_verify_options(prototxt, seed=seed, input_shapes=input_shapes)
    return check_verify_options(prototxt, image=image, mean=mean, scale=scale,
                                channel_order=channel_order, seed=seed,
                                input_shapes=input_shapes)


def _verify(prototxt, caffemodel, out, *, image=None, seed=0,
            input_shapes=None, activations: str = "float32", model=None) -> Verification:
    # imported when called: verify brings in numpy (0.15 s, -X importtime), and OpenCV
    # (0.08 s more) at its first forward pass
    from .pipeline import default_weights
    from .verification import verify as run
    try:
        report = run(prototxt, caffemodel or default_weights(prototxt), out, image=image,
                     seed=seed, input_shapes=input_shapes, activations=activations,
                     model=model)
    except (ImportError, MemoryError) as e:
        raise VerificationUnavailable(f"{type(e).__name__}: {e}") from None
    except Exception as e:          # noqa: BLE001  an OpenCV error no check turned into ours
        if type(e).__module__.split(".")[0] != "cv2":
            raise
        raise VerificationUnavailable(f"OpenCV failed: {str(e).strip().splitlines()[-1]}") \
            from None
    counted = [r for r in report.rows if r.counted and not math.isnan(r.rel)]
    return Verification(report=report, layers=list(report.layers), outputs=list(report.outputs),
                        ok=report.ok, worst=max(counted, key=lambda r: r.rel, default=None),
                        plan=list(report.plan))


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


def run(out: PathLike, *, image: PathLike | None = None, activations: str = "float32",
        backend: str = "numpy", device: str | None = None) -> Run:
    """Execute OUT's plan from OUT alone; the input is ``image`` preprocessed as the manifest
    records (nothing assumed when it records nothing), else verify's random input.
    ``backend`` "numpy" (MPS semantics in float64 numpy) or "mlx" (Apple's MLX, the optional
    extra ``caffe2metal[mlx]``) on ``device`` "cpu" or "gpu" (default: MLX's default, the
    GPU where MLX has one)."""
    from .runtime import load_plan, run_plan, select
    be = select(backend, device)          # a missing MLX or GPU: before anything is read
    feed, described = None, "uniform [-1, 1) random, seed 0 (verify's default input)"
    if image is not None:
        from .verification.inputs import check_image, load_image, manifest_image_input
        where = Path(out) / "manifest.json"
        manifest = load_plan(Path(out))
        spec = manifest_image_input(image, manifest, where)
        check_image(spec)
        feed, target = _run_feed(manifest, where)
        c, h, w = target[1][1:]
        if spec.mean and len(spec.mean) not in (1, c):
            raise Caffe2MetalError(f"preprocessing: {len(spec.mean)} mean values for input "
                                   f"'{target[0]}' of {c} channel(s)", file=where)
        feed[target[0]] = load_image(spec, target[1])
        described = spec.describe(w, h, c)
    r = run_plan(Path(out), feed, activations, backend, device)
    return Run(Path(out), r.outputs, r.detections, activations, described, be.name, be.device,
               r.skipped, r.overflow)


def _run_feed(manifest: dict, where: Path) -> tuple[dict, tuple[str, tuple]]:
    """verify's random input for every net input, and the input an image feeds: the one
    the manifest's preprocessing names, else the first 4-D one with 1 or 3 channels."""
    from .runtime import default_feed
    feed = default_feed(manifest)
    named = (manifest.get("preprocessing") or {}).get("input")
    shapes = {i.get("name"): i.get("shape") for i in manifest.get("inputs", [])
              if isinstance(i, dict)}
    for name, shape in ([(named, shapes.get(named))] if named in shapes else shapes.items()):
        if isinstance(shape, list) and len(shape) == 4 and shape[1] in (1, 3) \
                and all(isinstance(d, int) and d > 0 for d in shape):
            return feed, (str(name), (1, *shape[1:]))
    raise Caffe2MetalError("--image given, but the manifest lists no 4-D (N,C,H,W) input with "
                           "1 or 3 channels", file=where)
