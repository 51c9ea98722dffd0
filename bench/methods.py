"""Continual methods head to head: plasticity, stability and their H-mean per model and method.

    python bench/methods.py [jobs/stream.yaml] [--methods finetune,kd,bd,ccd,...] [--blocks N] [--json out.json]

Each method is the job's teachers and student with other distillation / continual settings (the
job's own settings are the "job" method). Every method runs the job's stages in this process (the
code the Ray actors run). After each block k, every model is scored on block k's test part
(plasticity) and on the test parts of blocks < k (stability); the table averages them over the
incremental blocks, with the H-mean of the two averages, validation NDCG@20 of block k (what
settings may be chosen on), seconds per block and parameters.

Methods (their distill / continual settings; the job's teachers and student are kept):
  finetune  every model fine-tuned on each block alone, no KD (the student learns nothing from teachers)
  scratch   every model retrained from scratch on all data so far each block, student with the job's terms
  kd        the job's teacher→student terms, teachers updated alone (KD without proxies or replay)
  bd        BD both ways: every teacher learns from the student, the student from the fused teachers
            (the reference code's sign: each model trains on items it ranks above the other)
  bd-paper  the same with the paper's sign (each model trains on items the other ranks above it)
  ccd       CCD: student first (RRD + IR-RRD from the previous block's teachers + proxy-guided replay,
            EMA proxies), then the teachers update with replay from the student and its proxies + keep
  ccd-1way  CCD's student side alone (teachers updated alone): isolates the collaborative direction
  job+fb    the job's terms, plus the teachers learn from the student (replay from student + keep)
  job+bd    the job's terms, plus the teachers learn from the student by BD
  rrd       RRD alone from the fused teachers;  single:<teacher>  RRD from that one teacher alone
  hetcomp   HetComp with jobs/hetcomp.yaml's term (trajectories, DKC)
  (bench/multi_teacher.py runs: finetune, single:<each teacher>, rrd, hetcomp, job)
An "ensemble" row (the teachers' rank fusion, CCD's (1/rank)^0.05, evaluated like a model) comes with
every method that has teachers.
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

RRD = {"name": "rrd", "weight": 0.01, "k": 40, "pool": 500, "uninteresting": 40, "score_clamp": 10.0}
IR_RRD = {"name": "ir_rrd", "weight": 0.01, "k": 40, "pool": 500, "uninteresting": 40, "score_clamp": 10.0}
REPLAY_STUDENT = {"name": "replay", "weight": 0.5, "decay": 10.0, "top": 50, "every": 5, "per_user": 10,
                  "source": "proxies"}
REPLAY_TEACHER = {"name": "replay", "weight": 0.5, "decay": 5.0, "top": 50, "every": 5, "per_user": 10,
                  "source": "peers"}
KEEP = {"name": "keep", "weight": 0.01, "k": 40, "uninteresting": 40}
PROXIES = {"stability": 0.9, "plasticity": 0.1}


def method_specs(job_dict: dict) -> dict[str, dict]:
    """method name → {"distill": ..., "continual": ...} overrides of the job."""
    own = [t for t in job_dict["distill"]["terms"]]
    base = {"fusion": job_dict["distill"]["fusion"], "teacher_weights": job_dict["distill"]["teacher_weights"]}
    warm = {"strategy": "warm", "order": "teachers_first", "proxies": None}
    ccd = {"strategy": "warm", "order": "student_first", "proxies": PROXIES}
    return {
        "job": {"distill": job_dict["distill"], "continual": job_dict["continual"]},
        "finetune": {"distill": {**base, "terms": [], "feedback": []}, "continual": warm},
        "scratch": {"distill": {**base, "terms": own, "feedback": []}, "continual": {**warm, "strategy": "scratch"}},
        "kd": {"distill": {**base, "terms": own, "feedback": []}, "continual": warm},
        "bd": {"distill": {**base, "terms": [{"name": "bd"}], "feedback": [{"name": "bd"}]}, "continual": warm},
        "bd-paper": {"distill": {**base, "terms": [{"name": "bd", "sign": "paper"}],
                                 "feedback": [{"name": "bd", "sign": "paper"}]}, "continual": warm},
        "ccd": {"distill": {**base, "terms": [RRD, IR_RRD, REPLAY_STUDENT], "feedback": [REPLAY_TEACHER, KEEP]},
                "continual": ccd},
        "ccd-1way": {"distill": {**base, "terms": [RRD, IR_RRD, REPLAY_STUDENT], "feedback": []}, "continual": ccd},
        "job+fb": {"distill": {**base, "terms": own, "feedback": [REPLAY_TEACHER, KEEP]}, "continual": warm},
        "job+bd": {"distill": {**base, "terms": own, "feedback": [{"name": "bd"}]}, "continual": warm},
        "rrd": {"distill": {**base, "terms": [t for t in own if t["name"] == "rrd"] or [RRD], "feedback": []},
                "continual": warm},
        "hetcomp": {"distill": {**base, "terms": [_hetcomp_term()], "feedback": []}, "continual": warm},
        **{f"single:{t['name']}": {"teachers": [t], "distill": {**base, "terms": [t2 for t2 in own if t2["name"] == "rrd"]
                                                                or [RRD], "feedback": []}, "continual": warm}
           for t in job_dict["teachers"]},
    }


def _hetcomp_term() -> dict:
    path = Path(__file__).resolve().parents[1] / "jobs" / "hetcomp.yaml"
    if path.is_file():
        term = load_job(path).distill.term("hetcomp")
        if term is not None:
            return term.model_dump()
    return {"name": "hetcomp"}


def _mean(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def summarise(results, key: str = "ndcg@20") -> dict[str, dict]:
    """Per model: plasticity / stability means over incremental blocks, their H-mean, valid, s/block."""
    incr = [r for r in results if r.block > 0] or results
    out = {}
    for model in results[0].metrics:
        p = _mean([r.continual[model][f"plasticity/{key}"] for r in incr])
        s = _mean([r.continual[model][f"stability/{key}"] for r in incr])
        out[model] = {
            "plasticity": p, "stability": s, "hmean": 2 * p * s / (p + s) if p + s > 0 else float("nan"),
            "valid": _mean([r.valid[model].get(key) for r in incr]),
            "tail": _mean([r.metrics[model].get("recall@20/tail") for r in incr]),
            "seconds": _mean([r.updates[model].get("seconds") for r in incr]),
            "parameters": results[-1].updates[model]["parameters"],
        }
    return out


def _add_ensemble(result, learners: dict, seen, job) -> None:
    """Score the teachers' rank-fusion ensemble like a model (block k and every earlier block) and add
    it to ``result`` as "ensemble"."""
    from continual_kd.continual.ensemble import evaluate_ensemble

    teachers = [lr for key, lr in learners.items() if key.startswith("teacher:")]
    ev = evaluate_ensemble(teachers, seen, result.block, job.eval)
    result.metrics["ensemble"], result.continual["ensemble"], result.valid["ensemble"] = ev["test"], ev["continual"], {}
    result.updates["ensemble"] = {"seconds": None, "parameters": sum(lr.num_parameters() for lr in teachers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", nargs="?", default="jobs/stream.yaml")
    ap.add_argument("--methods", default="finetune,scratch,kd,bd,ccd,ccd-1way,job+fb")
    ap.add_argument("--blocks", type=int, default=None, help="run only the first N blocks")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = one core per model, as in the actors)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    job = load_job(args.job)
    store = open_source(job.source)
    b = job.blocks
    plan = store.ensure_plan(b.base_fraction, b.incremental, b.plan_split, job.seed)
    n = plan.num_blocks if args.blocks is None else min(args.blocks, plan.num_blocks)
    specs = method_specs(job.to_dict())
    report = {}
    for name in args.methods.split(","):
        variant = parse_job({**job.to_dict(), **specs[name]}, f"{args.job} [{name}]")
        t0 = time.perf_counter()
        learners = make_learners(variant)
        ensemble: dict[int, dict] = {}

        def on_block(r, name=name, learners=learners, ensemble=ensemble, variant=variant):
            print(f"  {name} block {r.block}: {r.seconds:.1f}s", flush=True)
            if variant.teachers:
                _add_ensemble(r, learners, store.read_blocks(plan.plan_id, r.block), variant)

        results = run_stream_local(variant, lambda k: store.read_blocks(plan.plan_id, k), n, on_block=on_block,
                                   learners=learners)
        report[name] = {"summary": summarise(results), "seconds": time.perf_counter() - t0,
                        "per_block": [{"block": r.block, "continual": r.continual, "seconds": r.seconds}
                                      for r in results]}
        _print_method(name, report[name])
    _print_table(report)
    print(f"reproduce: python bench/methods.py {args.job} --methods {args.methods}"
          + (f" --blocks {args.blocks}" if args.blocks else ""))
    if args.json:
        args.json.write_text(json.dumps({"job": args.job, "methods": report}, indent=2, default=str))


def _print_method(name: str, rep: dict) -> None:
    print(f"\n{name}: per block NDCG@20 plasticity / stability (H-mean)  [{rep['seconds']:.0f}s]")
    for row in rep["per_block"]:
        cells = []
        for model, c in row["continual"].items():
            p, s, h = (c.get(f"{x}/ndcg@20") for x in ("plasticity", "stability", "hmean"))
            cells.append(f"{model} {p:.4f}/" + ("—" if s is None else f"{s:.4f} ({h:.4f})"))
        print(f"  b{row['block']} ({row['seconds']:.1f}s): " + "  ".join(cells))


def _print_table(report: dict) -> None:
    print("\nmean over incremental blocks, NDCG@20 (test; valid = block k's validation part)")
    header = f"{'method':<10} {'model':<18} {'plast.':>7} {'stab.':>7} {'H-mean':>7} {'valid':>7} {'tailR':>7} " \
             f"{'s/blk':>6} {'params':>9}"
    print(header)
    print("-" * len(header))
    for name, rep in report.items():
        for model, m in rep["summary"].items():
            print(f"{name:<10} {model:<18} {m['plasticity']:>7.4f} {m['stability']:>7.4f} {m['hmean']:>7.4f} "
                  f"{m['valid']:>7.4f} {m['tail']:>7.4f} {m['seconds']:>6.1f} {m['parameters']:>9,}")


if __name__ == "__main__":
    main()
