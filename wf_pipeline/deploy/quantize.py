"""Post-training static INT8 quantization of an exported FP32 model with ONNX Runtime's own tooling.

ONNX Runtime does the quantization (`quant_pre_process`, then `quantize_static` in QDQ format with
per-channel symmetric INT8 weights). What this module adds is what ORT does not do:
- which nodes stay FP32: named op types, node-name regexes, and the Convs outside ORT's fast x86 INT8
  kernel (`slow_int8_convs`): measured both ways on this machine by default, since such a conv can be
  slower in INT8 than in FP32 (a 1-channel input conv) or much faster (ResNet-18's 3-channel 7x7 conv);
  the choice is recorded, and reused on --resume so a resumed run writes the same file;
- calibration batches fed from arrays the caller chose (training images, never test images);
- compact (bitmask) storage of zero-heavy INT8 weights, proven bit-identical in ORT;
- an atomic write: a kill during quantization leaves no partial file, and the same inputs give the same bytes.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from wf_pipeline.deploy.export import compare_compact_in_ort
from wf_pipeline.deploy.latency import measure_interleaved
from wf_pipeline.deploy.ort_session import create_session, load_onnx
from wf_pipeline.deploy.sparse_storage import INT8_TYPES, compact_weight_names, to_compact_storage
from wf_pipeline.errors import WFError
from wf_pipeline.recipe.schema import QuantizeConfig
from wf_pipeline.runtime import atomic_io


@dataclass
class QuantizeResult:
    path: Path  # the INT8 model
    source_path: Path  # the FP32 model it was quantized from
    dense_path: Path | None  # INT8 twin in plain storage, written when `path` stores weights compactly
    file_bytes: int
    dense_file_bytes: int
    source_file_bytes: int
    calibration_samples: int
    calibrator: str
    activations: str
    quantized_nodes: int  # compute nodes ORT runs in INT8 (inputs fed by DequantizeLinear)
    fp32_nodes: dict[str, str] = field(default_factory=dict)  # node name -> why it stays FP32
    slow_int8_convs: dict[str, Any] = field(default_factory=dict)  # their precision and how it was chosen
    compact_weights: list[str] = field(default_factory=list)
    compact_vs_dense_max_abs_diff: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("path", "source_path", "dense_path"):
            data[key] = None if data[key] is None else str(data[key])
        data["size_ratio_to_fp32"] = self.file_bytes / self.source_file_bytes if self.source_file_bytes else None
        return data


class _Batches:
    """ORT's CalibrationDataReader protocol (`get_next` -> feed dict or None) over a list of arrays."""

    def __init__(self, name: str, batches: Sequence[np.ndarray]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter([{name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _conv_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, int, int]]:
    """(input channels, output channels, groups) of every Conv node whose weight is an initializer."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    convs = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in shapes:
            dims = shapes[node.input[1]]
            group = next((int(a.i) for a in node.attribute if a.name == "group"), 1)
            convs[node.name] = (int(dims[1]) * group, int(dims[0]), group)
    return convs


def slow_int8_convs(model: onnx.ModelProto) -> dict[str, str]:
    """Convs ONNX Runtime cannot run with its fast symmetric INT8 kernel on x86 (MLAS ConvSym), with why.

    That kernel takes input channels in multiples of 4 and output channels from 16 on in multiples of 8
    (blocks of 64 on AVX-512 VNNI); depthwise convs need channel counts that are multiples of 16. Other
    convs run ORT's generic INT8 path.
    """
    slow = {}
    for name, (cin, cout, group) in _conv_shapes(model).items():
        if group == 1 and (cin % 4 or cout < 16 or cout % 8):
            slow[name] = f"{cin} -> {cout} channels"
        elif group > 1 and not (group == cin == cout and cin % 16 == 0):
            slow[name] = f"{cin} -> {cout} channels in {group} groups"
    return slow


def nodes_kept_fp32(model: onnx.ModelProto, cfg: QuantizeConfig, slow_convs_fp32: bool = False) -> dict[str, str]:
    """Node name -> the setting that keeps it in FP32."""
    kept: dict[str, str] = {}
    patterns = [re.compile(p) for p in cfg.keep_fp32_nodes]
    if slow_convs_fp32:
        kept.update({name: f"slow_int8_convs: {why}" for name, why in slow_int8_convs(model).items()})
    for node in model.graph.node:
        if node.op_type in cfg.keep_fp32_op_types:
            kept[node.name] = f"keep_fp32_op_types: {node.op_type}"
        elif any(p.search(node.name) for p in patterns):
            kept[node.name] = "keep_fp32_nodes"
    return kept


def _op_types_to_quantize(cfg: QuantizeConfig) -> list[str]:
    from onnxruntime.quantization.registry import QDQRegistry

    return [op for op in QDQRegistry if op not in cfg.keep_fp32_op_types]


def _count_quantized(model: onnx.ModelProto) -> int:
    """Compute nodes (not Q/DQ themselves) that read a DequantizeLinear output: ORT fuses them to INT8 kernels."""
    dequantized = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    qdq = {"QuantizeLinear", "DequantizeLinear"}
    return sum(1 for node in model.graph.node
               if node.op_type not in qdq and any(name in dequantized for name in node.input))


def _prepare(source: Path, work: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = work / "prepared.onnx"
    quant_pre_process(str(source), str(prepared))  # shape inference + graph clean-up, as ORT recommends
    return prepared


def _quantize(prepared: Path, input_name: str, out: Path, batches: Sequence[np.ndarray], cfg: QuantizeConfig,
              exclude: dict[str, str]) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    quantize_static(
        str(prepared), str(out), _Batches(input_name, batches),  # ORT only calls get_next()
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=_op_types_to_quantize(cfg),
        per_channel=True,
        activation_type=QuantType.QInt8 if cfg.activations == "int8" else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=sorted(exclude),
        calibrate_method=methods[cfg.calibrator],
        extra_options={
            "WeightSymmetric": True,  # zero point 0: a pruned weight stays an exact INT8 zero
            "ActivationSymmetric": cfg.activations == "int8",
            "CalibPercentile": cfg.percentile,
        },
    )
    return onnx.load(str(out))


def _faster(files: dict[str, Path], batches: Sequence[np.ndarray]) -> tuple[str, dict[str, dict[str, float]]]:
    """Which file runs faster (mean p50 over batch 1 and the calibration batch, 1 thread, interleaved)."""
    sessions = {key: create_session(path, threads=1) for key, path in files.items()}
    timings: dict[str, dict[str, float]] = {key: {} for key in files}
    for batch in (batches[0][:1], batches[0]):
        stats = measure_interleaved(sessions, batch, warmup=3, repeats=30 if batch.shape[0] == 1 else 10)
        for key, stat in stats.items():
            timings[key][f"batch_{batch.shape[0]}_p50_ms"] = stat.p50
    baseline = next(iter(files))
    score = {key: float(np.mean([t[k] / timings[baseline][k] for k in t])) for key, t in timings.items()}
    return min(score, key=lambda key: score[key]), timings


def _recorded_or_measured(record: Path | None, measure: Callable[[], dict[str, Any]],
                          still_valid: Callable[[dict[str, Any]], bool] = lambda _: True) -> dict[str, Any]:
    """A timing-based decision, measured once and recorded: a resumed run reuses it, so it writes the same file."""
    if record is not None and record.is_file():
        recorded = json.loads(record.read_text())
        if still_valid(recorded):
            return {**recorded, "how": f"{recorded.get('how')} (recorded in {record.name}, reused)"}
    result = measure()
    if record is not None:
        atomic_io.write_json(record, result)
    return result


def _slow_conv_choice(prepared: Path, prepared_model: onnx.ModelProto, work: Path, batches: Sequence[np.ndarray],
                      cfg: QuantizeConfig, choice_file: Path | None) -> dict[str, Any]:
    """Whether the slow INT8 convs stay FP32: the setting, a recorded choice (resume), or a measurement."""
    slow = sorted(slow_int8_convs(prepared_model))
    if not slow or cfg.slow_int8_convs != "measure":
        return {"convs": slow, "precision": "int8" if cfg.slow_int8_convs == "measure" else cfg.slow_int8_convs,
                "how": "setting" if slow else "no slow convs"}

    def measure() -> dict[str, Any]:
        files = {}
        for precision in ("int8", "fp32"):
            files[precision] = work / f"slow-convs-{precision}.onnx"
            exclude = nodes_kept_fp32(prepared_model, cfg, slow_convs_fp32=precision == "fp32")
            _quantize(prepared, prepared_model.graph.input[0].name, files[precision], batches, cfg, exclude)
        precision, timings = _faster(files, batches)
        return {"convs": slow, "precision": precision, "how": "measured", "timings_ms": timings}

    return _recorded_or_measured(choice_file, measure, lambda recorded: recorded.get("convs") == slow)


def quantize_model(source: Path, out_path: Path, calibration: Sequence[np.ndarray], cfg: QuantizeConfig,
                   choice_file: Path | None = None) -> QuantizeResult:
    """Quantize the FP32 ONNX file `source` (plain weight storage) to INT8 at `out_path`.

    `calibration` holds the input batches (float32 NCHW arrays) the activation ranges are measured on.
    `choice_file` records the measured precision of the slow INT8 convs; when it exists (a resumed run)
    the recorded choice is used again, so the same inputs give the same file.
    With `cfg.sparse_storage`, zero-heavy INT8 weights are stored compactly when that is smaller; the
    plain-storage twin is then written as `<stem>.dense.onnx` and the two must agree exactly in ORT.
    """
    if not calibration or sum(b.shape[0] for b in calibration) == 0:
        raise WFError("quantization needs calibration images; none were given",
                      hint="set quantize.calibration_samples >= 1 and give the recipe training data")
    started = time.perf_counter()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # The work folder sits beside the output and goes away after an error too; after a kill, resume removes it.
    with atomic_io.temp_dir(out_path) as tmp:
        try:
            prepared = _prepare(Path(source), tmp)
            prepared_model = onnx.load(str(prepared), load_external_data=False)
            choice = _slow_conv_choice(prepared, prepared_model, tmp, calibration, cfg, choice_file)
            kept = nodes_kept_fp32(prepared_model, cfg, slow_convs_fp32=choice["precision"] == "fp32")
            model = _quantize(prepared, prepared_model.graph.input[0].name, tmp / "quantized.onnx", calibration,
                              cfg, kept)
        except WFError:
            raise
        except Exception as exc:
            raise WFError(f"ONNX Runtime quantization of {source} failed: {type(exc).__name__}: {str(exc)[:300]}",
                          hint="keep the failing op type in FP32 (quantize.keep_fp32_op_types) "
                               "or set quantize.enabled: false (WF_DEBUG=1 for the traceback)") from exc
    dense_bytes = model.SerializeToString()
    compact_names: list[str] = []
    dense_path: Path | None = None
    diff: float | None = None
    if cfg.sparse_storage:
        compact, conversion = to_compact_storage(model, threshold=0.5, data_types=INT8_TYPES)
        compact_names = conversion.names
        if compact_names:
            dense_path = out_path.with_name(f"{out_path.stem}.dense.onnx")
            atomic_io.write_bytes(dense_path, dense_bytes)
            atomic_io.write_bytes(out_path, compact.SerializeToString())
            try:
                diff = compare_compact_in_ort(out_path, create_session(dense_path, threads=1), calibration[0][:8],
                                              dynamic_batch=True, setting="quantize.sparse_storage")
            except WFError:
                out_path.unlink()  # no compact file that computes something else is left in place
                raise
    if dense_path is None:
        atomic_io.write_bytes(out_path, dense_bytes)
    written = load_onnx(out_path)
    return QuantizeResult(
        path=out_path,
        source_path=Path(source),
        dense_path=dense_path,
        file_bytes=out_path.stat().st_size,
        dense_file_bytes=len(dense_bytes),
        source_file_bytes=Path(source).stat().st_size,
        calibration_samples=int(sum(b.shape[0] for b in calibration)),
        calibrator=cfg.calibrator,
        activations=cfg.activations,
        quantized_nodes=_count_quantized(model),
        fp32_nodes=kept,
        slow_int8_convs=choice,
        compact_weights=compact_weight_names(written),
        compact_vs_dense_max_abs_diff=diff,
        seconds=time.perf_counter() - started,
    )


def int8_speed(int8_path: Path, fp32_path: Path, batches: Sequence[np.ndarray], record: Path | None = None,
               ) -> dict[str, Any]:
    """The INT8 model's latency over its FP32 source's, timed interleaved (batch 1 and the calibration batch).

    A recorded result (a resumed run) is reused, so the decision it drives comes out the same.
    """
    def measure() -> dict[str, Any]:
        _, timings = _faster({"fp32": fp32_path, "int8": int8_path}, batches)
        ratio = float(np.mean([timings["int8"][k] / timings["fp32"][k] for k in timings["fp32"]]))
        return {"int8_over_fp32": ratio, "how": "measured", "timings_ms": timings}

    return _recorded_or_measured(record, measure)


def is_quantized(model: onnx.ModelProto) -> bool:
    """True for a QDQ or QOperator INT8 model (any DequantizeLinear or QLinear* node)."""
    return any(node.op_type == "DequantizeLinear" or node.op_type.startswith("QLinear") for node in model.graph.node)
