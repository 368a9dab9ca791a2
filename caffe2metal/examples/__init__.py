"""The built-in example: a small MobileNet-SSD-style detector with weights.

Same structure as chuanqi305's MobileNet-SSD (depthwise-separable backbone,
Convolution -> BatchNorm -> Scale -> ReLU everywhere, six SSD heads with
PriorBox/Permute/Flatten/Concat and DetectionOutput) at a quarter of the
width, so it converts in a blink.  Realistic details a converter must get
right: BatchNorm scale factors far from 1, statistics calibrated on real
activations, eps 1e-3 on the extra layers, a few chains where BatchNorm
writes a new top, and one convolution that keeps its own bias before its
BatchNorm.  Deterministic: the same files every time.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

STEM = "mobilenet_ssd_example"
NUM_CLASSES = 5
WIDTH = 0.25


def _ch(c: int) -> int:
    return max(8, int(c * WIDTH))


class _Net:
    def __init__(self):
        self.parts = []

    def add(self, text: str):
        self.parts.append(text.strip("\n"))

    def conv_bn(self, name, bottom, out, k, stride=1, group=1, eps=None, new_top=False,
                conv_bias=False):
        pad = (k - 1) // 2
        extra = f"\n    group: {group}\n    engine: CAFFE" if group > 1 else ""
        bias = "" if conv_bias else "\n    bias_term: false"
        self.add(f"""
layer {{
  name: "{name}"
  type: "Convolution"
  bottom: "{bottom}"
  top: "{name}"
  param {{ lr_mult: 1 decay_mult: 1 }}
  convolution_param {{
    num_output: {out}{bias}
    pad: {pad}
    kernel_size: {k}
    stride: {stride}{extra}
    weight_filler {{ type: "msra" }}
  }}
}}""")
        bn_top = f"{name}/bn" if new_top else name
        bn_param = f"\n  batch_norm_param {{ eps: {eps} }}" if eps is not None else ""
        self.add(f"""
layer {{
  name: "{name}/bn"
  type: "BatchNorm"
  bottom: "{name}"
  top: "{bn_top}"
  param {{ lr_mult: 0 decay_mult: 0 }}
  param {{ lr_mult: 0 decay_mult: 0 }}
  param {{ lr_mult: 0 decay_mult: 0 }}{bn_param}
}}
layer {{
  name: "{name}/scale"
  type: "Scale"
  bottom: "{bn_top}"
  top: "{bn_top}"
  scale_param {{ filler {{ value: 1 }} bias_term: true bias_filler {{ value: 0 }} }}
}}
layer {{
  name: "{name}/relu"
  type: "ReLU"
  bottom: "{bn_top}"
  top: "{bn_top}"
}}""")
        return bn_top

    def head_conv(self, name, bottom, out):
        self.add(f"""
layer {{
  name: "{name}"
  type: "Convolution"
  bottom: "{bottom}"
  top: "{name}"
  convolution_param {{ num_output: {out} kernel_size: 3 pad: 1 stride: 1 }}
}}
layer {{
  name: "{name}_perm"
  type: "Permute"
  bottom: "{name}"
  top: "{name}_perm"
  permute_param {{ order: 0 order: 2 order: 3 order: 1 }}
}}
layer {{
  name: "{name}_flat"
  type: "Flatten"
  bottom: "{name}_perm"
  top: "{name}_flat"
  flatten_param {{ axis: 1 }}
}}""")
        return f"{name}_flat"


def prototxt() -> str:
    n = _Net()
    n.add("""
# caffe2metal built-in example: MobileNet-SSD-style (width 0.25), 300x300, 5 classes
name: "MobileNet-SSD-example"
input: "data"
input_shape { dim: 1 dim: 3 dim: 300 dim: 300 }""")
    x = n.conv_bn("conv0", "data", _ch(32), 3, stride=2, conv_bias=True)
    plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
            (1024, 2), (1024, 1)]
    for i, (out, stride) in enumerate(plan, start=1):
        c_in = _ch(32) if i == 1 else _ch(plan[i - 2][0])
        name = f"conv{i}" if i < 9 else f"conv{i + 3}"
        x = n.conv_bn(f"{name}/dw", x, c_in, 3, stride=stride, group=c_in)
        x = n.conv_bn(name, x, _ch(out), 1, new_top=(i >= 9))
        if i == 8:
            feat11 = x
    feats = [feat11, x]
    for i, (mid, out) in enumerate([(256, 512), (128, 256), (128, 256), (64, 128)], start=14):
        x = n.conv_bn(f"conv{i}_1", x, _ch(mid), 1, eps=0.001)
        x = n.conv_bn(f"conv{i}_2", x, _ch(out), 3, stride=2, eps=0.001)
        feats.append(x)
    sizes = [(60, None, [2]), (105, 150, [2, 3]), (150, 195, [2, 3]), (195, 240, [2, 3]),
             (240, 285, [2, 3]), (285, 300, [2, 3])]
    locs, confs, priors = [], [], []
    for feat, (mn, mx, ars) in zip(feats, sizes, strict=True):
        per_cell = 1 + (mx is not None) + 2 * len(ars)
        head = feat.split("/")[0]
        locs.append(n.head_conv(f"{head}_mbox_loc", feat, per_cell * 4))
        confs.append(n.head_conv(f"{head}_mbox_conf", feat, per_cell * NUM_CLASSES))
        ar_text = " ".join(f"aspect_ratio: {a}" for a in ars)
        mx_text = f" max_size: {mx}" if mx else ""
        n.add(f"""
