"""Scale on one machine (issue 12): seconds per stage of an incremental block as the stream grows.

    python bench/scale.py [--sizes 0.1M,1M,3M,10M] [--fixed 0.3M,1M,3M] [--threads 1] [--json out.json]
    python bench/scale.py --upkeep 1M,10M     # only the known-pair / eval-set upkeep per block, no training
    python bench/scale.py --sizes 1M,10M --device cuda --threads 16   # the models on a CUDA GPU
    python bench/scale.py --sizes 1M --device cuda --gpu-chunks cpu    # ... with chunks sized as on the CPU

The job of the issue's measurement: one MF-64 teacher → an MF-8 student with RRD (k 40, pool 500),
3 epochs per block, a base block of 50% + 3 incremental blocks, on `ckd data synthetic` streams
(built once under --stores, reused). The stages run in this process (``continual.stages`` on the
``InProcessExecutor``: the code the Ray actors run), then each block's snapshot is written and the block
committed in the store's catalog as ``ckd submit`` does. Printed per stream:

  stream sizes (users × items, rows per incremental block, seconds to build the stream),
  seconds per incremental block of every stage (mean over blocks 1..3): update teachers, teacher
  knowledge, update student, evaluate, snapshot, commit; rows/s of the updates (block rows × epochs /
  update s: per-epoch validation included) and of training alone (pairs stepped, replay included, over
  the epochs' training seconds, KD terms' resampling included);
  the process's memory peak (RSS high-water mark, and above the RSS before the stream was read; on
  ``--device cuda`` also the GPU's peak of allocated memory);
  the knowledge and evaluation calls again on the final models beside a bare ``matmul + topk`` over the
  same users, items and chunks (no masks, no metrics): the floor they are measured against.

``--sizes``: streams whose users × items grow with the interactions (the issue's sizes: 0.1M 5k × 2k,
1M 50k × 20k, 3M 150k × 60k, 10M 300k × 100k). ``--fixed``: 50k × 20k users × items while the
interactions grow (separates the cost of the rows from the cost of scoring every item).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import continual_kd  # noqa: E402,F401  (before torch: huge pages for its large buffers, as in `ckd`)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from continual_kd.config import SyntheticSpec, parse_job  # noqa: E402
from continual_kd.continual import make_learners  # noqa: E402
from continual_kd.continual.loop import run_block_local  # noqa: E402
from continual_kd.data.sources import build_store, source_plan  # noqa: E402
from continual_kd.eval import metrics  # noqa: E402
from continual_kd.eval.metrics import evaluate_ranking, top_k_items, users_per_chunk  # noqa: E402
from continual_kd.stream.store import StreamStore  # noqa: E402
from continual_kd.types import TEST, TRAIN  # noqa: E402

SIZES = {"0.1M": (5_000, 2_000, 100_000), "1M": (50_000, 20_000, 1_000_000),
         "3M": (150_000, 60_000, 3_000_000), "10M": (300_000, 100_000, 10_000_000)}
FIXED_USERS, FIXED_ITEMS = 50_000, 20_000
STAGES = ["update teachers", "teacher knowledge", "update student", "evaluate", "snapshot", "commit"]


def rows_of(label: str) -> int:
    return int(float(label.rstrip("M")) * 1_000_000)


class MemoryPeak:
    """RSS of this process sampled every 0.2 s (and the kernel's high-water mark)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def job_for(store: Path, runs: Path, optimizer: str = "lazy_adam"):
    # lazy_adam: row-sparse Adam steps (a step costs the batch's rows, not the 300k × 64 tables)
    train = {"epochs_base": 3, "epochs_block": 3, "lr": 0.005, "batch_size": 1024, "optimizer": optimizer}
    return parse_job({
        "name": f"scale-{runs.name}", "seed": 0, "source": {"dataset": "store", "store": str(store)},
        "blocks": {"base_fraction": 0.5, "incremental": 3, "split": [0.8, 0.1, 0.1]},
        "teachers": [{"name": "mf64", "backbone": "mf", "dim": 64, "train": {**train, "weight_decay": 0.01}}],
        "student": {"name": "student", "backbone": "mf", "dim": 8, "train": {**train, "weight_decay": 0.0001}},
        "distill": {"terms": [{"name": "rrd", "weight": 0.01, "k": 40, "pool": 500, "uninteresting": 40}]},
        "eval": {"ks": [10, 20, 50]}, "snapshots": {"dir": str(runs), "keep_last": 0}})


def ensure_stream(root: Path, users: int, items: int, rows: int) -> tuple[StreamStore, float]:
    path = root / f"synthetic-{users}x{items}-{rows}"
    t0 = time.perf_counter()
    if (path / "catalog.duckdb").is_file():  # built by an earlier run: read as it is (a top-up regenerates the stream)
        return StreamStore.open(path), float("nan")
    store, _ = build_store("synthetic", path, SyntheticSpec(users=users, items=items, interactions=rows))
    return store, time.perf_counter() - t0


def bare_topk(model, users: torch.Tensor, k: int) -> float:
    """Seconds of (U_chunk @ Iᵀ).topk(k) over ``users`` in the chunks top_k_items uses: the floor."""
    u_all, i_all = model.embeddings()
    step = users_per_chunk(model.num_items, device=u_all.device)
    users = users.to(u_all.device)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(users), step):
            torch.topk(u_all[users[start:start + step]] @ i_all.T, k, dim=1)
    sync()
    return time.perf_counter() - t0


