"""Checks of proto/caffe.proto and the generated proto/caffe_pb2.py.

* the checked-in caffe_pb2.py is what the pinned protoc (grpcio-tools
  1.78.0, part of the ``test`` extra) makes from caffe.proto;
* field numbers, types, defaults and enum values that Caffe files depend on
  (spot checks, each looked up in the BVLC master / weiliu89 ssd / fork
  caffe.proto sources named in caffe.proto);
* every real deploy/merged prototxt in ../shared/models parses strictly.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor as _d
from google.protobuf import descriptor_pb2, text_format

from caffe2metal.caffe.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO / "proto"
MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
PINNED_GRPC_TOOLS = "1.78.0"


# --------------------------------------------------------------- generated code

def test_generated_module_matches_caffe_proto(tmp_path):
    """proto/caffe_pb2.py must be the pinned protoc's output for caffe.proto
    (run `make proto` after editing caffe.proto)."""
    assert importlib.metadata.version("grpcio-tools") == PINNED_GRPC_TOOLS, (
        "caffe_pb2.py is generated with grpcio-tools " + PINNED_GRPC_TOOLS)
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}",
         f"--python_out={tmp_path}", str(PROTO_DIR / "caffe.proto")],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    fresh = (tmp_path / "caffe_pb2.py").read_bytes()
    checked_in = (PROTO_DIR / "caffe_pb2.py").read_bytes()
    assert fresh == checked_in, "proto/caffe_pb2.py is stale: run `make proto`"


def test_loaded_module_is_the_checked_in_one():
    assert Path(caffe_pb2.__file__).resolve() == (PROTO_DIR / "caffe_pb2.py").resolve()
    fdp = descriptor_pb2.FileDescriptorProto.FromString(caffe_pb2.DESCRIPTOR.serialized_pb)
    assert (fdp.name, fdp.package) == ("caffe.proto", "caffe")
    assert fdp.syntax in ("", "proto2")  # protoc leaves it empty for proto2


# ----------------------------------------------------------------- spot checks

# (message, field, number). Sources: BVLC/caffe master caffe.proto (via
# lutzroeder/netron source/caffe-proto.js @048b7a9c), weiliu89/caffe ssd
# branch caffe.proto (@8a65ae31), and the fork files named per entry.
FIELD_NUMBERS = [
    # blobs / data
    ("BlobShape", "dim", 1),
    ("BlobProto", "shape", 7),
    ("BlobProto", "data", 5),
    ("BlobProto", "diff", 6),
    ("BlobProto", "double_data", 8),
    ("BlobProto", "double_diff", 9),
    ("BlobProto", "num", 1),
    ("BlobProto", "channels", 2),
    ("BlobProto", "height", 3),
    ("BlobProto", "width", 4),
    ("BlobProtoVector", "blobs", 1),
    ("Datum", "encoded", 7),
    ("Datum", "float_data", 6),
    ("FillerParameter", "variance_norm", 8),
    ("FillerParameter", "sparse", 7),
    # net / solver / state
    ("NetParameter", "name", 1),
    ("NetParameter", "input", 3),
    ("NetParameter", "input_shape", 8),
    ("NetParameter", "input_dim", 4),
    ("NetParameter", "force_backward", 5),
    ("NetParameter", "state", 6),
    ("NetParameter", "debug_info", 7),
    ("NetParameter", "layer", 100),
    ("NetParameter", "layers", 2),
    ("SolverParameter", "net", 24),
    ("SolverParameter", "type", 40),
    ("SolverParameter", "layer_wise_reduce", 41),
    ("SolverParameter", "weights", 42),
    ("SolverParameter", "random_seed", 20),
    ("SolverState", "current_step", 4),
    ("NetState", "phase", 1),
    ("NetStateRule", "not_stage", 5),
    ("ParamSpec", "lr_mult", 3),
    ("ParamSpec", "decay_mult", 4),
    # LayerParameter, BVLC master
    ("LayerParameter", "name", 1),
    ("LayerParameter", "type", 2),
    ("LayerParameter", "bottom", 3),
    ("LayerParameter", "top", 4),
    ("LayerParameter", "phase", 10),
    ("LayerParameter", "param", 6),
    ("LayerParameter", "blobs", 7),
    ("LayerParameter", "include", 8),
    ("LayerParameter", "propagate_down", 11),
    ("LayerParameter", "transform_param", 100),
    ("LayerParameter", "loss_param", 101),
    ("LayerParameter", "convolution_param", 106),
    ("LayerParameter", "pooling_param", 121),
    ("LayerParameter", "inner_product_param", 117),
    ("LayerParameter", "batch_norm_param", 139),
    ("LayerParameter", "scale_param", 142),
    ("LayerParameter", "bias_param", 141),
    ("LayerParameter", "eltwise_param", 110),
    ("LayerParameter", "concat_param", 104),
    ("LayerParameter", "relu_param", 123),
    ("LayerParameter", "prelu_param", 131),
    ("LayerParameter", "input_param", 143),
    ("LayerParameter", "crop_param", 144),
    ("LayerParameter", "python_param", 130),
    ("LayerParameter", "reshape_param", 133),
    ("LayerParameter", "flatten_param", 135),
    ("LayerParameter", "embed_param", 137),
    ("LayerParameter", "tile_param", 138),
    ("LayerParameter", "elu_param", 140),
    ("LayerParameter", "parameter_param", 145),
    ("LayerParameter", "recurrent_param", 146),
    ("LayerParameter", "swish_param", 147),
    ("LayerParameter", "clip_param", 148),
    ("LayerParameter", "window_data_param", 129),
    # LayerParameter, SSD
    ("LayerParameter", "annotated_data_param", 200),
    ("LayerParameter", "multibox_loss_param", 201),
    ("LayerParameter", "permute_param", 202),
    ("LayerParameter", "prior_box_param", 203),
    ("LayerParameter", "detection_output_param", 204),
    ("LayerParameter", "detection_evaluate_param", 205),
    ("LayerParameter", "norm_param", 206),  # message NormalizeParameter
    ("LayerParameter", "video_data_param", 207),
    # LayerParameter, forks at their own (non-clashing) numbers
    ("LayerParameter", "bn_param", 45),                # caffe-segnet, caffe-enet
    ("LayerParameter", "dense_image_data_param", 46),  # caffe-enet
    ("LayerParameter", "upsample_param", 149),         # darknet2caffe
    ("LayerParameter", "interp_param", 163),           # hszhao/PSPNet
    ("LayerParameter", "shuffle_channel_param", 164),  # farmingyard/ShuffleNet
    # per-layer messages
    ("ConvolutionParameter", "num_output", 1),
    ("ConvolutionParameter", "bias_term", 2),
    ("ConvolutionParameter", "pad", 3),
    ("ConvolutionParameter", "kernel_size", 4),
    ("ConvolutionParameter", "group", 5),
    ("ConvolutionParameter", "stride", 6),
    ("ConvolutionParameter", "dilation", 18),
    ("ConvolutionParameter", "kernel_h", 11),
    ("ConvolutionParameter", "axis", 16),
    ("BatchNormParameter", "use_global_stats", 1),
    ("BatchNormParameter", "moving_average_fraction", 2),
    ("BatchNormParameter", "eps", 3),
    ("BatchNormParameter", "scale_bias", 7),  # NVIDIA/caffe
    ("ScaleParameter", "bias_term", 4),
    ("ScaleParameter", "bias_filler", 5),
    ("InnerProductParameter", "transpose", 6),
    ("PoolingParameter", "global_pooling", 12),
    ("PoolingParameter", "round_mode", 13),
    ("InfogainLossParameter", "axis", 2),
    ("LossParameter", "normalization", 3),
    ("TransformationParameter", "mean_value", 5),
    ("TransformationParameter", "resize_param", 8),   # SSD
    ("TransformationParameter", "expand_param", 14),  # SSD
    ("DataParameter", "prefetch", 10),
    ("PythonParameter", "param_str", 3),
    ("ClipParameter", "max", 2),
    ("SwishParameter", "beta", 1),
    # SSD messages
    ("PriorBoxParameter", "min_size", 1),
    ("PriorBoxParameter", "max_size", 2),
    ("PriorBoxParameter", "aspect_ratio", 3),
    ("PriorBoxParameter", "flip", 4),
    ("PriorBoxParameter", "clip", 5),
    ("PriorBoxParameter", "variance", 6),
    ("PriorBoxParameter", "img_size", 7),
    ("PriorBoxParameter", "img_h", 8),
    ("PriorBoxParameter", "img_w", 9),
    ("PriorBoxParameter", "step", 10),
    ("PriorBoxParameter", "step_h", 11),
    ("PriorBoxParameter", "step_w", 12),
    ("PriorBoxParameter", "offset", 13),
    ("DetectionOutputParameter", "num_classes", 1),
    ("DetectionOutputParameter", "nms_param", 4),
    ("DetectionOutputParameter", "save_output_param", 5),
    ("DetectionOutputParameter", "code_type", 6),
    ("DetectionOutputParameter", "keep_top_k", 7),
    ("DetectionOutputParameter", "variance_encoded_in_target", 8),
    ("DetectionOutputParameter", "confidence_threshold", 9),
    ("NonMaximumSuppressionParameter", "nms_threshold", 1),
    ("NonMaximumSuppressionParameter", "eta", 3),
    ("SaveOutputParameter", "label_map_file", 4),
    ("PermuteParameter", "order", 1),
    ("NormalizeParameter", "across_spatial", 1),
    ("NormalizeParameter", "channel_shared", 3),
    ("MultiBoxLossParameter", "encode_variance_in_target", 16),
    ("MultiBoxLossParameter", "use_prior_for_nms", 23),
    ("ResizeParameter", "interp_mode", 7),
    ("NoiseParameter", "saltpepper_param", 10),
    ("DistortionParameter", "random_order_prob", 11),
    ("ExpansionParameter", "max_expand_ratio", 2),
    ("EmitConstraint", "emit_overlap", 2),
    ("NormalizedBBox", "size", 8),
    ("LabelMapItem", "display_name", 3),
    ("BatchSampler", "max_trials", 5),
    ("SampleConstraint", "max_object_coverage", 6),
    ("AnnotatedDatum", "annotation_group", 3),
    ("AnnotationGroup", "annotation", 2),
    ("VideoDataParameter", "skip_frames", 4),
    ("SolverParameter", "show_per_class_result", 44),
    # fork messages
    ("BNParameter", "scale_filler", 1),   # caffe-segnet / caffe-enet
    ("BNParameter", "shift_filler", 2),
    ("BNParameter", "bn_mode", 3),
    ("UpsampleParameter", "scale", 1),    # caffe-segnet
    ("UpsampleParameter", "upsample_h", 6),
    ("UpsampleParameter", "upsample_w", 7),
    ("ShuffleChannelParameter", "group", 1),
    ("InterpParameter", "zoom_factor", 3),
    ("InterpParameter", "pad_end", 6),
    # legacy
    ("V1LayerParameter", "bottom", 2),
    ("V1LayerParameter", "top", 3),
    ("V1LayerParameter", "name", 4),
    ("V1LayerParameter", "type", 5),
    ("V1LayerParameter", "blobs", 6),
    ("V1LayerParameter", "blobs_lr", 7),
    ("V1LayerParameter", "weight_decay", 8),
    ("V1LayerParameter", "convolution_param", 10),
    ("V1LayerParameter", "pooling_param", 19),
    ("V1LayerParameter", "include", 32),
    ("V1LayerParameter", "param", 1001),
    ("V1LayerParameter", "layer", 1),
    ("V0LayerParameter", "kernelsize", 8),
    ("V0LayerParameter", "blobs", 50),
    ("V0LayerParameter", "hdf5_output_param", 1001),
]


def _field(message: str, field: str) -> _d.FieldDescriptor:
    desc = caffe_pb2.DESCRIPTOR.message_types_by_name[message]
    assert field in desc.fields_by_name, f"{message}.{field} missing"
    return desc.fields_by_name[field]


@pytest.mark.parametrize("message,field,number", FIELD_NUMBERS,
                         ids=[f"{m}.{f}" for m, f, _ in FIELD_NUMBERS])
def test_field_number(message, field, number):
    assert _field(message, field).number == number


def test_spot_checks_cover_every_message_family():
    covered = {m for m, _, _ in FIELD_NUMBERS}
    assert len(FIELD_NUMBERS) >= 40
    for family in ("BlobProto", "NetParameter", "SolverParameter", "LayerParameter",
                   "ConvolutionParameter", "BatchNormParameter", "PriorBoxParameter",
                   "DetectionOutputParameter", "BNParameter", "V1LayerParameter",
                   "V0LayerParameter"):
        assert family in covered


# (message, field, scalar type, cardinality) for fields whose type matters on
# the wire or in the text format.
T = _d.FieldDescriptor
FIELD_TYPES = [
    ("BlobShape", "dim", T.TYPE_INT64, "repeated"),
    ("BlobProto", "num", T.TYPE_INT32, "optional"),
    ("BlobProto", "data", T.TYPE_FLOAT, "repeated"),
    ("BlobProto", "double_data", T.TYPE_DOUBLE, "repeated"),
    ("NetParameter", "input_dim", T.TYPE_INT32, "repeated"),
    ("SolverParameter", "random_seed", T.TYPE_INT64, "optional"),
    ("ConvolutionParameter", "kernel_size", T.TYPE_UINT32, "repeated"),
    ("ConvolutionParameter", "num_output", T.TYPE_UINT32, "optional"),
    ("PoolingParameter", "kernel_size", T.TYPE_UINT32, "optional"),
    ("PriorBoxParameter", "min_size", T.TYPE_FLOAT, "repeated"),
    ("PriorBoxParameter", "img_size", T.TYPE_UINT32, "optional"),
    ("DetectionOutputParameter", "background_label_id", T.TYPE_INT32, "optional"),
    ("MultiBoxLossParameter", "background_label_id", T.TYPE_UINT32, "optional"),
    ("ClipParameter", "min", T.TYPE_FLOAT, "required"),
    ("ClipParameter", "max", T.TYPE_FLOAT, "required"),
    ("V1LayerParameter", "type", T.TYPE_ENUM, "optional"),
    ("ParamSpec", "share_mode", T.TYPE_ENUM, "optional"),
]


def _cardinality(fd: _d.FieldDescriptor) -> str:
    if fd.is_required:
        return "required"
    return "repeated" if fd.is_repeated else "optional"


@pytest.mark.parametrize("message,field,ftype,card", FIELD_TYPES,
                         ids=[f"{m}.{f}" for m, f, _, _ in FIELD_TYPES])
def test_field_type(message, field, ftype, card):
    fd = _field(message, field)
    assert (fd.type, _cardinality(fd)) == (ftype, card)


PACKED = [("BlobShape", "dim"), ("BlobProto", "data"), ("BlobProto", "diff"),
          ("BlobProto", "double_data"), ("BlobProto", "double_diff")]
NOT_PACKED = [("NetParameter", "input_dim"), ("Datum", "float_data"),
              ("ConvolutionParameter", "kernel_size"), ("PriorBoxParameter", "variance"),
              ("V1LayerParameter", "blobs_lr"), ("LayerParameter", "loss_weight")]


@pytest.mark.parametrize("message,field", PACKED)
def test_packed(message, field):
    assert _field(message, field).is_packed


@pytest.mark.parametrize("message,field", NOT_PACKED)
def test_not_packed(message, field):
    # proto2 repeated scalars are unpacked unless marked; Caffe only marks blobs
    assert not _field(message, field).is_packed


DEFAULTS = [
    ("FillerParameter", "type", "constant"),
    ("FillerParameter", "std", 1.0),
    ("FillerParameter", "sparse", -1),
    ("ConvolutionParameter", "bias_term", True),
    ("ConvolutionParameter", "group", 1),
    ("BatchNormParameter", "moving_average_fraction", pytest.approx(0.999)),
    ("BatchNormParameter", "eps", pytest.approx(1e-5)),
    ("ScaleParameter", "bias_term", False),
    ("ScaleParameter", "axis", 1),
    ("ScaleParameter", "num_axes", 1),
    ("InnerProductParameter", "bias_term", True),
    ("PoolingParameter", "stride", 1),
    ("PoolingParameter", "round_mode", caffe_pb2.PoolingParameter.CEIL),
    ("PoolingParameter", "ceil_mode", True),
    ("EltwiseParameter", "operation", caffe_pb2.EltwiseParameter.SUM),
    ("LRNParameter", "local_size", 5),
    ("LRNParameter", "beta", 0.75),
    ("NetState", "phase", caffe_pb2.TEST),
    ("ReshapeParameter", "num_axes", -1),
    ("FlattenParameter", "end_axis", -1),
    ("DataParameter", "prefetch", 4),
    ("SolverParameter", "rms_decay", pytest.approx(0.99)),
    ("SolverParameter", "solver_mode", caffe_pb2.SolverParameter.GPU),
    ("PriorBoxParameter", "flip", True),
    ("PriorBoxParameter", "clip", False),
    ("PriorBoxParameter", "offset", 0.5),
    ("DetectionOutputParameter", "share_location", True),
    ("DetectionOutputParameter", "keep_top_k", -1),
    ("DetectionOutputParameter", "code_type", caffe_pb2.PriorBoxParameter.CORNER),
    ("NonMaximumSuppressionParameter", "nms_threshold", pytest.approx(0.3)),
    ("NormalizeParameter", "eps", pytest.approx(1e-10)),
    ("NormalizeParameter", "across_spatial", True),
    ("MultiBoxLossParameter", "loc_loss_type", caffe_pb2.MultiBoxLossParameter.SMOOTH_L1),
    ("MultiBoxLossParameter", "neg_pos_ratio", 3.0),
    ("BNParameter", "bn_mode", caffe_pb2.BNParameter.LEARN),
    ("UpsampleParameter", "scale", 2),
    ("V0LayerParameter", "det_crop_mode", "warp"),
]


@pytest.mark.parametrize("message,field,default", DEFAULTS,
                         ids=[f"{m}.{f}" for m, f, _ in DEFAULTS])
def test_default(message, field, default):
    fd = _field(message, field)
    assert fd.has_default_value
    assert fd.default_value == default
    # and the generated class reports it for an unset field
    assert getattr(getattr(caffe_pb2, message)(), field) == default


ENUM_VALUES = [
    ("V1LayerParameter", "LayerType", {
        "NONE": 0, "ABSVAL": 35, "ACCURACY": 1, "ARGMAX": 30, "BNLL": 2, "CONCAT": 3,
        "CONTRASTIVE_LOSS": 37, "CONVOLUTION": 4, "DATA": 5, "DECONVOLUTION": 39,
        "DROPOUT": 6, "DUMMY_DATA": 32, "EUCLIDEAN_LOSS": 7, "ELTWISE": 25, "EXP": 38,
        "FLATTEN": 8, "HDF5_DATA": 9, "HDF5_OUTPUT": 10, "HINGE_LOSS": 28, "IM2COL": 11,
        "IMAGE_DATA": 12, "INFOGAIN_LOSS": 13, "INNER_PRODUCT": 14, "LRN": 15,
        "MEMORY_DATA": 29, "MULTINOMIAL_LOGISTIC_LOSS": 16, "MVN": 34, "POOLING": 17,
        "POWER": 26, "RELU": 18, "SIGMOID": 19, "SIGMOID_CROSS_ENTROPY_LOSS": 27,
        "SILENCE": 36, "SOFTMAX": 20, "SOFTMAX_LOSS": 21, "SPLIT": 22, "SLICE": 33,
        "TANH": 23, "WINDOW_DATA": 24, "THRESHOLD": 31}),
    ("PriorBoxParameter", "CodeType", {"CORNER": 1, "CENTER_SIZE": 2, "CORNER_SIZE": 3}),
    ("PoolingParameter", "PoolMethod", {"MAX": 0, "AVE": 1, "STOCHASTIC": 2}),
    ("PoolingParameter", "RoundMode", {"CEIL": 0, "FLOOR": 1}),
    ("LossParameter", "NormalizationMode", {"FULL": 0, "VALID": 1, "BATCH_SIZE": 2, "NONE": 3}),
    ("ReductionParameter", "ReductionOp", {"SUM": 1, "ASUM": 2, "SUMSQ": 3, "MEAN": 4}),
    ("HingeLossParameter", "Norm", {"L1": 1, "L2": 2}),
    ("ResizeParameter", "Resize_mode", {"WARP": 1, "FIT_SMALL_SIZE": 2,
                                        "FIT_LARGE_SIZE_AND_PAD": 3}),
    ("MultiBoxLossParameter", "MiningType", {"NONE": 0, "MAX_NEGATIVE": 1, "HARD_EXAMPLE": 2}),
    ("BNParameter", "BNMode", {"LEARN": 0, "INFERENCE": 1}),
    ("SolverParameter", "SolverType", {"SGD": 0, "NESTEROV": 1, "ADAGRAD": 2, "RMSPROP": 3,
                                       "ADADELTA": 4, "ADAM": 5}),
]


@pytest.mark.parametrize("message,enum,values", ENUM_VALUES,
                         ids=[f"{m}.{e}" for m, e, _ in ENUM_VALUES])
def test_enum_values(message, enum, values):
    desc = caffe_pb2.DESCRIPTOR.message_types_by_name[message].enum_types_by_name[enum]
    assert {v.name: v.number for v in desc.values} == values


def test_phase_enum():
    assert {v.name: v.number for v in caffe_pb2.Phase.DESCRIPTOR.values} == {"TRAIN": 0, "TEST": 1}


# ----------------------------------------------------------- wire behaviour

def test_wire_bytes_of_known_fields():
    # BlobProto.data is field 5, packed: tag 0x2a, length 8, two little-endian floats
    blob = caffe_pb2.BlobProto(data=[1.0, 2.0])
    assert blob.SerializeToString() == b"\x2a\x08\x00\x00\x80\x3f\x00\x00\x00\x40"
    # BlobShape.dim is field 1, packed int64 varints
    assert caffe_pb2.BlobShape(dim=[1, 3]).SerializeToString() == b"\x0a\x02\x01\x03"
    # NetParameter.layer is field 100 (tag varint 0xa2 0x06), LayerParameter.name field 1
    net = caffe_pb2.NetParameter()
    net.layer.add(name="a")
    assert net.SerializeToString() == b"\xa2\x06\x03\x0a\x01a"
    # V1LayerParameter.type CONVOLUTION (4) is field 5 varint
    assert caffe_pb2.V1LayerParameter(type=caffe_pb2.V1LayerParameter.CONVOLUTION) \
        .SerializeToString() == b"\x28\x04"


def test_unpacked_blob_data_still_decodes():
    # Writers that emit BlobProto.data unpacked (tag 0x2d per float) decode too.
    blob = caffe_pb2.BlobProto.FromString(b"\x2d\x00\x00\x80\x3f\x2d\x00\x00\x00\x40")
    assert list(blob.data) == [1.0, 2.0]


def test_fork_fields_parse_in_text():
    text = """
    layer { name: "bn" type: "BN" bn_param { bn_mode: INFERENCE
            scale_filler { type: "constant" value: 1 } shift_filler { value: 0.001 } } }
    layer { name: "up" type: "Upsample" upsample_param { scale: 2 upsample_h: 45 upsample_w: 60 } }
    layer { name: "sh" type: "ShuffleChannel" shuffle_channel_param { group: 3 } }
    layer { name: "ip" type: "Interp" interp_param { zoom_factor: 8 pad_beg: 0 pad_end: 0 } }
    layer { name: "rg" type: "Reorg" reorg_param { stride: 2 } }
    layer { name: "p" type: "Pooling" pooling_param { pool: MAX kernel_size: 3 ceil_mode: false } }
    layer { name: "b" type: "BatchNorm" batch_norm_param { scale_bias: true } }
    """
    net = text_format.Parse(text, caffe_pb2.NetParameter())
    bn, up, sh, ip, rg, pool, nvbn = net.layer
    assert bn.bn_param.bn_mode == caffe_pb2.BNParameter.INFERENCE
    assert bn.bn_param.shift_filler.value == pytest.approx(0.001)
    assert (up.upsample_param.scale, up.upsample_param.upsample_h) == (2, 45)
    assert sh.shuffle_channel_param.group == 3
    assert ip.interp_param.zoom_factor == 8
    assert rg.reorg_param.stride == 2
    assert pool.pooling_param.HasField("ceil_mode") and not pool.pooling_param.ceil_mode
    assert nvbn.batch_norm_param.scale_bias


def test_unknown_field_is_rejected():
    with pytest.raises(text_format.ParseError):
        text_format.Parse('layer { name: "x" no_such_param { a: 1 } }', caffe_pb2.NetParameter())


# --------------------------------------------------------- real model files

def _model_files() -> list[Path]:
    if not MODELS.is_dir():
        return []
    return sorted(p for name in ("deploy.prototxt", "merged.prototxt")
                  for p in MODELS.glob(f"*/{name}"))


@pytest.mark.parametrize("path", _model_files(),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_prototxt_parses(path):
    text = path.read_bytes().decode("utf-8")
    net = caffe_pb2.NetParameter()
    text_format.Parse(text, net, allow_unknown_field=False)
    assert len(net.layer) + len(net.layers) > 0
    # strict parse must not be a partial one: printing and re-parsing is stable
    again = text_format.Parse(text_format.MessageToString(net), caffe_pb2.NetParameter())
    assert again == net
