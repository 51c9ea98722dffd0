"""Structured-knowledge distillation and explanations on MovieLens-100K (jobs/explain.yaml).

    python bench/explain.py [--store stores/ml-100k-kg] [--blocks 6] [--users 50] [--json PATH]

Runs the job's stream in one process twice with the same seed and plan: the student with SKD (RRD + SKD
from the path teacher, as in the job) and without it (RRD only). Prints per block the student's test
NDCG@20 (and the path teacher's), then, on the last block's models: explanation faithfulness over every
user with training data (top-10 of the student; how often removing the cited rating lowers the path score
more than removing a random one, and the mean drops) and the cost of ``--explain`` per user (one user
at a time, as ``ckd recommend`` serves: recommendation alone vs recommendation + reasons in words).
The store is built (ratings + item knowledge) when missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continual_kd.config import load_job, parse_job  # noqa: E402
from continual_kd.continual.loop import make_learners, run_stream_local  # noqa: E402
from continual_kd.eval import known_pairs, top_k_items  # noqa: E402
from continual_kd.explain.faithfulness import faithfulness  # noqa: E402
from continual_kd.explain.service import explain_recommendations, path_model_of  # noqa: E402
from continual_kd.stream import StreamStore  # noqa: E402
from continual_kd.stream.kg import kg_status  # noqa: E402
from continual_kd.types import TRAIN  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def open_store(path: Path) -> StreamStore:
    if not (path / "catalog.duckdb").exists():
        from continual_kd.data.movielens_kg import add_movielens_kg
        from continual_kd.data.sources import build_store

        store, _ = build_store("movielens-100k", path)
        add_movielens_kg(store)
    store = StreamStore.open(path)
    if kg_status(store)["triples"] == 0:
        from continual_kd.data.movielens_kg import add_movielens_kg

        add_movielens_kg(store)
    return store


def run(job, store: StreamStore, blocks: int):
    b = job.blocks
    plan = store.ensure_plan(b.base_fraction, b.incremental, b.split, job.seed)
    blocks = min(blocks, plan.num_blocks)
    learners = make_learners(job)
    t0 = time.perf_counter()
    results = run_stream_local(job, lambda k: store.read_blocks(plan.plan_id, k), blocks, learners=learners)
    return results, learners, store.read_blocks(plan.plan_id, blocks - 1), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=ROOT / "stores/ml-100k-kg")
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--users", type=int, default=50, help="users timed one by one for the cost of --explain")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    store = open_store(args.store)
    job = load_job(ROOT / "jobs/explain.yaml")
    spec = job.to_dict()
    spec["source"]["store"] = str(args.store)
    with_skd = parse_job(spec, "jobs/explain.yaml")
    spec["distill"]["terms"] = [t for t in spec["distill"]["terms"] if t["name"] != "skd"]
    without = parse_job(spec, "jobs/explain.yaml (no SKD)")
    print(f"store {args.store}: {kg_status(store)}")

    runs = {}
    for label, j in (("with SKD", with_skd), ("without SKD", without)):
        results, learners, seen, seconds = run(j, store, args.blocks)
        runs[label] = (results, learners, seen, seconds)
        print(f"{label}: {len(results)} blocks in {seconds:.0f}s")

    report: dict = {"blocks": {}, "mean": {}}
    print(f"\n{'block':>5} | {'student + SKD':>13} | {'student, no SKD':>15} | {'path teacher':>12}   (test NDCG@20)")
    for k in range(len(runs["with SKD"][0])):
        a = runs["with SKD"][0][k].metrics
        c = runs["without SKD"][0][k].metrics
        row = {"skd": a["student"]["ndcg@20"], "no_skd": c["student"]["ndcg@20"], "teacher": a["teacher:path"]["ndcg@20"]}
        report["blocks"][k] = row
        print(f"{k:>5} | {row['skd']:>13.4f} | {row['no_skd']:>15.4f} | {row['teacher']:>12.4f}")
    for key in ("skd", "no_skd", "teacher"):
        report["mean"][key] = float(np.mean([r[key] for r in report["blocks"].values()]))
    m = report["mean"]
    print(f" mean | {m['skd']:>13.4f} | {m['no_skd']:>15.4f} | {m['teacher']:>12.4f}")

    # faithfulness and the cost of --explain, on the last block's models (with SKD)
    _, learners, seen, _ = runs["with SKD"]
    known = known_pairs(seen)
    student = learners["student"].model
    student.observe(known.users, known.items)
    path, _ = path_model_of(learners, seen)
    path.observe(known.users, known.items)
    path.set_item_graph(seen.meta.get("item_graph"))
    users = torch.as_tensor(np.unique(seen.users[seen.split == TRAIN]))
    recs, _ = top_k_items(student, users, 10, known)
    t = time.perf_counter()
    f = faithfulness(path, users, recs, torch.Generator().manual_seed(0))
    f["seconds"] = time.perf_counter() - t
    report["faithfulness"] = f
    print(f"\nfaithfulness over {f['cases']:,} (user, recommended film) cases: removing the cited rating lowers the "
          f"path score more than removing a random one in {f['cited_wins']:.1%} (mean drop {f['cited_drop']:.4f} vs "
          f"{f['random_drop']:.4f}; {f['seconds']:.2f}s)")

    timed = users[: args.users].numpy()
    plain, explained = [], []
    for u in timed:  # one user at a time, as `ckd recommend --user U` serves
        t = time.perf_counter()
        top_k_items(student, torch.as_tensor([u]), 10, known)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        explain_recommendations(learners, store, seen, np.array([u]), 10)
        explained.append(time.perf_counter() - t)
    report["cost_ms_per_user"] = {"recommend": 1000 * float(np.median(plain)),
                                  "recommend_explain": 1000 * float(np.median(explained))}
    c = report["cost_ms_per_user"]
    print(f"cost per user (median of {len(timed)}, top-10): recommend {c['recommend']:.1f} ms, recommend --explain "
          f"{c['recommend_explain']:.1f} ms (reasons, words from the catalog, faithfulness check)")
    sample = explain_recommendations(learners, store, seen, users[:1].numpy(), 3)
    for it in sample["users"][0]:
        print(f"  {it['title']}: " + " | ".join(r["text"] for r in it["reasons"][:2]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
