"""Export a (pruned) PyTorch classifier to one self-contained ONNX file, optionally with compact storage.

The export is checked, not assumed: every written file passes `onnx.checker` with `full_check=True`,
ONNX Runtime reproduces the PyTorch logits, the compact-storage file gives exactly the dense-storage
twin's outputs in ONNX Runtime, and the zero pattern read back from the written file is compared
with the PyTorch masks. Folded weights and biases carry their PyTorch names (see name_mapping).
"""
from __future__ import annotations

import copy
import io
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import torch
from torch import nn

from wf_pipeline.deploy.model_stats import model_stats
from wf_pipeline.deploy.name_mapping import (
    generated_weight_names,
    map_params_to_initializers,
    readable_bias_names,
    readable_initializer_names,
    rename_tensors,
)
from wf_pipeline.deploy.ort_session import create_session, load_onnx, run_logits
from wf_pipeline.deploy.sparse_storage import (
    MIN_OPSET,
    initializer_arrays,
    to_compact_storage,
    weight_zero_fractions,
)
from wf_pipeline.errors import WFError
from wf_pipeline.runtime import atomic_io

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"


@dataclass
class ExportResult:
    path: Path
    dense_path: Path | None
    sparse_storage: bool
    file_bytes: int
    dense_file_bytes: int
    per_initializer_sparsity: dict[str, float]
    torch_per_layer_sparsity: dict[str, float]
    sparsity_matches: bool
    opset: int
    # Evidence behind the verdicts above.
    onnx_per_layer_sparsity: dict[str, float] = field(default_factory=dict)  # keyed by torch parameter name
    initializer_for_param: dict[str, str] = field(default_factory=dict)
    compact_weights: list[str] = field(default_factory=list)  # weights stored in the bitmask form
    storage_format: str | None = None
    onnx_full_check: bool = False  # every written file passed onnx.checker.check_model(full_check=True)
    generated_names: list[str] = field(default_factory=list)  # layer weights/biases left without a torch name
    torch_max_abs_diff: float = float("nan")
    sparse_vs_dense_max_abs_diff: float | None = None
    dynamic_batch: bool = True
    sparsity_notes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    structure: dict[str, Any] = field(default_factory=dict)  # model_stats: channels, params, MACs per layer

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["dense_path"] = str(self.dense_path) if self.dense_path else None
        data["size_ratio"] = self.file_bytes / self.dense_file_bytes if self.dense_file_bytes else None
        return data


def _bake_parametrizations(model: nn.Module) -> None:
    """Replace parametrized tensors (e.g. mask parametrizations) by plain parameters holding their values.

    `parametrize.remove_parametrizations` cannot be used on a deep copy: the copy shares the injected
    `Parametrized<Module>` class with the caller's model, and removal deletes the property from that
    shared class, breaking the caller's model. Swapping the copy's class back avoids touching it.
    """
    from torch.nn.utils import parametrize

    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        values = {}
        for name, plist in cast(nn.ModuleDict, module.parametrizations).items():
            was_parameter = isinstance(getattr(plist, "original", None), nn.Parameter)
            values[name] = (getattr(module, name).detach().clone(), was_parameter)
        module.__class__ = module.__class__.__bases__[0]
        del module.parametrizations
        for name, (value, was_parameter) in values.items():
            if was_parameter:
                module.register_parameter(name, nn.Parameter(value))
            else:
                module.register_buffer(name, value)


