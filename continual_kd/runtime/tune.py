"""``ckd tune JOB.yaml``: a Ray Tune search over the job's own fields, ASHA on the student's validation NDCG@20.

The job file's ``tune:`` section (``config.TuneSpec``) names fields by dotted path (``student.dim``,
``student.train.lr``, ``teachers[0].train.lr``, ``distill.terms[0].weight``, …) with their candidates. Each
trial is the job with those fields changed, run in one process (``continual.loop.run_stream_local``: the
same stages as ``ckd submit``) on the first ``tune.blocks`` blocks, which the driver reads from the store
once and hands to every trial through the object store. After each block a trial reports the student's
validation NDCG@20 on that block (``tune.metric: holdout``: its mean NDCG@20 over the held-out parts of every
block so far, ``blocks.holdout``), so ASHA (``time_attr`` = blocks done) stops weak trials early; the best
trial among those that ran every block (by the figure on the last one) becomes a job file of its own,
without the ``tune`` section, that ``ckd submit`` runs.
"""

from __future__ import annotations

import copy
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from ..config import JobSpec, TuneDomainSpec, load_job, parse_job
from ..errors import CkdError, file_in_the_way

METRIC = "valid_ndcg_at_20"  # the student's validation NDCG@20 on the block just run
HOLDOUT_METRIC = "holdout_ndcg_at_20"  # tune.metric: holdout — its mean NDCG@20 over every held-out part so far
METRICS = {"valid": (METRIC, "validation NDCG@20"), "holdout": (HOLDOUT_METRIC, "held-out NDCG@20 (mean over blocks)")}
_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


# ---------------------------------------------------------------------------------- dotted paths


def parse_path(path: str) -> list[str | int]:
    """``distill.terms[0].weight`` → ``["distill", "terms", 0, "weight"]``; None when it is not a path."""
    parts: list[str | int] = []
    pos = 0
    while pos < len(path):
        if parts and path[pos] == ".":
            pos += 1
        m = _TOKEN.match(path, pos)
        if m is None or (m.group(1) and parts and path[pos - 1] not in "."):
            return None
        parts.append(m.group(1) if m.group(1) else int(m.group(2)))
        pos = m.end()
    return parts or None


def get_path(data, parts: list[str | int]):
    for p in parts:
        data = data[p]
    return data


def set_path(data: dict, parts: list[str | int], value) -> None:
    """Set the field in a job's YAML mapping, adding the mappings on the way that the file leaves out
    (``student.train.lr`` in a file with no ``student.train``); a list element must be in the file."""
    node = data
    for p, nxt in zip(parts, parts[1:]):
        if isinstance(p, int):
            node = node[p]
        else:
            if node.get(p) is None:
                node[p] = {} if isinstance(nxt, str) else []
            node = node[p]
    node[parts[-1]] = value


def _plain(value):
    """numpy scalars (Tune's draws) → Python numbers: the job spec is strict and YAML needs plain types."""
    return value.item() if hasattr(value, "item") else value


def with_values(raw: dict, values: dict[str, object]) -> dict:
    """A deep copy of the job mapping with each dotted path set to its value."""
    out = copy.deepcopy(raw)
    for path, value in values.items():
        set_path(out, parse_path(path), _plain(value))
    return out


def candidates(domain: TuneDomainSpec) -> list:
    """Values that stand for the domain when the job is checked: every listed value, or both bounds."""
    values = getattr(domain, domain.kind)
    return list(values)


def check_space(job: JobSpec, raw: dict, source: str) -> None:
    """Refuse, in one sentence naming the field, a path that names no field of the job or a candidate that
    makes the job invalid (each candidate is tried on its own)."""
    full = job.to_dict()
    for path, domain in job.tune.space.items():
        parts = parse_path(path)
        where = f"{source}: tune.space.{path}"
        if parts is None:
            raise CkdError(f"{where}: not a dotted path; write fields joined by '.' with list elements as [i], "
                           f"e.g. student.train.lr or distill.terms[0].weight")
        try:
            current = get_path(full, parts)
        except (KeyError, IndexError, TypeError):
            raise CkdError(f"{where}: names no field of the job; a path follows the job file's keys, e.g. "
                           f"student.dim, teachers[0].train.lr, distill.terms[0].weight") from None
        if isinstance(current, (dict, list, tuple)):
            raise CkdError(f"{where}: names a section, not one value; point at a field inside it")
        if parts[0] == "tune":
            raise CkdError(f"{where}: the tune section cannot tune itself; name a field of the job")
        last_index = max((i for i, p in enumerate(parts) if isinstance(p, int)), default=None)
        if last_index is not None:  # a list element (a teacher, a term) must be written in the file
            try:
                get_path(raw, parts[: last_index + 1])
            except (KeyError, IndexError, TypeError):
                raise CkdError(f"{where}: that list element is not written in the job file; add it there first") from None
        for value in candidates(domain):
            parse_job(with_values(raw, {path: value}), f"{source} with tune.space.{path} = {value!r}")


