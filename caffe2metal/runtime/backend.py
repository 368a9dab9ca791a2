"""The per-op compute of ``run``, one object per backend; the plan walk stays in
``runtime.run_plan`` (one driver loop for every backend).

A backend holds blob values in its own form (numpy: NCHW float32 arrays; MLX:
``mlx_ops.Blob``, NHWC between MPS ops) and gives every op kind the numpy runtime
executes, with Caffe's meaning for shapes and axes whatever it holds
internally.  ``from_numpy``/``to_numpy`` cross to numpy: the feed, the outputs,
and the ops that run in numpy in every backend (DetectionOutput, fork layers).
"""
from __future__ import annotations

import contextlib

import numpy as np

from ..errors import Caffe2MetalError
from . import ops

BACKENDS = ("numpy", "mlx")
DEVICES = ("cpu", "gpu")


class NumpyBackend:
    """``ops``: MPS semantics in float64 numpy, each op's output rounded to float32."""

    name = "numpy"
    device = "cpu"

    def context(self):
        return contextlib.nullcontext()

    def from_numpy(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a, np.float32)

    def to_numpy(self, v: np.ndarray) -> np.ndarray:
        return v

    def weights(self, a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32)

    def absmax(self, v: np.ndarray) -> float:
        return float(np.abs(v).max()) if v.size else 0.0

    def round16(self, v: np.ndarray) -> np.ndarray:
        return v.astype(np.float16).astype(np.float32)

    weighted = staticmethod(ops.weighted)
    pooling = staticmethod(ops.pooling)
    neuron = staticmethod(ops.neuron)
    prelu = staticmethod(ops.prelu)
    eltwise = staticmethod(ops.eltwise)
    concat_channels = staticmethod(ops.concat_channels)
    normalize = staticmethod(ops.normalize)
    scale_by = staticmethod(ops.scale_by)
    lrn = staticmethod(ops.lrn)
    softmax = staticmethod(ops.softmax)

    @staticmethod
    def reshape(v: np.ndarray, shape: tuple) -> np.ndarray:
        return v.reshape(shape)

    @staticmethod
    def transpose(v: np.ndarray, order) -> np.ndarray:
        return np.ascontiguousarray(v.transpose(order))

    @staticmethod
    def concat(vs: list, axis: int) -> np.ndarray:
        return np.concatenate(vs, axis=axis)

    @staticmethod
    def slice(v: np.ndarray, axis: int, start: int, size: int) -> np.ndarray:
        return np.take(v, range(start, start + size), axis=axis)

    @staticmethod
    def clip(v: np.ndarray, low: float, high: float) -> np.ndarray:
        return np.clip(v, low, high).astype(np.float32)

    @staticmethod
    def maximum(vs: list) -> np.ndarray:
        return np.max(np.stack(vs), axis=0)


def select(backend: str = "numpy", device: str | None = None):
    """The backend object for ``run --backend``/``--device``; one-line errors for a backend
    that is not installed or a device it does not have."""
    if backend == "numpy":
        if device not in (None, "cpu"):
            raise Caffe2MetalError(f"--device {device}: the numpy backend runs on the CPU "
                                   "only (--backend mlx can use a GPU)")
        return NumpyBackend()
    if backend != "mlx":
        raise Caffe2MetalError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if device not in (None, *DEVICES):
        raise Caffe2MetalError(f"--device {device!r}: use cpu or gpu")
    try:
        import mlx.core  # noqa: F401  (probe only: mlx_ops imports it for real)
    except ImportError as e:           # not installed; or installed but unloadable: say why
        why = "" if isinstance(e, ModuleNotFoundError) else f" ({e})"
        raise Caffe2MetalError(
            "--backend mlx needs Apple's MLX, which is not installed: pip install "
            f"'caffe2metal[mlx]' (on Linux that installs mlx[cpu], MLX's CPU build){why}"
        ) from None
    from .mlx_ops import MlxBackend
    return MlxBackend(device)