def sync() -> None:
    """Wait for queued CUDA work, so that a timer stops when the work is done (no-op on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def floor_check(learner, seen, block: int, size: int) -> dict:
    """The teacher's knowledge call and one evaluation, each beside the bare matmul + topk of its users."""
    users = learner._users(seen, block)
    known = learner.pairs.known(seen, block)
    sync()
    t0 = time.perf_counter()
    top_k_items(learner.model, users, size, known)
    sync()
    knowledge = time.perf_counter() - t0
    relevant, hidden = learner.pairs.eval_sets(seen, block, TEST)
    t0 = time.perf_counter()
    evaluate_ranking(learner.model, relevant, hidden, (10, 20, 50), users_per_chunk(learner.model.num_items,
                     device=learner.device), device=learner.device, keep_relevant=True)  # the bare call's chunks
    sync()
    evaluation = time.perf_counter() - t0
    eval_users = torch.nonzero(relevant.degree > 0).flatten()
    return {"knowledge_users": len(users), "knowledge_s": knowledge, "knowledge_bare_s": bare_topk(learner.model, users, size),
            "eval_users": len(eval_users), "eval_s": evaluation, "eval_bare_s": bare_topk(learner.model, eval_users, 50),
            "chunk_users": users_per_chunk(learner.model.num_items, device=learner.device)}


