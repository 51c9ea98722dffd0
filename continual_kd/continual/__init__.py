"""The per-block continual algorithm (plain PyTorch, runnable in one process)."""

from ..types import Knowledge
from .learner import Learner, derive_seed, resolve_device
from .loop import make_learners, run_block_local, run_stream_local
from .stages import (BlockResult, InProcessExecutor, block_stages, knowledge_request, model_key, run_block,
                     teacher_update_options, teacher_weights)
from .training import train_epochs

__all__ = ["BlockResult", "InProcessExecutor", "Knowledge", "Learner", "block_stages", "derive_seed",
           "knowledge_request", "make_learners", "model_key", "resolve_device", "run_block", "run_block_local",
           "run_stream_local", "teacher_update_options", "teacher_weights", "train_epochs"]
