"""Checks beyond the schema that need the outside world: files exist, the model builds, layers match."""
from __future__ import annotations

from pathlib import Path

from wf_pipeline.errors import RecipeError
from wf_pipeline.recipe.schema import Recipe


def _check_data_available(recipe: Recipe) -> None:
    cfg = recipe.data
    if cfg.root and not cfg.download and not Path(cfg.root).expanduser().exists():
        raise RecipeError(f"data.root: folder not found: {cfg.root}", "point data.root at an existing folder")
    if cfg.dataset == "fashion_mnist" and not cfg.download:
        from wf_pipeline.data.sources import _fashion_raw_folder

        _fashion_raw_folder(cfg)  # raises WFError naming data.root when the files are missing


def check_recipe(recipe: Recipe) -> list[str]:
    """Raise RecipeError/WFError on the first problem; return notes describing what was checked."""
    from wf_pipeline.models import build_model
    from wf_pipeline.models.zoo import is_torchvision_weights_name
    from wf_pipeline.pruning.selection import select_prunable

    weights = recipe.model.weights
    hub_weights = bool(weights) and is_torchvision_weights_name(weights)  # type: ignore[arg-type]
    if weights and not weights.startswith("builtin:") and not hub_weights:
        if not Path(weights).expanduser().is_file():
            raise RecipeError(f"model.weights: file not found: {weights}",
                              "give an existing checkpoint path (relative to the current folder)")
    if recipe.export.enabled and not recipe.export.filename.endswith(".onnx"):
        raise RecipeError(f"export.filename: {recipe.export.filename!r} must end with .onnx", "e.g. model.onnx")
    _check_data_available(recipe)
    # Loading local weights here catches a checkpoint that does not fit the model; hub names are only named.
    model = build_model(recipe.model, load=bool(weights) and not hub_weights)
    notes = [f"model {recipe.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters"]
    if recipe.pruning.method != "none":
        params = select_prunable(model, recipe.pruning.layers, recipe.pruning.skip, recipe.pruning.min_layer_params)
        count = sum(p.numel() for p in params.values())
        notes.append(f"pruning {len(params)} layers, {count:,} weights, to {recipe.pruning.final_sparsity:.0%} "
                     f"with {recipe.pruning.method}")
    return notes