def search_space(job: JobSpec) -> dict:
    from ray import tune

    make = {"choice": lambda v: tune.choice(list(v)), "grid": lambda v: tune.grid_search(list(v)),
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(v[0], v[1] + 1)}  # Tune's randint leaves out its upper bound
    return {path: make[d.kind](getattr(d, d.kind)) for path, d in job.tune.space.items()}


# ---------------------------------------------------------------------------------- one trial


def _figure(value) -> float:
    """A metric Tune can compare: an undefined one (no validation user) counts as 0."""
    return float(value) if value is not None and math.isfinite(float(value)) else 0.0


def run_trial(config: dict, raw: dict, source: str, blocks: list, threads: int = 1, metric: str = "valid") -> None:
    """One trial (a Tune function trainable): the job with ``config``'s values, its first blocks in this
    process, the student's validation NDCG@20 reported after every block (``metric="holdout"``: its mean
    NDCG@20 over the held-out parts of the blocks run so far, under ``HOLDOUT_METRIC``)."""
    import torch
    from ray import tune

    from ..continual import make_learners, run_stream_local
    from ..types import HOLDOUT, Interactions

    torch.set_num_threads(threads)
    job = parse_job(with_values(raw, config), source)
    learners = make_learners(job)

    def report(res) -> None:
        student = res.valid.get("student", {})
        figures = {METRIC: _figure(student.get("ndcg@20")), "block": res.block,
                   "test_ndcg_at_20": _figure(res.metrics.get("student", {}).get("ndcg@20")), "seconds": res.seconds}
        if metric == "holdout":
            held = learners["student"].evaluate(Interactions.concat(blocks[: res.block + 1]),
                                                list(range(res.block + 1)), job.eval, split=HOLDOUT)
            values = [m["ndcg@20"] for m in held.values() if m.get("ndcg@20") is not None]
            figures[HOLDOUT_METRIC] = _figure(sum(values) / len(values) if values else None)
        tune.report(figures)

    run_stream_local(job, lambda k: Interactions.concat(blocks[: k + 1]), len(blocks), on_block=report,
                     learners=learners)


# ---------------------------------------------------------------------------------- the search


@dataclass
class TrialRow:
    trial: str
    config: dict
    per_block: list[float]  # the reported figure (tune.metric), one per block run
    status: str  # "done" | "stopped" (by ASHA) | "error"
    error: str | None = None


@dataclass
class TuneOutcome:
    job: JobSpec
    rows: list[TrialRow]
    best: TrialRow
    out: Path
    experiment: str
    blocks: int
    space: list[str] = field(default_factory=list)


def best_job(raw: dict, job: JobSpec, config: dict) -> dict:
    """The job mapping of the best trial: its values set, the tune section dropped, a name of its own (and a
    snapshot folder of its own when the file names one), so it never mixes with the original job's runs."""
    data = with_values({k: v for k, v in raw.items() if k != "tune"}, config)
    name = f"{job.name}-best"
    data["name"] = name
    snaps = data.get("snapshots")
    if isinstance(snaps, dict) and snaps.get("dir"):
        snaps["dir"] = str(Path(snaps["dir"]).parent / name)
    return data


def write_job(path: Path, data: dict, header: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100))
    tmp.replace(path)


