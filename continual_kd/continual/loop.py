"""The stream in one process: the reference the Ray runtime must reproduce to the digit.

Each block runs the stages of ``continual.stages`` on an ``InProcessExecutor``; ``runtime.coordinator``
runs the very same stages on Ray actors.
"""

from __future__ import annotations

from typing import Callable

from ..config import JobSpec
from ..types import Interactions
from .learner import Learner
from .stages import BlockResult, InProcessExecutor, model_key, run_block


def make_learners(job: JobSpec, device: str = "cpu") -> dict[str, Learner]:
    """One Learner per model of the job, keyed as in metrics and snapshots (teachers first)."""
    learners = {model_key("teacher", t.name): Learner(t, job.seed, device, role="teacher") for t in job.teachers}
    learners[model_key("student", job.student.name)] = Learner(job.student, job.seed, device, role="student")
    return learners


def run_block_local(job: JobSpec, seen: Interactions, block: int, learners: dict[str, Learner],
                    on_stage: Callable[[str], None] | None = None,
                    previous_valid: dict[str, dict] | None = None) -> BlockResult:
    return run_block(job, block, InProcessExecutor(learners, seen, block), previous_valid, on_stage)


def run_stream_local(job: JobSpec, read_upto: Callable[[int], Interactions], num_blocks: int,
                     device: str = "cpu", on_block: Callable[[BlockResult], None] | None = None,
                     learners: dict[str, Learner] | None = None) -> list[BlockResult]:
    """Run every block in this process. ``read_upto(k)`` returns the interactions of blocks 0..k."""
    learners = learners if learners is not None else make_learners(job, device)
    results: list[BlockResult] = []
    for k in range(num_blocks):
        res = run_block_local(job, read_upto(k), k, learners, previous_valid=results[-1].valid if results else None)
        results.append(res)
        if on_block:
            on_block(res)
    return results
