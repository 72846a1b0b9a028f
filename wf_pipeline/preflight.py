"""Preflight: the checks beyond the recipe's schema that need the outside world, so that `compress`
fails here, in seconds, instead of mid-run (`wf-pipeline recipe check` runs exactly these): the run
directory can be made, files exist, the model builds and loads its weights, the data loads and one
batch of it goes through the model (channels, class count), the layer selection is not empty, and
one Fisher block fits in memory. Nothing is written."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from wf_pipeline.errors import RecipeError
from wf_pipeline.recipe.schema import Recipe

# Errors a model raises when the data does not fit it (wrong channels, images too small, ...).
_MISFIT_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


def _check_data_available(recipe: Recipe) -> None:
    cfg = recipe.data
    if cfg.root and not cfg.download and not Path(cfg.root).expanduser().exists():
        raise RecipeError(f"data.root: folder not found: {cfg.root}", "point data.root at an existing folder")
    if cfg.dataset == "fashion_mnist" and not cfg.download:
        from wf_pipeline.data.sources import _fashion_raw_folder

        _fashion_raw_folder(cfg)  # raises WFError naming data.root when the files are missing


def _check_weights_file(recipe: Recipe) -> bool:
    """True when the weights are a local file or built-in (loaded by the check); hub names are only named."""
    from wf_pipeline.models.zoo import is_torchvision_weights_name

    weights = recipe.model.weights
    if not weights:
        return False
    if is_torchvision_weights_name(weights):
        import torchvision

        try:
            torchvision.models.get_weight(weights)  # the name only: fetching the file waits for the run
        except (ValueError, KeyError, AttributeError):
            raise RecipeError(f"model.weights: unknown torchvision weights {weights!r}",
                              "use e.g. 'ResNet18_Weights.IMAGENET1K_V1' or a local file path") from None
        return False
    if not weights.startswith("builtin:") and not Path(weights).expanduser().is_file():
        raise RecipeError(f"model.weights: file not found: {weights}",
                          "give an existing checkpoint path (relative to the current folder)")
    return True


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _check_forward(model: nn.Module, data, recipe: Recipe) -> list[str]:  # data: DataBundle
    """One small batch of test data through the model in eval mode: shapes and class count."""
    cfg = recipe.model
    if data.num_train < 1:
        raise RecipeError("data: the training split is empty", "check data.root / data.train_subset")
    shape = f"{data.in_channels}x{data.image_size}x{data.image_size}"
    if cfg.in_channels != data.in_channels:
        raise RecipeError(f"model.in_channels: {cfg.in_channels}, but the {recipe.data.dataset} images have "
                          f"{data.in_channels} channel(s) ({shape})", f"set model.in_channels: {data.in_channels}")
    batch = next(iter(data.test_batches(batch_size=2)), None)
    if batch is None:
        raise RecipeError("data: the test split is empty", "check data.root / data.test_subset")
    inputs = batch[0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(inputs)
    except _MISFIT_ERRORS as exc:
        raise RecipeError(f"model: {cfg.name} cannot run on the data ({shape} images): {_one_line(exc)}",
                          "check model.name, model.in_channels and data.image_size") from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != inputs.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RecipeError(f"model: {cfg.name} returns {got} for a batch of {inputs.shape[0]}, "
                          "not (batch, classes) logits",
                          "use a classification model")
    outputs, classes = int(out.shape[1]), int(data.num_classes)
    if outputs < classes:
        raise RecipeError(f"model.num_classes: the model has {outputs} outputs but the {recipe.data.dataset} data "
                          f"has {classes} classes", f"set model.num_classes: {classes}")
    if not torch.isfinite(out).all():
        raise RecipeError(f"model: {cfg.name} gives non-finite outputs on the data", "check model.weights")
    notes = [f"data {recipe.data.dataset}: {data.num_train:,} training images of {shape}, {classes} classes; "
             "one batch runs through the model"]
    if outputs > classes:
        notes.append(f"note: the model has {outputs} outputs for {classes} classes")
    return notes


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def smallest_block_bytes(recipe: Recipe) -> int:
    """Bytes one Fisher block needs at the least: its Gram matrix (B*B) or its gradient rows (N*B), in fp32.

    A step can stream blocks through memory a few at a time (fisher/plan.py), but never less than one block.
    """
    wf = recipe.pruning.woodfisher
    return min(wf.block_size, wf.num_grads) * wf.block_size * 4


def _check_fisher_memory(recipe: Recipe, sizes: list[int]) -> list[str]:
    if recipe.pruning.method not in ("woodfisher", "woodtaylor") or not sizes:
        return []
    wf = recipe.pruning.woodfisher
    limit = _physical_memory()
    need = smallest_block_bytes(recipe)
    if limit is not None and need > limit:
        gb = 1024 ** 3
        raise RecipeError(
            f"pruning.woodfisher.block_size: one Fisher block of {wf.block_size:,} weights needs at least "
            f"{need / gb:.3g} GB, more than this machine's {limit / gb:.1f} GB", "lower pruning.woodfisher.block_size "
            "(the paper uses 128)")
    largest = max(sizes)
    if wf.block_size > largest:
        return [f"note: pruning.woodfisher.block_size {wf.block_size:,} exceeds the largest pruned layer "
                f"({largest:,} weights); every layer is one zero-padded block"]
    return []


def _free_disk_near(folder: Path) -> int | None:
    from wf_pipeline.fisher.plan import free_disk_bytes

    existing = next((f for f in (folder, *folder.parents) if f.is_dir()), None)
    return None if existing is None else free_disk_bytes(existing)


def _check_fisher_budget(recipe: Recipe, model: nn.Module, groups: list, data) -> list[str]:  # data: DataBundle
    """Plan each group's WoodFisher step within an explicit `memory_budget_gb`, as the step will (the same
    measured inputs, gradient count and process count; spills go to the run folder): a budget below the
    smallest plan is refused here."""
    from dataclasses import replace

    from wf_pipeline.fisher.engine import statistics_dtype
    from wf_pipeline.fisher.plan import make_plan
    from wf_pipeline.fisher.streamed import FisherJob, measure_plan_inputs
    from wf_pipeline.pruning import PruneSettings
    from wf_pipeline.training.gradual.fisher_data import fisher_pool_size, plan_num_grads

    pcfg, wf = recipe.pruning, recipe.pruning.woodfisher
    if pcfg.method not in ("woodfisher", "woodtaylor") or pcfg.structure == "channel" or wf.memory_budget_gb is None:
        return []
    settings = PruneSettings.from_config(pcfg)
    world = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))  # under torchrun each rank plans its share
    total, _ = plan_num_grads(wf.num_grads, wf.grad_batch_size, fisher_pool_size(data), world)
    sample = data.sample_input(1)
    labels = torch.zeros(1, dtype=torch.long)
    spill_free = _free_disk_near(Path(recipe.output.root).expanduser())
    for group in groups:
        if not group.params:
            continue
        job = FisherJob(model=model, params=group.params, masks=None, batches=lambda: iter([(sample, labels)]),
                        num_grads=max(1, -(-total // world)), block_size=wf.block_size, damp=wf.damp,
                        stat_dtype=statistics_dtype(wf.route, total, wf.block_size, settings.torch_dtype),
                        grad_batch_size=wf.grad_batch_size)
        inputs = measure_plan_inputs(job, max_chunk=wf.chunk_size, vectors=3 if pcfg.method == "woodtaylor" else 1,
                                     allow_lowrank=wf.route != "woodbury" and world == 1)
        make_plan(replace(inputs, spill_free_bytes=spill_free), int(wf.memory_budget_gb * 1e9))
    return [f"the WoodFisher step fits pruning.woodfisher.memory_budget_gb: {wf.memory_budget_gb:g}"]


def check_recipe(recipe: Recipe, *, resume: bool | None = None, overwrite: bool = False) -> list[str]:
    """Raise RecipeError/WFError on the first problem; return notes describing what was checked.

    Every refusal a run can make from its recipe alone is made here, before a run folder or lock exists:
    the run folder (with `resume`/`overwrite` given: for that command), the device, the weights, the
    model on the data, the layer selection and the Fisher's memory.
    """
    from wf_pipeline.data import build_data
    from wf_pipeline.models import build_model
    from wf_pipeline.runtime.device import resolve_device
    from wf_pipeline.runtime.rundir import check_run_location

    check_run_location(recipe, resume=resume, overwrite=overwrite)
    resolve_device(recipe.device)
    load = _check_weights_file(recipe)
    _check_data_available(recipe)
    model = build_model(recipe.model, load=load)  # a 'module:factory' runs only when trusted
    notes = [f"model {recipe.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters"]
    data = build_data(recipe.data, recipe.seed)
    notes += _check_forward(model, data, recipe)
    if recipe.pruning.prunes:
        from wf_pipeline.pruning import PruneSettings
        from wf_pipeline.training.gradual.plan import build_groups

        groups = build_groups(model, recipe.pruning, PruneSettings.from_config(recipe.pruning), data.sample_input(1))
        sizes = [p.numel() for group in groups for p in group.params.values()]
        notes += _check_fisher_memory(recipe, sizes)
        notes += _check_fisher_budget(recipe, model, groups, data)
        for group in groups:
            count = sum(p.numel() for p in group.params.values())
            notes.append(f"pruning {len(group.params)} layers, {count:,} weights, to {group.final_sparsity:.0%} "
                         f"with {recipe.pruning.method}" + (f" (group {group.name})" if len(groups) > 1 else ""))
    return notes
