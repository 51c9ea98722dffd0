"""Multi-teacher benchmark: every teacher, their fused ensemble, and one student per distillation
variant, all on the same stream and the same teacher knowledge, averaged over the incremental blocks.

    python bench/multi_teacher.py [jobs/stream.yaml] [--blocks N] [--json out.json]

Teachers train once per block (with HetComp trajectories kept); each student variant trains from
the same initial weights on the same block data:
  no KD | RRD from each single teacher | RRD from the fused teachers | HetComp | fused RRD + UnKD
Printed per model: NDCG@20, Recall@20, tail-group Recall@20, average popularity of the top-20,
item coverage@20, parameters, seconds per block, and "final@all": the final models' NDCG@20 on
the test part of every block (mean over blocks 0..last: how much of the old blocks is kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continual_kd.config import DistillSpec, UnKDSpec, load_job  # noqa: E402
from continual_kd.continual import Learner, model_key  # noqa: E402
from continual_kd.continual.ensemble import RankFusionEnsemble  # noqa: E402
from continual_kd.data.sources import open_source  # noqa: E402
from continual_kd.eval import eval_sets, evaluate_ranking  # noqa: E402
from continual_kd.eval.bias import item_popularity_groups  # noqa: E402
from continual_kd.continual.learner import item_counts  # noqa: E402

KEYS = ("ndcg@20", "recall@20", "recall@20/tail", "avgpop@20", "coverage@20")


def variants(job, hetcomp_job=None) -> dict[str, tuple[DistillSpec, list[str] | None]]:
    """name → (distill spec, teachers it learns from; None = all). HetComp's settings come from
    ``hetcomp_job`` (jobs/hetcomp.yaml) when given, else from the job's own distill.hetcomp."""
    d = job.distill
    hetcomp = hetcomp_job.distill if hetcomp_job is not None else d
    rrd = dataclasses.replace(d, method="rrd", unkd=UnKDSpec(weight=0.0))
    unkd_w = d.unkd.weight if d.unkd.weight > 0 else 0.1
    out = {"student (no KD)": (DistillSpec(method="none"), [])}
    for t in job.teachers:
        out[f"student + RRD({t.name})"] = (rrd, [model_key("teacher", t.name)])
    out["student + RRD(fused)"] = (rrd, None)
    out["student + HetComp"] = (dataclasses.replace(d, method="hetcomp", fusion=hetcomp.fusion,
                                                    hetcomp=hetcomp.hetcomp, unkd=UnKDSpec(weight=0.0)), None)
    out["student + RRD(fused) + UnKD"] = (dataclasses.replace(rrd, unkd=dataclasses.replace(d.unkd, weight=unkd_w)), None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", nargs="?", default="jobs/stream.yaml")
    ap.add_argument("--blocks", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--hetcomp-job", default="jobs/hetcomp.yaml", help="job file whose distill.hetcomp to use")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    job = load_job(args.job)
    hetcomp_job = load_job(args.hetcomp_job) if Path(args.hetcomp_job).is_file() else None
    store = open_source(job.source)
    b = job.blocks
    plan = store.ensure_plan(b.base_fraction, b.incremental, b.split, job.seed)
    n_blocks = plan.num_blocks if args.blocks is None else min(args.blocks, plan.num_blocks)

    teachers = {model_key("teacher", t.name): Learner(t, job.seed) for t in job.teachers}
    students = {name: (Learner(job.student, job.seed), spec, names)
                for name, (spec, names) in variants(job, hetcomp_job).items()}
    h, u = (hetcomp_job or job).distill.hetcomp, job.distill.unkd
    size = max(job.distill.k, job.distill.pool, h.k)
    per_block: dict[str, list[dict]] = defaultdict(list)
    seconds: dict[str, list[float]] = defaultdict(list)
    params: dict[str, int] = {}

    for k in range(n_blocks):
        seen = store.read_blocks(plan.plan_id, k)
        t_block = time.perf_counter()
        for name, t in teachers.items():
            log = t.update(seen, k, trajectory=(h.checkpoints, h.k))
            seconds[name].append(log["seconds"])
        knowledge = {n: t.knowledge(seen, k, size, unkd_groups=u.groups, per_group=u.per_group,
                                    observed=h.observed) for n, t in teachers.items()}
        for name, (learner, spec, names) in students.items():
            chosen = [knowledge[n] for n in (names if names is not None else teachers)]
            log = learner.update(seen, k, chosen, spec)
            seconds[name].append(log["seconds"])
        popularity = item_counts(seen)
        groups = item_popularity_groups(popularity)
        relevant, exclude = eval_sets(seen, k)
        models = {**{n: t.model for n, t in teachers.items()}, **{n: s[0].model for n, s in students.items()}}
        for t in teachers.values():
            t.observe(seen)
        models["ensemble (rank fusion)"] = RankFusionEnsemble([t.model for t in teachers.values()], exclude=exclude)
        for name, model in models.items():
            m = evaluate_ranking(model, relevant, exclude, job.eval.ks, job.eval.chunk_size,
                                 item_popularity=popularity, item_group=groups)
            per_block[name].append(m)
            params[name] = sum(p.numel() for p in model.parameters())
        line = "  ".join(f"{n.split(' + ')[-1]}={per_block[n][-1]['ndcg@20']:.4f}" for n in models)
        print(f"block {k} ({time.perf_counter() - t_block:.0f}s): {line}", flush=True)

    # stability: the final models on the test part of every block (CCD's view of forgetting)
    final = {}
    for name, model in models.items():
        scores = []
        for j in range(n_blocks):
            relevant, exclude = eval_sets(seen, j)
            if isinstance(model, RankFusionEnsemble):  # its members rank with this block's mask
                model = RankFusionEnsemble(model.members, exclude=exclude)
            scores.append(evaluate_ranking(model, relevant, exclude, ks=(20,))["ndcg@20"])
        final[name] = sum(scores) / len(scores)
    incr = slice(1, None) if n_blocks > 1 else slice(None)
    rows = {}
    for name, blocks in per_block.items():
        use = blocks[incr]
        rows[name] = {key: sum(m[key] for m in use) / len(use) for key in KEYS}
        rows[name]["parameters"] = params[name]
        rows[name]["seconds_per_block"] = (sum(seconds[name][incr]) / len(seconds[name][incr])) if seconds[name] else None
        rows[name]["per_block_ndcg@20"] = [m["ndcg@20"] for m in blocks]
        rows[name]["final_all_blocks_ndcg@20"] = final[name]
    head = (f"{'model':<34} {'NDCG@20':>8} {'Recall@20':>9} {'tail R@20':>9} {'avg pop':>8} {'cover@20':>8} "
            f"{'params':>10} {'s/block':>7} {'final@all':>9}")
    print(f"\nmean over incremental blocks 1..{n_blocks - 1} (full ranking, test part of each block)")
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        secs = f"{r['seconds_per_block']:.1f}" if r["seconds_per_block"] is not None else "—"
        print(f"{name:<34} {r['ndcg@20']:>8.4f} {r['recall@20']:>9.4f} {r['recall@20/tail']:>9.4f} "
              f"{r['avgpop@20']:>8.1f} {r['coverage@20']:>8.3f} {r['parameters']:>10,} {secs:>7} "
              f"{r['final_all_blocks_ndcg@20']:>9.4f}")
    print(f"reproduce: python bench/multi_teacher.py {args.job}" + (f" --blocks {args.blocks}" if args.blocks else ""))
    if args.json:
        args.json.write_text(json.dumps({"job": args.job, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
