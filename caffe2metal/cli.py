"""Command line: caffe2metal {inspect,convert,verify,compare,example}.

Argument parsing over the Python API (``caffe2metal.api``): each command calls
its function and prints ``result.render()``.  Exit status: 0 success, 1
verification (or ``compare --atol``) above tolerance, 2 bad input (one clear
line on stderr, no traceback), 130 interrupted; a closed stdout (``| head``) is 0.
"""
from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys

from .errors import Caffe2MetalError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="caffe2metal", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list layers, shapes, blobs and the BatchNorm fold plan")
    p.add_argument("prototxt")
    p.add_argument("caffemodel", nargs="?")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

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
    p.add_argument("--verify", action="store_true",
                   help="then run `verify` on the result (exit 1 above tolerance)")

    p = sub.add_parser("verify", help="recompute every Metal layer from OUT's files and compare "
                       "with the original model in OpenCV; compare the merged model end to end")
    p.add_argument("prototxt")
    p.add_argument("caffemodel", nargs="?", help="default: the .caffemodel next to PROTOTXT")
    p.add_argument("out", help="the directory `convert` wrote")
    p.add_argument("--image", help="input image (resized to the net's input, BGR, no mean "
                   "subtraction); default: a deterministic random input")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")

    p = sub.add_parser("compare", help="max difference of every weights/bias file two output "
                       "directories share, and the files only one has")
    p.add_argument("dir_a")
    p.add_argument("dir_b")
    p.add_argument("--atol", type=float,
                   help="exit 1 when a shared file differs by more than this (or in size)")

    p = sub.add_parser("example", help="write the built-in MobileNet-SSD-style example model")
    p.add_argument("directory")
    return ap


# Each command imports the API as it runs, not at start-up: --help and usage errors skip
# it (16 ms against the CLI's 3 ms start-up imports, -X importtime).

def _inspect(args) -> int:
    from . import api
    info = api.inspect(args.prototxt, args.caffemodel)
    print(info.to_json() if args.json else info.render())
    return 0


def _convert(args) -> int:
    from . import api
    # converted and printed first, then verified: the report shows before the slow part,
    # as convert(verify=True) would render it
    done = api.convert(args.prototxt, args.caffemodel, args.out, metal=args.metal,
                       dtype=args.dtype, naming=args.naming)
    print(done.render())
    if not args.verify:
        return 0
    checked = api.verify(args.prototxt, done.caffemodel, done.out)
    print()
    print(checked.render())
    return 0 if checked.ok else 1


def _verify(args) -> int:
    from . import api
    checked = api.verify(args.prototxt, args.caffemodel, args.out, image=args.image,
                         seed=args.seed)
    print(checked.render())
    return 0 if checked.ok else 1


def _compare(args) -> int:
    from . import api
    c = api.compare(args.dir_a, args.dir_b)
    print(c.render())
    if args.atol is None:
        return 0
    return 1 if c.above(args.atol) else 0


def _example(args) -> int:
    from . import api
    print(api.example(args.directory).render())
    return 0


_COMMANDS = {"inspect": _inspect, "convert": _convert, "verify": _verify, "compare": _compare,
             "example": _example}


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
    try:
        return _COMMANDS[args.command](args)
    except Caffe2MetalError as e:
        print(f"caffe2metal: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("caffe2metal: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
