"""The recipe language: pydantic schema, YAML loading, overrides and SparseML translation."""
from wf_pipeline.recipe.schema import Recipe

__all__ = ["Recipe"]
