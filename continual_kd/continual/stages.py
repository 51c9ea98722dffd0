"""The per-block stages, defined once; an executor decides where each model's call runs.

A block is an ordered list of stages over the job's models (``block_stages``). Each stage asks an
executor to call ``Learner`` methods on named models — ``InProcessExecutor`` below (tests, bench)
or ``runtime.executor.RayExecutor`` (``ckd submit``: one actor per model, calls on different models
run in parallel, knowledge passed actor→actor by reference). So the same job gives the same numbers
in both.

Knowledge flows both ways:
- teachers → student: ``teacher knowledge`` (each teacher's lists for the block's users), consumed by
  the student's ``distill.terms`` (fused by ``distill.fusion``);
- student → teachers: ``student feedback`` (the student's lists, and its proxies' with CCD),
  consumed by every teacher's ``distill.feedback`` terms (BD, CCD's replay, keep).

Order (``continual.order``): ``teachers_first`` — [student feedback →] update teachers → teacher
knowledge → update student; ``student_first`` (CCD, from block 1 on) — teacher knowledge (the
teachers of block k-1) → update student → student feedback → update teachers. Block 0 is always
teachers first (nothing to learn from yet). Every block ends with ``evaluate``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..config import JobSpec

STUDENT = "student"

# list size a term needs from the other side's knowledge (BD ranks the other's top list)
BD_LIST = 100


def model_key(role: str, name: str) -> str:
    """How a model is named in metrics, snapshots and the Ray dashboard: teacher:<name> or student."""
    return STUDENT if role == "student" else f"teacher:{name}"


@dataclass
class BlockResult:
    block: int
    metrics: dict[str, dict[str, float]]  # model → metric → value on block k's test part (plasticity)
    valid: dict[str, dict[str, float]]  # model → metric → value on block k's valid part
    updates: dict[str, dict] = field(default_factory=dict)  # model → update log (seconds, losses, terms)
    seconds: float = 0.0
    earlier: dict[str, dict[int, dict]] = field(default_factory=dict)  # model → block j < k → test metrics
    continual: dict[str, dict] = field(default_factory=dict)  # model → plasticity / stability / hmean
    stages: dict[str, float] = field(default_factory=dict)  # stage name → seconds, in the order run
    pooled: dict[str, dict] = field(default_factory=dict)  # model → metrics on every block's test pairs at once


class Executor(Protocol):
    """Runs ``Learner`` methods on named models for the current block (seen data + block index)."""

    def call(self, names: list[str], method: str, **kwargs) -> list:
        """Start ``method`` on each model (concurrently where the executor can); one handle per name.
        Handles from earlier calls may be passed in ``knowledge``."""

    def get(self, handles: list) -> list:
        """The values behind handles, in order."""


class InProcessExecutor:
    """Every model is a ``Learner`` in this process; calls run one after the other."""

    def __init__(self, learners: dict, seen, block: int):
        self.learners, self.seen, self.block = learners, seen, block

    def call(self, names: list[str], method: str, **kwargs) -> list:
        return [getattr(self.learners[n], method)(self.seen, self.block, **kwargs) for n in names]

    def get(self, handles: list) -> list:
        return list(handles)


# ------------------------------------------------------------------ what each side asks of the other


def knowledge_request(terms) -> dict:
    """Arguments of a ``knowledge`` call that give ``terms`` what they read: the list size, UnKD's
    per-group rankings, HetComp's ranking of the known items, IR-RRD's per-item user lists."""
    size, req = 1, {}
    for t in terms:
        if t.name == "rrd":
            size = max(size, t.k, t.pool)
        elif t.name == "hetcomp":
            size = max(size, t.k)
            req["observed"] = t.observed
        elif t.name == "unkd":
            req["unkd_groups"], req["per_group"] = t.groups, t.per_group
        elif t.name == "ir_rrd":
            req["item_users"] = max(t.k, t.pool)
        elif t.name == "bd":
            size = max(size, BD_LIST)
            req["vectors"] = True
        elif t.name in ("ftd", "htd", "de"):  # topology / experts on the other side's user/item vectors
            req["vectors"] = True
        elif t.name == "rd":
            size = max(size, t.k)
        elif t.name == "cd":  # its scored top-pool list
            size = max(size, t.pool)
        elif t.name in ("replay", "keep", "skd"):
            size = max(size, getattr(t, "top", 0), getattr(t, "k", 0))
    return {"size": size, **req}


def scope(job: JobSpec) -> str:
    """Users knowledge is about: the block's ("warm" updates) or everybody's so far ("retrain")."""
    return "all" if job.continual.strategy == "retrain" or job.continual.knowledge_users == "all" else "block"


def update_options(job: JobSpec) -> dict:
    """How every model's update treats the history: warm or retrain, and the replay of earlier blocks."""
    c = job.continual
    return {"strategy": c.strategy, "replay": c.replay, "replay_by": c.replay_by, "knowledge_users": c.knowledge_users}


def teacher_update_options(job: JobSpec) -> dict:
    """A teacher's update: HetComp's trajectory (checkpoints' top lists) when the student uses it."""
    h = job.distill.term("hetcomp")
    return {"trajectory": (h.checkpoints, h.k)} if h is not None else {}


