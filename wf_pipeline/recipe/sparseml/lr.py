"""SparseML's learning-rate and weight-decay modifiers -> `finetune.lr_schedule` (one schedule or pieces).

SparseML's rate over training is whatever the last modifier to touch it set: a SetLearningRateModifier
sets a rate that holds until something changes it; a LearningRateFunctionModifier (linear/cosine) or a
LearningRateModifier (torch's MultiStepLR/StepLR/ExponentialLR) sets it at every step of its range and
leaves it at its end value. That timeline maps exactly onto contiguous pieces: one per function or
scheduler, constant pieces in between. Weight decay changes (SetWeightDecayModifier after epoch 0) ride on
the pieces. When the whole timeline is one piece, the familiar single-schedule form is written instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from wf_pipeline.recipe.sparseml.fields import Context, Modifier

_TOLERANCE = 1e-9


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@dataclass
class SetLR:
    epoch: float  # 0 for "from the start" (SparseML's -1)
    lr: float
    mod: Modifier


@dataclass
class Curve:
    """A modifier that sets the rate at every step of [start, end): linear, cosine or step decay."""

    kind: str
    start: float
    end: float | None  # None: until training ends (SparseML's end_epoch -1)
    lr: float
    final_lr: float = 0.0
    step_epochs: list[float] = field(default_factory=list)
    gamma: float = 0.1
    mod: Modifier | None = None

    def value_at_end(self, end: float) -> float:
        if self.kind == "step":
            return self.lr * self.gamma ** sum(e < end for e in self.step_epochs)
        return self.final_lr


@dataclass
class SetWeightDecay:
    epoch: float
    weight_decay: float
    mod: Modifier


@dataclass
class LRModifiers:
    set_lrs: list[SetLR] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    weight_decays: list[SetWeightDecay] = field(default_factory=list)

    def ends(self) -> list[float]:
        return [c.end for c in self.curves if c.end is not None]

    @property
    def empty(self) -> bool:
        return not (self.set_lrs or self.curves or self.weight_decays)


# ============================================================================= parsing the modifiers


def _require_unset(mod: Modifier, name: str, allowed: tuple[Any, ...], why: str) -> None:
    if mod.has(name):
        if mod.fields[name] not in allowed:
            raise mod.stop(name, f"value {mod.fields[name]!r} is not supported: {why}", f"remove '{name}'")
        mod.ignored(name, f"{mod.fields[name]!r} is SparseML's default")


def parse_set_lr(mod: Modifier, out: LRModifiers) -> None:
    mod.check_fields(required=("learning_rate",), optional=("start_epoch", "end_epoch", "param_groups"))
    _require_unset(mod, "param_groups", (None,), "wf-pipeline uses one learning rate for all parameters")
    if mod.raw("learning_rate") is None:
        mod.ignored("learning_rate", "null: the modifier does nothing")
        for name in ("start_epoch", "end_epoch"):
            if mod.has(name):
                mod.ignored(name, "the modifier does nothing")
        return
    lr = mod.number("learning_rate")
    if lr <= 0:
        raise mod.stop("learning_rate", f"must be > 0, got {lr}", "give a positive learning rate")
    if mod.has("end_epoch"):
        mod.ignored("end_epoch", "SparseML ignores it too: the rate holds until another modifier changes it")
    start = mod.epoch("start_epoch", -1.0)
    out.set_lrs.append(SetLR(max(start, 0.0), lr, mod))


def parse_lr_function(mod: Modifier, out: LRModifiers) -> None:
    mod.check_fields(
        required=("lr_func", "init_lr", "final_lr", "start_epoch", "end_epoch"),
        optional=("cycle_epochs", "param_groups", "update_frequency"),
    )
    _require_unset(mod, "param_groups", (None,), "wf-pipeline uses one learning rate for all parameters")
    _require_unset(mod, "update_frequency", (-1, -1.0), "SparseML requires it to stay -1")
    func = mod.string("lr_func")
    if func not in ("linear", "cosine"):
        raise mod.stop(
            "lr_func",
            f"'{func}' has no wf-pipeline equivalent",
            "use lr_func: linear or cosine (restarts: one modifier per cycle)",
        )
    start, end = max(mod.epoch("start_epoch"), 0.0), mod.epoch("end_epoch")
    if end <= start:
        raise mod.stop("end_epoch", f"must be after start_epoch ({start}), got {end}", "give a later end_epoch")
    if mod.has("cycle_epochs"):
        cycle = mod.number("cycle_epochs")
        if cycle > 0 and not _same(cycle, end - start):
            raise mod.stop(
                "cycle_epochs",
                f"cycles of {cycle} epochs inside one modifier are not supported",
                "write one !LearningRateFunctionModifier per cycle (each becomes a schedule piece)",
            )
        mod.ignored("cycle_epochs", "one cycle over the whole range, as without it")
    init_lr, final_lr = mod.number("init_lr"), mod.number("final_lr")
    for name, value in (("init_lr", init_lr), ("final_lr", final_lr)):
        if value < 0:
            raise mod.stop(name, f"learning rates must be >= 0, got {value}", "give a rate >= 0")
    if init_lr == 0 and final_lr == 0:
        raise mod.stop("init_lr", "init_lr and final_lr are both 0", "give a positive rate")
    out.curves.append(Curve(func, start, end, init_lr, final_lr, mod=mod))


_LR_CLASS_KWARGS = {
    "MultiStepLR": ("milestones", "gamma"),
    "StepLR": ("step_size", "gamma"),
    "ExponentialLR": ("gamma",),
}


def _positive_kwarg(mod: Modifier, kwargs: dict[str, Any], key: str) -> float:
    value = kwargs[key]
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise mod.stop(
                "lr_kwargs", f"{key} must be a number, got {value!r}", f"give lr_kwargs.{key} a number"
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise mod.stop("lr_kwargs", f"{key} must be a positive number, got {value!r}", f"give lr_kwargs.{key} > 0")
    return float(value)


def parse_lr_class(mod: Modifier, out: LRModifiers) -> None:
    mod.check_fields(
        required=("lr_class", "lr_kwargs", "init_lr", "start_epoch"), optional=("end_epoch", "update_frequency")
    )
    _require_unset(mod, "update_frequency", (-1, -1.0), "SparseML requires it to stay -1")
    lr_class = mod.string("lr_class")
    if lr_class not in _LR_CLASS_KWARGS:
        raise mod.stop(
            "lr_class",
            f"'{lr_class}' has no wf-pipeline equivalent",
            "use MultiStepLR, StepLR or ExponentialLR (or LearningRateFunctionModifiers)",
        )
    kwargs = mod.raw("lr_kwargs")
    if not isinstance(kwargs, dict):
        raise mod.stop("lr_kwargs", f"expected a mapping, got {kwargs!r}", "write lr_kwargs: {gamma: 0.1, ...}")
    expected = _LR_CLASS_KWARGS[lr_class]
    unknown = [key for key in kwargs if key not in expected]
    missing = [key for key in expected if key not in kwargs]
    if unknown or missing:
        raise mod.stop(
            "lr_kwargs",
            f"{lr_class} takes {', '.join(expected)} (unknown: {unknown or 'none'}, missing: {missing or 'none'})",
            f"use exactly lr_kwargs keys {list(expected)}",
        )
    init_lr = mod.number("init_lr")
    if init_lr <= 0:
        raise mod.stop("init_lr", f"must be > 0, got {init_lr}", "give a positive rate")
    start = mod.epoch("start_epoch")
    if start > 0:
        raise mod.stop(
            "start_epoch",
            f"{start}: a torch scheduler that starts mid-training is not translated "
            "(its milestones count from its own start)",
            "start it at epoch 0 (or -1), or use !LearningRateFunctionModifier / !SetLearningRateModifier",
        )
    end = mod.epoch("end_epoch", -1.0)
    gamma = _positive_kwarg(mod, kwargs, "gamma")
    if lr_class == "MultiStepLR":
        milestones = kwargs["milestones"]
        if (
            not isinstance(milestones, list)
            or not milestones
            or any(isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0 for m in milestones)
        ):
            raise mod.stop(
                "lr_kwargs",
                f"milestones must be a non-empty list of epochs > 0, got {milestones!r}",
                "e.g. milestones: [30, 60]",
            )
        steps = sorted({float(m) for m in milestones})
        curve = Curve("step", 0.0, None if end < 0 else end, init_lr, step_epochs=steps, gamma=gamma, mod=mod)
    else:
        size = _positive_kwarg(mod, kwargs, "step_size") if lr_class == "StepLR" else 1.0
        # The steps depend on where training ends, known once every modifier is read: filled in later.
        curve = Curve("step", 0.0, None if end < 0 else end, init_lr, step_epochs=[-size], gamma=gamma, mod=mod)
        if lr_class == "ExponentialLR":
            mod.ctx.note(f"{mod.label}: ExponentialLR decays once per epoch in SparseML -> a step decay every epoch")
    out.curves.append(curve)


def parse_weight_decay(mod: Modifier, out: LRModifiers) -> None:
    mod.check_fields(required=("weight_decay",), optional=("start_epoch", "param_groups"))
    _require_unset(mod, "param_groups", (None,), "wf-pipeline uses one weight decay for all decayed parameters")
    decay = mod.number("weight_decay")
    if decay < 0:
        raise mod.stop("weight_decay", f"must be >= 0, got {decay}", "give a weight decay >= 0")
    out.weight_decays.append(SetWeightDecay(max(mod.epoch("start_epoch", -1.0), 0.0), decay, mod))


# ============================================================================= composing the pieces


@dataclass
class _Piece:
    kind: str
    start: float
    end: float
    lr: float
    final_lr: float = 0.0
    step_epochs: list[float] = field(default_factory=list)
    gamma: float = 0.1
    weight_decay: float | None = None
    sources: list[tuple[Modifier, str]] = field(default_factory=list)  # (modifier, what it contributed)

    def value_at(self, epoch: float) -> float:
        t = (epoch - self.start) / (self.end - self.start)
        if self.kind == "constant":
            return self.lr
        if self.kind == "linear":
            return self.lr + (self.final_lr - self.lr) * t
        if self.kind == "step":
            return self.lr * self.gamma ** sum(e <= epoch for e in self.step_epochs)
        raise ValueError(self.kind)  # cosine pieces are never split

    def describe(self) -> str:
        span = f"epochs {self.start:g}-{self.end:g}"
        if self.kind == "constant":
            text = f"constant {self.lr:g}, {span}"
        elif self.kind in ("linear", "cosine"):
            text = f"{self.kind} {self.lr:g} -> {self.final_lr:g}, {span}"
        else:
            text = f"step from {self.lr:g}, x{self.gamma:g} at {[_tidy(e) for e in self.step_epochs]}, {span}"
        return text + ("" if self.weight_decay is None else f", weight decay {self.weight_decay:g}")


def _tidy(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


@dataclass
class LRTranslation:
    """What the learning-rate modifiers set: `finetune.optimizer` values and `finetune.lr_schedule`."""

    optimizer: dict[str, float] = field(default_factory=dict)
    schedule: dict[str, Any] | list[dict[str, Any]] | None = None


def compose(mods: LRModifiers, epochs: int, base_lr: float | None, ctx: Context) -> LRTranslation:
    """Turn the learning-rate and weight-decay modifiers into our schedule, recording problems in `ctx`."""
    result = LRTranslation()
    initial_decays = [w for w in mods.weight_decays if w.epoch <= 0]
    later_decays = sorted((w for w in mods.weight_decays if w.epoch > 0), key=lambda w: w.epoch)
    if len(initial_decays) > 1:
        ctx.problem(
            ", ".join(w.mod.label for w in initial_decays),
            "several SetWeightDecayModifiers start at epoch 0",
            "keep one",
        )
    for item in initial_decays[-1:]:
        result.optimizer["weight_decay"] = item.weight_decay
        item.mod.became("weight_decay", f"finetune.optimizer.weight_decay = {item.weight_decay:g}")
        if item.mod.has("start_epoch"):
            item.mod.became("start_epoch", "from the start of fine-tuning")
    if not mods.set_lrs and not mods.curves:
        if later_decays:
            for item in later_decays:
                item.mod.problem(
                    "start_epoch",
                    f"a weight decay change at epoch {item.epoch:g} needs the learning-rate "
                    "schedule stated in the recipe (wf-pipeline changes weight decay where a schedule piece starts)",
                    "add a !SetLearningRateModifier at epoch 0 (or the recipe's learning-rate modifiers)",
                )
        else:
            ctx.note(
                "no learning-rate modifier: finetune.optimizer.lr and lr_schedule come from the base recipe or defaults"
            )
        return result
    if epochs <= 0:  # no training length (a recipe of one-shot steps): only a rate set from the start can apply
        for set_lr in mods.set_lrs:
            if set_lr.epoch <= 0:
                result.optimizer["lr"] = set_lr.lr
                result.schedule = {"kind": "constant"}
                for name in set_lr.mod.unrecorded_fields():
                    set_lr.mod.became(name, "finetune.optimizer.lr" if name == "learning_rate" else "from the start")
            else:
                set_lr.mod.ignored("learning_rate", "no fine-tuning epochs to apply it to")
        for curve in mods.curves:
            if curve.mod is not None:
                curve.mod.problem(
                    None, "a learning-rate schedule needs fine-tuning epochs", "add an !EpochRangeModifier"
                )
        return result
    for set_lr in mods.set_lrs:
        if set_lr.epoch >= epochs > 0:
            set_lr.mod.ignored(
                "learning_rate", f"set at epoch {set_lr.epoch:g}, when training (epochs={epochs}) is over"
            )
            set_lr.mod.ignored("start_epoch", "after the end of training")
    mods = LRModifiers([s for s in mods.set_lrs if s.epoch < epochs or epochs == 0], mods.curves, mods.weight_decays)
    pieces = _lr_pieces(mods, float(epochs), base_lr, ctx)
    if pieces is None:
        return result
    pieces = _apply_weight_decays(pieces, later_decays, ctx)
    if pieces is None:
        return result
    pieces = _merge_constants(pieces)
    _emit(pieces, result)
    return result


def _lr_pieces(mods: LRModifiers, epochs: float, base_lr: float | None, ctx: Context) -> list[_Piece] | None:
    curves = sorted(mods.curves, key=lambda c: c.start)
    for curve in curves:
        if curve.kind == "step" and curve.step_epochs and curve.step_epochs[0] < 0:  # StepLR/ExponentialLR
            size, horizon = -curve.step_epochs[0], curve.end if curve.end is not None else epochs
            curve.step_epochs = [size * k for k in range(1, math.ceil(horizon / size - _TOLERANCE))]
    ok = True
    for first, second in zip(curves, curves[1:], strict=False):
        first_end = first.end if first.end is not None else epochs
        if first_end > second.start + _TOLERANCE:
            assert first.mod is not None and second.mod is not None
            ctx.problem(
                f"{first.mod.label} and {second.mod.label}",
                f"both set the learning rate between epochs {second.start:g} and {min(first_end, epochs):g}",
                "let each learning-rate modifier end where the next one starts",
            )
            ok = False
    starts = [s for s in mods.set_lrs if s.epoch <= 0]
    if len(starts) > 1:
        ctx.problem(
            ", ".join(s.mod.label for s in starts), "several SetLearningRateModifiers all start at epoch 0", "keep one"
        )
        ok = False
    if not ok:
        return None

    pieces: list[_Piece] = []
    cursor: float = 0.0
    held: float | None = None  # the rate in force
    held_from: SetLR | Curve | None = None  # and what set it
    set_lrs = sorted(mods.set_lrs, key=lambda s: s.epoch)

    def fill(until: float) -> bool:
        """Constant pieces from `cursor` to `until`, starting a new one at every SetLearningRateModifier."""
        nonlocal cursor, held, held_from
        for item in [s for s in set_lrs if cursor <= s.epoch < until]:
            if item.epoch > cursor:
                if not _constant(cursor, item.epoch):
                    return False
            held, held_from, cursor = item.lr, item, item.epoch
        return until <= cursor or _constant(cursor, until)

    def _constant(start: float, end: float) -> bool:
        nonlocal held
        if held is None:
            if base_lr is None:
                ctx.problem(
                    "recipe",
                    f"the learning rate before epoch {end:g} is not set by any modifier "
                    "(SparseML used the training script's optimizer rate)",
                    "add a !SetLearningRateModifier at epoch 0, or set finetune.optimizer.lr in the --base recipe",
                )
                return False
            held = base_lr
            ctx.note(
                f"epochs {start:g}-{end:g}: the base recipe's finetune.optimizer.lr {base_lr:g} (no SparseML "
                "modifier sets the rate there)"
            )
        piece = _Piece("constant", start, end, held)
        if isinstance(held_from, SetLR):
            piece.sources.append((held_from.mod, "lr"))
        elif isinstance(held_from, Curve) and held_from.mod is not None:
            piece.sources.append((held_from.mod, "end value"))
        pieces.append(piece)
        return True

    for curve in curves:
        if not fill(curve.start):
            return None
        end = min(curve.end if curve.end is not None else epochs, epochs)
        for item in set_lrs:
            if _same(item.epoch, curve.start) and curve.mod is not None:
                item.mod.ctx.note(
                    f"{item.mod.label}: learning_rate {item.lr:g} is overridden by {curve.mod.label} "
                    f"from epoch {curve.start:g}"
                )
                item.mod.ignored(
                    "learning_rate",
                    f"overridden at once by {curve.mod.label}, which sets the rate from epoch {curve.start:g}",
                )
                if item.mod.has("start_epoch"):
                    item.mod.ignored("start_epoch", "the modifier is overridden")
            elif curve.start < item.epoch < end and curve.mod is not None:
                ctx.problem(
                    f"{item.mod.label} and {curve.mod.label}",
                    f"the rate is set at epoch {item.epoch:g} inside the {curve.kind} schedule "
                    f"({curve.start:g}-{end:g})",
                    "move the SetLearningRateModifier to where the schedule ends",
                )
                return None
        steps = [e for e in curve.step_epochs if curve.start < e < end]
        pieces.append(
            _Piece(
                curve.kind,
                curve.start,
                end,
                curve.lr,
                curve.final_lr,
                steps,
                curve.gamma,
                sources=[(curve.mod, "piece")] if curve.mod is not None else [],
            )
        )
        held, held_from, cursor = curve.value_at_end(end), curve, end
    if not fill(epochs):
        return None
    return pieces


def _split(piece: _Piece, at: float) -> tuple[_Piece, _Piece]:
    """Two pieces that give the same rates as `piece` (constant, linear or step) on either side of `at`."""
    value = piece.value_at(at)
    before = replace(piece, end=at, step_epochs=[e for e in piece.step_epochs if e < at], sources=list(piece.sources))
    after = replace(
        piece, start=at, lr=value, step_epochs=[e for e in piece.step_epochs if e > at], sources=list(piece.sources)
    )
    if piece.kind == "linear":
        before.final_lr = value
    for part in (before, after):
        if part.kind == "step" and not part.step_epochs:
            part.kind = "constant"
    return before, after


def _apply_weight_decays(pieces: list[_Piece], changes: list[SetWeightDecay], ctx: Context) -> list[_Piece] | None:
    for change in changes:
        index = next((i for i, p in enumerate(pieces) if p.start <= change.epoch < p.end), None)
        if index is None:
            change.mod.problem("start_epoch", f"epoch {change.epoch:g} is after training ends", "start it earlier")
            return None
        piece = pieces[index]
        if piece.start < change.epoch:
            if piece.kind in ("cosine",):
                change.mod.problem(
                    "start_epoch",
                    f"epoch {change.epoch:g} falls inside the cosine learning-rate "
                    f"schedule ({piece.start:g}-{piece.end:g}); wf-pipeline changes weight decay where "
                    "a schedule piece starts",
                    "move it to where the learning-rate schedule ends",
                )
                return None
            pieces[index : index + 1] = list(_split(piece, change.epoch))
        for later in pieces:
            if later.start >= change.epoch:
                later.weight_decay = change.weight_decay
                later.sources.append((change.mod, "weight_decay"))
    return pieces


def _merge_constants(pieces: list[_Piece]) -> list[_Piece]:
    """Neighbouring constant pieces -> one piece; a run whose rate changes by one factor -> one step piece."""
    merged: list[_Piece] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        same_decay = last is not None and last.weight_decay == piece.weight_decay
        if last is not None and same_decay and piece.kind == "constant" and last.kind in ("constant", "step"):
            current = last.value_at(piece.start)
            ratio = float(f"{piece.lr / current:.12g}")  # drop float noise such as 0.1000...02
            if _same(piece.lr, current):
                last.end = piece.end
                last.sources += piece.sources
                continue
            if last.kind == "constant" or math.isclose(ratio, last.gamma, rel_tol=1e-6):
                last.kind, last.gamma = "step", ratio if last.kind == "constant" else last.gamma
                last.step_epochs = [*last.step_epochs, piece.start]
                last.end = piece.end
                last.sources += piece.sources
                continue
        merged.append(piece)
    return merged


def _single_form(piece: _Piece) -> dict[str, Any] | None:
    if piece.weight_decay is not None or piece.lr <= 0:
        return None
    if piece.kind == "constant":
        return {"kind": "constant"}
    if piece.kind in ("linear", "cosine"):
        return {"kind": piece.kind, "final_lr": piece.final_lr}
    if all(float(e).is_integer() for e in piece.step_epochs):
        return {"kind": "step", "step_epochs": [int(e) for e in piece.step_epochs], "gamma": piece.gamma}
    return None


def _piece_dict(piece: _Piece) -> dict[str, Any]:
    out: dict[str, Any] = {
        "start_epoch": _tidy(piece.start),
        "end_epoch": _tidy(piece.end),
        "kind": piece.kind,
        "lr": piece.lr,
    }
    if piece.kind in ("linear", "cosine"):
        out["final_lr"] = piece.final_lr
    if piece.kind == "step":
        out["step_epochs"] = [_tidy(e) for e in piece.step_epochs]
        out["gamma"] = piece.gamma
    if piece.weight_decay is not None:
        out["weight_decay"] = piece.weight_decay
    return out


# Which part of a piece each SparseML field sets.
_FIELD_ATTRIBUTE = {
    "learning_rate": "lr",
    "init_lr": "lr",
    "final_lr": "final_lr",
    "lr_func": "kind",
    "lr_class": "kind",
    "lr_kwargs": "step_epochs/gamma",
    "start_epoch": "start_epoch",
    "end_epoch": "end_epoch",
    "weight_decay": "weight_decay",
}


def _target(field_name: str, index: int | None) -> str:
    attribute = _FIELD_ATTRIBUTE.get(field_name, "")
    if index is not None:
        return f"finetune.lr_schedule[{index}].{attribute}" if attribute else f"finetune.lr_schedule[{index}]"
    if attribute == "lr":
        return "finetune.optimizer.lr"
    if attribute in ("start_epoch", "end_epoch"):
        return "finetune.lr_schedule (over all fine-tuning epochs)"
    return f"finetune.lr_schedule.{attribute}" if attribute else "finetune.lr_schedule"


def _emit(pieces: list[_Piece], result: LRTranslation) -> None:
    single = _single_form(pieces[0]) if len(pieces) == 1 else None
    if single is not None:
        result.optimizer["lr"] = pieces[0].lr
        result.schedule = single
    else:
        result.schedule = [_piece_dict(p) for p in pieces]
        result.optimizer["lr"] = pieces[0].lr if pieces[0].lr > 0 else pieces[0].final_lr  # as the schema mirrors it
    for index, piece in enumerate(pieces):
        for mod, _ in piece.sources:
            for name in mod.unrecorded_fields():
                mod.became(name, f"{_target(name, None if single is not None else index)} ({piece.describe()})")
