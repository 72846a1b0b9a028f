"""Datasets with deterministic splits: training data, a separate Fisher pool, and a test set."""
from wf_pipeline.data.bundle import DataBundle, build_data
from wf_pipeline.data.loaders import Batch

__all__ = ["Batch", "DataBundle", "build_data"]
