"""Continual updates against retraining from scratch: pooled and per-block NDCG@20, and their cost.

    python bench/continual_vs_retrain.py [JOB ...] [--methods retrain,finetune,job,ccd] [--json out.json]
                                         [--seeds N] [--set PATH=JSON ...]

Default streams: MovieLens-100K's default job (jobs/stream.yaml) and the synthetic stream with new users
and items in every block (jobs/synthetic-stream.yaml). For each stream every method runs the job's
teachers and student through the job's stages in this process (the code the Ray actors run), one torch
thread:

  retrain   every model rebuilt and trained from scratch on everything seen so far at every block
            (``continual.strategy: retrain``), same settings, same best-epoch choice on validation
  finetune  warm updates on the new block alone: no replay, no distillation either way
  job       the job's own settings (the default continual method)
  ccd       CCD's settings (jobs/ccd.yaml's distill/continual) on the job's models

After each block k every model is scored on the pooled test pairs of blocks ≤ k (one test set; train +
valid masked) and on each block's own test pairs. Printed: per model the final snapshot's pooled
NDCG@20 and the mean over blocks of the per-block figure, with the ratio to the same model retrained;
the student's ratio to the best retrained teacher; per block the pooled NDCG@20 of every method and
the seconds of each model's update next to the retrain's, and the four models' together (issue 19's time goal:
their updates ÷ their retrains, ≤ 1/3 by the last block).

``--seeds N`` runs every stream with job seeds 0..N-1 (each seed its own models and its own cut of the
blocks into train / valid / test) and closes with each model's final ratio to its retrain per seed and
their mean: one seed's ratio moves by ±.03 (issue 19, session 11); ``--json`` then holds
``{job: {"seeds": {seed: {method: …}}}}`` instead of ``{job: {method: …}}``. ``--set`` overrides a job setting as
in ``bench/robustness.py`` (``--set teachers.1.train.lr_block=0.001``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continual_kd.config import load_job, parse_job  # noqa: E402
from continual_kd.continual import make_learners, run_stream_local  # noqa: E402
from continual_kd.data.sources import open_source  # noqa: E402
from robustness import set_path  # noqa: E402  (bench/robustness.py: one ``a.b.c=JSON`` override)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JOBS = ["jobs/stream.yaml", "jobs/synthetic-stream.yaml"]


def method_overrides(job: dict) -> dict[str, dict]:
    """method → job-dict overrides (the job's teachers and student are kept)."""
    ccd = load_job(ROOT / "jobs" / "ccd.yaml").to_dict()
    return {
        "retrain": {"continual": {**job["continual"], "strategy": "retrain", "replay": 0.0}},
        "finetune": {"distill": {**job["distill"], "terms": [], "feedback": []},
                     "continual": {**job["continual"], "strategy": "warm", "replay": 0.0, "proxies": None,
                                   "order": "teachers_first"}},
        "job": {},
        "ccd": {"distill": ccd["distill"], "continual": {**ccd["continual"], "replay": job["continual"].get("replay", 0.0),
                                                         "replay_by": job["continual"].get("replay_by", "user")}},
    }


def run_method(job, store, plan, device: str = "cpu") -> dict:
    """Per block: pooled / per-block NDCG@20 of every model and each model's update seconds."""
    learners = make_learners(job, device)
    blocks = []

    def on_block(r):
        blocks.append({
            "block": r.block,
            "pooled": {m: v.get("ndcg@20") for m, v in r.pooled.items()},
            "own": {m: v.get("ndcg@20") for m, v in r.metrics.items()},
            "mean": {m: _mean([r.metrics[m].get("ndcg@20")] + [e.get("ndcg@20") for e in r.earlier[m].values()])
                     for m in r.metrics},
            "seconds": {m: u.get("seconds") for m, u in r.updates.items()},
            "epochs": {m: u.get("epochs") for m, u in r.updates.items()},
        })
        print(f"    block {r.block}: {r.seconds:.1f}s  pooled "
              + "  ".join(f"{m} {v:.4f}" for m, v in blocks[-1]["pooled"].items() if v is not None), flush=True)

    t0 = time.perf_counter()
    run_stream_local(job, lambda k: store.read_blocks(plan.plan_id, k), plan.num_blocks, on_block=on_block,
                     learners=learners)
    return {"blocks": blocks, "seconds": time.perf_counter() - t0}


def _mean(values):
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def _ratio(a, b):
    return a / b if a is not None and b and not math.isnan(a) and not math.isnan(b) else float("nan")


def print_stream(path: str, report: dict) -> None:
    methods = list(report)
    final = {m: report[m]["blocks"][-1] for m in methods}
    models = list(final[methods[0]]["pooled"])
    print(f"\n{path}: final snapshot, NDCG@20 pooled over every block's test pairs (mean over blocks)")
    head = f"{'model':18s}" + "".join(f"{m:>22s}" for m in methods)
    print(head)
    for model in models:
        cells = []
        for m in methods:
            p, mean = final[m]["pooled"].get(model), final[m]["mean"].get(model)
            ratio = _ratio(p, final["retrain"]["pooled"].get(model)) if "retrain" in final else float("nan")
            cells.append(f"{p:.4f} ({mean:.4f}) {ratio:4.2f}x" if p is not None else "–")
        print(f"{model:18s}" + "".join(f"{c:>22s}" for c in cells))
    if "retrain" in final:
        best = max((v for k, v in final["retrain"]["pooled"].items() if k.startswith("teacher:") and v is not None),
                   default=None)
        if best:
            print("student / best retrained teacher (pooled): "
                  + ", ".join(f"{m} {_ratio(final[m]['pooled'].get('student'), best):.3f}" for m in methods))
    print(f"\n{path}: per block, pooled NDCG@20 of the student and seconds of each update vs the retrain")
    for k in range(len(report[methods[0]]["blocks"])):
        row = {m: report[m]["blocks"][k] for m in methods}
        pooled = "  ".join(f"{m} {row[m]['pooled'].get('student') or float('nan'):.4f}" for m in methods)
        secs = []
        for model in models:
            upd = [row[m]["seconds"].get(model) for m in methods]
            if "retrain" in row:
                r = row["retrain"]["seconds"].get(model)
                secs.append(f"{model.split(':')[-1]} " + "/".join(f"{s:.1f}" for s in upd if s is not None)
                            + (f" ({_ratio(row['job']['seconds'].get(model), r):.2f}x)" if "job" in row else ""))
        print(f"  block {k}: {pooled}")
        if secs:
            print(f"    update s ({'/'.join(methods)}; job/retrain): " + "  ".join(secs))
        if k and "job" in row and "retrain" in row:  # issue 19's time goal: all models' updates ÷ their retrains
            job_s, re_s = _total_seconds(row["job"]), _total_seconds(row["retrain"])
            print(f"    all models: {job_s:.1f} / {re_s:.1f} s = {_ratio(job_s, re_s):.2f}x")


def _total_seconds(block: dict) -> float:
    return sum(v for v in block["seconds"].values() if v is not None)


def print_seeds(path: str, per_seed: dict) -> None:
    """Each model's final pooled NDCG@20 ÷ its retrain's, per seed and their mean (needs retrain)."""
    finals = {seed: {m: r["blocks"][-1]["pooled"] for m, r in report.items()} for seed, report in per_seed.items()}
    first = next(iter(finals.values()))
    if "retrain" not in first:
        return
    methods = [m for m in first if m != "retrain"]
    print(f"\n{path}: final pooled NDCG@20 ÷ the same model retrained, per seed ({', '.join(map(str, finals))}) and mean")
    for m in methods:
        for model in first[m]:
            ratios = [_ratio(f[m].get(model), f["retrain"].get(model)) for f in finals.values()]
            print(f"  {m:9s} {model:18s} " + " ".join(f"{r:.3f}" for r in ratios) + f"   mean {_mean(ratios):.3f}")
        best = [_ratio(f[m].get("student"), max((v for k, v in f["retrain"].items()
                                                  if k.startswith("teacher:") and v is not None), default=None))
                for f in finals.values()]
        print(f"  {m:9s} {'student / best T':18s} " + " ".join(f"{r:.3f}" for r in best) + f"   mean {_mean(best):.3f}")
    if "job" in first:  # the time goal per block over the seeds: Σ update seconds ÷ Σ retrain seconds
        blocks = len(next(iter(per_seed.values()))["job"]["blocks"])
        cells = []
        for k in range(1, blocks):
            job_s = sum(_total_seconds(r["job"]["blocks"][k]) for r in per_seed.values())
            re_s = sum(_total_seconds(r["retrain"]["blocks"][k]) for r in per_seed.values())
            cells.append(f"block {k} {_ratio(job_s, re_s):.2f}x")
        print("  all models' update ÷ retrain seconds, summed over the seeds: " + "  ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jobs", nargs="*", default=DEFAULT_JOBS)
    ap.add_argument("--methods", default="retrain,finetune,job,ccd")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the models train and score")
    ap.add_argument("--seeds", type=int, default=1, help="run each stream with job seeds 0..N-1 and average the ratios")
    ap.add_argument("--set", action="append", default=[], metavar="PATH=JSON",
                    help="override a job setting, e.g. --set teachers.1.train.lr_block=0.001 (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device cuda: this torch ({torch.__version__}) sees no CUDA device")
    out = {}
    for path in args.jobs:
        base = json.loads(json.dumps(load_job(path).to_dict(), default=str))  # tuples → lists for --set
        for item in args.set:
            set_path(base, item)
        per_seed = {}
        for seed in range(args.seeds) if args.seeds > 1 else [base["seed"]]:
            job = parse_job({**base, "seed": seed}, path)
            store = open_source(job.source)
            b = job.blocks
            plan = store.ensure_plan(b.base_fraction, b.incremental, b.plan_split, job.seed)
            overrides = method_overrides(job.to_dict())
            report = {}
            for name in args.methods.split(","):
                print(f"{path} [{name}] seed {seed}", flush=True)
                variant = parse_job({**job.to_dict(), **overrides[name]}, f"{path} [{name}]")
                report[name] = run_method(variant, store, plan, args.device)
            per_seed[seed] = report
            print_stream(f"{path} (seed {seed})", report)
        out[path] = per_seed[next(iter(per_seed))] if len(per_seed) == 1 else {"seeds": per_seed}
        if len(per_seed) > 1:
            print_seeds(path, per_seed)
    device = f" --device {args.device}" if args.device != "cpu" else ""
    extra = (f" --seeds {args.seeds}" if args.seeds > 1 else "") + "".join(f" --set '{item}'" for item in args.set)
    print(f"\nreproduce: python bench/continual_vs_retrain.py {' '.join(args.jobs)} --methods {args.methods}{device}{extra}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
