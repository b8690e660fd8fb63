"""TensorRT 10.x ONNX operator support table (what ``trt_lint`` checks the graphs against).

Source: onnx/onnx-tensorrt ``docs/operators.md``, "Supported ONNX Operators" as published
for TensorRT 10.15 (branch release/10.15: "TensorRT 10.15 supports operators in the
inclusive range of opset 9 to opset 24"). Each supported operator is listed with the
tensor types of the table's "Supported Types" column and, where the table has one, its
restriction. The export targets every TensorRT 10 release, so the opset ceiling is the
one of TensorRT 10.0 (opset 20), the lowest of the 10.x parsers; the operators that later
10.x releases added (Attention, RotaryEmbedding, RMSNormalization, TensorScatter) only
exist at opsets 23-24, above that ceiling, so they cannot appear in a graph that passes
the opset check.

Update this file (and ``SOURCE``) when targeting another TensorRT release.
"""

from __future__ import annotations

SOURCE = ("https://github.com/onnx/onnx-tensorrt/blob/release/10.15/docs/operators.md "
          "(TensorRT 10.15, opsets 9-24)")
TARGET = "TensorRT 10.x"
MIN_OPSET = 9
MAX_OPSET = 20  # TensorRT 10.0's parser; later 10.x parsers accept more
TOPK_MAX_K = 3840  # "K input must be less than 3840"

_F = ("FP32", "FP16", "BF16")
_FI = _F + ("INT32", "INT64")
_FIB = _FI + ("BOOL",)

# op -> (supported tensor types, restriction from the table or "")
SUPPORTED: dict[str, tuple[tuple[str, ...], str]] = {
    "Abs": (_FI, ""), "Acos": (_F, ""), "Acosh": (_F, ""), "Add": (_FI, ""), "And": (("BOOL",), ""),
    "ArgMax": (_FI, ""), "ArgMin": (_FI, ""), "Asin": (_F, ""), "Asinh": (_F, ""), "Atan": (_F, ""),
    "Atanh": (_F, ""),
    "AveragePool": (_F, "2D or 3D Pooling only. `dilations` must be empty or all ones"),
    "BatchNormalization": (_F, ""), "BlackmanWindow": (("FP32", "FP16"), ""),
    "Cast": (_FI + ("UINT8", "BOOL"), ""), "CastLike": (_FI + ("UINT8", "BOOL"), ""),
    "Ceil": (_F, ""), "Celu": (_F, ""), "Clip": (_F, ""), "Concat": (_FIB, ""),
    "Constant": (_F + ("FP8", "FP4", "INT4", "INT32", "INT64", "BOOL"),
                 "`sparse_value`, `value_string`, and `value_strings` attributes are unsupported."),
    "ConstantOfShape": (_F + ("FP8", "FP4", "INT4", "INT32", "INT64", "BOOL"), ""),
    "Conv": (_F, ""), "ConvTranspose": (_F, ""), "Cos": (_F, ""), "Cosh": (_F, ""),
    "CumSum": (_F, "`axis` must be a build-time constant"),
    "DeformConv": (("FP32", "FP16"), "`input` must have 1D or 2D spatial dimensions"),
    "DepthToSpace": (_FI, ""),
    "DequantizeLinear": (("INT8", "FP8", "FP4", "INT4"), "`x_zero_point` must be zero"),
    "Div": (_FI, ""), "Dropout": (_F, "`is_training` must be an initializer and evaluate to False."),
    "Einsum": (_F, ""), "Elu": (_F, ""), "Equal": (_FI, ""), "Erf": (_F, ""), "Exp": (_F, ""),
    "Expand": (_FIB, ""), "EyeLike": (_FIB, "`input` must have static dimensions"), "Flatten": (_FIB, ""),
    "Floor": (_F, ""), "Gather": (_FIB, ""), "GatherElements": (_FIB, ""), "GatherND": (_FIB, ""),
    "Gelu": (_F + ("INT8", "INT32", "INT64"), ""), "Gemm": (_F, ""), "GlobalAveragePool": (_F, ""),
    "GlobalLpPool": (_F, ""), "GlobalMaxPool": (_F, ""), "Greater": (_FI, ""), "GreaterOrEqual": (_FI, ""),
    "GridSample": (("FP32", "FP16"), "Input must be 4D input."), "GroupNormalization": (_F, ""),
    "GRU": (_F, ""), "HammingWindow": (("FP32", "FP16"), ""), "HannWindow": (("FP32", "FP16"), ""),
    "HardSigmoid": (_F, ""), "HardSwish": (_F, ""),
    "Hardmax": (_F, "`axis` dimension of input must be a build-time constant"), "Identity": (_FIB, ""),
    "If": (_FIB, "Output tensors of the two conditional branches must have the same rank and must have "
                 "different names"),
    "ImageScaler": (_F, ""), "InstanceNormalization": (_F, ""), "IsInf": (_F, ""),
    "IsNaN": (_FI, ""), "LayerNormalization": (_F, "Only the first output `Y` is supported."),
    "LeakyRelu": (_F, ""), "Less": (_FI, ""), "LessOrEqual": (_FI, ""), "Log": (_F, ""),
    "LogSoftmax": (_F, ""),
    "Loop": (_FIB, "Scan output length cannot be dynamic. The shape of Loop carried dependencies must be the "
                   "same across all loop iterations."),
    "LRN": (_F, ""), "LSTM": (_F, "`input_forget` attribute must be 0. `layout` attribute must be 0."),
    "LpNormalization": (_F, ""), "LpPool": (_F, "`dilations` must be empty or all ones"), "MatMul": (_F, ""),
    "Max": (_FI, ""),
    "MaxPool": (_F, "2D or 3D pooling only. `Indices` output tensor unsupported. `dilations` must be empty or "
                    "all ones"),
    "Mean": (_F + ("FP8", "INT32", "INT64"), ""), "MeanVarianceNormalization": (_F, ""), "Min": (_FI, ""),
    "Mish": (("FP32", "FP16"), ""), "Mod": (_FI, ""), "Mul": (_FI, ""), "Neg": (_FI, ""),
    "NonMaxSuppression": (("FP32", "FP16"), ""), "NonZero": (("FP32", "FP16"), ""), "Not": (("BOOL",), ""),
    "OneHot": (_FIB, "`depth` must be a build-time constant"), "Or": (("BOOL",), ""), "Pad": (_FI, ""),
    "ParametricSoftplus": (_F, ""), "Pow": (_FI, ""), "PRelu": (_F, ""),
    "QuantizeLinear": (_F, "`y_zero_point` must be 0"),
    "RandomNormal": (_F, ""), "RandomNormalLike": (_F, ""), "RandomUniform": (_F, ""),
    "RandomUniformLike": (_F, ""), "Range": (_FI, ""), "Reciprocal": (_F, ""),
    **{op: (_FI, "`axes` must be an initializer") for op in (
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSum", "ReduceSumSquare")},
    "Relu": (_FI, ""), "Reshape": (_FIB, ""),
    "Resize": (_F, "Supported modes: nearest, linear; antialiasing is not supported"),
    "ReverseSequence": (_FIB, ""), "RNN": (_F, ""), "RoiAlign": (("FP32", "FP16"), ""), "Round": (_F, ""),
    "STFT": (("FP32",), "`frame_step` and `window` must be an initializer. Input must be real-valued."),
    "ScaledTanh": (_F, ""), "Scan": (_F, ""), "Scatter": (_FI, ""), "ScatterElements": (_FI, ""),
    "ScatterND": (_FI, "`reduction` other than `none` is not supported"), "Selu": (_F, ""),
    "Shape": (_FIB, ""), "Shrink": (_FI, ""), "Sigmoid": (_F, ""), "Sign": (_FI, ""), "Sin": (_F, ""),
    "Sinh": (_F, ""), "Size": (_FIB, ""), "Slice": (_FIB, ""), "Softmax": (_F, ""), "Softplus": (_F, ""),
    "Softsign": (_F, ""), "SpaceToDepth": (_FI, ""), "Split": (_FIB, ""), "Sqrt": (_F, ""),
    "Squeeze": (_FIB, "`axes` must be resolvable to a constant."), "Sub": (_FI, ""), "Sum": (_FI, ""),
    "Tan": (_F, ""), "Tanh": (_F, ""), "ThresholdedRelu": (_F, ""), "Tile": (_FIB, ""),
    "TopK": (_FI, "`sorted` must be 1. `K` input must be less than 3840."), "Transpose": (_FIB, ""),
    "Trilu": (_FIB, ""), "Unsqueeze": (_FIB, "`axes` must be resolvable to a constant."),
    "Upsample": (_F, ""), "Where": (_FIB, ""), "Xor": (("BOOL",), ""),
}

# Listed as "N" (not supported) in the same table.
UNSUPPORTED: frozenset[str] = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Col2Im",
    "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
    "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence",
    "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
})

