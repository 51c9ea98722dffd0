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
    if d.method == "hetcomp":
        return d.hetcomp.k
    return max(d.k, d.pool)


def teacher_update_options(job: JobSpec) -> dict:
    """Extra arguments of a teacher's update: HetComp needs its trajectory (checkpoints' top lists)."""
    d = job.distill
    return {"trajectory": (d.hetcomp.checkpoints, d.hetcomp.k)} if d.method == "hetcomp" else {}


def teacher_knowledge_options(job: JobSpec) -> dict:
    """Arguments of a teacher's knowledge call: list size, UnKD's per-group rankings if on, and
    HetComp's ranking of the users' known items."""
    d, u = job.distill, job.distill.unkd
    return {"size": knowledge_size(job), "unkd_groups": u.groups if u.weight > 0 else 0, "per_group": u.per_group,
            "observed": d.hetcomp.observed if d.method == "hetcomp" else 0}


def teacher_weights(job: JobSpec, previous_valid: dict[str, dict] | None, names: list[str]) -> list[float] | None:
    """Per-teacher fusion weights: uniform, or each teacher's validation NDCG@20 on the previous block."""
    if job.distill.teacher_weights != "valid_ndcg" or not previous_valid:
        return None
    from ..distill import teacher_weights_from_ndcg

    return teacher_weights_from_ndcg([previous_valid.get(n, {}).get("ndcg@20", float("nan")) for n in names])


def make_learners(job: JobSpec, device: str = "cpu") -> tuple[dict[str, Learner], Learner]:
    teachers = {model_key("teacher", t.name): Learner(t, job.seed, device) for t in job.teachers}
    return teachers, Learner(job.student, job.seed, device)


def run_block_local(job: JobSpec, seen: Interactions, block: int, teachers: dict[str, Learner],
                    student: Learner, on_stage: Callable[[str], None] | None = None,
                    previous_valid: dict[str, dict] | None = None) -> BlockResult:
    import time

    t0 = time.perf_counter()
    stage = on_stage or (lambda _s: None)
    updates = {}
    for name, t in teachers.items():
        stage(f"update {name}")
        updates[name] = t.update(seen, block, **teacher_update_options(job))
    knowledge = []
    if job.distill.needs_teachers and teachers:
        stage("teacher knowledge")
        knowledge = [t.knowledge(seen, block, **teacher_knowledge_options(job)) for t in teachers.values()]
    stage("update student")
    weights = teacher_weights(job, previous_valid, list(teachers))
    updates["student"] = student.update(seen, block, knowledge, job.distill, weights)
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
        res = run_block_local(job, read_upto(k), k, teachers, student,
                              previous_valid=results[-1].valid if results else None)
        results.append(res)
        if on_block:
            on_block(res)
    return results
