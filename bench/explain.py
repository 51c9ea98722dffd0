"""Structured-knowledge distillation and explanations on MovieLens-100K (jobs/explain.yaml).

    python bench/explain.py [--store stores/ml-100k-kg] [--blocks 6] [--users 50] [--json PATH]
                            [--rationale-weight 0.05] [--no-rationale | --only-rationale]

Runs the job's stream in one process three times with the same seed and plan: the student with SKD (RRD + SKD
from the path teacher, as in the job), without it (RRD only), and with SKD + rationale distillation (the
``rationale`` term added: the student's item embeddings predict each film's rationale embedding,
distill/rationale.py). Prints per block the student's test NDCG@20 (and the path teacher's), then, on the
last block's models: explanation faithfulness over every
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
    plan = store.ensure_plan(b.base_fraction, b.incremental, b.plan_split, job.seed)
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
    ap.add_argument("--rationale-weight", type=float, default=0.05, help="weight of the rationale term")
    ap.add_argument("--rationale-dim", type=int, default=64, help="LSA components of the rationale embedding")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--no-rationale", action="store_true", help="skip the run with rationale distillation")
    which.add_argument("--only-rationale", action="store_true",
                       help="only the runs with SKD, with and without the rationale term (not the one without SKD)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    store = open_store(args.store)
    job = load_job(ROOT / "jobs/explain.yaml")
    spec = job.to_dict()
    spec["source"]["store"] = str(args.store)
    with_skd = parse_job(spec, "jobs/explain.yaml")
    rationale = {"name": "rationale", "weight": args.rationale_weight, "dim": args.rationale_dim}
    spec["distill"]["terms"] = [*job.to_dict()["distill"]["terms"], rationale]
    with_rationale = parse_job(spec, "jobs/explain.yaml (+ rationale)")
    spec["distill"]["terms"] = [t for t in job.to_dict()["distill"]["terms"] if t["name"] != "skd"]
    without = parse_job(spec, "jobs/explain.yaml (no SKD)")
    print(f"store {args.store}: {kg_status(store)}")

    plan = [("with SKD", "skd", with_skd)]
    if not args.only_rationale:
        plan.append(("without SKD", "no_skd", without))
    if not args.no_rationale:
        plan.append(("with SKD + rationale", "skd_rationale", with_rationale))
    runs = {}
    for label, key, j in plan:
        results, learners, seen, seconds = run(j, store, args.blocks)
        runs[key] = (results, learners, seen, seconds)
        print(f"{label}: {len(results)} blocks in {seconds:.0f}s")

    columns = [(key, head) for key, head in (("skd", "student + SKD"), ("no_skd", "student, no SKD"),
                                             ("skd_rationale", "student + SKD + rationale")) if key in runs]
    columns.append(("teacher", "path teacher"))
    report: dict = {"blocks": {}, "mean": {}, "seconds": {key: runs[key][3] for key in runs},
                    "rationale": rationale if "skd_rationale" in runs else None}
    print("\n" + " | ".join([f"{'block':>5}", *(f"{head:>{len(head)}}" for _, head in columns)]) + "   (test NDCG@20)")
    for k in range(len(runs["skd"][0])):
        row = {key: runs[key][0][k].metrics["student"]["ndcg@20"] for key, _ in columns if key != "teacher"}
        row["teacher"] = runs["skd"][0][k].metrics["teacher:path"]["ndcg@20"]
        report["blocks"][k] = row
        print(" | ".join([f"{k:>5}", *(f"{row[key]:>{len(head)}.4f}" for key, head in columns)]))
    for key, _ in columns:
        report["mean"][key] = float(np.mean([r[key] for r in report["blocks"].values()]))
    print(" | ".join([f"{'mean':>5}", *(f"{report['mean'][key]:>{len(head)}.4f}" for key, head in columns)]))

    # faithfulness and the cost of --explain, on the last block's models (with SKD)
    _, learners, seen, _ = runs["skd"]
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
        if it.get("rationale"):
            print(f"    about it: {it['rationale']['text']}")
            for sf in it["rationale"]["shared"]:
                print(f"    shared with your {', '.join(sf['with'])}: {sf['fact']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
