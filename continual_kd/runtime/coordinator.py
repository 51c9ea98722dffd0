"""The driver of a job: blocks in, actors updated, knowledge passed, snapshots out.

It is the only writer of the store's catalog. Per block k it puts block k in the object store once,
runs the stages of ``continual.loop`` on the actors (teachers in parallel), writes an atomic
snapshot and then records the block as committed. A re-submit of the same job continues after the
newest good snapshot of its lineage (same config hash and block plan).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ray

from ..config import JobSpec
from ..continual import BlockResult, knowledge_size, model_key
from ..continual.snapshot_eval import learner_states
from ..data.sources import open_source
from ..errors import CkdError
from ..models import num_parameters  # noqa: F401  (registers backbones in the driver too)
from ..snapshots import list_snapshots, prune_snapshots, resolve_snapshot, write_snapshot
from ..stream import BlockPlan, StreamStore
from .actors import spawn_learner
from .cluster import check_resources, ray_session

Progress = Callable[[dict], None]


@dataclass
class JobResult:
    job: JobSpec
    plan: BlockPlan
    runs_dir: Path
    results: list[BlockResult] = field(default_factory=list)  # blocks run by this call
    history: list[dict] = field(default_factory=list)  # every committed block's metrics, oldest first
    resumed_from: int | None = None
    dashboard_url: str | None = None


def _resume_point(job: JobSpec, plan: BlockPlan, runs: Path, restart: bool, emit: Progress):
    """(first block to run, model states or None, metric history) for this job's lineage."""
    if restart and runs.exists():
        shutil.rmtree(runs)
        emit({"type": "info", "message": f"--restart: removed the old snapshots in {runs}"})
    if not list_snapshots(runs):
        return 0, None, []
    snap, warnings = resolve_snapshot(runs, "latest")
    for w in warnings:
        emit({"type": "warning", "message": w})
    m = snap.manifest
    if m.get("config_hash") != job.config_hash() or m.get("plan_id") != plan.plan_id:
        raise CkdError(
            f"{runs}: holds snapshots of a different job configuration or block plan (config "
            f"{m.get('config_hash')} vs {job.config_hash()}); pass --restart to discard them, or set "
            f"snapshots.dir in the job file to keep both"
        )
    return snap.block + 1, learner_states(snap), list(m.get("history", []))


def run_job(job: JobSpec, address: str | None = None, restart: bool = False,
            progress: Progress | None = None, max_blocks: int | None = None) -> JobResult:
    emit = progress or (lambda _e: None)
    store: StreamStore = open_source(job.source)
    b = job.blocks
    plan = store.ensure_plan(b.base_fraction, b.incremental, b.split, job.seed)
    if job.distill.method != "none" and job.distill.k > store.num_items:
        raise CkdError(f"distill.k: {job.distill.k} is larger than the {store.num_items} items in the store; lower it")
    runs = job.snapshot_dir
    start, states, history = _resume_point(job, plan, runs, restart, emit)
    result = JobResult(job, plan, runs, history=history, resumed_from=start if start else None)
    end = plan.num_blocks if max_blocks is None else min(plan.num_blocks, start + max_blocks)
    if start >= plan.num_blocks:
        emit({"type": "info", "message": f"all {plan.num_blocks} blocks already committed in {runs}"})
        return result
    emit({"type": "plan", "plan": plan, "start": start, "end": end})

    models = [("teacher", t) for t in job.teachers] + [("student", job.student)]
    names = {model_key(role, spec.name): spec for role, spec in models}
    with ray_session(address, job.runtime.num_cpus, namespace=f"ckd-{job.name}") as session:
        result.dashboard_url = session.dashboard_url
        emit({"type": "ray", "address": session.address, "dashboard": session.dashboard_url})
        check_resources({n: {"CPU": s.resources.num_cpus, "GPU": s.resources.num_gpus} for n, s in names.items()})
        actors = {n: spawn_learner(n, s, job.seed, job.runtime.device, (states or {}).get(n)) for n, s in names.items()}
        ray.get([a.ping.remote() for a in actors.values()])
        teachers = {n: a for n, a in actors.items() if n != "student"}
        student = actors["student"]
        # blocks before `start` are re-read (not re-trained): they are history for masks and sampling
        block_refs = [ray.put(store.read_block(plan.plan_id, k)) for k in range(start)]
        try:
            for k in range(start, end):
                block_refs.append(ray.put(store.read_block(plan.plan_id, k)))
                res = _run_block(job, k, block_refs, teachers, student, emit)
                states = dict(zip(actors, ray.get([a.state.remote() for a in actors.values()])))
                entry = {"block": k, "metrics": res.metrics, "valid": res.valid, "seconds": res.seconds,
                         "updates": {n: u.get("seconds") for n, u in res.updates.items()}}
                history.append(entry)
                manifest = _manifest(job, plan, store, k, states, res, history)
                snap = write_snapshot(runs, k, {n: s["weights"] for n, s in states.items()}, manifest)
                if job.snapshots.keep_last:
                    prune_snapshots(runs, job.snapshots.keep_last)
                result.results.append(res)
                emit({"type": "block", "result": res, "snapshot": snap.path})
        finally:
            for a in actors.values():
                ray.kill(a)
    return result


def _run_block(job: JobSpec, k: int, block_refs: list, teachers: dict, student, emit: Progress) -> BlockResult:
    t0 = time.perf_counter()
    stage = lambda s: emit({"type": "stage", "block": k, "stage": s})  # noqa: E731
    stage("update teachers")
    updates = dict(zip(teachers, ray.get([t.update.remote(k, block_refs) for t in teachers.values()])))
    knowledge_refs = []
    if job.distill.method != "none" and teachers:
        stage("teacher knowledge")
        knowledge_refs = [t.knowledge.remote(k, block_refs, knowledge_size(job)) for t in teachers.values()]
    stage("update student")
    updates["student"] = ray.get(student.update.remote(k, block_refs, knowledge_refs, job.distill))
    stage("evaluate")
    evals = dict(zip([*teachers, "student"],
                     ray.get([a.evaluate.remote(k, block_refs, job.eval) for a in [*teachers.values(), student]])))
    return BlockResult(
        block=k,
        metrics={n: e["test"] for n, e in evals.items()},
        valid={n: e["valid"] for n, e in evals.items()},
        updates={n: {**u, "parameters": evals[n]["parameters"]} for n, u in updates.items()},
        seconds=time.perf_counter() - t0,
    )


def _manifest(job: JobSpec, plan: BlockPlan, store: StreamStore, k: int, states: dict, res: BlockResult,
              history: list[dict]) -> dict:
    info = plan.blocks[k]
    specs = {model_key("teacher", t.name): ("teacher", t) for t in job.teachers}
    specs["student"] = ("student", job.student)
    return {
        "job": job.name,
        "config_hash": job.config_hash(),
        "job_spec": job.to_dict(),
        "plan_id": plan.plan_id,
        "store": str(Path(store.root).resolve()),
        "num_blocks": plan.num_blocks,
        "rows_covered": sum(b.rows for b in plan.blocks[: k + 1]),
        "ts_end": info.ts_end,
        "id_space": {"num_users": info.num_users, "num_items": info.num_items},
        "model_info": {
            n: {"role": role, "spec_name": spec.name, "backbone": spec.backbone, "dim": spec.dim,
                "num_users": states[n]["num_users"], "num_items": states[n]["num_items"],
                "parameters": res.updates[n]["parameters"]}
            for n, (role, spec) in specs.items()
        },
        "metrics": res.metrics,
        "valid": res.valid,
        "history": history,
    }
