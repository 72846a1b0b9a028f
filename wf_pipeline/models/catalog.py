"""The parameter catalog of the model a recipe names: what recipe translations check names against.

The SparseML translation (wf_pipeline.recipe.sparseml, reached only through the recipe loader) cannot build
models itself; the caller hands it :func:`model_params`, which builds the model without weights and
lists its parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import ValidationError

from wf_pipeline.errors import RecipeError, WFError
from wf_pipeline.models.zoo import build_model
from wf_pipeline.pruning.selection import prunable_weight_names
from wf_pipeline.recipe.param_catalog import ModelParams
from wf_pipeline.recipe.schema import ModelConfig


def model_params(recipe: dict[str, Any], from_user: bool) -> ModelParams:
    """The parameters of `recipe`'s model (a raw recipe dict), built on the meta device when possible.

    `from_user` says whether the recipe is the user's base recipe or the bundled default (for messages).
    """
    section = recipe.get("model", {})
    if not isinstance(section, dict):
        raise RecipeError("base recipe: 'model' must be a mapping", hint="fix the base recipe")
    try:
        cfg = ModelConfig.model_validate(section)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        place = ".".join(str(p) for p in err["loc"])
        raise RecipeError(
            f"base recipe: model.{place}: {err['msg']}", hint="fix the base recipe's model section"
        ) from None
    try:
        with torch.device("meta"):  # names and shapes only: no memory for the weights
            model = build_model(cfg, load=False)
    except WFError:
        raise  # e.g. an unknown model name, or user code not trusted: say so
    except Exception:  # noqa: BLE001 - some factories cannot build on meta; build for real then
        model = build_model(cfg, load=False)
    origin = "from the --base recipe" if from_user else "the bundled default (no --base recipe given)"
    return ModelParams.from_module(model, f"model {cfg.name} ({origin})", prunable_weight_names(model))
