"""Research-only pruning baselines, kept apart from the product's methods.

* :mod:`.kfac` / :mod:`.kfac_pruner` — K-FAC-based OBS (recipe ``pruning.method: kfac``), a baseline for the
  research studies (``benchmarks/research/``); it needs the optional ``research`` extra (curvlinops-for-pytorch).
  The registry (:mod:`wf_pipeline.pruning.pruners.registry`) maps the recipe name to :class:`.KFACPruner`.
"""
from wf_pipeline.pruning.research.kfac_pruner import KFACPruner

__all__ = ["KFACPruner"]
