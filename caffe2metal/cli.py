"""Command line: caffe2metal {inspect,convert,verify,compare,example}.

Argument parsing over the Python API (``caffe2metal.api``): each command calls
its function and prints ``result.render()``.

Exit status (README, "Exit status"):
  0    success (``| head`` closing stdout early is success too)
  1    verification (or ``compare --atol``) above tolerance, or the report could
       not be written to stdout (closed, or a full disk: ``> /dev/full``); one
       line on stderr in that case
  2    bad input: the user's files or options are wrong (a missing or broken
       prototxt, caffemodel, image or OUT; a net input without a shape; a
       negative seed).  Nothing is written; one line on stderr, no traceback.
  3    could not verify: ``convert --verify`` wrote a complete OUT but the
       verification could not run, or ``verify`` (alone or after convert) could
       not run (OpenCV cannot load or run a model whose files are fine) or could
       not hold every layer to a tolerance (rows shown but not counted).  Never
       used for bad input.
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM)
``convert --verify`` ends with one line stating the verification's outcome:
``verify: PASS (...)``, ``verify: FAIL (...)``, ``verify: INCOMPLETE (...)`` or
``verify: could not run: <reason> (the conversion in OUT is complete)``.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import os
import sys

from .errors import Caffe2MetalError, VerificationUnavailable, one_line

OK, FAILED, BAD_INPUT, NOT_VERIFIED, INTERRUPTED = 0, 1, 2, 3, 130

_SHAPE_HELP = ("[NAME=]N,C,H,W: the shape of a net input; for a train/test prototxt (a Data "
               "layer instead of an input) the shape of the data layer's first top, which "
               "becomes the input (labels, loss and accuracy layers are dropped). NAME may be "
               "left out when the net has one input; repeat for several")
_IMAGE_OPTIONS = (
    ("--mean", dict(metavar="V[,V,V]", help="subtract from every pixel after resizing: one "
                    "value, or one per channel in the model's channel order (default: none). "
                    "convert records --mean/--scale/--channel-order in the manifest; verify "
                    "without any of them applies the manifest's")),
    ("--scale", dict(type=float, metavar="S", help="multiply by S after subtracting the mean "
                     "(default 1)")),
    ("--channel-order", dict(choices=("BGR", "RGB"), type=str.upper, help="the model's "
                             "channel order: BGR (as OpenCV reads images, the default) or RGB "
                             "(B and R swapped)")),
)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="caffe2metal", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list layers, shapes, blobs and the BatchNorm fold plan")
    p.add_argument("prototxt")
    p.add_argument("caffemodel", nargs="?")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--input-shape", action="append", metavar="SHAPE", help=_SHAPE_HELP)

    p = sub.add_parser("convert", help="fold BatchNorm/Scale; write merged Caffe model, Metal "
                       "weights and manifest.json")
    p.add_argument("prototxt")
    p.add_argument("caffemodel", nargs="?", help="default: the .caffemodel next to PROTOTXT")
    p.add_argument("-o", "--out", help="output directory (default: out/<prototxt stem>)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="Metal weight precision (bias stays float32)")
    p.add_argument("--naming", choices=("apple", "forge"), default="apple",
                   help="apple: weights_<name>.dat/bias_<name>.dat; "
                   "forge: <name>_w.bin/<name>_b.bin")
    p.add_argument("--no-metal", dest="metal", action="store_false",
                   help="write only the merged Caffe model and the manifest")
    p.add_argument("--input-shape", action="append", metavar="SHAPE", help=_SHAPE_HELP)
    p.add_argument("--verify", action="store_true",
                   help="then verify the result (exit 1 above tolerance, 3 when it cannot "
                   "run); the last line states the outcome")
    _verify_input(p)

    p = sub.add_parser("verify", help="recompute every Metal layer from OUT's files and compare "
                       "with the original model in OpenCV; compare the merged model end to end")
    p.add_argument("prototxt")
    p.add_argument("caffemodel", nargs="?", help="default: the .caffemodel next to PROTOTXT")
    p.add_argument("out", help="the directory convert wrote")
    p.add_argument("--input-shape", action="append", metavar="SHAPE", help=_SHAPE_HELP)
    p.add_argument("--activations", choices=("float32", "float16"), default="float32",
                   help="the plan run stores every MPS op's output as float16 (held to the "
                   "float16 tolerance)")
    _verify_input(p)

    p = sub.add_parser("compare", help="max difference of every weights/bias file two output "
                       "directories share, and the files only one has")
    p.add_argument("dir_a")
    p.add_argument("dir_b")
    p.add_argument("--atol", type=float,
                   help="exit 1 when a shared file differs by more than this (or in size)")

    p = sub.add_parser("example", help="write the built-in MobileNet-SSD-style example model")
    p.add_argument("directory")

    p = sub.add_parser("run", help="execute OUT's plan with MPS semantics (numpy, or Apple's "
                       "MLX), from OUT alone; print the net outputs and SSD detections")
    p.add_argument("out", help="the directory convert wrote")
    p.add_argument("--image", help="input image, preprocessed as the manifest records; "
                   "default: verify's deterministic random input")
    p.add_argument("--json", action="store_true", help="print {outputs, detections} as JSON")
    p.add_argument("--activations", choices=("float32", "float16"), default="float32",
                   help="float16 rounds every MPS op's output as an MPSImage stores it")
    p.add_argument("--backend", choices=("numpy", "mlx"), default="numpy",
                   help="numpy (default; float64, rounded to float32 per op) or mlx (Apple's "
                   "MLX, float32; pip install 'caffe2metal[mlx]')")
    p.add_argument("--device", choices=("cpu", "gpu"), help="with --backend mlx: where MLX "
                   "runs (default: MLX's default, the GPU on an Apple-silicon Mac)")
    return ap


def _verify_input(p: argparse.ArgumentParser) -> None:
    """The options of the input verify feeds both models (verify, convert --verify)."""
    p.add_argument("--image", help="input image, resized to the net's input with "
                   "cv2.resize INTER_LINEAR (as cv2.dnn.blobFromImage does), then --channel-"
                   "order, --mean and --scale; default: a deterministic random input")
    for flag, kwargs in _IMAGE_OPTIONS:
        p.add_argument(flag, **kwargs)      # type: ignore[arg-type]
    p.add_argument("--seed", type=int, default=0, help="seed of the random input (an integer "
                   ">= 0, default 0)")


def _image_options(args) -> dict:
    return dict(image=args.image, mean=args.mean, scale=args.scale,
                channel_order=args.channel_order, seed=args.seed)


# Each command imports the API as it runs, not at start-up: --help and usage errors skip
# it (16 ms against the CLI's 3 ms start-up imports, -X importtime).

def _inspect(args) -> int:
    from . import api
    info = api.inspect(args.prototxt, args.caffemodel, input_shapes=args.input_shape)
    _print(info.to_json() if args.json else info.render())
    return OK


def _convert(args) -> int:
    from . import api
    # converted and printed first, then verified: the report shows before the slow part,
    # exactly as convert(verify=True) renders it
    if args.verify:                 # bad verify options are bad input: before any writing
        api.check_convert_options(args.prototxt, input_shapes=args.input_shape,
                                  **_image_options(args))
    elif args.image is not None:
        raise Caffe2MetalError("--image only applies with --verify")
    # --mean, --scale, --channel-order: the manifest's preprocessing (which verify applies)
    done = api.convert(args.prototxt, args.caffemodel, args.out, metal=args.metal,
                       dtype=args.dtype, naming=args.naming, input_shapes=args.input_shape,
                       mean=args.mean, scale=args.scale, channel_order=args.channel_order)
    _print(done.render())
    if not args.verify:
        return OK
    # from here on OUT is complete: no outcome is "bad input" any more
    given = _image_options(args) if args.image is not None else dict(seed=args.seed)
    try:
        checked = api.verify(args.prototxt, done.caffemodel, done.out,
                             input_shapes=args.input_shape, **given)
    except Caffe2MetalError as e:
        _print(api.cannot_verify(str(e), done.out))
        return NOT_VERIFIED
    _print("")
    _print(checked.render())
    _print(checked.verdict())
    return _verified(checked)


def _verified(checked) -> int:
    if not checked.ok:
        return FAILED
    return OK if checked.complete else NOT_VERIFIED


def _verify(args) -> int:
    from . import api
    checked = api.verify(args.prototxt, args.caffemodel, args.out,
                         input_shapes=args.input_shape, activations=args.activations,
                         **_image_options(args))
    _print(checked.render())
    if checked.ok and not checked.complete:
        _print(checked.verdict())
    return _verified(checked)


def _compare(args) -> int:
    from . import api
    c = api.compare(args.dir_a, args.dir_b)
    _print(c.render())
    if args.atol is None:
        return OK
    return FAILED if c.above(args.atol) else OK


def _example(args) -> int:
    from . import api
    _print(api.example(args.directory).render())
    return OK


def _run(args) -> int:
    from . import api
    done = api.run(args.out, image=args.image, activations=args.activations,
                   backend=args.backend, device=args.device)
    _print(done.to_json() if args.json else done.render())
    return OK if done.complete else NOT_VERIFIED     # 3: ops convert marked unavailable


class _StdoutFailed(Exception):
    """stdout cannot be written (closed, or a full disk); not a broken pipe."""


def _print(text: str) -> None:
    """Print and flush now: a stdout that cannot be written is found at once."""
    out = sys.stdout
    if out is None:                 # started with stdout closed (>&-)
        raise _StdoutFailed("stdout is closed")
    try:
        out.write(text + "\n")
        out.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as e:      # ENOSPC (/dev/full), EBADF, closed file
        raise _StdoutFailed(getattr(e, "strerror", None) or str(e)) from None


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null, so that the interpreter's last flush of what is still
    buffered neither fails again nor prints 'Exception ignored'."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


_COMMANDS = {"inspect": _inspect, "convert": _convert, "verify": _verify, "compare": _compare,
             "example": _example, "run": _run}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if argv is None:
        # Run as a program: skip collecting every module's objects at interpreter exit
        # (~30 ms of a 0.3 s MobileNet-SSD conversion); our files are all closed by then.
        atexit.register(gc.freeze)
        if args.command == "convert" and not args.verify and "numpy" not in sys.modules:
            # convert does no linear algebra: no OpenBLAS worker threads spinning on
            # the cores that folding and writing use (~0.1 s of CPU at numpy's import)
            os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if sys.stdout is None:
        _error("cannot write the report: stdout is closed")
        return FAILED
    try:
        return _COMMANDS[args.command](args)
    except _StdoutFailed as e:
        _silence_stdout()
        _error(f"cannot write the report to stdout: {e}")
        return FAILED
    except VerificationUnavailable as e:
        _error(f"could not verify: {e}")
        return NOT_VERIFIED
    except Caffe2MetalError as e:
        _error(f"error: {e}")
        return BAD_INPUT
    except KeyboardInterrupt:
        _error("interrupted")
        return INTERRUPTED
    except BrokenPipeError:         # | head: the reader has what it wanted
        _silence_stdout()
        return OK


def _error(text: str) -> None:
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            print(f"caffe2metal: {one_line(text)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
