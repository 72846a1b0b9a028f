"""SparseML recipe compatibility, fenced off: translate SparseML's YAML recipes into ours.

Only the recipe loader (``wf_pipeline.recipe.loader``) imports this package, and only through the names
below; nothing in the pipeline knows SparseML exists (tests/test_architecture.py holds the fence). It
imports nothing of the pipeline but errors and the parameter catalog it is handed.

Modules: ``translate`` (the modifiers -> recipe sections), ``fields`` (reading one modifier's fields and
collecting problems), ``lr`` (learning-rate and weight-decay modifiers), ``params`` (SparseML's
parameter-name matching), ``safe_eval`` (the ``eval(...)`` arithmetic SparseML recipes may contain).
"""
from wf_pipeline.recipe.sparseml.translate import (
    DEFAULT_BASE,
    MODIFIER_KEY,
    SparseMLRecipeError,
    Translation,
    UniqueKeyLoader,
    conversion_header,
    convert_sparseml,
    is_sparseml_recipe,
    load_sparseml_text,
    translate_sparseml,
)

__all__ = [
    "DEFAULT_BASE",
    "MODIFIER_KEY",
    "SparseMLRecipeError",
    "Translation",
    "UniqueKeyLoader",
    "conversion_header",
    "convert_sparseml",
    "is_sparseml_recipe",
    "load_sparseml_text",
    "translate_sparseml",
]
