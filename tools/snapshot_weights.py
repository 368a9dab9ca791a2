"""Give every real architecture in ../shared/models deterministic synthetic weights, once.

    python -m tools.snapshot_weights DIR

writes DIR/<model>/deploy.prototxt and deploy.caffemodel (seed 0, calibrated in
OpenCV where OpenCV runs the net), the inputs of ``tools/snapshot_outputs.sh``.
Make them with one version of caffe2metal and feed both versions the same files.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from caffe2metal.caffe.caffemodel import write_caffemodel
from caffe2metal.errors import Caffe2MetalError
from caffe2metal.examples import weights as synth
from caffe2metal.export.caffe import merged_layers
from caffe2metal.net.reader import read_prototxt

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"


def main(dst: Path) -> None:
    for proto in sorted(SHARED_MODELS.glob("*/deploy.prototxt")):
        d = dst / proto.parent.name
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(proto, d / "deploy.prototxt")
        model = read_prototxt(d / "deploy.prototxt")
        synth.init_weights(model, 0)
        try:
            synth.calibrate(model, 0)
        except Exception as e:          # OpenCV cannot run it: uncalibrated weights
            print(f"{proto.parent.name}: not calibrated ({type(e).__name__})")
        write_caffemodel(d / "deploy.caffemodel", merged_layers(model.graph),
                         net_name=model.graph.name)


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    except Caffe2MetalError as e:
        sys.exit(f"error: {e}")
