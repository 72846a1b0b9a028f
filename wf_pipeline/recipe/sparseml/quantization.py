"""SparseML's `!QuantizationModifier` as wf-pipeline's `quantize` section.

SparseML quantizes by quantization-aware training (fake-quantized modules from `start_epoch` on);
wf-pipeline quantizes after export, by static INT8 calibration in ONNX Runtime (QDQ, per-channel
symmetric INT8 weights). So the modifier switches quantization on and its training schedule is recorded
as ignored, never silently: the translation says that QAT becomes post-training calibration.
"""
from __future__ import annotations

from typing import Any

from wf_pipeline.recipe.sparseml.fields import Modifier

# Fields of SparseML 1.x's QuantizationModifier (pytorch), by what becomes of them.
_SCHEDULE_FIELDS = ("start_epoch", "end_epoch", "disable_quantization_observer_epoch", "freeze_bn_stats_epoch")
_LAYOUT_FIELDS = ("submodules", "model_fuse_fn_name", "model_fuse_fn_kwargs", "exclude_batchnorm", "tensorrt",
                  "quantize_embeddings", "quantize_embedding_activations", "scheme", "scheme_overrides",
                  "ignore", "reduce_range", "quantize_linear_activations", "quantize_conv_activations",
                  "activation_qconfig_kwargs", "weight_qconfig_kwargs", "custom_quantizable_module_types")
_BIT_FIELDS = ("activation_bits", "weight_bits")
_CALIBRATION_BATCH = 64

# PyTorch module types SparseML recipes exclude, as the ONNX op types they export to.
TORCH_TO_ONNX_OPS = {
    "Linear": "Gemm", "Conv2d": "Conv", "Conv1d": "Conv", "Conv3d": "Conv", "ConvTranspose2d": "ConvTranspose",
    "ReLU": "Relu", "ReLU6": "Clip", "AdaptiveAvgPool2d": "GlobalAveragePool", "AvgPool2d": "AveragePool",
    "MaxPool2d": "MaxPool", "Sigmoid": "Sigmoid", "Hardswish": "HardSwish", "Softmax": "Softmax", "Flatten": "Flatten",
}
_FOLDED_AT_EXPORT = ("BatchNorm2d", "BatchNorm1d", "Identity", "Dropout")


def parse_quantization(mod: Modifier, quantize: dict[str, Any]) -> None:
    """Fill `quantize` (the recipe's quantize section) from one QuantizationModifier; problems go to the context."""
    mod.check_fields(required=(), optional=(*_SCHEDULE_FIELDS, *_LAYOUT_FIELDS, *_BIT_FIELDS,
                                            "num_calibration_steps", "exclude_module_types"))
    if quantize.get("enabled"):
        raise mod.stop(None, "a second quantization modifier", "keep one !QuantizationModifier")
    quantize["enabled"] = True
    mod.ctx.note("!QuantizationModifier: SparseML's quantization-aware training becomes post-training static INT8 "
                 "calibration in ONNX Runtime after export (quantize section: 512 training images, QDQ, per-channel "
                 "symmetric INT8 weights); no fake-quantized fine-tuning runs")
    for name in _SCHEDULE_FIELDS:
        if mod.has(name):
            mod.ignored(name, "quantization-aware training schedule: wf-pipeline calibrates after export instead")
    for name in _LAYOUT_FIELDS:
        if mod.has(name):
            mod.ignored(name, "ONNX Runtime decides the quantized layout (BatchNorm folded at export, QDQ on every "
                              "quantizable op, per-channel symmetric INT8 weights, UINT8 activations)")
    for name in _BIT_FIELDS:
        if mod.has(name):
            bits = mod.integer(name)
            if bits != 8:
                mod.problem(name, f"{bits}-bit quantization is not supported", f"use {name}: 8 (INT8)")
            else:
                mod.became(name, "INT8 (the only width ONNX Runtime's static quantization writes)")
    if mod.has("num_calibration_steps"):
        steps = mod.integer("num_calibration_steps")
        if steps < 1:
            mod.problem("num_calibration_steps", f"must be >= 1, got {steps}", "give a positive number of batches")
        else:
            quantize["calibration_samples"] = steps * _CALIBRATION_BATCH
            quantize["calibration_batch_size"] = _CALIBRATION_BATCH
            mod.became("num_calibration_steps",
                       f"quantize.calibration_samples = {steps} x {_CALIBRATION_BATCH} training images")
    if mod.has("exclude_module_types"):
        _exclude_types(mod, quantize)


def _exclude_types(mod: Modifier, quantize: dict[str, Any]) -> None:
    types = mod.deref(mod.raw("exclude_module_types"))
    if isinstance(types, str):
        types = [types]
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise mod.stop("exclude_module_types", f"expected a list of module types, got {types!r}",
                       "give e.g. [ReLU, Linear]")
    unknown = [t for t in types if t not in TORCH_TO_ONNX_OPS and t not in _FOLDED_AT_EXPORT]
    for name in unknown:
        mod.problem("exclude_module_types", f"{name!r} has no ONNX op type wf-pipeline knows",
                    f"use module types among {', '.join(sorted(TORCH_TO_ONNX_OPS))}, or name ONNX nodes in "
                    "quantize.keep_fp32_nodes of a --base recipe")
    ops = sorted({TORCH_TO_ONNX_OPS[t] for t in types if t in TORCH_TO_ONNX_OPS})
    if ops and not unknown:
        quantize["keep_fp32_op_types"] = ops
        mod.became("exclude_module_types", f"quantize.keep_fp32_op_types = {ops}")
