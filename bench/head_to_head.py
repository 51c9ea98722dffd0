"""Every distillation method on the peer's own ground: MovieLens-100K, its split, BPR-MF 128 → BPR-MF 16.

    python bench/head_to_head.py [--json PATH] [--methods "no KD,RRD,HTD"] [--epochs 1000] [--patience 30]
                                 [--lr 0.001] [--batch-size 2048] [--teacher-wd 1e-5,1e-4,1e-3]
                                 [--teacher-hard 2,4,8] [--teacher-lr 2.5e-4,5e-4,1e-3] [--student-wd 1e-4]
                                 [--student-hard 1,4,8,16] [--student-lr 0.001] [--student-dim 16]
                                 [--term rrd.k=100 ...] [--teacher-train KEY=VALUE ...] [--seed 0]
                                 [--device cuda]
    python bench/head_to_head.py --merge s0.json s1.json ...   # runs of several seeds: mean, min–max, ÷ peer

The split (the one woriazzc/KDs and RecBole-style scripts use): dense ids = sorted original ids - 1;
every user's items sorted by item id, then shuffled with one ``numpy.random.default_rng(0)`` (users in
ascending dense id order), cut at l = max(⌊0.8n⌋, 1), r = ⌊0.9n⌋ into train / valid / test
(79,619 / 9,942 / 10,439 rows). Evaluation masks training pairs only (``eval.exclude: train``: the
validation items stay in the ranking as negatives, as the peer's evaluator does); every model is kept
at its best validation NDCG@20 epoch (``train.select: best_valid``).

The teachers are trained once (BPR-MF 128, its L2, its hard negatives — ``train.hard_negatives``, dynamic
negative sampling — and its learning rate chosen on validation from ``--teacher-wd`` × ``--teacher-hard`` ×
``--teacher-lr``; for
HetComp also LightGCN and MultVAE, with their trajectories) and every method trains a fresh BPR-MF 16
student from them through the library's own stages (``continual.stages``: teacher knowledge → update
student, on the in-process executor). A method whose term is not registered (yet) is reported n/a.

Printed per method: test NDCG@20 and Recall@20, training rows per second per epoch (the epoch's
resampling, batches and KD terms; validation and the terms' one-off construction excluded) and the
served student's parameters; ``--json PATH`` writes ``{method: {"ndcg@20", "recall@20", "rows_per_s",
"parameters", "valid_ndcg@20"}}`` (the teachers as ``teacher:<name>`` rows) plus ``"split"`` (row counts) and
``"seed"``. One seed's figures move by about ±.002 (every model's initialisation and draws): ``--merge`` reads the
JSON of runs with different ``--seed`` (run side by side, one process each) and prints each method's mean over them,
its range, its validation mean and its ratio to the peer's figure — the figures a comparison should quote.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import yaml
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continual_kd.config import parse_job  # noqa: E402
from continual_kd.continual.learner import Learner  # noqa: E402
from continual_kd.continual.stages import (BlockRun, InProcessExecutor, model_key, teacher_knowledge,  # noqa: E402
                                           update_student, update_teachers)
from continual_kd.distill import TERMS  # noqa: E402
from continual_kd.errors import CkdError  # noqa: E402
from continual_kd.types import TEST, TRAIN, VALID, Interactions  # noqa: E402

# RRD as the paper draws it: each epoch 40 of the teacher's top-500 by exp(-rank/10), in order above 40 items from
# outside the top-500, weight .03 — chosen on validation over five seeds (session 21: valid NDCG@20 .2975 against
# .2959 for the teacher's top-40 as is at weight .01, higher or equal on every seed; docs/RESULTS.md)
RRD = {"name": "rrd", "weight": 0.03, "k": 40, "pool": 500, "uninteresting": 40, "mode": "sample", "temperature": 10.0}
IR_RRD = {"name": "ir_rrd", "weight": 0.005, "k": 40, "pool": 500, "uninteresting": 40}
MF_TEACHER = {"name": "mf128", "backbone": "mf", "dim": 128}
HETCOMP_TEACHERS = [MF_TEACHER, {"name": "lightgcn", "backbone": "lightgcn", "dim": 64, "layers": 2},
                    {"name": "multvae", "backbone": "multvae", "dim": 200, "hidden": 600,
                     "train_overrides": {"batch_size": 64, "lr": 0.001}}]
# method → (its distill.terms, teacher set); the peer's figures (its evaluator, this split) for the table
METHODS = {
    "no KD": ([], "mf"),
    "RD": ([{"name": "rd"}], "mf"),
    "CD": ([{"name": "cd"}], "mf"),
    "RRD": ([RRD], "mf"),
    "IR-RRD + RRD": ([RRD, IR_RRD], "mf"),
    "DE": ([{"name": "de"}], "mf"),
    "DE + RRD": ([{"name": "de"}, RRD], "mf"),
    "FTD": ([{"name": "ftd"}], "mf"),
    "HTD": ([{"name": "htd"}], "mf"),
    "UnKD": ([{"name": "unkd"}], "mf"),
    "HetComp": ([{"name": "hetcomp"}], "hetcomp"),
}
PEER = {"teacher": (.2916, .3453, 0.94), "no KD": (.2548, .3052, 0.84), "RRD": (.2891, .3442, 1.55),
        "DE": (.2790, .3316, 5.00), "HTD": (.2631, .3169, 6.82), "UnKD": (.2643, .3160, 1.07)}


# ------------------------------------------------------------------------------------- the split


def movielens_split() -> Interactions:
    """MovieLens-100K cut as the module note says: one block, split per row."""
    from continual_kd.data.movielens import load_movielens_100k

    table = load_movielens_100k()
    users_ext = np.asarray(table.column("user").to_pylist(), dtype=np.int64)
    items_ext = np.asarray(table.column("item").to_pylist(), dtype=np.int64)
    _, users = np.unique(users_ext, return_inverse=True)  # rank among the sorted originals = original - 1
    _, items = np.unique(items_ext, return_inverse=True)
    order = np.lexsort((items, users))  # by user, then item id
    users, items = users[order], items[order]
    num_users = int(users.max()) + 1
    starts = np.searchsorted(users, np.arange(num_users))
    ends = np.append(starts[1:], len(users))
    rng = np.random.default_rng(0)
    split = np.empty(len(users), dtype=np.int8)
    for s, e in zip(starts, ends):  # one generator, users in ascending order: the split is the peer's
        items[s:e] = rng.permutation(items[s:e])
        n = e - s
        lo, hi = max(math.floor(0.8 * n), 1), math.floor(0.9 * n)
        split[s : s + lo], split[s + lo : s + hi], split[s + hi : e] = TRAIN, VALID, TEST
    zeros = np.zeros(len(users), dtype=np.int64)
    return Interactions(users.astype(np.int64), items.astype(np.int64), zeros, np.ones(len(users), np.float32),
                        np.zeros(len(users), np.int16), split, num_users, int(items.max()) + 1)


# ---------------------------------------------------------------------------------------- a method


def grid_of(values: dict[str, list]) -> dict:
    """Train settings: a single value set as it is, several chosen on validation (``train.grid``)."""
    fixed = {k: v[0] for k, v in values.items() if len(v) == 1}
    grid = {k: v for k, v in values.items() if len(v) > 1}
    return {**fixed, **({"grid": grid} if grid else {})}


def job_for(terms: list[dict], teachers: list[dict], args) -> "object":
    train = {"epochs_base": args.epochs, "select": "best_valid", "patience": args.patience,
             "batch_size": args.batch_size, "lr": args.lr}
    teacher_specs = []
    for t in teachers:
        t = dict(t)
        overrides = t.pop("train_overrides", {})
        mf = {}
        if t["backbone"] == "mf":  # the MF teacher's L2, hard negatives and rate chosen on validation
            mf = {**grid_of({"weight_decay": args.teacher_wd, "hard_negatives": args.teacher_hard,
                             "lr": args.teacher_lr}), **args.teacher_train}
        teacher_specs.append({**t, "train": {**train, **overrides, **mf}})
    terms = [{**t, **args.term.get(t["name"], {})} for t in terms]
    # HetComp's student learns from its KD loss alone (no BPR term): no negatives to choose
    hard = [1] if any(t["name"] == "hetcomp" for t in terms) else args.student_hard
    job = {"name": "head-to-head", "seed": args.seed, "teachers": teacher_specs,
           "student": {"name": "student", "backbone": "mf", "dim": args.student_dim,
                       "train": {**train, **grid_of({"weight_decay": args.student_wd, "hard_negatives": hard,
                                                      "lr": args.student_lr}),
                                 **args.student_train}},
           "distill": {"terms": terms, "feedback": []}, "eval": {"ks": [20], "exclude": "train"}}
    return parse_job(job, "bench/head_to_head.py")


def train_teachers(seen: Interactions, group: str, args) -> tuple[dict, dict]:
    """The group's teachers, trained once (HetComp's with their trajectories) → (learners, test metrics)."""
    specs = [MF_TEACHER] if group == "mf" else HETCOMP_TEACHERS
    terms = [{"name": "hetcomp"}] if group == "hetcomp" else []
    job = job_for(terms, specs, args)
    learners = {model_key("teacher", t.name): Learner(t, job.seed, args.device, role="teacher") for t in job.teachers}
    run = BlockRun(job, 0, list(learners))
    t0 = time.perf_counter()
    update_teachers(run, InProcessExecutor(learners, seen, 0))
    metrics = {}
    for key, lr in learners.items():
        ev = lr.evaluate_block(seen, 0, job.eval)
        log = run.updates[key]
        metrics[key] = {"ndcg@20": ev["test"]["ndcg@20"], "recall@20": ev["test"]["recall@20"],
                        "valid_ndcg@20": log.get("valid_ndcg@20"), "best_epoch": log.get("best_epoch"),
                        "chosen": log.get("chosen"), "parameters": ev["parameters"]}
    print(f"teachers ({group}) trained in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{k} {m['ndcg@20']:.4f} (chosen {m['chosen']}, best epoch {m['best_epoch']})"
                      for k, m in metrics.items()), file=sys.stderr, flush=True)
    return learners, metrics


def run_method(seen: Interactions, name: str, teachers: dict, args) -> dict:
    terms, group = METHODS[name]
    missing = [t["name"] for t in terms if t["name"] not in TERMS]
    if missing:
        return {"ndcg@20": None, "recall@20": None, "rows_per_s": None, "parameters": None,
                "note": f"n/a: term {', '.join(missing)} not registered"}
    teacher_specs = [MF_TEACHER] if group == "mf" else HETCOMP_TEACHERS
    job = job_for(terms, teacher_specs, args)
    learners = {**teachers, "student": Learner(job.student, job.seed, args.device, role="student")}
    ex = InProcessExecutor(learners, seen, 0)
    run = BlockRun(job, 0, [model_key("teacher", t.name) for t in job.teachers])
    if terms:
        teacher_knowledge(run, ex)
    t0 = time.perf_counter()
    update_student(run, ex)
    seconds = time.perf_counter() - t0
    ev = learners["student"].evaluate_block(seen, 0, job.eval)
    log = run.updates["student"]
    # the update's training alone (its epochs' resampling, batches and KD terms; not the per-epoch validation)
    train_s = log.get("train_seconds") or 0.0
    return {"ndcg@20": ev["test"]["ndcg@20"], "recall@20": ev["test"]["recall@20"],
            "rows_per_s": log["trained_rows"] / train_s if train_s > 0 else None, "parameters": ev["parameters"],
            "best_epoch": log.get("best_epoch"), "epochs": log.get("epochs"),
            "valid_ndcg@20": log.get("valid_ndcg@20"), "update_seconds": seconds, "chosen": log.get("chosen")}


def parse_term_settings(items: list[str]) -> dict[str, dict]:
    """["rrd.k=100", "rrd.mode=sample"] → {"rrd": {"k": 100, "mode": "sample"}} (values as YAML scalars)."""
    import yaml

    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, field = key.partition(".")
        if not (sep and dot and name and field):
            raise SystemExit(f"--term {item!r}: expected NAME.KEY=VALUE, e.g. rrd.k=100")
        out.setdefault(name, {})[field] = yaml.safe_load(value)
    return out


def merge_runs(runs: list[dict]) -> dict[str, dict]:
    """Per method (and teacher row) present in every run: n, the mean, min and max of test NDCG@20, the means of
    Recall@20, validation NDCG@20 and rows/s, and the mean's ratio to the peer's NDCG@20 (None without one)."""
    rows = [{k: v for k, v in run.items() if isinstance(v, dict) and k != "split"} for run in runs]
    out: dict[str, dict] = {}
    for method in rows[0] if rows else ():
        cells = [r[method] for r in rows if method in r]
        if len(cells) < len(rows):
            continue

        def mean(key):
            values = [c.get(key) for c in cells]
            return None if any(v is None for v in values) else float(np.mean(values))

        ndcgs = [c.get("ndcg@20") for c in cells]
        peer = PEER.get("teacher" if method.startswith("teacher:") else method)
        m = mean("ndcg@20")
        out[method] = {"n": len(cells), "ndcg@20": m, "ndcg_min": None if m is None else min(ndcgs),
                       "ndcg_max": None if m is None else max(ndcgs), "recall@20": mean("recall@20"),
                       "valid_ndcg@20": mean("valid_ndcg@20"), "rows_per_s": mean("rows_per_s"),
                       "to_peer": None if m is None or peer is None else m / peer[0],
                       "seeds": [run.get("seed") for run in runs]}
    return out


def print_merged(merged: dict[str, dict]) -> None:
    header = (f"{'method':<14} {'n':>2} {'NDCG@20':>8} {'min–max':>13} {'Recall@20':>9} {'valid':>7} {'rows/s':>10}"
              f"   ÷ peer NDCG")
    print(header)
    print("-" * len(header))
    for method, r in merged.items():
        span = "n/a" if r["ndcg@20"] is None else f"{r['ndcg_min']:.4f}–{r['ndcg_max']:.4f}"
        print(f"{method:<14} {r['n']:>2} {_fmt(r['ndcg@20'], '>8.4f')} {span:>13} {_fmt(r['recall@20'], '>9.4f')} "
              f"{_fmt(r['valid_ndcg@20'], '>7.4f')} {_fmt(r['rows_per_s'], '>10,.0f')}   "
              f"{_fmt(r['to_peer'], '.3f')}")
    seeds = next(iter(merged.values()), {}).get("seeds")
    print(f"seeds: {seeds}")


def _fmt(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return format("n/a", spec.split(".")[0].rstrip(",") + "s")  # the column's width kept
    return format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    # the peer's protocol for BPR on its datasets (configs/*/bpr/scratch.yaml, modules/parse.py): Adam lr 1e-3,
    # batches of 2048, validation every epoch, patience 30, a cap of 1000 epochs
    ap.add_argument("--epochs", type=int, default=1000, help="epoch cap of every model (best validation epoch kept)")
    ap.add_argument("--patience", type=int, default=30, help="epochs without a validation gain before stopping")
    ap.add_argument("--lr", type=float, default=0.001)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--teacher-wd", type=lambda s: [float(x) for x in s.split(",")], default=[1e-5, 1e-4, 1e-3],
                    help="the MF teacher's L2 candidates, chosen on validation (one value: fixed)")
    ap.add_argument("--student-wd", type=lambda s: [float(x) for x in s.split(",")], default=[1e-4],
                    help="the student's L2 (several: chosen on validation)")
    ap.add_argument("--teacher-hard", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8],
                    help="the MF teacher's train.hard_negatives, chosen on validation among these (1: plain BPR)")
    ap.add_argument("--teacher-lr", type=lambda s: [float(x) for x in s.split(",")], default=[2.5e-4, 5e-4, 1e-3],
                    help="the MF teacher's learning rate candidates, chosen on validation")
    ap.add_argument("--student-lr", type=lambda s: [float(x) for x in s.split(",")], default=None,
                    help="the student's learning rate candidates, chosen on validation (default: --lr)")
    ap.add_argument("--student-hard", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16],
                    help="the student's train.hard_negatives, chosen on validation among these per method")
    ap.add_argument("--student-dim", type=int, default=16, help="the student's dimension (the peer's: 16)")
    ap.add_argument("--term", action="append", default=[], metavar="NAME.KEY=VALUE",
                    help="a term setting for every method using that term, e.g. rrd.mode=sample (repeatable)")
    ap.add_argument("--teacher-train", action="append", default=[], metavar="KEY=VALUE",
                    help="a train setting of the MF teachers (e.g. hard_negatives=8), YAML value")
    ap.add_argument("--student-train", action="append", default=[], metavar="KEY=VALUE",
                    help="a train setting of the student (e.g. hard_negatives=8), YAML value")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the models train and score")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                    help="print the mean over the --json files of earlier runs (e.g. one per --seed); no training")
    args = ap.parse_args()
    if args.merge:
        runs = []
        for path in args.merge:
            try:
                runs.append(json.loads(path.read_text()))
            except (OSError, ValueError) as e:
                print(f"--merge: {path}: not a JSON file of this bench ({e})", file=sys.stderr)
                raise SystemExit(2)
        print_merged(merge_runs(runs))
        return
    args.term = parse_term_settings(args.term)
    args.student_lr = args.student_lr or [args.lr]
    args.teacher_train, args.student_train = (
        {k: yaml.safe_load(v) for k, v in (x.split("=", 1) for x in xs)} for xs in (args.teacher_train, args.student_train))
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device cuda: this torch ({torch.__version__}) sees no CUDA device")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")

    seen = movielens_split()
    counts = {name: int((seen.split == code).sum()) for name, code in (("train", TRAIN), ("valid", VALID),
                                                                     ("test", TEST))}
    print(f"split: {counts['train']:,} / {counts['valid']:,} / {counts['test']:,} rows "
          f"({seen.num_users} users, {seen.num_items} items)", file=sys.stderr)
    groups = {METHODS[m][1] for m in methods if any(t["name"] in TERMS for t in METHODS[m][0])}
    teachers, teacher_metrics = {}, {}
    if "hetcomp" in groups:  # its MF-128 is the single teacher of the other methods too (same seed, same model)
        teachers["hetcomp"], teacher_metrics = train_teachers(seen, "hetcomp", args)
        teachers["mf"] = {k: v for k, v in teachers["hetcomp"].items() if k == "teacher:mf128"}
    elif "mf" in groups:
        teachers["mf"], teacher_metrics = train_teachers(seen, "mf", args)

    results: dict[str, dict] = {}
    for m in methods:
        group = METHODS[m][1]
        try:
            results[m] = run_method(seen, m, teachers.get(group, {}), args)
        except CkdError as e:
            results[m] = {"ndcg@20": None, "recall@20": None, "rows_per_s": None, "parameters": None,
                          "note": f"n/a: {e}"}
        r = results[m]
        print(f"{m}: NDCG@20 {_fmt(r['ndcg@20'], '.4f')}  Recall@20 {_fmt(r['recall@20'], '.4f')}  "
              f"{_fmt(r['rows_per_s'], ',.0f')} rows/s  valid NDCG@20 {_fmt(r.get('valid_ndcg@20'), '.4f')} "
              f"(best epoch {r.get('best_epoch')}{', chosen ' + str(r['chosen']) if r.get('chosen') else ''})  "
              f"{r.get('note', '')}", file=sys.stderr, flush=True)

    header = f"{'method':<14} {'NDCG@20':>8} {'Recall@20':>9} {'rows/s':>10} {'params':>8}   peer NDCG / Recall / rows/s"
    print(header)
    print("-" * len(header))
    if "teacher:mf128" in teacher_metrics:
        t = teacher_metrics["teacher:mf128"]
        peer = PEER["teacher"]
        print(f"{'teacher MF-128':<14} {t['ndcg@20']:>8.4f} {t['recall@20']:>9.4f} {'':>10} {t['parameters']:>8,}   "
              f"{peer[0]:.4f} / {peer[1]:.4f} / {79_619 / peer[2]:,.0f}")
    for m, r in results.items():
        peer = PEER.get(m)
        peer_text = f"{peer[0]:.4f} / {peer[1]:.4f} / {79_619 / peer[2]:,.0f}" if peer else ""
        print(f"{m:<14} {_fmt(r['ndcg@20'], '>8.4f')} {_fmt(r['recall@20'], '>9.4f')} "
              f"{_fmt(r['rows_per_s'], '>10,.0f')} {_fmt(r['parameters'], '>8,')}   {peer_text}")
    if args.json is not None:
        out = {m: {k: r.get(k) for k in ("ndcg@20", "recall@20", "rows_per_s", "parameters", "valid_ndcg@20")}
               for m, r in results.items()}
        for key, t in teacher_metrics.items():  # the teachers as rows of the same shape (no student rows/s)
            out[key] = {"ndcg@20": t["ndcg@20"], "recall@20": t["recall@20"], "rows_per_s": None,
                        "parameters": t["parameters"]}
        out["split"], out["seed"] = counts, args.seed
        args.json.write_text(json.dumps(out, indent=2, default=float))


if __name__ == "__main__":
    main()
