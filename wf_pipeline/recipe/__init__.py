"""The recipe language: pydantic schema, YAML loading and overrides (SparseML recipes are translated by the loader)."""
from wf_pipeline.recipe.schema import Recipe

__all__ = ["Recipe"]
