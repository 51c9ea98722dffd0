"""Quality benchmark: per-block NDCG@20 of the teacher, the RRD student and the same student without KD.

    python bench/quality.py [jobs/stream.yaml] [--blocks N] [--json out.json]

Runs the job's stages in this process (the same code the Ray actors run), once as written and
once with distillation off, and prints per-block NDCG@20 / Recall@20 with the seconds per block.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continual_kd.config import load_job, parse_job  # noqa: E402
from continual_kd.continual import run_stream_local  # noqa: E402
from continual_kd.data.sources import open_source  # noqa: E402


def run(job, blocks: int | None):
    store = open_source(job.source)
    b = job.blocks
    plan = store.ensure_plan(b.base_fraction, b.incremental, b.plan_split, job.seed)
    n = plan.num_blocks if blocks is None else min(blocks, plan.num_blocks)
    t0 = time.perf_counter()
    results = run_stream_local(job, lambda k: store.read_blocks(plan.plan_id, k), n,
                               on_block=lambda r: print(f"  block {r.block}: {r.seconds:.1f}s", flush=True))
    return results, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", nargs="?", default="jobs/stream.yaml")
    ap.add_argument("--blocks", type=int, default=None, help="run only the first N blocks")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = one core per model, as in the actors)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    job = load_job(args.job)
    terms = "+".join(t.name for t in job.distill.terms) or "no KD"
    print(f"job {args.job}: KD run ({len(job.teachers)} teacher(s) + student with {terms})", flush=True)
    kd_results, kd_secs = run(job, args.blocks)
    no_kd = parse_job({**job.to_dict(), "teachers": [], "distill": {"terms": [], "feedback": []},
                       "continual": {**job.to_dict()["continual"], "proxies": None}}, args.job)
    print("same student without distillation", flush=True)
    base_results, base_secs = run(no_kd, args.blocks)

    teachers = [n for n in kd_results[0].metrics if n.startswith("teacher:")]
    cols = [*teachers, "student+KD", "student"]
    rows = []
    print("\nNDCG@20 (full ranking, test part of each block)")
    header = f"{'block':>8} | " + " | ".join(f"{c:>16}" for c in cols) + " | KD s/block | noKD s/block"
    print(header)
    print("-" * len(header))
    for kd, base in zip(kd_results, base_results):
        row = {"block": kd.block, "kd_seconds": kd.seconds, "nokd_seconds": base.seconds}
        for metric in ("ndcg@20", "recall@20"):
            for t in teachers:
                row[f"{t} {metric}"] = kd.metrics[t][metric]
            row[f"student+KD {metric}"] = kd.metrics["student"][metric]
            row[f"student {metric}"] = base.metrics["student"][metric]
        rows.append(row)
        print(f"{kd.block:>8} | " + " | ".join(f"{row[c + ' ndcg@20']:>16.4f}" for c in cols)
              + f" | {kd.seconds:>10.1f} | {base.seconds:>12.1f}")
    incr = [r for r in rows if r["block"] > 0] or rows
    mean = {k: sum(r[k] for r in incr) / len(incr) for k in rows[0] if k != "block"}
    print(f"{'mean 1..':>8} | " + " | ".join(f"{mean[c + ' ndcg@20']:>16.4f}" for c in cols)
          + f" | {mean['kd_seconds']:>10.1f} | {mean['nokd_seconds']:>12.1f}   (mean over incremental blocks)")
    print("Recall@20, mean over incremental blocks: "
          + ", ".join(f"{c} {mean[c + ' recall@20']:.4f}" for c in cols))
    print(f"total: KD run {kd_secs:.1f}s, no-KD run {base_secs:.1f}s; torch threads {args.threads}")
    print(f"reproduce: python bench/quality.py {args.job}" + (f" --blocks {args.blocks}" if args.blocks else ""))
    if args.json:
        args.json.write_text(json.dumps({"job": args.job, "rows": rows, "mean_incremental": mean}, indent=2))


if __name__ == "__main__":
    main()
