"""Validate an exported ONNX model in ONNX Runtime: parity, accuracy, latency, size, sparsity, gates.

The result feeds `wf-pipeline validate` (exit 0 when every gate passes, 1 when one fails) and the
run report. This module only measures: `wf_pipeline.reporting.validation_outputs` writes validation.json,
junit.xml and validation.md from the result (imports point one way, from reporting to deploy).
"""
from __future__ import annotations

import copy
import os
import platform
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from wf_pipeline.deploy.gates import (
    GateInputs,
    GateResult,
    check_gates_evaluable,
    evaluate_gates,
    failed,
)
from wf_pipeline.deploy.latency import LatencyStats, measure_interleaved
from wf_pipeline.deploy.model_stats import model_stats_dict
from wf_pipeline.deploy.ort_session import (
    create_session,
    input_sample_shape,
    load_onnx,
    run_logits,
    static_batch_size,
)
from wf_pipeline.deploy.quantize import is_quantized
from wf_pipeline.deploy.sparse_storage import compact_weight_names, overall_weight_sparsity, weight_zero_fractions
from wf_pipeline.errors import WFError
from wf_pipeline.recipe.schema import GatesConfig, ValidateConfig

# progress(stage, done, total); total 0 when unknown (a data loader of unknown length).
ProgressFn = Callable[[str, int, int], None]
TestData = Iterable[tuple[torch.Tensor, torch.Tensor]] | tuple[torch.Tensor, torch.Tensor]


@dataclass
class ValidationSettings:
    parity_samples: int = 256
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    threads: int = 1
    warmup: int = 10
    repeats: int = 50
    accuracy_batch_size: int = 256  # only for whole-tensor test data; loaders keep their own batching

    @classmethod
    def from_config(cls, config: ValidateConfig) -> ValidationSettings:
        return cls(
            parity_samples=config.parity_samples,
            batch_sizes=list(config.batch_sizes),
            threads=config.threads,
            warmup=config.warmup,
            repeats=config.repeats,
        )

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise WFError(f"batch_sizes must be positive integers, got {self.batch_sizes}")
        if self.repeats < 1 or self.warmup < 0 or self.parity_samples < 1 or self.threads < 1:
            raise WFError("validation needs repeats >= 1, warmup >= 0, parity_samples >= 1, threads >= 1")


@dataclass
class ParityResult:
    samples: int
    source: str  # "test data" | "random normal inputs"
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    relative_error: float = 0.0  # mean |diff| / mean |reference logit|
    reference: str = "PyTorch"  # what the logits were compared with


@dataclass
class LatencyResult:
    batch_size: int
    threads: int
    pruned: LatencyStats  # the validated (shipped) model
    dense: LatencyStats | None
    ratio_p50: float | None  # shipped / dense
    fp32: LatencyStats | None = None  # the FP32 model a quantized one came from
    fp32_ratio_p50: float | None = None  # that FP32 model / dense


@dataclass
class ValidationResult:
    model_path: str
    baseline_path: str | None
    file_bytes: int
    baseline_file_bytes: int | None
    sparsity: float
    sparsity_zeros: int
    sparsity_total: int
    baseline_sparsity: float | None
    per_initializer_sparsity: dict[str, float]
    sparse_initializers: int  # weights stored compactly (bitmask form or sparse initializers)
    accuracy: float | None
    baseline_accuracy: float | None
    test_samples: int
    parity: ParityResult | None
    latency: list[LatencyResult]
    gates: list[GateResult]
    settings: ValidationSettings
    environment: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    structure: dict[str, Any] | None = None  # model_stats of the model and of the baseline: channels, params, MACs
    baseline_structure: dict[str, Any] | None = None
    quantized: bool = False  # the validated model is INT8 (QDQ)
    fp32_path: str | None = None  # the FP32 model it was quantized from
    fp32_accuracy: float | None = None
    int8_agreement: ParityResult | None = None  # INT8 logits against its FP32 source (file, else PyTorch)

    @property
    def failed_gates(self) -> list[GateResult]:
        return failed(self.gates)

    @property
    def passed(self) -> bool:
        return not self.failed_gates

    @property
    def exit_code(self) -> int:
        """0 when every gate passed (skipped gates do not fail a build), 1 otherwise."""
        return 0 if self.passed else 1

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy is None or self.baseline_accuracy is None:
            return None
        return self.baseline_accuracy - self.accuracy

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gates"] = [g.to_dict() for g in self.gates]
        data["passed"] = self.passed
        data["failed_gates"] = [g.name for g in self.failed_gates]
        data["accuracy_drop"] = self.accuracy_drop
        return data


