"""caffe2metal: fold BatchNorm/Scale into Caffe models and export Metal weights.

Python API (``caffe2metal.api``), one function per command::

    inspect(prototxt, caffemodel=None) -> Inspection
    convert(prototxt, caffemodel=None, out=None, *, dtype="float32", naming="apple",
            metal=True, verify=False) -> Conversion
    verify(prototxt, caffemodel, out, *, image=None, seed=0) -> Verification
    compare(dir_a, dir_b) -> DirectoryComparison
    example(directory) -> Example

Results are frozen dataclasses; ``result.render()`` is the text the command
prints.  Bad input raises a ``Caffe2MetalError`` subclass.

``convert``, ``verify`` and ``example`` share their names with the submodules
that implement them.  The package keeps the function under the name (the
import system does not replace it), and the function passes attribute access
on to its submodule, so ``caffe2metal.verify.Report``, ``from caffe2metal
import example; example.build(d)`` and ``import caffe2metal.convert as c``
(then ``c.WRITE_BEHIND_MIN_BYTES``) work as before.

``import caffe2metal`` imports only this file and ``errors`` (1 ms, measured
with ``python -X importtime``): the API module (16 ms) and the pipeline (numpy,
0.1 s; OpenCV for verify and example) are imported when first used.
"""
from __future__ import annotations

import importlib
import sys
import types

from .errors import Caffe2MetalError, ExportError, GraphError, ModelFormatError

TYPE_CHECKING = False   # True for type checkers; importing typing for it costs ~3 ms
if TYPE_CHECKING:
    from .api import DirectoryComparison, Inspection, PathLike

__version__ = "0.1.0"

_RESULTS = ("Conversion", "DirectoryComparison", "Example", "Inspection", "Skipped",
            "Verification")
_SHADOWED = ("convert", "verify", "example")        # API functions named like a submodule

__all__ = ["Caffe2MetalError", "ExportError", "GraphError", "ModelFormatError", "compare",
           "convert", "example", "inspect", "verify", *_RESULTS]


def _api():
    # imported on first use, not with the package: the API module takes 16 ms (-X importtime:
    # dataclasses 8, typing 3, its dataclasses 4) against the package's 1 ms
    return importlib.import_module(".api", __name__)


class _Function:
    """The API function ``name`` that also stands for the submodule of that name:
    calling it calls ``caffe2metal.api.<name>``; any attribute is the submodule's
    (imported on first access), and setting one sets it on the submodule."""

    __slots__ = ("_name",)

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)

    def __call__(self, *args, **kwargs):
        return getattr(_api(), self._name)(*args, **kwargs)

    def _module(self) -> types.ModuleType:
        return importlib.import_module(f"{__name__}.{self._name}")

    @property
    def __wrapped__(self):              # inspect.signature and help() read the function's
        return getattr(_api(), self._name)

    @property
    def __doc__(self):                  # type: ignore[override]
        return getattr(_api(), self._name).__doc__

    @property
    def __name__(self) -> str:
        return self._name

    def __getattr__(self, attr: str):
        if attr == "_name":             # not set yet (copy, pickle): no recursion
            raise AttributeError(attr)
        return getattr(self._module(), attr)

    def __setattr__(self, attr: str, value) -> None:
        setattr(self._module(), attr, value)

    def __delattr__(self, attr: str) -> None:
        delattr(self._module(), attr)

    def __dir__(self):
        return dir(self._module())

    def __repr__(self) -> str:
        return (f"<function {__name__}.{self._name} (also module {__name__}.{self._name}: "
                "its attributes)>")


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # importing caffe2metal.convert (say) binds the submodule on the package;
        # the API function keeps the name, and reaches the submodule itself
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


convert = _Function("convert")
verify = _Function("verify")
example = _Function("example")
sys.modules[__name__].__class__ = _Package


def inspect(prototxt: PathLike, caffemodel: PathLike | None = None) -> Inspection:
    """Read a net (and its weights, when given): layers, shapes, counts and fold plan.
    See ``caffe2metal.api.inspect``."""
    return _api().inspect(prototxt, caffemodel)


def compare(dir_a: PathLike, dir_b: PathLike) -> DirectoryComparison:
    """Max |A - B| of every weights/bias file two output directories share.
    See ``caffe2metal.api.compare``."""
    return _api().compare(dir_a, dir_b)


def __getattr__(name: str):
    if name in _RESULTS or name == "api":
        api = _api()
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_RESULTS) | {"api"})
