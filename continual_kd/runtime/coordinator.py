"""The driver of a job: blocks in, actors updated, knowledge passed, snapshots out, blocks committed.

It is the only writer of the store's catalog. Per block k it puts block k in the object store once,
runs the stages of ``continual.loop`` on the actors (teachers in parallel), writes an atomic
snapshot, and only then records block k as committed in the catalog (``commits`` table).

Exactly once: a (re-)submit of the same job (same config hash = same lineage) continues after the
last committed block whose snapshot verifies. A snapshot written but not committed (the driver died
in between) is verified and committed on resume; a committed block whose snapshot is missing or
damaged is revoked (kept in the record) and trained again. A model actor that dies is restarted by
Ray; every actor is then restored to the last committed state and the block is retried, so the
result equals an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ray
from ray.exceptions import RayActorError

from ..config import LIVE_KEEP_LAST, JobSpec
from ..continual import BlockResult, model_key, run_block
from ..continual.snapshot_eval import learner_states
from ..data.sources import open_source, source_plan
from ..errors import CkdError
from ..eval.metrics import undefined_as_none
from ..locks import single_driver
from ..manifest import block_manifest, block_manifest_problem, block_results, manifest_digest, update_choice
from ..stopping import Stop, StopFlag, catch_stop_signals, nap_until, restore_signals
from ..snapshots import (MANIFEST, block_dir_name, list_snapshots, prune_snapshots, remove_job_snapshots, resolve_snapshot,
                         write_snapshot)
from ..stream import BlockPlan, StreamStore
from ..stream.catalog import StoreBusyError
from ..stream.live import policy_of
from ..stream.rationale import store_has_item_knowledge
from .actors import StaleActorError, actor_device, spawn_learner
from .train import worker_resources
from .executor import RayExecutor
from .cluster import check_address, check_resources, ray_session, reserve_actors
from .metrics import job_metrics, model_metrics

Progress = Callable[[dict], None]


@dataclass
class JobResult:
    job: JobSpec
    plan: BlockPlan
    runs_dir: Path
    results: list[BlockResult] = field(default_factory=list)  # blocks run by this call
    history: list[dict] = field(default_factory=list)  # every committed block's metrics, oldest first
    resumed_from: int | None = None
    retries: int = 0  # blocks retried after an actor died
    dashboard_url: str | None = None
    placement: dict[str, dict] = field(default_factory=dict)
    stopped: bool = False  # a follow run stopped by SIGINT / SIGTERM (or `stop`)  # actor → its ping: node_id, node (ckd_node_*), device


@dataclass
class _Recovery:
    start: int = 0  # first block to run
    plan_id: str | None = None  # the lineage's plan (pinned once a block is committed)
    states: dict | None = None  # model name → state of the last committed block
    history: list[dict] = field(default_factory=list)


def failpoint(point: str) -> None:
    """Fault injection for tests: ``CKD_FAILPOINT=<point>`` SIGKILLs this driver when it reaches
    ``point`` — ``stage:<k>:<stage>`` (a stage of block k starts), ``snapshot:<k>`` (snapshot k written,
    not yet committed) or ``commit:<k>`` (block k committed)."""
    if os.environ.get("CKD_FAILPOINT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _recover(job: JobSpec, store: StreamStore, runs: Path, restart: bool, emit: Progress) -> _Recovery:
    lineage = job.config_hash()
    if restart:  # refuses (before revoking anything) unless runs/ holds only this job's snapshots
        removed = remove_job_snapshots(runs, job.name)
        n = store.revoke_commits(job.name, None, 0, "restart requested")
        emit({"type": "info", "message": f"--restart: revoked {n} committed blocks, removed {len(removed)} "
                                         f"snapshot(s) from {runs}"})
    for alias in job.lineage_aliases():  # committed by a release that hashed the same job differently
        if alias != lineage and store.committed_blocks(job.name, alias, include_revoked=True):
            n = store.relabel_lineage(job.name, alias, lineage)
            emit({"type": "info", "message": f"lineage {alias} (an earlier release's hash of this job) is now "
                                             f"{lineage}: {n} commit(s) carried over"})
    others = [c for c in store.committed_blocks(job.name) if c["lineage"] != lineage]
    if others:
        raise CkdError(
            f"job {job.name!r} has blocks committed under another configuration (lineage {others[0]['lineage']}, "
            f"this file is {lineage}); pass --restart to start a new lineage, or give the job another name"
        )
    commits = store.committed_blocks(job.name, lineage)
    good = None
    for c in reversed(commits):  # the newest commit whose snapshot is intact and is the one committed
        try:
            snap, _ = resolve_snapshot(runs, c["block"], check=block_manifest_problem)
        except CkdError as e:
            emit({"type": "warning", "message": f"committed block {c['block']}: {e}"})
            continue
        if manifest_digest(snap.path) != c["snapshot_digest"]:
            emit({"type": "warning", "message": f"committed block {c['block']}: {snap.path} is not the snapshot "
                                                f"that was committed"})
            continue
        good = snap
        break
    last = good.block if good else -1
    if commits and commits[-1]["block"] > last:
        n = store.revoke_commits(job.name, lineage, last + 1, "snapshot missing or damaged")
        emit({"type": "warning", "message": f"revoked {n} committed block(s) after {last} whose snapshots are "
                                            f"missing or damaged; they will be trained again"})
    # roll forward: snapshots completed after the last commit (the driver died before committing)
    on_disk = set(list_snapshots(runs))
    while last + 1 in on_disk:
        try:
            snap, _ = resolve_snapshot(runs, last + 1, check=lambda m: block_manifest_problem(m, commit=True))
        except CkdError:
            break  # damaged: it will be rewritten
        m = snap.manifest
        if not job.is_lineage(m.get("config_hash")):
            raise CkdError(
                f"{runs}: holds snapshots of a different job configuration (config {m.get('config_hash')}, "
                f"this file is {lineage}); pass --restart to discard them, or set snapshots.dir in the job file"
            )
        if good is not None and m.get("plan_id") != good.manifest.get("plan_id"):
            break
        store.commit_block(job.name, lineage, m["plan_id"], snap.block, m["rows_covered"], str(snap.path),
                           manifest_digest(snap.path), results=block_results((m.get("history") or [{}])[-1]))
        emit({"type": "info", "message": f"block {snap.block}: snapshot complete but not committed; committed it now"})
        good, last = snap, snap.block
    if good is None:
        return _Recovery()
    return _Recovery(last + 1, good.manifest["plan_id"], learner_states(good), list(good.manifest.get("history", [])))


@single_driver  # one running driver per job: a second submit fails at once, naming this one
def run_job(job: JobSpec, address: str | None = None, restart: bool = False, progress: Progress | None = None,
            max_blocks: int | None = None, dashboard_host: str = "127.0.0.1",
            node_ip_address: str | None = None, follow: bool = False, poll_s: float = 30.0, flush: bool = False,
            stop: Stop | None = None) -> JobResult:
    """Run the job's blocks. A live block policy (``blocks.window`` / ``blocks.rows``) appends the blocks that are
    complete now (``flush``: the incomplete rest too); ``follow`` then waits for new data and runs each new block
    as soon as it is complete, until SIGINT / SIGTERM or ``stop`` is set (the running block is abandoned at its
    next stage, uncommitted: a re-submit runs it again from the last commit)."""
    stop = stop if stop is not None else StopFlag()
    emit = _stop_at_stage(progress or (lambda _e: None), stop)
    if (follow or flush) and not job.blocks.live:
        raise CkdError(f"--{'follow' if follow else 'flush'}: job {job.name!r} cuts a fixed plan (blocks.base_fraction / "
                       f"incremental); give it a live block policy, e.g. blocks: {{window: 1d}} or {{rows: 50000}}")
    if follow and flush:
        raise CkdError("--flush ends the stream (the incomplete last block is cut and run), --follow waits for more: "
                       "pass one; stop the follower, then `ckd submit JOB --flush` at the end of a stream")
    if max_blocks is not None and max_blocks < 1:
        raise CkdError(f"--max-blocks: must be at least 1, got {max_blocks}")
    if address:
        check_address(address)  # before anything is read or written
    for m in (*job.teachers, job.student):  # runtime.device cuda for a model given no GPU: refused at once
        actor_device(job.runtime.device, m.resources.num_gpus, f"the model {m.name}", cuda_available=True)
    store: StreamStore = open_source(job.source)
    store.verify_segments(checksum=False)  # a damaged segment is named and refused before Ray starts
    if job.blocks.live:  # ingests into the store it follows hold the catalog for moments: wait them out
        store.lock_wait_s = max(store.lock_wait_s, 120.0)
    runs = job.snapshot_dir
    if (store.num_users == 0 or store.num_items == 0) and not follow:  # a follower may start before the data
        raise CkdError(f"the stream store {store.root} holds no interactions yet; add some with `ckd ingest FILE "
                       f"--store {store.root}` (a labelled sample or item knowledge alone is not a stream)")
    for side in ("terms", "feedback"):
        for i, term in enumerate(getattr(job.distill, side)):
            if getattr(term, "k", 0) > store.num_items:
                raise CkdError(f"distill.{side}[{i}].k: {term.k} is larger than the {store.num_items} items in the "
                               f"store {store.root}; lower it")
            if term.name == "rationale" and not store_has_item_knowledge(store):  # refused before Ray starts
                raise CkdError(f"distill.{side}[{i}]: the rationale term needs item knowledge (titles, genres or "
                               f"triples) in the store {store.root}, which has none; add it with `ckd data "
                               f"movielens-100k --kg` or `ckd ingest-kg FILE`, or remove the term")
    if restart and address and not ray.is_initialized():
        # join (and leave) the cluster before --restart revokes anything: one that refuses this driver (another
        # token, another Ray version) must do so while every commit and snapshot is still there
        with ray_session(address, job.runtime.num_cpus, namespace=f"ckd-{job.name}"):
            pass
    rec = _recover(job, store, runs, restart, emit)
    if job.blocks.live:  # a live plan grows: the blocks complete now are appended (cut once, never changed)
        plan, waiting = store.advance_live_plan(policy_of(job.blocks, job.seed), flush=flush)
    elif rec.plan_id is not None:  # a lineage keeps its plan; data ingested since goes to a later lineage
        plan = store.get_plan(rec.plan_id)
    else:
        plan = source_plan(store, job)  # dataset files: the fixed split's one block
    result = JobResult(job, plan, runs, history=rec.history, resumed_from=rec.start or None)
    end = plan.num_blocks if max_blocks is None else min(plan.num_blocks, rec.start + max_blocks)
    if rec.start >= plan.num_blocks and not follow:
        more = (f"; {waiting['pending_rows']:,} rows wait for {waiting['needs']} (or --flush)"
                if plan.is_live and waiting["pending_rows"] else "")
        emit({"type": "info", "message": f"all {plan.num_blocks} blocks already committed in {runs}{more}"})
        return result
    emit({"type": "plan", "plan": plan, "start": rec.start, "end": end})

    specs = {model_key("teacher", t.name): t for t in job.teachers}
    specs["student"] = job.student
    with ray_session(address, job.runtime.num_cpus, namespace=f"ckd-{job.name}",
                     dashboard_host=dashboard_host, node_ip_address=node_ip_address) as session:
        result.dashboard_url = session.dashboard_url
        emit({"type": "ray", "address": session.address, "dashboard": session.dashboard_url})
        demands = {n: {"CPU": s.resources.num_cpus, "GPU": s.resources.num_gpus} for n, s in specs.items()}
        trainers = {f"{n} (Ray Train worker {w})": worker_resources(s) for n, s in specs.items() if s.workers > 1
                    for w in range(s.workers)}
        if trainers:  # Ray Train places a model's workers when its update starts: they must fit next to the actors
            check_resources({**demands, **trainers})
        reservation = reserve_actors(demands, timeout_s=job.runtime.placement_timeout_s,
                                     strategy=job.runtime.placement)  # fails here, in one line
        # no state in the constructor: Ray keeps a restartable actor's constructor arguments in the object store
        # for its restarts (and warns about it); the committed state is handed over by `restore` instead, as
        # after a restart
        actors = {n: spawn_learner(n, s, job.seed, job.runtime.device, max_restarts=job.runtime.max_restarts,
                                   scheduling_strategy=reservation.strategies[n])
                  for n, s in specs.items()}
        feed = None
        try:
            result.placement = dict(zip(actors, ray.get([a.ping.remote() for a in actors.values()])))
            refused = [p["error"] for p in result.placement.values() if p.get("error")]
            if refused:  # e.g. a GPU was asked for and the actor's process sees none: no silent CPU fallback
                raise CkdError(refused[0])
            if rec.states:
                ray.get([actors[n].restore.remote(st) for n, st in rec.states.items() if n in actors])
            if any(p.get("node") for p in result.placement.values()):  # nodes of `ckd cluster up` name themselves
                emit({"type": "info", "message": "actors: " + ", ".join(
                    f"{n} on {p['node'] or p['node_id'][:8]} ({p['device']})" for n, p in result.placement.items())})
            metrics = job_metrics(job.name)  # kept (and refreshed) after the job while this driver's Ray lives
            if result.history and rec.start > 0:
                snap_manifest = runs / block_dir_name(rec.start - 1) / MANIFEST
                metrics.resumed(snap_manifest.stat().st_mtime if snap_manifest.exists() else None)
            # blocks before `start` are read (not trained): history for masks and sampling
            block_refs = [ray.put(store.read_block(plan.plan_id, k)) for k in range(rec.start)]
            states = rec.states
            feed = _BlockFeed(store, job, plan, rec.start, max_blocks, follow, poll_s, stop, emit)
            for k in feed:  # the plan's blocks; with follow, each new one once it is complete
                plan = result.plan = feed.plan
                block_refs.append(ray.put(store.read_block(plan.plan_id, k)))
                metrics.block_started(k)
                previous_valid = result.history[-1]["valid"] if result.history else None
                res, states = _run_block_with_retries(job, k, block_refs, actors, states, emit, result, previous_valid)
                entry = undefined_as_none({  # an undefined metric (no test user in a group, …) is null, never NaN
                    "block": k, "metrics": res.metrics, "valid": res.valid, "continual": res.continual,
                    "seconds": res.seconds, "stages": res.stages,
                    "updates": {n: u.get("seconds") for n, u in res.updates.items()},
                    "pooled": res.pooled,  # every block's test pairs as one test set
                    # what each update kept: epochs run, the best validation epoch and its NDCG@20, the fusion's choices
                    "choice": {n: update_choice(u) for n, u in res.updates.items()}})
                history = [*result.history, entry]
                manifest = block_manifest(job, plan, store, k, states, res, history)
                snap = write_snapshot(runs, k, {n: s["weights"] for n, s in states.items()}, manifest)
                failpoint(f"snapshot:{k}")
                store.commit_block(job.name, job.config_hash(), plan.plan_id, k, manifest["rows_covered"],
                                   str(snap.path), manifest_digest(snap.path), results=block_results(entry))
                failpoint(f"commit:{k}")
                metrics.block_done(k, plan.blocks[k].rows, res.seconds, res.stages, time.time(), model_metrics(res))
                result.history = history
                keep_last = job.snapshots.keep_last
                if keep_last is None:  # default: every snapshot of a fixed plan, the newest few of a live one
                    keep_last = LIVE_KEEP_LAST if job.blocks.live else 0
                if keep_last:
                    prune_snapshots(runs, keep_last, set(job.snapshots.keep))
                result.results.append(res)
                emit({"type": "block", "result": res, "snapshot": snap.path})
        except _Stopped:
            result.stopped = True
        finally:
            if feed is not None:
                feed.close()
            for a in actors.values():
                ray.kill(a, no_restart=True)
            reservation.release()
    return result


class _Stopped(Exception):
    """A stop was asked for: the running block is abandoned at its next stage; nothing of it is committed."""


def _stop_at_stage(emit: Progress, stop: Stop) -> Progress:
    """``emit``, raising ``_Stopped`` when a stage starts after a stop was asked for (the running stage ends first)."""

    def wrapped(e: dict) -> None:
        if e.get("type") == "stage" and stop.is_set():
            raise _Stopped()
        emit(e)

    return wrapped


class _BlockFeed:
    """The blocks to run, in order: those of the plan now; with ``follow`` (a live plan), then each new block
    once it is complete, polling the store every ``poll_s`` seconds until a stop is asked for. While it
    follows, SIGINT / SIGTERM set ``stop`` (a second one interrupts at once)."""

    def __init__(self, store: StreamStore, job: JobSpec, plan: BlockPlan, start: int, max_blocks: int | None,
                 follow: bool, poll_s: float, stop: Stop, emit: Progress):
        self.store, self.plan, self.start, self.follow, self.poll_s, self.stop, self.emit = \
            store, plan, start, follow, poll_s, stop, emit
        self.policy = policy_of(job.blocks, job.seed) if job.blocks.live else None
        self.limit = None if max_blocks is None else start + max_blocks
        # after ray.init, which sets its own SIGTERM handler; a second signal interrupts at once
        self._handlers = catch_stop_signals(stop, interrupt_on_second=True) if follow else {}

    def __iter__(self):
        k = self.start
        while True:
            if self.stop.is_set():
                raise _Stopped()
            if self.limit is not None and k >= self.limit:
                return
            if k < self.plan.num_blocks:
                yield k
                k += 1
            elif not self.follow:
                return
            elif not self._wait_for_block(k):
                raise _Stopped()

    def _wait_for_block(self, k: int) -> bool:
        """Poll until block k is cut (True) or a stop is asked for (False)."""
        since = time.monotonic()
        while not self.stop.is_set():
            try:
                plan, waiting = self.store.advance_live_plan(self.policy)
            except StoreBusyError as e:  # an ingest holds the catalog: look again at the next poll
                plan, waiting = self.plan, None
                self.emit({"type": "warning", "message": f"{e} (looking again in {self.poll_s:g}s)"})
            if plan.num_blocks > k:
                self.plan = plan
                self.emit({"type": "blocks", "plan": plan, "start": self.start,
                           "end": plan.num_blocks if self.limit is None else min(plan.num_blocks, self.limit)})
                return True
            if waiting is not None:
                self.emit({"type": "wait", "done": k, "pending_rows": waiting["pending_rows"],
                           "needs": waiting["needs"], "waited_s": time.monotonic() - since, "poll_s": self.poll_s})
            nap_until(self.stop, self.poll_s, nap=0.2)
        return False

    def close(self) -> None:
        restore_signals(self._handlers)
        self._handlers = {}


def _run_block_with_retries(job: JobSpec, k: int, block_refs: list, actors: dict, states: dict | None,
                            emit: Progress, result: JobResult, previous_valid: dict | None) -> tuple[BlockResult, dict]:
    """Run block k; if an actor dies, restore every actor to the last committed state and retry."""
    for attempt in range(1, job.runtime.block_attempts + 1):
        try:
            res = _run_block(job, k, block_refs, actors, emit, previous_valid)
            new_states = dict(zip(actors, ray.get([a.state.remote() for a in actors.values()])))
            return res, new_states
        except (RayActorError, StaleActorError) as e:  # died mid-call, or died idle and came back stale
            who = getattr(e, "actor_id", None)
            emit({"type": "warning", "message": f"block {k}: a model actor died (attempt {attempt}: "
                                                f"{type(e).__name__}{' ' + str(who) if who else ''}); restoring "
                                                f"all models to block {k - 1} and retrying"})
            result.retries += 1
            _restore(actors, states)
    raise CkdError(f"block {k} failed {job.runtime.block_attempts} times because model actors died; see the "
                   f"Ray dashboard / logs, then `ckd submit` again to resume after block {k - 1}")


def _restore(actors: dict, states: dict | None, timeout_s: float = 120.0) -> None:
    """Wait until every actor answers (Ray restarts dead ones), then load the committed state."""
    deadline = time.monotonic() + timeout_s
    for name, actor in actors.items():
        while True:
            try:
                ray.get(actor.ping.remote(), timeout=30)
                break
            except (RayActorError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise CkdError(f"model actor {name!r} did not come back after dying; the job stops here and "
                                   f"`ckd submit` resumes after the last committed block") from None
                time.sleep(0.5)
    ray.get([a.restore.remote((states or {}).get(n)) for n, a in actors.items()])


def _run_block(job: JobSpec, k: int, block_refs: list, actors: dict, emit: Progress,
               previous_valid: dict | None = None) -> BlockResult:
    """The stages of ``continual.stages`` on the actors (the same stages ``run_stream_local`` runs)."""

    def on_stage(s: str) -> None:
        emit({"type": "stage", "block": k, "stage": s})
        failpoint(f"stage:{k}:{s}")

    return run_block(job, k, RayExecutor(actors, block_refs, k), previous_valid, on_stage)


