"""A post-hoc popularity penalty on a saved snapshot: what each model gives up for less popular lists.

    python bench/popularity_penalty.py [RUNS_DIR] [--snapshot latest] [--betas 0,0.05,0.1,0.2,0.3,0.5]

Every model of the snapshot ranks by ``score(u, i) - beta * log(1 + training count of i)`` (the count over
the training pairs it has seen; training itself untouched) and is evaluated as ``ckd evaluate`` does: the
test pairs of every block (the job's mask), means over blocks of NDCG@20, tail Recall@20 and average
popularity@20, and beside them the last block's validation NDCG@20 (pairs the snapshot never trained on:
where a beta would be chosen). One line per model and beta; the least-biased teacher's average popularity
and the best teacher's tail recall at beta 0 are the bars issue 9 sets for the student.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continual_kd.config import parse_job  # noqa: E402
from continual_kd.continual import rank_penalty  # noqa: E402
from continual_kd.continual.snapshot_eval import learners_from_snapshot  # noqa: E402
from continual_kd.data.sources import open_source  # noqa: E402
from continual_kd.snapshots import resolve_snapshot  # noqa: E402
from continual_kd.types import TEST, VALID  # noqa: E402

TAIL, POP = "recall@20/tail", "avgpop@20"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="?", default="runs/stream")
    ap.add_argument("--snapshot", default="latest")
    ap.add_argument("--betas", default="0,0.05,0.1,0.2,0.3,0.5")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    snap, _ = resolve_snapshot(Path(args.runs), args.snapshot)
    job = parse_job(snap.manifest["job_spec"], f"{snap.path}/manifest.json")
    store = open_source(job.source)
    plan = store.ensure_plan(job.blocks.base_fraction, job.blocks.incremental, job.blocks.plan_split, job.seed)
    seen = store.read_blocks(plan.plan_id, snap.block)
    blocks = list(range(snap.block + 1))
    betas = [float(b) for b in args.betas.split(",")]
    print(f"{snap.path} (block {snap.block}, job {job.name}): means over blocks 0..{snap.block}")
    print(f"{'model':18s} {'beta':>5s} {'valid ndcg@20':>14s} {'ndcg@20':>8s} {'tail R@20':>9s} {'avgpop@20':>9s}")
    for name, learner in learners_from_snapshot(snap).items():
        learner.observe(seen)
        popularity = learner.pairs.popularity(seen)
        for beta in betas:  # the option's own penalty (continual/rank_penalty.py), installed on the model
            rank_penalty.install(learner.model, rank_penalty.penalty_of(beta, popularity))
            valid = learner.evaluate(seen, [snap.block], job.eval, VALID)[snap.block]
            test = learner.evaluate(seen, blocks, job.eval, TEST)
            mean = {k: float(np.mean([test[b][k] for b in blocks if test[b].get(k) is not None]))
                    for k in ("ndcg@20", TAIL, POP)}
            print(f"{name:18s} {beta:5.2f} {valid['ndcg@20']:14.4f} {mean['ndcg@20']:8.4f} {mean[TAIL]:9.4f} "
                  f"{mean[POP]:9.1f}", flush=True)
        rank_penalty.install(learner.model, learner.penalty)  # back to what the snapshot ranks with
    print(f"\nreproduce: python bench/popularity_penalty.py {args.runs} --snapshot {args.snapshot} --betas {args.betas}")


if __name__ == "__main__":
    main()