# Operators whose output shape depends on input values (TensorRT: slow or unsupported).
DATA_DEPENDENT_SHAPE_OPS: frozenset[str] = frozenset({"NonZero", "NonMaxSuppression", "Unique", "Compress"})

# Inputs that TensorRT reads as shape tensors (build/enqueue-time sizes): op -> input indices.
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "ConstantOfShape": (0,), "Tile": (1,), "Slice": (1, 2, 3, 4),
    "Range": (0, 1, 2), "TopK": (1,), "Pad": (1,), "Resize": (2, 3), "OneHot": (1,), "Squeeze": (1,),
    "Unsqueeze": (1,), "Split": (1,), "CumSum": (1,), "Upsample": (1,),
    **{op: (1,) for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                           "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
}

# Inputs that must be build-time constants (initializers or constant-foldable).
CONSTANT_INPUTS: dict[str, tuple[int, ...]] = {
    "TopK": (1,), "CumSum": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "OneHot": (1,),
    **{op: (1,) for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                           "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
}

# ONNX TensorProto element type -> the table's type names.
ONNX_TYPE_NAMES: dict[int, str] = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16",
                                   11: "DOUBLE", 16: "BF16", 22: "INT4"}

# Which input's type the table's "Supported Types" refers to (default: input 0); -1 = output 0.
TYPE_OPERAND: dict[str, int] = {"Where": 1, "Constant": -1, "ConstantOfShape": -1, "RandomNormal": -1,
                                "RandomUniform": -1, "If": -1, "Loop": -1, "Scan": -1}


def is_supported(op: str) -> bool:
    return op in SUPPORTED


def supported_types(op: str) -> tuple[str, ...]:
    return SUPPORTED[op][0]