def _environment(threads: int) -> dict[str, Any]:
    import onnx
    import onnxruntime

    return {
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "intra_op_threads": threads,
        "provider": "CPUExecutionProvider",
    }


def _iter_batches(test_data: TestData, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Both (X, Y) whole tensors and an iterable of (x, y) batches, e.g. a DataLoader."""
    if (
        isinstance(test_data, tuple)
        and len(test_data) == 2
        and all(isinstance(t, torch.Tensor) for t in test_data)
    ):
        images, labels = cast(tuple[torch.Tensor, torch.Tensor], test_data)
        if images.shape[0] != labels.shape[0]:
            raise WFError(f"test data has {images.shape[0]} inputs but {labels.shape[0]} labels")
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size], labels[start : start + batch_size]
        return
    for item in test_data:
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise WFError("test data must yield (inputs, labels) pairs")
        yield item[0], item[1]


def _to_numpy(batch: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())


def torch_logits_fn(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def logits(inputs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(inputs)).float().numpy()

    return logits


class _ParityAccumulator:
    """Logit agreement of a model with a reference on up to `limit` inputs."""

    def __init__(self, reference: Callable[[np.ndarray], np.ndarray], limit: int, name: str = "PyTorch") -> None:
        self.reference, self.limit, self.name = reference, limit, name
        self.count = 0
        self.max_diff = 0.0
        self.sum_diff = 0.0
        self.sum_reference = 0.0
        self.elements = 0
        self.agree = 0

    @property
    def full(self) -> bool:
        return self.count >= self.limit

    def add(self, inputs: np.ndarray, onnx_logits: np.ndarray) -> None:
        take = min(self.limit - self.count, inputs.shape[0])
        if take <= 0:
            return
        torch_logits = self.reference(inputs[:take])
        diff = np.abs(torch_logits - onnx_logits[:take])
        self.max_diff = max(self.max_diff, float(np.max(diff))) if diff.size else self.max_diff
        if np.isnan(diff).any():
            self.max_diff = float("nan")
        self.sum_diff += float(np.sum(diff))
        self.sum_reference += float(np.sum(np.abs(torch_logits)))
        self.elements += diff.size
        self.agree += int(np.sum(torch_logits.argmax(1) == onnx_logits[:take].argmax(1)))
        self.count += take

    def result(self, source: str) -> ParityResult:
        return ParityResult(
            samples=self.count,
            source=source,
            max_abs_diff=self.max_diff,
            mean_abs_diff=self.sum_diff / self.elements if self.elements else 0.0,
            top1_agreement=self.agree / self.count if self.count else 0.0,
            relative_error=self.sum_diff / self.sum_reference if self.sum_reference else 0.0,
            reference=self.name,
        )


def _synthetic_inputs(session, test_data_shape: tuple[int, ...] | None, batch_size: int) -> np.ndarray:
    """Seeded standard-normal inputs of the model's per-sample shape (latency timing, parity without data)."""
    shape = input_sample_shape(session) or test_data_shape
    if shape is None:
        raise WFError(
            "the ONNX input has dynamic non-batch dimensions and no test data fixes them",
            hint="export with a fixed image size or give test data",
        )
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch_size, *shape)).astype(np.float32)


def _check_input_fits(session, sample_shape: tuple[int, ...], path: Path) -> None:
    """The test data's per-sample shape must be one the ONNX input accepts (fixed dims must match)."""
    dims = session.get_inputs()[0].shape[1:]
    fits = len(dims) == len(sample_shape) and all(
        not isinstance(dim, int) or dim == size for dim, size in zip(dims, sample_shape, strict=True))
    if not fits:
        wanted = "x".join(str(d) if isinstance(d, int) else "?" for d in dims)
        raise WFError(f"{path} takes inputs of {wanted} per sample, but the recipe's test data is "
                      f"{'x'.join(map(str, sample_shape))}",
                      "give the recipe the model was made for (data.dataset, data.image_size, model.in_channels)")


