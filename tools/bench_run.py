"""Speed of `run`: the plan of OUT executed by the numpy and the MLX backend, beside
OpenCV's forward of the original model on the same input.

    python -m tools.bench_run PROTOTXT [CAFFEMODEL] [--runs N] [--out OUT]
    python -m tools.bench_run --mobilenet [--runs N]

converts the model (into a temporary directory, or OUT) and times, in this process, each
of ``run_plan(OUT, feed)`` (numpy), ``run_plan(OUT, feed, backend="mlx")`` (MLX on its
default device) and ``net.forward()`` of ``cv2.dnn.readNetFromCaffe(PROTOTXT,
CAFFEMODEL)`` (OpenCV's defaults: its CPU backend, fusion on), with verify's input
(``runtime.default_feed``): one untimed warm-up each, then N timed runs; best and median.
``run`` includes reading OUT (the manifest, its checks, every file and its sha256); the
OpenCV net is read once before its runs.  ``--mobilenet`` uses ``tools.bench``'s
MobileNet-SSD (the real architecture from ../shared/models when present, generated
weights).  ``time_runs(out, prototxt, caffemodel)`` returns the rows for `make bench`.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunRow:
    figure: str
    runs: tuple[float, ...]          # seconds; empty when the runtime is unavailable
    note: str = ""

    @property
    def best(self) -> float:
        return min(self.runs)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


def _timed(fn: Callable[[], object], runs: int) -> tuple[float, ...]:
    fn()                                                        # warm-up, untimed
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return tuple(times)


def time_runs(out: Path, prototxt: Path, caffemodel: Path, runs: int = 5) -> list[RunRow]:
    """numpy `run`, MLX `run` and OpenCV's forward of the original, timed on one input."""
    import cv2

    from caffe2metal.errors import Caffe2MetalError
    from caffe2metal.runtime import default_feed, load_plan, run_plan, select
    feed = default_feed(load_plan(Path(out)))
    rows = [RunRow("`run --backend numpy` (float64 per op)",
                   _timed(lambda: run_plan(out, feed), runs))]
    try:
        device = select("mlx").device
    except Caffe2MetalError as e:
        rows.append(RunRow("`run --backend mlx`", (), f"not measured: {e}"))
    else:
        rows.append(RunRow(f"`run --backend mlx` ({device}, float32)",
                           _timed(lambda: run_plan(out, feed, backend="mlx"), runs)))
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    names = net.getUnconnectedOutLayersNames()

    def forward():
        for name, x in feed.items():
            net.setInput(x, name)
        return net.forward(names)
    rows.append(RunRow("OpenCV forward of the original (net read once)",
                       _timed(forward, runs)))
    return rows


def render(rows: list[RunRow], title: str) -> str:
    lines = [f"{title}", "", "| figure | best s | median s | runs s |", "| --- | --- | --- | --- |"]
    for r in rows:
        if not r.runs:
            lines.append(f"| {r.figure} | - | - | {r.note} |")
            continue
        runs = ", ".join(f"{t:.3f}" for t in r.runs)
        lines.append(f"| {r.figure} | {r.best:.3f} | {r.median:.3f} | {runs} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prototxt", nargs="?")
    ap.add_argument("caffemodel", nargs="?")
    ap.add_argument("--mobilenet", action="store_true", help="tools.bench's MobileNet-SSD")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", help="convert into OUT (kept) instead of a temporary directory")
    args = ap.parse_args(argv)
    if bool(args.prototxt) == args.mobilenet:
        ap.error("give PROTOTXT [CAFFEMODEL] or --mobilenet")
    from caffe2metal import api
    with tempfile.TemporaryDirectory(prefix="bench_run.") as tmp:
        if args.mobilenet:
            from tools.bench import mobilenet_source, write_mobilenet
            text, source = mobilenet_source()
            proto, weights = write_mobilenet(Path(tmp) / "model", text)
        else:
            proto = Path(args.prototxt)
            weights = Path(args.caffemodel) if args.caffemodel else proto.with_suffix(
                ".caffemodel")
            source = str(proto)
        out = api.convert(proto, weights, Path(args.out or Path(tmp) / "out")).out
        rows = time_runs(out, proto, weights, args.runs)
    print(render(rows, f"`run` of {source}: best and median of {args.runs} after a warm-up"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
