"""The served student on streams nobody tuned for: the default job's settings across densities and skews.

    python bench/robustness.py [--job jobs/stream.yaml] [--rows all|ml|synthetic] [--json out.json]
    python bench/robustness.py --rows synthetic --only "0.5%" --set student.train.negatives=uniform   # one change
    python bench/robustness.py --rows synthetic --only "0.5%" --seeds 3   # each row on 3 streams, averaged

Rows: synthetic streams (1,500 users × 1,000 items, six periods, new users and items arriving, drifting
tastes) at about 0.5%, 2% and 6% of the user×item matrix filled, each with a mild and a steep item
popularity exponent (0.6, 1.2), and MovieLens-100K. Every row runs the job's teachers, student,
distillation and continual settings (only the source changes) through the job's stages in this
process, one torch thread. Printed for the final snapshot, as means over every block it has seen:
NDCG@20 of every model and of the teachers' rank-fusion ensemble, the student's ratio to the best
teacher and to the ensemble, tail Recall@20, average popularity@20 and coverage@20 of every model;
plus the pooled NDCG@20 (every block's test pairs as one test set) and the mean validation NDCG@20.
The sparse rows have ~75 test users a block: their figures move by a third between runs that differ in
anything; ``--seeds N`` runs every synthetic row on N streams of the same shape and MovieLens-100K with N
job seeds (each its own cut of the blocks and draws), and averages them.
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
from continual_kd.continual.ensemble import evaluate_ensemble  # noqa: E402
from continual_kd.data.sources import open_source  # noqa: E402
from continual_kd.types import HOLDOUT  # noqa: E402

USERS, ITEMS = 1500, 1000
DENSITIES = (0.005, 0.02, 0.06)
EXPONENTS = (0.6, 1.2)
KEYS = ("ndcg@20", "recall@20/tail", "avgpop@20", "coverage@20")


def rows(kind: str, seed: int = 0) -> list[tuple[str, dict]]:
    """(name, source) of every row; ``seed`` draws another synthetic stream of the same shape (ML: unchanged)."""
    out = []
    if kind in ("all", "ml"):
        out.append(("movielens-100k", {"dataset": "movielens-100k", "store": "stores/ml-100k"}))
    if kind in ("all", "synthetic"):
        for d in DENSITIES:
            for e in EXPONENTS:
                name = f"synthetic {d:.1%} pop^{e}"
                store = f"stores/robustness-{d}-{e}" + (f"-s{seed}" if seed else "")
                out.append((name, {"dataset": "synthetic", "store": store,
                                   "synthetic": {"users": USERS, "items": ITEMS, "interactions": int(d * USERS * ITEMS),
                                                 "periods": 6, "popularity_exponent": e, "seed": seed}}))
    return out


def set_path(job: dict, item: str) -> None:
    """Apply one ``a.b.c=JSON`` override to the job dict (list entries by index: ``distill.terms.1.weight``)."""
    path, _, raw = item.partition("=")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    *parents, last = path.split(".")
    node = job
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _mean(values):
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def final_snapshot(results, learners, seen, job) -> dict[str, dict]:
    """Per model (and the ensemble): the final snapshot's mean over every block of KEYS, pooled NDCG@20, and
    the mean over blocks of each block's validation NDCG@20 right after its update (what a choice may use)."""
    last = results[-1]
    out = {}
    for model in last.metrics:
        per_block = [last.metrics[model], *last.earlier[model].values()]
        out[model] = {k: _mean([m.get(k) for m in per_block]) for k in KEYS}
        out[model]["pooled"] = (last.pooled.get(model) or {}).get("ndcg@20")
        out[model]["valid"] = _mean([(r.valid.get(model) or {}).get("ndcg@20") for r in results])
        if (seen.split == HOLDOUT).any():  # blocks.holdout: the final snapshot on every block's held-out part
            held = learners[model].evaluate(seen, list(range(last.block + 1)), job.eval, split=HOLDOUT)
            out[model]["holdout"] = _mean([m.get("ndcg@20") for m in held.values()])
    teachers = [learners[m] for m in learners if m.startswith("teacher:")]
    if teachers:
        ens = evaluate_ensemble(teachers, seen, last.block, job.eval)
        per_block = [ens["test"], *ens["earlier"].values()]
        out["ensemble"] = {k: _mean([m.get(k) for m in per_block]) for k in KEYS}
        out["ensemble"]["pooled"] = out["ensemble"]["valid"] = None
    return out


def run_row(job_dict: dict, source: dict, name: str) -> dict:
    job = parse_job({**job_dict, "source": source}, f"robustness [{name}]")
    store = open_source(job.source)
    b = job.blocks
    plan = store.ensure_plan(b.base_fraction, b.incremental, b.plan_split, job.seed)
    learners = make_learners(job)
    t0 = time.perf_counter()
    results = run_stream_local(job, lambda k: store.read_blocks(plan.plan_id, k), plan.num_blocks, learners=learners)
    seen = store.read_blocks(plan.plan_id, plan.num_blocks - 1)
    info = {"users": int(seen.num_users), "items": int(seen.num_items), "rows": int(len(seen))}
    info["density"] = info["rows"] / max(info["users"] * info["items"], 1)
    info["chosen"] = {m: dict(learner.chosen) for m, learner in learners.items() if learner.chosen}  # train.grid
    return {"models": final_snapshot(results, learners, seen, job), "seconds": time.perf_counter() - t0, **info}


