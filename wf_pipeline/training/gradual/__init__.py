"""The `compress` pruning stage: gradual pruning with fine-tuning in between (see :mod:`.loop`)."""
from wf_pipeline.training.gradual.checkpoint import CHECKPOINT_NAME
from wf_pipeline.training.gradual.fisher_data import plan_num_grads
from wf_pipeline.training.gradual.loop import StageResult, run_pruning_stage

__all__ = ["CHECKPOINT_NAME", "StageResult", "plan_num_grads", "run_pruning_stage"]