layer {{
  name: "{head}_mbox_priorbox"
  type: "PriorBox"
  bottom: "{feat}"
  bottom: "data"
  top: "{head}_mbox_priorbox"
  prior_box_param {{
    min_size: {mn}{mx_text} {ar_text}
    flip: true clip: false
    variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2
    offset: 0.5
  }}
}}""")
        priors.append(f"{head}_mbox_priorbox")

    def concat(name, bottoms, axis):
        b = "\n".join(f'  bottom: "{x}"' for x in bottoms)
        n.add(f"""
layer {{
  name: "{name}"
  type: "Concat"
{b}
  top: "{name}"
  concat_param {{ axis: {axis} }}
}}""")
    concat("mbox_loc", locs, 1)
    concat("mbox_conf", confs, 1)
    concat("mbox_priorbox", priors, 2)
    n.add(f"""
layer {{
  name: "mbox_conf_reshape"
  type: "Reshape"
  bottom: "mbox_conf"
  top: "mbox_conf_reshape"
  reshape_param {{ shape {{ dim: 0 dim: -1 dim: {NUM_CLASSES} }} }}
}}
layer {{
  name: "mbox_conf_softmax"
  type: "Softmax"
  bottom: "mbox_conf_reshape"
  top: "mbox_conf_softmax"
  softmax_param {{ axis: 2 }}
}}
layer {{
  name: "mbox_conf_flatten"
  type: "Flatten"
  bottom: "mbox_conf_softmax"
  top: "mbox_conf_flatten"
  flatten_param {{ axis: 1 }}
}}
layer {{
  name: "detection_out"
  type: "DetectionOutput"
  bottom: "mbox_loc"
  bottom: "mbox_conf_flatten"
  bottom: "mbox_priorbox"
  top: "detection_out"
  include {{ phase: TEST }}
  detection_output_param {{
    num_classes: {NUM_CLASSES}
    share_location: true
    background_label_id: 0
    nms_param {{ nms_threshold: 0.45 top_k: 100 }}
    code_type: CENTER_SIZE
    keep_top_k: 100
    confidence_threshold: 0.25
  }}
}}""")
    return "\n".join(n.parts) + "\n"


def build(directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``<STEM>.prototxt`` and ``<STEM>.caffemodel`` into ``directory``.

    All or nothing, never through a planted link:

    * a ``directory`` that does not exist is built like ``convert``'s OUT
      (``export.output.atomic_directory``: a hidden sibling renamed into place
      when complete; parents made for it are removed again on failure);
    * an existing directory (it may hold other files: ``example .``) gets each
      file as a temporary file next to it (``O_EXCL | O_NOFOLLOW``), renamed over
      the final name only once both are complete.  A rename replaces a symbolic
      link at that name, never writes through it; a failure removes the
      temporary files and leaves the directory as it was;
    * anything else (a file, a name that is not UTF-8) is an ExportError.
    """
    from ..errors import ExportError
    from ..export.output import _owner_can_write, atomic_directory
    from ..paths import check_name
    d = Path(check_name(directory, ExportError))
    proto, weights = d / f"{STEM}.prototxt", d / f"{STEM}.caffemodel"
    try:
        exists = os.path.lexists(d)
        is_dir = d.is_dir()
    except OSError as e:
        raise ExportError(f"cannot write the example: {e.strerror or e}", file=d) from None
    if exists and not is_dir:
        raise ExportError("exists and is not a directory", file=d)
    if not exists:
        try:
            with atomic_directory(d) as tmp:
                _write_files(tmp, d, seed)
        except ExportError as e:
            if not e.message.startswith("cannot write the example"):
                e.message = f"cannot write the example: {e.message}"
                e.args = (str(e),)
            raise
        return proto, weights
    with _owner_can_write():
        _write_files(d, d, seed)
    return proto, weights


def _write_files(d: Path, final: Path, seed: int) -> None:
    """Both files into ``d`` via temporary names, renamed into place together;
    errors name the files under ``final``."""
    from ..errors import Caffe2MetalError, ExportError
    from ..export.caffe import write_merged_caffemodel
    from ..export.output import _signals_held
    from ..net.reader import read_prototxt
    from . import weights as synth
    tag = f"{os.getpid()}.{os.urandom(4).hex()}"
    names = (f"{STEM}.prototxt", f"{STEM}.caffemodel")
    temps = [d / f".{n}.{tag}.tmp" for n in names]
    current = final / names[0]
    try:
        fd = os.open(temps[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL
                     | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(prototxt())
        model = read_prototxt(temps[0])
        synth.init_weights(model, seed)
        synth.calibrate(model, seed)
        current = final / names[1]
        write_merged_caffemodel(temps[1], model.graph)
        with _signals_held():       # both renames, or (a failure) neither file changed
            os.replace(temps[1], d / names[1])
            current = final / names[0]
            try:
                os.replace(temps[0], d / names[0])
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(d / names[1])
                raise
    except OSError as e:
        raise ExportError(f"cannot write the example: {e.strerror or e}", file=current) from None
    except Caffe2MetalError as e:
        if e.file is not None:
            for t, n in zip(temps, names, strict=True):
                e.file = e.file.replace(str(t), str(final / n))
            e.args = (str(e),)
        raise
    finally:
        for t in temps:
            with contextlib.suppress(OSError):
                os.unlink(t)