def _check_classes_fit(logits: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Every test label must be one of the model's outputs (a 5-class model cannot score 10-class data)."""
    if logits.ndim != 2:
        raise WFError(f"{path} outputs shape {logits.shape}, not (batch, classes) logits", "validate a classifier")
    if labels.size and (int(labels.max()) >= logits.shape[1] or int(labels.min()) < 0):
        raise WFError(f"{path} has {logits.shape[1]} outputs, but the recipe's test data has labels up to "
                      f"{int(labels.max())}", "give the recipe the model was made for (its data and model.num_classes)")


def validate_model(
    onnx_path: Path,
    *,
    torch_model: nn.Module | None,
    test_data: TestData | None,
    baseline_path: Path | None,
    settings: ValidationSettings,
    gates: GatesConfig,
    progress: ProgressFn | None = None,
    fp32_path: Path | None = None,
) -> ValidationResult:
    """Measure `onnx_path` (against `baseline_path` when given) and evaluate the gates.

    An INT8 model is judged by its agreement with the FP32 model it came from (`fp32_path`, else the
    PyTorch model), not by the FP32 parity gate, which then applies to `fp32_path` against PyTorch; the
    FP32 file is timed beside the shipped and dense ones.
    Raises WFError for bad input: missing/corrupt ONNX files, or an explicitly set gate whose input
    (baseline, PyTorch model, test data) is not provided. Gate failures are in the result, not raised.
    """
    onnx_path = Path(onnx_path)
    model_proto = load_onnx(onnx_path)
    quantized = is_quantized(model_proto)
    if fp32_path is not None and not quantized:
        raise WFError(f"{onnx_path} is not a quantized model, so it has no FP32 source to compare with",
                      hint="give the INT8 file (export/model.onnx of a run with quantize.enabled) or drop --fp32")
    available = {"onnx"}
    if torch_model is not None:
        available.add("torch_model")
    if test_data is not None:
        available.add("test_data")
    if baseline_path is not None:
        available.add("baseline")
    if quantized:
        available.add("quantized")
    check_gates_evaluable(gates, available)
    zero_fraction, zeros, total = overall_weight_sparsity(model_proto)
    per_init = weight_zero_fractions(model_proto)
    sparse_count = len(compact_weight_names(model_proto))
    structure = model_stats_dict(model_proto)
    del model_proto
    baseline_sparsity = baseline_structure = None
    if baseline_path is not None:
        baseline_proto = load_onnx(Path(baseline_path))
        baseline_sparsity = overall_weight_sparsity(baseline_proto)[0]
        baseline_structure = model_stats_dict(baseline_proto)

    session = create_session(onnx_path, threads=0)
    baseline_session = create_session(Path(baseline_path), threads=0) if baseline_path is not None else None
    fp32_session = create_session(Path(fp32_path), threads=0) if fp32_path is not None else None
    notes: list[str] = []
    fixed = static_batch_size(session)
    if fixed is not None and any(b != fixed for b in settings.batch_sizes):
        raise WFError(
            f"{onnx_path} has a fixed batch size of {fixed}; cannot time batch sizes {settings.batch_sizes}",
            hint=f"export with dynamic_batch: true or set validate.batch_sizes: [{fixed}]",
        )

    parity = agreement = None
    torch_fn = None
    if torch_model is not None:  # a CPU eval copy: the caller's model keeps its device and mode
        torch_fn = torch_logits_fn(copy.deepcopy(torch_model).cpu().eval())
    if fp32_session is not None:
        # INT8 agreement over the whole test set (both logits are computed anyway); parity_samples without data
        agreement = _ParityAccumulator(partial(run_logits, fp32_session), _ALL, "FP32 ONNX model")
        if torch_fn is not None:  # the FP32 file against PyTorch, as for an FP32 run
            parity = _ParityAccumulator(torch_fn, settings.parity_samples)
    elif torch_fn is not None:
        if quantized:
            agreement = _ParityAccumulator(torch_fn, _ALL, "PyTorch (FP32)")
        else:
            parity = _ParityAccumulator(torch_fn, settings.parity_samples)
    correct = baseline_correct = fp32_correct = seen = 0
    sample_shape: tuple[int, ...] | None = None
    if test_data is not None:
        for batch_index, (inputs, labels) in enumerate(_iter_batches(test_data, settings.accuracy_batch_size)):
            array = _to_numpy(inputs)
            sample_shape = tuple(array.shape[1:])
            label_array = labels.detach().cpu().numpy().reshape(-1)
            if batch_index == 0:
                _check_input_fits(session, sample_shape, onnx_path)
                if baseline_session is not None:
                    _check_input_fits(baseline_session, sample_shape, Path(baseline_path))  # type: ignore[arg-type]
            logits = run_logits(session, array)
            _check_classes_fit(logits, label_array, onnx_path)
            correct += int(np.sum(logits.argmax(1) == label_array))
            if baseline_session is not None:
                baseline_logits = run_logits(baseline_session, array)
                _check_classes_fit(baseline_logits, label_array, Path(baseline_path))  # type: ignore[arg-type]
                baseline_correct += int(np.sum(baseline_logits.argmax(1) == label_array))
            fp32_logits = run_logits(fp32_session, array) if fp32_session is not None else None
            if fp32_logits is not None:
                fp32_correct += int(np.sum(fp32_logits.argmax(1) == label_array))
            if agreement is not None and not agreement.full:
                agreement.add(array, logits)
            if parity is not None and not parity.full:
                parity.add(array, logits if fp32_logits is None else fp32_logits)
            seen += array.shape[0]
            if progress is not None:
                progress("accuracy", batch_index + 1, 0)
        if seen == 0:
            raise WFError("test data is empty", hint="check the data section of the recipe (test_subset?)")
    parity_result = _finish_parity(parity, fp32_session or session, sample_shape, settings.parity_samples)
    agreement_result = _finish_parity(agreement, session, sample_shape, settings.parity_samples)

    latency: list[LatencyResult] = []
    timed = {"pruned": create_session(onnx_path, threads=settings.threads)}
    if baseline_path is not None:
        timed["dense"] = create_session(Path(baseline_path), threads=settings.threads)
    if fp32_path is not None:
        timed["fp32"] = create_session(Path(fp32_path), threads=settings.threads)
    for batch_size in settings.batch_sizes:
        stats = measure_interleaved(
            timed,
            _synthetic_inputs(session, sample_shape, batch_size),
            warmup=settings.warmup,
            repeats=settings.repeats,
            progress=progress,
            label=f"latency batch {batch_size}",
        )
        dense, fp32 = stats.get("dense"), stats.get("fp32")
        latency.append(
            LatencyResult(
                batch_size=batch_size,
                threads=settings.threads,
                pruned=stats["pruned"],
                dense=dense,
                ratio_p50=_ratio(stats["pruned"], dense),
                fp32=fp32,
                fp32_ratio_p50=_ratio(fp32, dense),
            )
        )
    if baseline_path is None:
        notes.append("no dense baseline given: latency ratio and accuracy drop not measured")

    accuracy = correct / seen if seen else None
    baseline_accuracy = baseline_correct / seen if seen and baseline_session is not None else None
    first = latency[0]
    unavailable = {}
    if quantized and parity_result is None and fp32_path is None:
        unavailable["max_parity_error"] = ("INT8 model: judged against its FP32 source by min_int8_agreement and "
                                           "max_int8_logit_error (the FP32 parity needs its FP32 file, --fp32)")
    gate_inputs = GateInputs(
        accuracy=accuracy,
        baseline_accuracy=baseline_accuracy,
        latency_p50_ms=first.pruned.p50,
        latency_ratios={r.batch_size: r.ratio_p50 for r in latency if r.ratio_p50 is not None},
        latency_batch_size=first.batch_size,
        sparsity=zero_fraction,
        sparsity_zeros=zeros,
        sparsity_total=total,
        parity_error=parity_result.max_abs_diff if parity_result else None,
        top1_agreement=parity_result.top1_agreement if parity_result else None,
        int8_agreement=agreement_result.top1_agreement if agreement_result else None,
        int8_logit_error=agreement_result.relative_error if agreement_result else None,
    )
    return ValidationResult(
        model_path=str(onnx_path),
        baseline_path=str(baseline_path) if baseline_path is not None else None,
        file_bytes=onnx_path.stat().st_size,
        baseline_file_bytes=Path(baseline_path).stat().st_size if baseline_path is not None else None,
        sparsity=zero_fraction,
        sparsity_zeros=zeros,
        sparsity_total=total,
        baseline_sparsity=baseline_sparsity,
        per_initializer_sparsity=per_init,
        sparse_initializers=sparse_count,
        accuracy=accuracy,
        baseline_accuracy=baseline_accuracy,
        test_samples=seen,
        parity=parity_result,
        latency=latency,
        gates=evaluate_gates(gates, gate_inputs, unavailable, quantized=quantized),
        settings=settings,
        environment=_environment(settings.threads),
        notes=notes,
        structure=structure,
        baseline_structure=baseline_structure,
        quantized=quantized,
        fp32_path=str(fp32_path) if fp32_path is not None else None,
        fp32_accuracy=fp32_correct / seen if seen and fp32_session is not None else None,
        int8_agreement=agreement_result,
    )


_ALL = 2**62  # an agreement limit no test set reaches


def _ratio(model: LatencyStats | None, dense: LatencyStats | None) -> float | None:
    return model.p50 / dense.p50 if model is not None and dense is not None and dense.p50 > 0 else None


def _finish_parity(parity: _ParityAccumulator | None, session, sample_shape: tuple[int, ...] | None,
                   samples: int) -> ParityResult | None:
    """The accumulated agreement; without test data, seeded random inputs still prove the graph computes the same."""
    if parity is None:
        return None
    source = "test data"
    if parity.count == 0:
        source = "random normal inputs"
        random_inputs = _synthetic_inputs(session, sample_shape, samples)
        parity.add(random_inputs, run_logits(session, random_inputs))
    return parity.result(source)

