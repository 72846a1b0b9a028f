"""Pydantic models for a wf-pipeline recipe. Every section forbids unknown keys so typos fail loudly.

Defaults follow the WoodFisher paper where it has one (dampening 1e-5, cubic schedule, block 128).
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails


class Strict(BaseModel):
    # allow_inf_nan=False: `.inf` or `.nan` in any number field is refused at load, not met mid-run.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# A run name or file name that stays where it is put: no folders, no leading '.' ('.', '..', hidden files).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def _plain_name(name: str, what: str) -> str:
    if not _PLAIN_NAME.fullmatch(name):
        raise ValueError(f"{what} must be a plain name of at most 100 letters, digits, '.', '_' and '-', "
                         "not starting with '.' (no folders)")
    return name


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
    image_size: int | None = Field(
        None, ge=4, description="input size in pixels (None keeps native; imagefolder defaults to 224): "
        "tensor datasets are resized to it, image folders are resized then centre-cropped to it"
    )
    resize_size: int | None = Field(
        None, ge=4, description="imagefolder evaluation/Fisher: shorter side resized to this before the "
        "centre crop (default image_size·256/224, ImageNet's 256 → 224)"
    )
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
    normalization: Literal["dataset", "imagenet"] = Field(
        "dataset", description="per-channel statistics to normalise with: the dataset's own, or ImageNet's "
        "(for torchvision ImageNet weights on another dataset; image folders always use ImageNet's)"
    )

    @model_validator(mode="after")
    def _crop_fits(self) -> DataConfig:
        if self.resize_size is not None and self.dataset != "imagefolder":
            raise ValueError("resize_size applies to dataset: imagefolder only "
                             "(tensor datasets are resized to image_size)")
        if self.resize_size is not None and self.image_size is not None and self.resize_size < self.image_size:
            raise ValueError(
                f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size}): the crop is taken "
                "from the resized image"
            )
        return self


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


class LRPieceConfig(Strict):
    """One piece of a piecewise learning-rate schedule: absolute rates over [start_epoch, end_epoch)."""

    start_epoch: float = Field(ge=0, description="the first piece starts at 0, every other where the previous ends")
    end_epoch: float | None = Field(None, description="None: until the end of training (last piece only)")
    kind: Literal["constant", "linear", "cosine", "step", "exponential"] = Field(
        description="linear/cosine go from lr to final_lr over the piece "
        "(a cosine piece after another is a warm restart)"
    )
    lr: float = Field(ge=0, description="rate at start_epoch")
    final_lr: float = Field(0.0, ge=0, description="linear/cosine: rate reached at end_epoch")
    step_epochs: list[float] = Field(
        default_factory=list, description="step: epochs (absolute, inside the piece) at which lr is multiplied by gamma"
    )
    gamma: float = Field(0.1, gt=0, description="step: factor per step epoch; exponential: factor per epoch")
    weight_decay: float | None = Field(
        None, ge=0, description="weight decay during this piece (None: optimizer.weight_decay)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> LRPieceConfig:
        if self.end_epoch is not None and self.end_epoch <= self.start_epoch:
            raise ValueError(f"end_epoch ({self.end_epoch}) must be after start_epoch ({self.start_epoch})")
        # A value that the piece's kind never reads is a mistake, not a no-op.
        fields = type(self).model_fields
        unused = sorted(
            name for name in self._unused_fields()
            if getattr(self, name) != fields[name].get_default(call_default_factory=True)
        )
        if unused:
            raise ValueError(f"{', '.join(unused)} has no effect on a '{self.kind}' piece; remove it")
        if self.kind in ("constant", "step", "exponential") and self.lr <= 0:
            raise ValueError(f"lr must be > 0 for a '{self.kind}' piece")
        if self.kind in ("linear", "cosine") and self.lr == 0 and self.final_lr == 0:
            raise ValueError("lr and final_lr are both 0: the piece would not train")
        for epoch in self.step_epochs:
            if epoch <= self.start_epoch or (self.end_epoch is not None and epoch >= self.end_epoch):
                raise ValueError(f"step epoch {epoch} is outside the piece ({self.start_epoch}, {self.end_epoch})")
        return self

    def _unused_fields(self) -> frozenset[str]:
        return _LR_PIECE_VALUES - _LR_PIECE_USES[self.kind]

    @model_serializer(mode="wrap")
    def _without_unused(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Written recipes show only the values the piece's kind reads."""
        data = handler(self)
        for name in self._unused_fields():
            data.pop(name, None)
        if self.weight_decay is None:
            data.pop("weight_decay", None)
        return data