def run_stream(label: str, users: int, items: int, rows: int, root: Path, floor: bool = True,
               optimizer: str = "lazy_adam", device: str = "cpu") -> dict:
    from continual_kd.manifest import block_manifest, block_results, manifest_digest
    from continual_kd.snapshots import write_snapshot

    store, build_s = ensure_stream(root, users, items, rows)
    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=root))
    job = job_for(store.root, runs, optimizer)
    plan = source_plan(store, job)
    learners = make_learners(job, device)
    out = {"stream": label, "users": users, "items": items, "interactions": rows, "build_s": build_s,
           "device": device, "blocks": [], "rss_before": MemoryPeak.rss()}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    history = []
    with MemoryPeak() as mem:
        for k in range(plan.num_blocks):
            t0 = time.perf_counter()
            seen = store.read_blocks(plan.plan_id, k)
            read_s = time.perf_counter() - t0
            res = run_block_local(job, seen, k, learners, previous_valid=history[-1]["valid"] if history else None)
            stages = {"read": read_s, **res.stages}
            states = {n: lr.state() for n, lr in learners.items()}
            entry = {"block": k, "metrics": res.metrics, "valid": res.valid, "continual": res.continual,
                     "seconds": res.seconds, "stages": res.stages,
                     "updates": {n: u.get("seconds") for n, u in res.updates.items()}}
            history.append(entry)
            t0 = time.perf_counter()
            manifest = block_manifest(job, plan, store, k, states, res, history)
            snap = write_snapshot(runs, k, {n: s["weights"] for n, s in states.items()}, manifest)
            stages["snapshot"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            store.commit_block(job.name, job.config_hash(), plan.plan_id, k, manifest["rows_covered"], str(snap.path),
                               manifest_digest(snap.path), results=block_results(entry))
            stages["commit"] = time.perf_counter() - t0
            block_rows = int(((seen.block == k) & (seen.split == TRAIN)).sum())
            rate = {n: u["train_rows"] * u["epochs"] / u["seconds"] for n, u in res.updates.items()
                    if u.get("seconds") and u.get("epochs")}
            # training alone: the pairs stepped (replay included) over the epochs' training seconds (KD terms'
            # resampling included; not the per-epoch validation of best-epoch choice)
            train_rate = {n: u["trained_rows"] / u["train_seconds"] for n, u in res.updates.items()
                          if u.get("train_seconds")}
            valid_s = {n: u["seconds"] - u.get("train_seconds", 0.0) for n, u in res.updates.items() if u.get("seconds")}
            out["blocks"].append({"block": k, "rows": int((seen.block == k).sum()), "train_rows": block_rows,
                                  "stages": stages, "rows_per_s": rate, "train_rows_per_s": train_rate,
                                  "update_other_s": valid_s,
                                  "ndcg@20": {n: m.get("ndcg@20") for n, m in res.metrics.items()}})
            print(f"  {label} block {k}: {sum(stages.values()):7.1f}s  "
                  + "  ".join(f"{s} {v:.2f}" for s, v in stages.items()), flush=True)
        teacher = next(n for n in learners if n.startswith("teacher:"))
        if floor:
            out["floor"] = floor_check(learners[teacher], seen, plan.num_blocks - 1, 500)
    out["peak_rss"] = max(mem.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if device == "cuda":
        out["gpu_peak"] = torch.cuda.max_memory_allocated()
    return out


def upkeep(label: str, users: int, items: int, rows: int, blocks: int = 4, seed: int = 0) -> dict:
    """Seconds per incremental block of what a model derives from the pairs it has seen, as one Learner asks
    for it in a block (observe ×3: update, knowledge, evaluate; item counts; the evaluation sets of blocks
    ≤ k, pooled, and valid k): rebuilt from all history by the ``eval.protocol`` functions (before issue
    12) vs kept in a ``PairState`` and extended with the block's rows. Uniform random ids, no training."""
    from continual_kd.continual.learner import item_counts
    from continual_kd.continual.pairs import PairState
    from continual_kd.eval.protocol import eval_sets, model_pairs, training_popularity
    from continual_kd.types import VALID, Interactions

    rng = np.random.default_rng(seed)
    sizes = [rows // 2] + [(rows - rows // 2) // (blocks - 1)] * (blocks - 1)
    parts, seens = [], []
    for b, n in enumerate(sizes):
        grow = (b + 1) / blocks
        u, i = rng.integers(0, int(users * grow), n), rng.integers(0, int(items * grow), n)
        split = rng.choice(np.array([TRAIN, VALID, TEST], np.int8), n, p=[0.8, 0.1, 0.1])
        parts.append(Interactions(u, i, np.zeros(n, np.int64), np.ones(n, np.float32), np.full(n, b, np.int16), split,
                                  int(users * grow), int(items * grow)))
        seens.append(Interactions.concat(parts))

    def scratch(seen, k):
        for _ in range(3):
            model_pairs(seen, k)
        item_counts(seen), training_popularity(seen)
        for b in [*range(k + 1), None]:
            eval_sets(seen, b, TEST)
        eval_sets(seen, k, VALID)

    state = PairState()

    def kept(seen, k):
        for _ in range(3):
            state.known(seen, k)
        state.item_counts(seen, k), state.popularity(seen)
        for b in [*range(k + 1), None]:
            state.eval_sets(seen, b, TEST)
        state.eval_sets(seen, k, VALID, exact=True)

    out = {"stream": label, "rows": rows, "users": users, "items": items, "scratch": [], "kept": []}
    for k, seen in enumerate(seens):
        for name, fn in (("scratch", scratch), ("kept", kept)):
            t0 = time.perf_counter()
            fn(seen, k)
            out[name].append(time.perf_counter() - t0)
    print(f"  upkeep {label} ({users // 1000}k × {items // 1000}k): seconds per block, rebuilt / kept: "
          + "  ".join(f"{k}: {a:.2f} / {b:.2f}" for k, (a, b) in enumerate(zip(out["scratch"], out["kept"]))), flush=True)
    return out


def summary(r: dict) -> dict:
    inc = r["blocks"][1:]
    stages = {s: float(np.mean([b["stages"].get(s, 0.0) for b in inc])) for s in ["read", *STAGES]}
    rate = {n: float(np.mean([b["rows_per_s"].get(n, np.nan) for b in inc])) for n in inc[0]["rows_per_s"]}
    train = {n: float(np.mean([b.get("train_rows_per_s", {}).get(n, np.nan) for b in inc]))
             for n in inc[0].get("train_rows_per_s", {})}
    return {"rows_per_block": int(np.mean([b["rows"] for b in inc])), "stages": stages,
            "block_s": sum(stages.values()), "rows_per_s": rate, "train_rows_per_s": train}


def print_table(results: list[dict]) -> None:
    head = ["stream", "users × items", "rows/block", "build s"] + ["read", *STAGES] + [
        "block s", "teacher rows/s", "student rows/s", "teacher training rows/s", "student training rows/s",
        "peak GB", "+GB", "GPU peak GB"]
    print("\n| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for r in results:
        s = summary(r)
        rate = list(s["rows_per_s"].values())
        train = list(s["train_rows_per_s"].values()) or [float("nan")]
        cells = [r["stream"], f"{r['users'] // 1000}k × {r['items'] // 1000}k", f"{s['rows_per_block']:,}",
                 f"{r['build_s']:.0f}"] + [f"{s['stages'][x]:.2f}" for x in ["read", *STAGES]] + [
            f"{s['block_s']:.1f}", f"{rate[0]:,.0f}", f"{rate[-1]:,.0f}", f"{train[0]:,.0f}", f"{train[-1]:,.0f}",
            f"{r['peak_rss'] / 2**30:.2f}",
            f"{(r['peak_rss'] - r['rss_before']) / 2**30:.2f}",
            f"{r['gpu_peak'] / 2**30:.2f}" if "gpu_peak" in r else "–"]
        print("| " + " | ".join(cells) + " |")
    print("\nknowledge (teacher top-500 of the last block's users) and evaluation (its test users, top-50) on the "
          "final teacher, beside a bare matmul + topk over the same users and chunks:")
    for r in results:
        if "floor" not in r:
            continue
        f = r["floor"]
        print(f"  {r['stream']:>6s}: chunk {f['chunk_users']} users; knowledge {f['knowledge_users']:,} users "
              f"{f['knowledge_s']:.2f}s vs bare {f['knowledge_bare_s']:.2f}s ({f['knowledge_s'] / f['knowledge_bare_s']:.2f}×); "
              f"evaluation {f['eval_users']:,} users {f['eval_s']:.2f}s vs bare {f['eval_bare_s']:.2f}s "
              f"({f['eval_s'] / f['eval_bare_s']:.2f}×)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.1M,1M", help="streams whose users × items grow: " + ",".join(SIZES))
    ap.add_argument("--fixed", default="", help=f"streams of {FIXED_USERS // 1000}k × {FIXED_ITEMS // 1000}k with these "
                                                "interactions, e.g. 0.3M,1M,3M")
    ap.add_argument("--stores", default=os.environ.get("CKD_SCALE_STORES", "/tmp/ckd-scale"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-floor", action="store_true", help="skip the bare matmul + topk comparison")
    ap.add_argument("--optimizer", default="lazy_adam", choices=("lazy_adam", "adam"),
                    help="the models' train.optimizer (adam: dense steps over the whole tables)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where the models train and score (the stream's store work stays on the CPU)")
    ap.add_argument("--gpu-chunks", default="free", choices=("free", "cpu"),
                    help="on --device cuda, chunks of users sized by the GPU's free memory (the default) or by the "
                         "CPU's 256 MB budget (as before session 21: the comparison)")
    ap.add_argument("--upkeep", default="", help="only the pair-state upkeep per block (no training) at these sizes, "
                                                 "e.g. 1M,10M: rebuilt from history vs kept and extended")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device cuda: this torch ({torch.__version__}) sees no CUDA device")
    if args.gpu_chunks == "cpu":
        metrics.CUDA_SCORE_SHARE = 0.0  # cuda_budget_mb falls back to the CPU's budget
    root = Path(args.stores)
    root.mkdir(parents=True, exist_ok=True)
    if args.upkeep:
        found = [upkeep(label, *SIZES[label]) for label in args.upkeep.split(",") if label]
        if args.json:
            Path(args.json).write_text(json.dumps(found, indent=1))
        return
    results = []
    def save():
        if args.json:  # after every stream: a long run keeps what it finished
            Path(args.json).write_text(json.dumps(results, indent=1, default=float))

    for label in [s for s in args.sizes.split(",") if s]:
        results.append(run_stream(label, *SIZES[label], root, not args.no_floor, args.optimizer, args.device))
        save()
    for label in [s for s in args.fixed.split(",") if s]:
        results.append(run_stream(f"{label} fixed", FIXED_USERS, FIXED_ITEMS, rows_of(label), root, not args.no_floor,
                                  args.optimizer, args.device))
        save()
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