def mean_rows(runs: list[dict]) -> dict:
    """One row from the same row's runs on several seeds: every figure averaged, each seed's student ratios kept."""
    if len(runs) == 1:
        return runs[0]
    models = {m: {k: _mean([r["models"][m][k] for r in runs]) if runs[0]["models"][m][k] is not None else None
                  for k in runs[0]["models"][m]} for m in runs[0]["models"]}
    out = {**runs[0], "models": models, "seeds": len(runs), "seconds": sum(r["seconds"] for r in runs),
           "rows": round(_mean([r["rows"] for r in runs])), "density": _mean([r["density"] for r in runs]),
           "per_seed": [student_ratios(r) for r in runs]}
    return out


def student_ratios(row: dict) -> dict:
    """The student's NDCG@20 over the best teacher's and over the ensemble's."""
    models = row["models"]
    best = max(v["ndcg@20"] for m, v in models.items() if m.startswith("teacher:"))
    return {"best_teacher": models["student"]["ndcg@20"] / best,
            "ensemble": models["student"]["ndcg@20"] / models["ensemble"]["ndcg@20"]}


def print_row(name: str, row: dict) -> None:
    models = row["models"]
    teachers = {m: v for m, v in models.items() if m.startswith("teacher:")}
    best = max((v["ndcg@20"] for v in teachers.values()), default=float("nan"))
    s = models.get("student", {})
    ens = models.get("ensemble", {}).get("ndcg@20", float("nan"))
    seeds = f", mean of {row['seeds']} seeds" if row.get("seeds", 1) > 1 else ""
    print(f"\n{name}: {row['users']} users × {row['items']} items, {row['rows']} rows "
          f"({row['density']:.2%}{seeds}), {row['seconds']:.0f}s")
    if row.get("chosen"):
        print("  chosen on validation: " + "; ".join(f"{m} {c}" for m, c in row["chosen"].items()))
    print(f"  {'model':18s} {'NDCG@20':>8s} {'pooled':>7s} {'tail R@20':>9s} {'avgpop@20':>9s} {'cov@20':>7s} {'valid':>7s}")
    for m, v in models.items():
        pooled = "–" if v.get("pooled") is None else f"{v['pooled']:.4f}"
        valid = "–" if v.get("valid") is None else f"{v['valid']:.4f}"
        held = "" if v.get("holdout") is None else f"  held-out {v['holdout']:.4f}"
        print(f"  {m:18s} {v['ndcg@20']:8.4f} {pooled:>7s} {v['recall@20/tail']:9.4f} {v['avgpop@20']:9.1f} "
              f"{v['coverage@20']:7.3f} {valid:>7s}{held}")
    print(f"  student / best teacher {s.get('ndcg@20', float('nan')) / best:.3f}   "
          f"student / ensemble {s.get('ndcg@20', float('nan')) / ens:.3f}")
    if row.get("per_seed"):
        print("  per seed, student / best teacher: " + " ".join(f"{r['best_teacher']:.3f}" for r in row["per_seed"])
              + "   / ensemble: " + " ".join(f"{r['ensemble']:.3f}" for r in row["per_seed"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default="jobs/stream.yaml")
    ap.add_argument("--rows", choices=("all", "ml", "synthetic"), default="all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", default="", help="run only the rows whose name contains this text (e.g. '0.5%%')")
    ap.add_argument("--seeds", type=int, default=1,
                    help="run every row this many times and average: a synthetic row on streams of seeds 0..N-1, "
                         "MovieLens-100K with the job's seed + 0..N-1 (small rows are noisy; one run moves by ±1%%)")
    ap.add_argument("--set", action="append", default=[], metavar="PATH=JSON",
                    help="override a job setting, e.g. --set student.train.negative_exponent=0 (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    job_dict = json.loads(json.dumps(load_job(args.job).to_dict(), default=str))  # tuples → lists for --set
    for item in args.set:
        set_path(job_dict, item)
    report = {}
    for index, (name, _) in enumerate(rows(args.rows)):
        if args.only and args.only not in name:
            continue
        if name.startswith("synthetic"):  # another stream of the same shape per seed, the job as it is
            runs = [run_row(job_dict, rows(args.rows, seed)[index][1], name) for seed in range(args.seeds)]
        else:  # one dataset: the job's seed per run (its own cut of the blocks, draws and initialisations)
            runs = [run_row({**job_dict, "seed": job_dict.get("seed", 0) + seed}, rows(args.rows)[index][1], name)
                    for seed in range(args.seeds)]
        report[name] = mean_rows(runs)
        print_row(name, report[name])
    print("\nsummary: student NDCG@20 / best teacher, / ensemble; student tail R@20 / best teacher's; "
          "student avgpop@20 / least-biased teacher's")
    for name, row in report.items():
        models = row["models"]
        teachers = {m: v for m, v in models.items() if m.startswith("teacher:")}
        s = models["student"]
        best = max(v["ndcg@20"] for v in teachers.values())
        tail = max(v["recall@20/tail"] for v in teachers.values())
        pop = min(v["avgpop@20"] for v in teachers.values())
        ens = models["ensemble"]["ndcg@20"]
        print(f"  {name:26s} {s['ndcg@20'] / best:6.3f} {s['ndcg@20'] / ens:6.3f} "
              f"{s['recall@20/tail'] / tail if tail else float('nan'):6.3f} {s['avgpop@20'] / pop:6.3f}")
    extra = (f" --only '{args.only}'" if args.only else "") + (f" --seeds {args.seeds}" if args.seeds > 1 else "") + "".join(f" --set '{item}'" for item in args.set)
    print(f"reproduce: python bench/robustness.py --job {args.job} --rows {args.rows}{extra}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
