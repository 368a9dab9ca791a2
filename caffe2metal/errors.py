"""One exception family for everything a user can get wrong.

Every message names where the problem is: the file, and when known the layer
and the blob.  The command line prints ``str(err)`` and exits with status 2.
``str(err)`` is always one line: control characters (a layer name with a
newline, say) are shown as escapes.
"""
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def one_line(text: str) -> str:
    """``text`` with control characters and line separators as Python escapes."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class Caffe2MetalError(Exception):
    """Base class of every error caffe2metal raises on bad input."""

    def __init__(self, message, *, file=None, layer=None, blob=None):
        self.message = message
        self.file = None if file is None else str(file)
        self.layer = layer
        self.blob = blob
        super().__init__(self.__str__())

    def __str__(self):
        where = []
        if self.file is not None:
            where.append(self.file)
        if self.layer is not None:
            where.append(f"layer '{self.layer}'")
        if self.blob is not None:
            where.append(f"blob {self.blob}")
        return one_line(": ".join([", ".join(where), str(self.message)]) if where
                        else str(self.message))


class ModelFormatError(Caffe2MetalError):
    """A prototxt or caffemodel that cannot be read as what it claims to be."""


class GraphError(Caffe2MetalError):
    """A net whose structure is inconsistent (unknown bottom, wrong blob count, ...)."""


class VerificationUnavailable(Caffe2MetalError):
    """The verification could not run although its input is fine: OpenCV cannot load
    or run the model (a layer it lacks), OpenCV is missing, out of memory.  The
    command line's exit status 3."""


class ExportError(Caffe2MetalError):
    """Something that cannot be written as asked (name clash, unsupported layout, ...)."""