def teacher_weights(job: JobSpec, previous_valid: dict[str, dict] | None, names: list[str]) -> list[float] | None:
    """Per-teacher fusion weights: uniform, or each teacher's validation NDCG@20 on the previous block."""
    if job.distill.teacher_weights != "valid_ndcg" or not previous_valid:
        return None
    from ..distill import teacher_weights_from_ndcg

    return teacher_weights_from_ndcg([previous_valid.get(n, {}).get("ndcg@20", float("nan")) for n in names])


# ------------------------------------------------------------------ the stages


@dataclass
class BlockRun:
    """What the stages of one block share."""

    job: JobSpec
    block: int
    teachers: list[str]  # model keys, in job order
    previous_valid: dict | None = None
    knowledge: dict[str, list] = field(default_factory=dict)  # "teachers" / "student" → handles
    updates: dict[str, dict] = field(default_factory=dict)
    evals: dict[str, dict] = field(default_factory=dict)


def student_feedback(run: BlockRun, ex: Executor) -> None:
    run.knowledge["student"] = ex.call([STUDENT], "feedback", scope=scope(run.job),
                                       **knowledge_request(run.job.distill.feedback))


def feedback_terms(job: JobSpec, teacher: str) -> tuple:
    """The ``distill.feedback`` terms that train ``teacher`` (a term's ``models``: its teachers; empty: all)."""
    return tuple(t for t in job.distill.feedback if not t.models or teacher in t.models)


def update_teachers(run: BlockRun, ex: Executor) -> None:
    job = run.job
    feedback = run.knowledge.get("student", [])
    groups: dict[tuple, list[str]] = {}  # teachers with the same feedback terms: one call (they run in parallel)
    for name in run.teachers:
        groups.setdefault(feedback_terms(job, name.split(":", 1)[-1]), []).append(name)
    handles = {}
    for terms, names in groups.items():
        handles.update(zip(names, ex.call(names, "update", knowledge=feedback, terms=terms, fusion=job.distill.fusion,
                                          **update_options(job), **teacher_update_options(job))))
    run.updates.update(zip(run.teachers, ex.get([handles[n] for n in run.teachers])))


def teacher_knowledge(run: BlockRun, ex: Executor) -> None:
    run.knowledge["teachers"] = ex.call(run.teachers, "knowledge", scope=scope(run.job),
                                        **knowledge_request(run.job.distill.terms))


def update_student(run: BlockRun, ex: Executor) -> None:
    job = run.job
    weights = teacher_weights(job, run.previous_valid, run.teachers)
    [log] = ex.get(ex.call([STUDENT], "update", knowledge=run.knowledge.get("teachers", []), terms=job.distill.terms,
                           fusion=job.distill.fusion, weights=weights, **update_options(job),
                           choose_weights=job.distill.teacher_weights == "chosen",
                           fusion_popularity=job.distill.fusion_popularity,
                           fusion_popularity_tolerance=job.distill.fusion_popularity_tolerance,
                           teacher_floor=job.distill.teacher_floor,
                           proxies=job.continual.proxies))
    run.updates[STUDENT] = log


def evaluate(run: BlockRun, ex: Executor) -> None:
    names = [*run.teachers, STUDENT]
    run.evals = dict(zip(names, ex.get(ex.call(names, "evaluate_block", spec=run.job.eval))))


Stage = tuple[str, Callable[[BlockRun, Executor], None]]


def block_stages(job: JobSpec, block: int) -> list[Stage]:
    """The ordered stages of ``block`` for ``job`` (see the module note)."""
    teachers = bool(job.teachers)
    teach = teachers and bool(job.distill.terms)
    feedback = teachers and bool(job.distill.feedback) and block > 0
    if block > 0 and teachers and job.continual.order == "student_first":
        stages = [("teacher knowledge", teacher_knowledge)] if teach else []
        stages += [("update student", update_student)]
        stages += [("student feedback", student_feedback)] if feedback else []
        stages += [("update teachers", update_teachers)]
    else:
        stages = [("student feedback", student_feedback)] if feedback else []
        stages += [("update teachers", update_teachers)] if teachers else []
        stages += [("teacher knowledge", teacher_knowledge)] if teach else []
        stages += [("update student", update_student)]
    return stages + [("evaluate", evaluate)]


def run_block(job: JobSpec, block: int, ex: Executor, previous_valid: dict | None = None,
              on_stage: Callable[[str], None] | None = None) -> BlockResult:
    """Run every stage of ``block`` on ``ex``; ``on_stage(name)`` is called as each starts."""
    t0 = time.perf_counter()
    run = BlockRun(job, block, [model_key("teacher", t.name) for t in job.teachers], previous_valid)
    stage_seconds: dict[str, float] = {}
    for name, stage in block_stages(job, block):
        if on_stage is not None:
            on_stage(name)
        started = time.perf_counter()
        stage(run, ex)
        stage_seconds[name] = time.perf_counter() - started
    ev = run.evals
    return BlockResult(
        block=block,
        metrics={n: e["test"] for n, e in ev.items()},
        valid={n: e["valid"] for n, e in ev.items()},
        updates={n: {**run.updates.get(n, {}), "parameters": e["parameters"]} for n, e in ev.items()},
        seconds=time.perf_counter() - t0,
        earlier={n: e["earlier"] for n, e in ev.items()},
        continual={n: e["continual"] for n, e in ev.items()},
        stages=stage_seconds,
        pooled={n: e.get("pooled", {}) for n, e in ev.items()},
    )
