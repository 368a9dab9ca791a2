"""Array helpers shared by the readers and writers."""
from __future__ import annotations

import numpy as np


def first_nonfinite(a: np.ndarray, chunk: int = 1 << 20) -> int | None:
    """Index of the first NaN/inf of ``a`` (flat), checked in chunks: no big temporaries."""
    flat = a.reshape(-1)
    for start in range(0, flat.size, chunk):
        part = np.isfinite(flat[start:start + chunk])
        if not part.all():
            return start + int(np.flatnonzero(~part)[0])
    return None