def run_tune(job_file: Path, address: str | None = None, out: Path | None = None, storage: Path = Path("runs/.tune"),
             progress: Callable[[dict], None] | None = None) -> TuneOutcome:
    """Run the search of ``job_file``'s ``tune`` section; write the best job file (default
    ``<job>-best.yaml`` next to it) and return every trial's figures."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from ..data.sources import open_source, source_plan
    from .cluster import _alive_nodes, _nodes_text, ray_session

    emit = progress or (lambda _e: None)
    job_file = Path(job_file)
    job = load_job(job_file)
    spec = job.tune
    if spec is None:
        raise CkdError(f"{job_file}: no tune section; add one, e.g. tune: {{space: {{student.train.lr: "
                       f"{{loguniform: [0.001, 0.01]}}}}, num_samples: 4, blocks: 2}} (jobs/tune.yaml is an example)")
    if job.blocks.live:
        raise CkdError(f"{job_file}: blocks: a live block policy has no fixed first blocks to tune on; tune a copy "
                       f"of the job with blocks: {{base_fraction: 0.5, incremental: N}}")
    raw = yaml.safe_load(job_file.read_text())
    check_space(job, raw, str(job_file))
    out = Path(out) if out is not None else job_file.with_name(f"{job_file.stem}-best.yaml")
    if out.is_dir():
        raise CkdError(f"--out {out}: is a folder; give the path of the job file to write")
    for folder in (out.parent, Path(storage)):  # a file in the way fails now, not after every trial
        if file_in_the_way(folder) is not None:
            raise CkdError(f"{folder}: a file stands where a folder is needed (--out / --storage); give another path")
    store = open_source(job.source)
    plan = source_plan(store, job)
    if spec.blocks > plan.num_blocks:
        raise CkdError(f"{job_file}: tune.blocks: {spec.blocks} is more than the {plan.num_blocks} blocks of the job's "
                       f"plan; lower it to at most {plan.num_blocks}")
    blocks = [store.read_block(plan.plan_id, k) for k in range(spec.blocks)]
    trial_raw = {k: v for k, v in raw.items() if k != "tune"}
    key, label = METRICS[spec.metric]
    emit({"type": "info", "message": f"{spec.num_samples} sample(s) of {len(spec.space)} field(s), first "
                                     f"{spec.blocks} block(s), ASHA on the student's {label}"})
    with ray_session(address, job.runtime.num_cpus, namespace=f"ckd-tune-{job.name}"):
        nodes = _alive_nodes()  # a trial no node can hold would wait for ever: refused before any trial starts
        if not any(n.get("CPU", 0.0) + 1e-9 >= spec.cpus_per_trial for n in nodes):
            raise CkdError(f"{job_file}: tune.cpus_per_trial: {spec.cpus_per_trial:g} CPUs, but no node of the Ray "
                           f"cluster has that many (nodes: {_nodes_text(nodes)}); lower it (each trial's torch "
                           f"threads follow it)")
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, raw=trial_raw, source=str(job_file), blocks=blocks,
                                 threads=max(1, int(spec.cpus_per_trial)), metric=spec.metric),
            {"cpu": spec.cpus_per_trial})
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=spec.blocks, grace_period=spec.grace_period,
                                  reduction_factor=spec.reduction_factor)
        tuner = tune.Tuner(
            trainable, param_space=search_space(job),
            tune_config=tune.TuneConfig(metric=key, mode="max", scheduler=scheduler, num_samples=spec.num_samples,
                                        max_concurrent_trials=spec.max_concurrent,
                                        search_alg=BasicVariantGenerator(random_state=job.seed)),
            run_config=tune.RunConfig(name=f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(Path(storage).resolve()),
                                      verbose=0))
        # Tune's older output engine honours verbose=0 (no boxes on stdout). Ctrl-C interrupts the search as it
        # interrupts any command (one line, exit 130, no job file written): Tune's own handler ended the trials
        # and returned, and the search went on to write a "best" job from the trials finished so far
        settings = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_SIGINT_HANDLER": "1"}
        saved = {k: os.environ.get(k) for k in settings}
        os.environ.update(settings)
        try:
            grid = tuner.fit()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        experiment = grid.experiment_path
        rows = [_row(i, r, spec.blocks, key) for i, r in enumerate(grid)]
    done = [r for r in rows if r.status == "done"]
    if not done:
        first = next((r.error for r in rows if r.error), "no trial ran every block")
        raise CkdError(f"{job_file}: no trial of the search ran all {spec.blocks} blocks ({first}); fix the job and "
                       f"run `ckd tune` again")
    best = max(done, key=lambda r: r.per_block[-1])
    header = (f"# {out.name}: the best trial of `ckd tune {job_file}` ({best.trial}: student {label} "
              f"{best.per_block[-1]:.4f} on block {spec.blocks - 1}, {len(rows)} trials)\n"
              + "".join(f"#   {p}: {_plain(v)!r}\n" for p, v in best.config.items())
              + ("# chosen on the held-out share: drop blocks.holdout to train the chosen job on every row\n"
                 if spec.metric == "holdout" else "")
              + f"# run it with: ckd submit {out}\n")
    data = best_job(raw, job, best.config)
    parse_job(data, str(out))  # never write a job file that does not parse
    write_job(out, data, header)
    return TuneOutcome(job, rows, best, out, experiment, spec.blocks, list(spec.space))


def _row(i: int, result, blocks: int, key: str = METRIC) -> TrialRow:
    config = {k: _plain(v) for k, v in (result.config or {}).items()}
    per_block: list[float] = []
    df = result.metrics_dataframe
    if df is not None and key in df:
        per_block = [float(v) for v in df[key].tolist()]
    elif result.metrics and key in result.metrics:
        per_block = [float(result.metrics[key])]
    name = (result.metrics or {}).get("trial_id") or f"trial {i}"
    if result.error is not None:
        return TrialRow(name, config, per_block, "error", str(result.error).strip().splitlines()[-1][:200])
    return TrialRow(name, config, per_block, "done" if len(per_block) >= blocks else "stopped")
