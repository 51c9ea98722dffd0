"""The per-block algorithm, in one process: the reference the Ray runtime must reproduce.

Per block k: every teacher updates on block k (warm start) → the teachers' top-N knowledge for the
block's users → the student updates with BPR + λ·KD → every model is evaluated on block k's test
part with full ranking. ``runtime.coordinator`` runs the same stages with the models in actors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..config import JobSpec
from ..types import Interactions
from .learner import Learner


@dataclass
class BlockResult:
    block: int
    metrics: dict[str, dict[str, float]]  # model name → metric → value (block's test part)
    valid: dict[str, dict[str, float]]  # model name → metric → value (block's valid part)
    updates: dict[str, dict] = field(default_factory=dict)  # model name → update log (seconds, losses)
    seconds: float = 0.0


def model_key(role: str, name: str) -> str:
    """How a model is named in metrics, snapshots and the Ray dashboard: teacher:<name> or student."""
    return "student" if role == "student" else f"teacher:{name}"


def knowledge_size(job: JobSpec) -> int:
    d = job.distill
    return max(d.k, d.pool) if d.method != "none" else 0


def make_learners(job: JobSpec, device: str = "cpu") -> tuple[dict[str, Learner], Learner]:
    teachers = {model_key("teacher", t.name): Learner(t, job.seed, device) for t in job.teachers}
    return teachers, Learner(job.student, job.seed, device)


def run_block_local(job: JobSpec, seen: Interactions, block: int, teachers: dict[str, Learner],
                    student: Learner, on_stage: Callable[[str], None] | None = None) -> BlockResult:
    import time

    t0 = time.perf_counter()
    stage = on_stage or (lambda _s: None)
    updates = {}
    for name, t in teachers.items():
        stage(f"update {name}")
        updates[name] = t.update(seen, block)
    knowledge = []
    if job.distill.method != "none" and teachers:
        stage("teacher knowledge")
        knowledge = [t.knowledge(seen, block, knowledge_size(job)) for t in teachers.values()]
    stage("update student")
    updates["student"] = student.update(seen, block, knowledge, job.distill)
    stage("evaluate")
    metrics, valid = {}, {}
    for name, learner in [*teachers.items(), ("student", student)]:
        metrics[name] = learner.evaluate(seen, [block], job.eval)[block]
        valid[name] = learner.validate(seen, block, job.eval)
        updates[name]["parameters"] = learner.num_parameters()
    return BlockResult(block, metrics, valid, updates, time.perf_counter() - t0)


def run_stream_local(job: JobSpec, read_upto: Callable[[int], Interactions], num_blocks: int,
                     device: str = "cpu", on_block: Callable[[BlockResult], None] | None = None) -> list[BlockResult]:
    """Run every block in this process. ``read_upto(k)`` returns the interactions of blocks 0..k."""
    teachers, student = make_learners(job, device)
    results = []
    for k in range(num_blocks):
        res = run_block_local(job, read_upto(k), k, teachers, student)
        results.append(res)
        if on_block:
            on_block(res)
    return results
