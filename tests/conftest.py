"""Shared helpers: real model files from ../shared/models, tiny nets, OpenCV runs."""
from __future__ import annotations

import io
import signal
from pathlib import Path

import numpy as np
import pytest

from caffe2metal.caffe.caffemodel import write_caffemodel
from caffe2metal.examples import weights as synth
from caffe2metal.net.reader import read_model, read_prototxt

# A suite started in the background without job control (`make test &` from a script)
# inherits SIGINT ignored, and every child it starts would too (an ignored signal stays
# ignored across exec; Python then installs no KeyboardInterrupt handler): the Ctrl-C
# tests need it delivered.  A handler here is reset to the default in each child.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"


def real_models() -> list[Path]:
    """Every deploy.prototxt in ../shared/models; empty when the folder is absent."""
    if not SHARED_MODELS.is_dir():
        return []
    return sorted(SHARED_MODELS.glob("*/deploy.prototxt"))


def model_id(path: Path) -> str:
    return path.parent.name


_PARAM = type(pytest.param(None))


def mark_slow(values, slow, key=lambda v: v):
    """``values`` for parametrize with those whose ``key`` is in ``slow`` marked slow
    (left out of ``make test-fast``); values that already are ``pytest.param`` pass as is."""
    return [v if isinstance(v, _PARAM) or key(v) not in slow
            else pytest.param(v, marks=pytest.mark.slow) for v in values]


def write_net(tmp_path: Path, text: str, name: str = "net") -> Path:
    p = tmp_path / f"{name}.prototxt"
    p.write_text(text)
    return p


def with_weights(proto: Path, seed: int = 0, calibrate: bool = True, out: Path | None = None,
                 drop: tuple[str, ...] = ()):
    """Read ``proto``, give it deterministic weights, write them next to it.

    Returns (model, path)."""
    path = synth.write_synthetic(read_prototxt(proto), out or proto.with_suffix(".caffemodel"),
                                 seed, calibrate, drop)
    return read_model(proto, path), path


def opencv_run(proto: Path, weights: Path, feed: dict, outputs: list) -> list[np.ndarray]:
    """Forward in OpenCV (fusion off); each output is a layer name or (layer name, top name).

    OpenCV's Caffe importer names some layers after their top instead of their
    `name`, so a (name, top) pair is looked up under whichever one it used."""
    import cv2
    net = cv2.dnn.readNetFromCaffe(str(proto), str(weights))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.enableFusion(False)
    known = set(net.getLayerNames())
    names = [o if isinstance(o, str) else (o[0] if o[0] in known else o[1]) for o in outputs]
    for name, x in feed.items():
        net.setInput(x, name)
    return [np.array(o) for o in net.forward(names)]


def caffemodel_bytes(layers) -> bytes:
    buf = io.BytesIO()
    write_caffemodel(buf, layers)
    return buf.getvalue()


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


@pytest.fixture(scope="module")
def example_outputs(tmp_path_factory):
    """The built-in example, and OUT converted from it with float32 and with float16 weights:
    (``api.Example``, {dtype: OUT})."""
    from caffe2metal import api
    d = tmp_path_factory.mktemp("ex")
    ex = api.example(d)
    outs = {dt: api.convert(ex.prototxt, ex.caffemodel, d / dt, dtype=dt).out
            for dt in ("float32", "float16")}
    return ex, outs
