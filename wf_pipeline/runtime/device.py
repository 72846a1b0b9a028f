"""Device choice and reproducibility switches."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def resolve_device(choice: str = "auto") -> torch.device:
    """'auto' takes a GPU when one is present, else the CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from wf_pipeline.errors import WFError

            raise WFError("device: cuda requested but no GPU is available", "set device: auto or cpu")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        # Bit-identical resume needs deterministic kernels; warn_only keeps ops without one usable.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
