"""Pydantic models for a wf-pipeline recipe. Every section forbids unknown keys so typos fail loudly.

Defaults follow the WoodFisher paper where it has one (dampening 1e-5, cubic schedule, block 128).
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    name: str = Field(
        "resnet20",
        description="resnet20 | mobilenetv1 | any torchvision classification model name "
        "(resnet18, mobilenet_v2, ...) | 'module.path:factory' for your own model",
    )
    num_classes: int = Field(10, ge=1)
    in_channels: int = Field(3, ge=1, description="input channels; torchvision models are adapted")
    weights: str | None = Field(
        None,
        description="local checkpoint path, 'builtin:<name>' for a checkpoint shipped in the package, "
        "or a torchvision weights enum name such as 'ResNet18_Weights.IMAGENET1K_V1'",
    )
    strict_load: bool = True
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra factory arguments")


class DataConfig(Strict):
    dataset: Literal["fashion_mnist", "cifar10", "imagefolder", "digits"] = "fashion_mnist"
    root: str | None = Field(
        None,
        description="dataset folder; fashion_mnist defaults to the Debian package's "
        "/usr/share/datasets/fashion-mnist, then ./data",
    )
    download: bool = Field(False, description="allow torchvision to download (only where a network exists)")
    image_size: int | None = Field(None, ge=4, description="resize images to this size (None keeps native)")
    augment: bool = True
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    num_workers: int = Field(0, ge=0)
    train_subset: int | None = Field(None, ge=1, description="use only this many training samples")
    test_subset: int | None = Field(None, ge=1, description="evaluate on only this many test samples")
    fisher_pool: int = Field(
        5000, ge=1, description="size of the held-out pool of training samples reserved for Fisher gradients"
    )
    fisher_samples_per_class: int | None = Field(
        None, ge=1, description="limited-data mode: build the Fisher from only this many samples per class"
    )
    normalize: bool = True


class OptimizerConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)


class LRScheduleConfig(Strict):
    kind: Literal["constant", "cosine", "step", "linear", "exponential", "onecycle"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    step_epochs: list[int] = Field(default_factory=list, description="epochs at which 'step' multiplies lr by gamma")
    gamma: float = Field(0.1, gt=0)
    final_lr: float = Field(0.0, ge=0, description="end value for cosine/linear")


class TrainingConfig(Strict):
    epochs: int = Field(8, ge=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    steps_per_epoch: int | None = Field(None, ge=1, description="cap optimizer steps per epoch (fast runs)")
    grad_clip: float | None = Field(None, gt=0)


class ScheduleConfig(Strict):
    kind: Literal["cubic", "linear", "constant"] = "cubic"
    start_epoch: int = Field(0, ge=0)
    end_epoch: int = Field(4, ge=0)
    frequency: int = Field(1, ge=1, description="epochs between pruning steps")

    @model_validator(mode="after")
    def _order(self) -> "ScheduleConfig":
        if self.end_epoch < self.start_epoch:
            raise ValueError(
                f"end_epoch ({self.end_epoch}) must be >= start_epoch ({self.start_epoch})"
            )
        return self


class WoodFisherConfig(Strict):
    num_grads: int = Field(1000, ge=1, description="number of gradients in the empirical Fisher")
    grad_batch_size: int = Field(1, ge=1, description="samples averaged into each gradient (1 = per-sample)")
    block_size: int = Field(128, ge=1, description="block size B of the block-diagonal Fisher")
    damp: float = Field(1e-5, gt=0, description="dampening lambda added to the Fisher diagonal")
    update: Literal["joint", "independent", "none"] = Field(
        "joint", description="weight update for the pruned set: exact joint OBS, the paper's sum, or none"
    )
    fisher_type: Literal["empirical", "true"] = "empirical"
    recompute_steps: int = Field(1, ge=1, description="split each pruning step into this many Fisher recomputations")
    chunk_size: int = Field(100, ge=1, description="gradients computed and folded in per chunk (memory bound)")
    dtype: Literal["float32", "float64"] = "float32"
    route: Literal["fast", "woodbury"] = Field("fast", description="fast GEMM+Cholesky or rank-one recursion")


class PruningConfig(Strict):
    method: Literal["woodfisher", "woodtaylor", "magnitude", "magnitude_uniform", "diag_fisher", "none"] = (
        "woodfisher"
    )
    initial_sparsity: float = Field(0.0, ge=0, lt=1)
    final_sparsity: float = Field(0.9, ge=0, lt=1)
    ranking: Literal["global", "uniform"] = "global"
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    woodfisher: WoodFisherConfig = Field(default_factory=WoodFisherConfig)
    layers: list[str] = Field(
        default_factory=lambda: [r".*"],
        description="regexes over parameter names of conv/linear weights to prune",
    )
    skip: list[str] = Field(default_factory=list, description="regexes of parameter names never pruned")
    min_layer_params: int = Field(0, ge=0, description="leave layers smaller than this dense")

    @field_validator("layers", "skip")
    @classmethod
    def _regexes_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r}: {exc}") from exc
        return patterns

    @model_validator(mode="after")
    def _sparsity_order(self) -> "PruningConfig":
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity ({self.initial_sparsity}) must be <= final_sparsity ({self.final_sparsity})"
            )
        return self


class ExportConfig(Strict):
    enabled: bool = True
    opset: int = Field(17, ge=9, le=23)
    filename: str = "model.onnx"
    sparse_storage: bool = Field(True, description="store zero-heavy initializers as ONNX sparse_initializers")
    sparse_threshold: float = Field(0.5, ge=0, le=1, description="min zero fraction to store a tensor sparsely")
    dynamic_batch: bool = True


class GatesConfig(Strict):
    min_accuracy: float | None = Field(None, ge=0, le=1)
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="vs the dense baseline, absolute")
    max_latency_ms: float | None = Field(None, gt=0, description="p50 latency at the first batch size")
    max_latency_ratio: float | None = Field(None, gt=0, description="pruned p50 / dense p50")
    min_sparsity: float | None = Field(None, ge=0, le=1)
    max_parity_error: float | None = Field(1e-4, gt=0, description="max |logit difference| vs PyTorch")
    min_top1_agreement: float | None = Field(None, ge=0, le=1)


class ValidateConfig(Strict):
    enabled: bool = True
    parity_samples: int = Field(256, ge=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
    threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads for latency runs")
    warmup: int = Field(10, ge=0)
    repeats: int = Field(50, ge=1)
    gates: GatesConfig = Field(default_factory=GatesConfig)

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, sizes: list[int]) -> list[int]:
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError("batch_sizes must be a non-empty list of positive integers")
        return sizes


class OutputConfig(Strict):
    root: str = "artifacts"
    run_name: str | None = Field(None, description="defaults to the recipe's name")
    checkpoint_every_epoch: bool = True

    @field_validator("run_name")
    @classmethod
    def _safe_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ValueError("run_name may only contain letters, digits, '.', '_' and '-'")
        return name


class Recipe(Strict):
    name: str = Field("run", pattern=r"^[A-Za-z0-9._-]+$")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = True
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainingConfig = Field(default_factory=TrainingConfig, description="dense training (wf-pipeline train)")
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    finetune: TrainingConfig = Field(default_factory=TrainingConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    output: OutputConfig = Field(default_factory=OutputConfig)

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @model_validator(mode="after")
    def _schedule_within_finetune(self) -> "Recipe":
        if self.pruning.method != "none" and self.pruning.schedule.end_epoch > self.finetune.epochs:
            raise ValueError(
                f"pruning.schedule.end_epoch ({self.pruning.schedule.end_epoch}) is after the last "
                f"fine-tuning epoch (finetune.epochs={self.finetune.epochs}); raise finetune.epochs or lower end_epoch"
            )
        return self

    def run_name(self) -> str:
        return self.output.run_name or self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)