def _prepare_model(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> nn.Module:
    """A CPU eval copy with parametrizations baked in and masks squashed to real zeros."""
    export_model = copy.deepcopy(model).cpu().eval()
    _bake_parametrizations(export_model)
    if masks:
        params = dict(export_model.named_parameters())
        for name, mask in masks.items():
            if name not in params:
                raise WFError(
                    f"mask for {name!r} has no matching parameter in the model",
                    hint=f"mask names must be parameter names such as {next(iter(params), 'conv.weight')!r}",
                )
            if tuple(mask.shape) != tuple(params[name].shape):
                raise WFError(
                    f"mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(params[name].shape)}")
            with torch.no_grad():  # where, not multiply: a pruned negative weight becomes 0.0, not -0.0
                params[name].copy_(torch.where(mask.to("cpu", torch.bool), params[name], 0.0))
    return export_model


def _prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of conv and linear layers, the tensors pruning acts on."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d)
    return {
        f"{name}.weight" if name else "weight": module.weight.detach()
        for name, module in model.named_modules()
        if isinstance(module, kinds) and isinstance(getattr(module, "weight", None), torch.Tensor)
    }


def _torch_to_onnx_bytes(model: nn.Module, sample: torch.Tensor, opset: int, dynamic_batch: bool) -> bytes:
    buffer = io.BytesIO()
    dynamic_axes = {INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in torch 2.9+, but it is the one that writes a
            # single self-contained file with folded BatchNorm; the warning is noise for users.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (sample,),
                buffer,  # type: ignore[arg-type]  # the TorchScript exporter also writes to a file object
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic_axes,
                training=torch.onnx.TrainingMode.EVAL,
                do_constant_folding=True,
            )
    except Exception as exc:
        raise WFError(
            f"torch.onnx.export failed at opset {opset}: {type(exc).__name__}: {str(exc).strip()[:300]}",
            hint="try another export.opset, or check that the model runs on the sample input "
                 "(WF_DEBUG=1 for the traceback)",
        ) from exc
    return buffer.getvalue()


def _full_check(model: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise WFError(f"{what} fails onnx.checker's full check: {str(exc)[:300]}",
                      hint="try another export.opset") from exc


def _name_weights(dense_model: onnx.ModelProto, export_model: nn.Module, weights: dict[str, np.ndarray]) -> list[str]:
    """Give BN-folded weights and biases (generated names such as `onnx::Conv_27`) their parameter's name.

    Returns notes on layer weights the exporter stores once for several layers (equal values, e.g.
    fully pruned layers of one shape: all zeros after folding), each further layer reading the first's.
    """
    params = dict(export_model.named_parameters())
    named = {**{n: w.numpy() for n, w in _prunable_weights(export_model).items()}, **weights}
    named = {n: a for n, a in named.items() if n in params}
    matches = map_params_to_initializers(dense_model, named, initializer_arrays(dense_model))
    module_names = {name for name, _ in export_model.named_modules() if name}
    weight_names = readable_initializer_names(matches)
    rename_tensors(dense_model, {**weight_names, **readable_bias_names(dense_model, module_names)})
    shared = [f"{param} = {weight_names.get(m.initializer, m.initializer)}" for param, m in matches.items()
              if m.tensor != m.initializer]
    if not shared:
        return []
    shown = ", ".join(shared[:6]) + (f", ... ({len(shared)} in all)" if len(shared) > 6 else "")
    return [f"equal layer weights are stored once and shared through Identity nodes (as torch.onnx does): {shown}"]


def _save_onnx(model: onnx.ModelProto, path: Path) -> int:
    data = model.SerializeToString()
    try:
        atomic_io.write_bytes(path, data)
    except OSError as exc:
        raise WFError(f"cannot write ONNX file {path}: {exc.strerror or exc}",
                      hint="choose a writable output folder") from exc
    return len(data)


def _check_out_path(out_path: Path) -> None:
    if out_path.suffix != ".onnx":
        raise WFError(f"ONNX output path must end in .onnx: {out_path}")
    if out_path.is_dir():
        raise WFError(f"ONNX output path is a folder: {out_path}", hint="give a file name such as model.onnx")


def _torch_weights(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> dict[str, np.ndarray]:
    """The tensors whose sparsity is checked: the masked weights of rank >= 2, else every conv/linear weight.

    Masks on vectors (BatchNorm entries, biases: channel pruning holds them) are applied before export,
    but folding merges them into the conv's weight and bias, so they cannot be read back one to one.
    """
    if masks:
        params = dict(model.named_parameters())
        return {name: params[name].detach().numpy() for name in masks if params[name].dim() >= 2}
    return {name: weight.numpy() for name, weight in _prunable_weights(model).items()}


@dataclass
class SparsityCheck:
    torch_sparsity: dict[str, float]
    onnx_sparsity: dict[str, float]
    initializer_for_param: dict[str, str]
    matches: bool
    notes: list[str]


def compare_sparsity(
    model_onnx: onnx.ModelProto, weights: dict[str, np.ndarray], masks: dict[str, torch.Tensor] | None
) -> SparsityCheck:
    """Every pruned position must be an exact zero in the ONNX file; extra zeros are noted, not failed."""
    arrays = initializer_arrays(model_onnx)
    matches = map_params_to_initializers(model_onnx, weights, arrays)
    check = SparsityCheck({}, {}, {name: m.initializer for name, m in matches.items()}, True, [])
    for name, weight in weights.items():
        pruned = ~masks[name].cpu().numpy().astype(bool) if masks else weight == 0
        check.torch_sparsity[name] = float(pruned.mean()) if pruned.size else 0.0
        match = matches.get(name)
        if match is None:
            if not pruned.any():  # nothing pruned: no position has to be zero, so nothing to verify (a dense run)
                check.notes.append(f"{name}: nothing pruned; its ONNX initializer was not identified")
                continue
            check.matches = False
            check.notes.append(f"{name}: no ONNX initializer found for this parameter")
            continue
        onnx_array = arrays[match.initializer]
        onnx_zero = (onnx_array.T if match.transposed else onnx_array) == 0
        check.onnx_sparsity[name] = float(onnx_zero.mean()) if onnx_zero.size else 0.0
        missed = int(np.sum(pruned & ~onnx_zero))
        if missed:
            check.matches = False
            check.notes.append(f"{name}: {missed} pruned weights are non-zero in initializer {match.initializer}")
        extra = int(np.sum(onnx_zero & ~pruned))
        if extra:
            check.notes.append(
                f"{name}: {extra} kept weights are exactly zero in {match.initializer} "
                "(zero in torch or a zero BN scale)"
            )
    return check


def _opset_of(model: onnx.ModelProto) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), -1)


def compare_compact_in_ort(path: Path, dense_session, sample: np.ndarray, dynamic_batch: bool,
                           setting: str = "export.sparse_storage") -> float:
    """Max |diff| between the compact file and its dense twin in ONNX Runtime; anything but 0 is a bug
    (the hint names `setting`, the switch that turns the compact form off)."""
    session = create_session(path, threads=1)
    probe = np.concatenate([sample, sample[:1]]) if dynamic_batch else sample  # a second batch size
    compact_out, dense_out = run_logits(session, probe), run_logits(dense_session, probe)
    diff = float(np.max(np.abs(compact_out - dense_out))) if dense_out.size else 0.0
    if not np.array_equal(compact_out, dense_out):
        raise WFError(
            f"compact-storage ONNX file {path} differs from its dense twin in onnxruntime (max |diff| {diff:.3g})",
            hint=f"set {setting}: false and report this as a bug",
        )
    return diff


def export_onnx(
    model: nn.Module,
    sample_input: torch.Tensor,
    out_path: Path,
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    sparse_storage: bool = True,
    sparse_threshold: float = 0.5,
    masks: dict[str, torch.Tensor] | None = None,
) -> ExportResult:
    """Export `model` to `out_path` and verify the result (see module docstring).

    With sparse_storage, weights with at least `sparse_threshold` zeros are stored in the bitmask form
    (see sparse_storage) and the dense-storage twin is written as `<stem>.dense.onnx` beside the main file.
    `masks` maps parameter names to bool tensors (True = kept); without masks, exact zeros in the
    conv/linear weights are taken as the pruning pattern.
    """
    out_path = Path(out_path)
    _check_out_path(out_path)
    if not 0.0 <= sparse_threshold <= 1.0:
        raise WFError(f"sparse_threshold must be within [0, 1], got {sparse_threshold}")
    export_model = _prepare_model(model, masks)
    sample = sample_input.detach().to("cpu", torch.float32)
    weights = _torch_weights(export_model, masks)

    dense_model = onnx.load_from_string(_torch_to_onnx_bytes(export_model, sample, opset, dynamic_batch))
    notes = _name_weights(dense_model, export_model, weights)
    _full_check(dense_model, "the exported ONNX model")
    opset_written = _opset_of(dense_model)
    if sparse_storage and opset_written < MIN_OPSET:
        notes.append(f"opset {opset_written} < {MIN_OPSET}: weights stored dense "
                     f"(the bitmask storage needs opset >= {MIN_OPSET})")
        sparse_storage = False

    dense_path = out_path.with_name(f"{out_path.stem}.dense.onnx") if sparse_storage else out_path
    dense_bytes = _save_onnx(dense_model, dense_path)

    with torch.no_grad():
        torch_logits = export_model(sample).numpy()
    dense_session = create_session(dense_path, threads=1)
    dense_logits = run_logits(dense_session, sample.numpy())
    torch_diff = float(np.max(np.abs(dense_logits - torch_logits))) if dense_logits.size else 0.0

    compact_names: list[str] = []
    storage_format: str | None = None
    sparse_diff: float | None = None
    file_bytes = dense_bytes
    if sparse_storage:
        compact_model, conversion = to_compact_storage(dense_model, sparse_threshold)
        _full_check(compact_model, "the compact-storage ONNX model")  # before writing: no bad file on disk
        file_bytes = _save_onnx(compact_model, out_path)
        compact_names = conversion.names
        storage_format = conversion.storage_format if compact_names else None
        sparse_diff = compare_compact_in_ort(out_path, dense_session, sample.numpy(), dynamic_batch)

    written = load_onnx(out_path)  # read back what is on disk, not what is in memory
    check = compare_sparsity(written, weights, masks)
    return ExportResult(
        path=out_path,
        dense_path=dense_path if sparse_storage else None,
        sparse_storage=sparse_storage,
        file_bytes=file_bytes,
        dense_file_bytes=dense_bytes,
        per_initializer_sparsity=weight_zero_fractions(written),
        torch_per_layer_sparsity=check.torch_sparsity,
        sparsity_matches=check.matches,
        opset=_opset_of(written),
        onnx_per_layer_sparsity=check.onnx_sparsity,
        initializer_for_param=check.initializer_for_param,
        compact_weights=compact_names,
        storage_format=storage_format,
        onnx_full_check=True,
        generated_names=generated_weight_names(written, set(initializer_arrays(written))),
        torch_max_abs_diff=torch_diff,
        sparse_vs_dense_max_abs_diff=sparse_diff,
        dynamic_batch=dynamic_batch,
        sparsity_notes=check.notes,
        notes=notes,
        structure=model_stats(written).to_dict(),
    )