_LR_PIECE_VALUES = frozenset({"final_lr", "step_epochs", "gamma"})
_LR_PIECE_USES: dict[str, frozenset[str]] = {
    "constant": frozenset(),
    "linear": frozenset({"final_lr"}),
    "cosine": frozenset({"final_lr"}),
    "step": frozenset({"step_epochs", "gamma"}),
    "exponential": frozenset({"gamma"}),
}


def _lr_schedule_form(value: Any) -> str:
    return "pieces" if isinstance(value, list) else "single"


def _without_form_tag(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    return loc[1:] if loc and loc[0] in ("single", "pieces") else loc


LRSchedule = Annotated[
    Annotated[LRScheduleConfig, Tag("single")] | Annotated[list[LRPieceConfig], Tag("pieces")],
    Discriminator(_lr_schedule_form),
]


class TrainingConfig(Strict):
    epochs: int = Field(8, ge=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_schedule: LRSchedule = Field(
        default_factory=LRScheduleConfig,
        description="one schedule over all epochs (a mapping, rates relative to optimizer.lr), or a list of "
        "pieces with their own epoch ranges and absolute rates (warm restarts, a constant then a decay, ...)",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    steps_per_epoch: int | None = Field(None, ge=1, description="cap optimizer steps per epoch (fast runs)")
    grad_clip: float | None = Field(None, gt=0)

    @field_validator("lr_schedule", mode="wrap")
    @classmethod
    def _plain_error_locations(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Drop the union's tag from error locations: 'lr_schedule.1.kind', not 'lr_schedule.pieces.1.kind'."""
        try:
            return handler(value)
        except ValidationError as exc:
            details = [
                InitErrorDetails(type=err["type"], loc=_without_form_tag(err["loc"]), input=err["input"],
                                 ctx=err.get("ctx", {}))
                for err in exc.errors()
            ]
            raise ValidationError.from_exception_data(exc.title, details) from None

    @model_validator(mode="after")
    def _pieces_cover_training(self) -> TrainingConfig:
        pieces = self.lr_schedule
        if not isinstance(pieces, list):
            return self
        if not pieces:
            raise ValueError("lr_schedule is an empty list; give at least one piece or a single schedule mapping")
        if pieces[0].start_epoch != 0:
            raise ValueError(f"lr_schedule.0 starts at epoch {pieces[0].start_epoch}; the first piece starts at 0")
        for index, (piece, following) in enumerate(zip(pieces, pieces[1:], strict=False)):
            if piece.end_epoch is None:
                raise ValueError(f"lr_schedule.{index} has no end_epoch; only the last piece may leave it out")
            if following.start_epoch != piece.end_epoch:
                raise ValueError(
                    f"lr_schedule.{index + 1} starts at epoch {following.start_epoch} but lr_schedule.{index} ends "
                    f"at {piece.end_epoch}; pieces must follow each other without gaps or overlaps"
                )
        last = pieces[-1]
        if self.epochs > 0 and last.start_epoch >= self.epochs:
            raise ValueError(
                f"lr_schedule.{len(pieces) - 1} starts at epoch {last.start_epoch}, when training is over "
                f"(epochs={self.epochs}); remove it or raise epochs"
            )
        if last.end_epoch is not None and last.end_epoch < self.epochs:
            raise ValueError(
                f"lr_schedule pieces end at epoch {last.end_epoch} but training lasts {self.epochs} epochs; "
                "extend the last piece or leave its end_epoch out"
            )
        # optimizer.lr mirrors the first piece's rate (its end rate for a warmup from 0), so that an override
        # of optimizer.lr, which the pieces would silently replace, is caught.
        first_lr = pieces[0].lr if pieces[0].lr > 0 else pieces[0].final_lr
        if "lr" in self.optimizer.model_fields_set and self.optimizer.lr != first_lr:
            raise ValueError(
                f"optimizer.lr ({self.optimizer.lr}) differs from the rate of the first lr_schedule piece "
                f"({first_lr}); with a list of pieces each piece sets its rate: "
                "change the pieces and remove optimizer.lr"
            )
        self.optimizer.lr = first_lr
        return self


class ScheduleConfig(Strict):
    kind: Literal["cubic", "linear", "constant"] = "cubic"
    start_epoch: float = Field(0, ge=0, description="first pruning step (fractional epochs allowed)")
    end_epoch: float = Field(4, ge=0, description="last pruning step, at final sparsity")
    frequency: float = Field(
        1, gt=0, description="epochs between pruning steps; fractions allowed (0.5 = twice per epoch)"
    )

    @model_validator(mode="after")
    def _order(self) -> ScheduleConfig:
        if self.end_epoch < self.start_epoch:
            raise ValueError(
                f"end_epoch ({self.end_epoch}) must be >= start_epoch ({self.start_epoch})"
            )
        return self


def _compiled_regexes(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        if not pattern.strip():  # an empty pattern matches every name: never what a list of names means
            raise ValueError(f"empty regex {pattern!r} matches every parameter; write '.*' to mean all")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regex {pattern!r}: {exc}") from exc
    return patterns


class PruningGroupConfig(Strict):
    """One target over one group of parameters (SparseML: one pruning modifier)."""

    name: str | None = Field(None, description="label used in logs and reports")
    layers: list[str] = Field(..., min_length=1, description="regexes over parameter names of this group")
    skip: list[str] = Field(default_factory=list, description="regexes of parameter names left out of this group")
    initial_sparsity: float = Field(0.0, ge=0, lt=1)
    final_sparsity: float = Field(..., ge=0, lt=1)
    schedule: ScheduleConfig | None = Field(None, description="defaults to pruning.schedule")

    @field_validator("layers", "skip")
    @classmethod
    def _regexes_compile(cls, patterns: list[str]) -> list[str]:
        return _compiled_regexes(patterns)

    @model_validator(mode="after")
    def _sparsity_order(self) -> PruningGroupConfig:
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity ({self.initial_sparsity}) must be <= final_sparsity ({self.final_sparsity})"
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
    route: Literal["fast", "woodbury"] = Field(
        "fast", description="fast GEMM+Cholesky or the rank-one recursion (a slow reference, always run in float64)"
    )
    inverse_rtol: float = Field(
        1e-3, gt=0, lt=1, allow_inf_nan=False,
        description="relative accuracy each Fisher inverse block is held to; blocks float32 cannot hold are "
        "computed in float64, blocks float64 cannot hold get jitter (see max_repair_jitter)",
    )
    max_repair_jitter: float = Field(
        0.1, ge=0, allow_inf_nan=False,
        description="largest extra damping a repair may add to a Fisher block, relative to damp; a step needing "
        "more fails (raise damp, or raise this to accept it)",
    )
    newton_step_cap: float = Field(
        0.003, ge=0, allow_inf_nan=False,
        description="woodtaylor: largest norm of the Newton step F^-1 g relative to each layer's weight norm (the "
        "step is scaled down to it; it grows like damp^-1/2); 0 = no first-order step (WoodFisher's update)",
    )
    nonfinite: Literal["error", "skip"] = Field(
        "error", description="a Fisher gradient with NaN/Inf: stop naming it, or skip it "
        "(replaced by more samples, count reported)"
    )
    memory_budget_gb: float | None = Field(
        None, gt=0, description="memory (GB) one WoodFisher step may allocate for Fisher statistics, gradient chunks "
        "and cached samples; blocks that do not fit are streamed through it in groups (default: half the memory "
        "available when the step starts)"
    )


# Methods that exist for whole channels (pruning.structure: channel); taylor and group_norm exist only there.
CHANNEL_METHODS = ("woodfisher", "magnitude", "taylor", "group_norm")
CHANNEL_ONLY_METHODS = ("taylor", "group_norm")


class ChannelConfig(Strict):
    """Channel pruning (``pruning.structure: channel``): what the sparsity counts and how it is spread."""

    target: Literal["channels", "flops"] = Field(
        "channels", description="what initial/final_sparsity measure: the fraction of prunable channels removed, "
        "or the fraction of conv/linear multiply-accumulates (FLOPs) removed"
    )
    rank_by: Literal["auto", "cost", "cost_per_flop"] = Field(
        "auto", description="global ranking key: the method's score, or score per MAC the channel saves "
        "(auto: cost for a channel target, cost_per_flop for a FLOPs target)"
    )
    min_keep: float = Field(0.1, ge=0, lt=1,
                            description="fraction of every channel group always kept (at least one channel)")
    round_to: int = Field(1, ge=1, description="remove channels in blocks so kept widths are multiples of this "
                          "(ONNX Runtime pads widths to its SIMD block: 16 with AVX-512, 8 with AVX2)")
    round_to_layers: dict[str, int] = Field(
        default_factory=dict, description="per-layer round_to: regex over a producing layer's weight name -> block "
        "size of its channel group's kept widths (the first matching pattern wins; e.g. narrow early stages)"
    )
    min_keep_layers: dict[str, float] = Field(
        default_factory=dict, description="per-layer floors: regex over a producing layer's weight name -> fraction "
        "of its channel group always kept (the largest applying floor wins)"
    )

    @field_validator("min_keep_layers")
    @classmethod
    def _floors(cls, floors: dict[str, float]) -> dict[str, float]:
        _compiled_regexes(list(floors))
        for pattern, value in floors.items():
            if not 0 <= value < 1:
                raise ValueError(f"floor for {pattern!r} must be in [0, 1), got {value}")
        return floors

    @field_validator("round_to_layers")
    @classmethod
    def _rounds(cls, rounds: dict[str, int]) -> dict[str, int]:
        _compiled_regexes(list(rounds))
        for pattern, value in rounds.items():
            if value < 1:
                raise ValueError(f"round_to for {pattern!r} must be >= 1, got {value}")
        return rounds


# Top-level pruning fields that pruning.groups replace (each group has its own).
_GROUP_OWNED = ("layers", "initial_sparsity", "final_sparsity")


class PruningConfig(Strict):
    # kfac: K-FAC-based OBS, a research baseline that needs the optional `research` extra (curvlinops).
    method: Literal["woodfisher", "woodtaylor", "magnitude", "magnitude_uniform", "diag_fisher", "kfac", "taylor",
                    "group_norm", "none"] = Field(
        "woodfisher", description="kfac (K-FAC-based OBS, research baseline) needs `pip install "
        "'wf-pipeline[research]'`; with structure channel: woodfisher (group OBS), magnitude (L1 filter norm), "
        "taylor or group_norm (Torch-Pruning's importances)"
    )
    structure: Literal["unstructured", "channel"] = Field(
        "unstructured", description="unstructured: single weights; channel: whole channels (physically removed)"
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
    groups: list[PruningGroupConfig] = Field(
        default_factory=list,
        description="several targets over different parameter groups; when given, each group prunes its own "
        "layers (minus pruning.skip) and pruning.layers/initial_sparsity/final_sparsity must not be set",
    )
    channel: ChannelConfig = Field(default_factory=ChannelConfig, description="structure channel only")

    @field_validator("layers", "skip")
    @classmethod
    def _regexes_compile(cls, patterns: list[str]) -> list[str]:
        return _compiled_regexes(patterns)

    @model_validator(mode="after")
    def _sparsity_order(self) -> PruningConfig:
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity ({self.initial_sparsity}) must be <= final_sparsity ({self.final_sparsity})"
            )
        return self

    @model_validator(mode="after")
    def _method_fits_structure(self) -> PruningConfig:
        if self.structure == "channel" and self.method not in (*CHANNEL_METHODS, "none"):
            raise ValueError(f"method {self.method!r} prunes single weights; with structure 'channel' use one of "
                             f"{', '.join(CHANNEL_METHODS)}")
        if self.structure == "unstructured" and self.method in CHANNEL_ONLY_METHODS:
            raise ValueError(f"method {self.method!r} removes whole channels: set pruning.structure to 'channel'")
        return self

    @model_validator(mode="after")
    def _groups_own_their_targets(self) -> PruningConfig:
        given = [name for name in _GROUP_OWNED if name in self.model_fields_set] if self.groups else []
        if given:
            raise ValueError(f"pruning.{given[0]} is not used when pruning.groups is given (each group prunes its own "
                             f"layers to its own sparsity): remove pruning.{given[0]} and set it in each group")
        return self

    @model_serializer(mode="wrap")
    def _without_group_owned(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Written recipes with groups leave out the top-level targets no group reads."""
        data = handler(self)
        if self.groups:
            for name in _GROUP_OWNED:
                data.pop(name, None)
        return data

    @property
    def prunes(self) -> bool:
        """False for method 'none': the stage only fine-tunes (and exports) the model."""
        return self.method != "none"

    @property
    def removes_channels(self) -> bool:
        """Whole channels are removed (structure 'channel') and cut out of the model before export."""
        return self.prunes and self.structure == "channel"

    def schedules(self) -> list[ScheduleConfig]:
        """The schedule of every pruning group (one entry when `groups` is empty)."""
        if not self.groups:
            return [self.schedule]
        return [g.schedule or self.schedule for g in self.groups]


class EvaluationConfig(Strict):
    monitor: Literal["none", "pruning_steps", "epochs", "all"] = Field(
        "none",
        description="test-set evaluations between the start and the end of the pruning stage, for progress "
        "lines, history.jsonl and the report's curves only (no decision of the run reads them): none (only the "
        "starting model and the final one, both on the whole test set), pruning_steps (also right after every "
        "pruning step), epochs (also after every fine-tuning epoch), all (both)",
    )
    monitor_samples: int | None = Field(
        2000,
        ge=1,
        description="test samples behind each evaluation that `monitor` adds (null: the whole test set each "
        "time); the starting and final accuracies always use the whole test set",
    )

    @property
    def after_pruning_steps(self) -> bool:
        """The accuracy right after every pruning step is measured."""
        return self.monitor in ("pruning_steps", "all")

    @property
    def after_epochs(self) -> bool:
        """The accuracy after every fine-tuning epoch is measured."""
        return self.monitor in ("epochs", "all")


class ExportConfig(Strict):
    enabled: bool = True
    opset: int = Field(17, ge=9, le=23)
    filename: str = Field("model.onnx", description="file name of the deployable model inside the run's export/ folder")
    sparse_storage: bool = Field(
        True, description="store zero-heavy weights compactly (bitmask + non-zeros, checker-clean)")
    sparse_threshold: float = Field(0.5, ge=0, le=1, description="min zero fraction to store a weight compactly")
    dynamic_batch: bool = True

    @field_validator("filename")
    @classmethod
    def _inside_export_folder(cls, name: str) -> str:
        _plain_name(name, "filename")
        if not name.endswith(".onnx"):
            raise ValueError("filename must end with .onnx, e.g. model.onnx")
        if name == "dense_baseline.onnx":
            raise ValueError("filename dense_baseline.onnx is taken by the dense baseline; choose another name")
        return name


class QuantizeConfig(Strict):
    """Post-training static INT8 quantization of the exported model in ONNX Runtime (QDQ format).

    Weights are INT8, symmetric, per output channel; activations are calibrated on training images
    (never test images). The quantized file is what ships; its FP32 source stays beside it.
    """

    enabled: bool = Field(False, description="quantize the exported model to INT8 (off: the FP32 model ships)")
    calibration_samples: int = Field(
        512, ge=1, le=100_000, description="training images (no augmentation) the activation ranges are measured on")
    calibration_batch_size: int = Field(64, ge=1, le=4096, description="images per calibration batch")
    calibrator: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="how activation ranges are chosen from the calibration outputs")
    percentile: float = Field(99.999, gt=90, le=100, description="calibrator percentile: the kept percentile")
    activations: Literal["uint8", "int8"] = Field(
        "uint8", description="activation type: uint8 (asymmetric, the fast u8s8 kernels on x86) or int8 (symmetric)")
    keep_fp32_op_types: list[str] = Field(
        default_factory=list, description="ONNX op types left in FP32, e.g. [Add, GlobalAveragePool]")
    keep_fp32_nodes: list[str] = Field(
        default_factory=list, description="regexes over ONNX node names left in FP32, e.g. ['^/conv1/']")
    slow_int8_convs: Literal["measure", "fp32", "int8"] = Field(
        "measure",
        description="Convs outside ONNX Runtime's fast INT8 kernel (input channels not a multiple of 4, output "
        "channels under 16 or not a multiple of 8; depthwise: channels not a multiple of 16): 'measure' times the "
        "model both ways on this machine and keeps the faster (recorded in export.json), 'fp32' keeps them FP32, "
        "'int8' quantizes them")
    sparse_storage: bool = Field(
        True, description="store zero-heavy INT8 weights compactly (bitmask + non-zeros) where that is smaller")
    ship: Literal["faster", "int8"] = Field(
        "faster",
        description="'faster': ship the INT8 model only if it runs faster than its FP32 source on this machine "
        "(timed interleaved; otherwise the FP32 model ships as export/model.onnx, the INT8 one stays beside it "
        "as model.int8.onnx, and the report says why); 'int8': always ship the INT8 model")

    @field_validator("keep_fp32_nodes")
    @classmethod
    def _valid_regexes(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if not pattern:
                raise ValueError("keep_fp32_nodes: an empty pattern matches every node; remove it or name nodes")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"keep_fp32_nodes: {pattern!r} is not a valid regex ({exc})") from None
        return patterns

    @field_validator("keep_fp32_op_types")
    @classmethod
    def _op_type_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not re.fullmatch(r"[A-Z][A-Za-z0-9]*", name):
                raise ValueError(f"keep_fp32_op_types: {name!r} is not an ONNX op type (such as Conv, Add, Gemm)")
        return names


class GatesConfig(Strict):
    min_accuracy: float | None = Field(None, ge=0, le=1)
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="vs the dense baseline, absolute")
    max_latency_ms: float | None = Field(None, gt=0, description="p50 latency at the first batch size")
    max_latency_ratio: float | None = Field(
        None, gt=0, description="shipped p50 / dense p50, at every batch size in validate.batch_sizes")
    min_sparsity: float | None = Field(None, ge=0, le=1)
    max_parity_error: float | None = Field(1e-4, gt=0, description="max |logit difference| vs PyTorch")
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    # INT8 against the FP32 model it was quantized from (on test inputs, which calibration never sees).
    min_int8_agreement: float | None = Field(
        0.97, ge=0, le=1, description="top-1 agreement of the INT8 model with its FP32 source (quantize on)")
    max_int8_logit_error: float | None = Field(
        0.1, gt=0, description="mean |INT8 - FP32 logit| / mean |FP32 logit| (quantize on)")


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
        return None if name is None else _plain_name(name, "run_name")


class Recipe(Strict):
    name: str = Field("run", description="the run's name (and its folder under output.root unless output.run_name)")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = True
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainingConfig = Field(default_factory=TrainingConfig, description="dense training (wf-pipeline train)")
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    finetune: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    output: OutputConfig = Field(default_factory=OutputConfig)

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, allow_inf_nan=False)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return _plain_name(name, "name")

    @model_validator(mode="after")
    def _schedule_within_finetune(self) -> Recipe:
        if self.pruning.prunes:
            for index, schedule in enumerate(self.pruning.schedules()):
                where = "pruning.schedule" if not self.pruning.groups else f"pruning.groups[{index}].schedule"
                if schedule.end_epoch > self.finetune.epochs:
                    raise ValueError(
                        f"{where}.end_epoch ({schedule.end_epoch}) is after the last fine-tuning epoch "
                        f"(finetune.epochs={self.finetune.epochs}); raise finetune.epochs or lower end_epoch"
                    )
        return self

    @model_validator(mode="after")
    def _quantize_needs_export(self) -> Recipe:
        if self.quantize.enabled and not self.export.enabled:
            raise ValueError("quantize.enabled needs export.enabled: true (the INT8 model is made from the "
                             "exported FP32 file); enable export or set quantize.enabled: false")
        if self.quantize.enabled and not self.export.dynamic_batch:
            raise ValueError("quantize.enabled needs export.dynamic_batch: true (calibration and the INT8-vs-FP32 "
                             "timing run batches of other sizes than the export's); set export.dynamic_batch: true")
        gates = self.validate_.gates
        defaults = GatesConfig.model_fields
        int8_gates = [name for name in ("min_int8_agreement", "max_int8_logit_error")
                      if name in gates.model_fields_set and getattr(gates, name) != defaults[name].default]
        if int8_gates and not self.quantize.enabled:
            raise ValueError(f"validate.gates.{int8_gates[0]} judges an INT8 model, but quantize.enabled is false; "
                             "set quantize.enabled: true or remove the gate")
        return self

    def run_name(self) -> str:
        return self.output.run_name or self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)
