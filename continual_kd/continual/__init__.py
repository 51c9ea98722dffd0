"""The per-block continual algorithm (plain PyTorch, runnable in one process)."""

from .learner import Knowledge, Learner, derive_seed, resolve_device
from .loop import (BlockResult, knowledge_size, make_learners, model_key, run_block_local, run_stream_local,
                   teacher_knowledge_options, teacher_update_options, teacher_weights)
from .training import train_epochs

__all__ = ["BlockResult", "Knowledge", "Learner", "derive_seed", "knowledge_size", "make_learners", "model_key",
           "resolve_device", "run_block_local", "run_stream_local", "teacher_knowledge_options", "teacher_update_options",
           "teacher_weights", "train_epochs"]
