"""What one new live block costs as the store grows: the cut, the block's read and its commit, at block 10 vs 200.

    python bench/live_cut.py [--days 202] [--rows 2000] [--dir /tmp/ckd-live-cut] [--json out.json] [--ingest-only]

A generated stream arrives one day per ingest (``--rows`` interactions a day, ~2% of them late rows of the day
before, users and items drawn from pools that grow every day); after each ingest the live plan (``blocks:
{window: 1d}``) is advanced as ``ckd submit --follow`` does, the new block is read (``read_block``) and committed
(``commit_block``, which fingerprints the block's rows). Per block: seconds and the segment files / rows handed
to a reader (``stream.segments.READS``) of each step, and the ingest's seconds and files / rows read (its check
for duplicates of stored rows). The summary is the mean over blocks 8–12 and over the last 5 blocks, and over
ingests 8–12 and the last 5 ingests; ``--ingest-only`` runs the ingests alone (no plan, cut, read or commit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from continual_kd.stream import StreamStore
from continual_kd.stream.live import LivePolicy
from continual_kd.stream.segments import READS

DAY = 86400
T0 = 1_600_000_000 // DAY * DAY


def day_rows(rng: np.random.Generator, day: int, rows: int) -> pa.Table:
    """One day's interactions (+ ~2% late ones of the day before); pools of 300 + 40·day users, 200 + 20·day items."""
    late = rows // 50 if day else 0
    ts = np.concatenate([T0 + day * DAY + rng.integers(0, DAY, rows - late),
                         T0 + (day - 1) * DAY + rng.integers(0, DAY, late)])
    users = np.minimum(rng.zipf(1.3, rows), 300 + 40 * day) - 1 + rng.integers(0, 40 * day + 1, rows) // 7
    items = np.minimum(rng.zipf(1.2, rows), 200 + 20 * day) - 1
    return pa.table({"user": pa.array(np.char.add("u", users.astype(str))),
                     "item": pa.array(np.char.add("i", items.astype(str))), "timestamp": ts})


def measure(step):
    READS.reset()
    start = time.perf_counter()
    out = step()
    return out, {"s": time.perf_counter() - start, "files": READS.files, "rows": READS.rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=202)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--dir", default="/tmp/ckd-live-cut")
    ap.add_argument("--json", default=None)
    ap.add_argument("--ingest-only", action="store_true", help="only the ingests (their cost, no live plan)")
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    store = StreamStore.open(root, create=True)
    policy = LivePolicy(DAY, None, None, None, (0.8, 0.1, 0.1), 0)
    rng = np.random.default_rng(0)
    per_block, per_ingest = [], []
    for day in range(args.days):
        table = day_rows(rng, day, args.rows)
        _, ingest = measure(lambda: store.ingest_table(table, f"day-{day}"))
        per_ingest.append({"ingest": day, **ingest})
        if args.ingest_only:
            print(f"ingest {day:3d}: {ingest['s']:.3f} s {ingest['files']:3d} files {ingest['rows']:7d} rows read",
                  flush=True)
            continue
        before = store.get_plan(per_block[-1]["plan_id"]).num_blocks if per_block else 0
        (plan, _), cut = measure(lambda: store.advance_live_plan(policy))
        for k in range(before, plan.num_blocks):  # one new block a day once day 1 arrived
            _, read = measure(lambda: store.read_block(plan.plan_id, k))
            _, commit = measure(lambda: store.commit_block("bench", "lineage", plan.plan_id, k, 0, f"snap-{k}", "d" * 64))
            per_block.append({"block": k, "plan_id": plan.plan_id, "rows": plan.blocks[k].rows,
                              "stored_rows": plan.total_rows, "ingest_s": ingest["s"], "cut": cut, "read": read,
                              "commit": commit})
            print(f"block {k:3d}: {plan.blocks[k].rows:5d} rows  cut {cut['s']:.3f} s {cut['files']:3d} files "
                  f"{cut['rows']:7d} rows  read {read['s']:.3f} s {read['files']:3d} files  commit {commit['s']:.3f} s "
                  f"{commit['files']:3d} files  (ingest {ingest['s']:.3f} s)", flush=True)
    summary = {}
    for name, chunk in (("ingests 8-12", per_ingest[8:13]), (f"ingests {len(per_ingest) - 5}-{len(per_ingest) - 1}",
                                                             per_ingest[-5:])):
        summary[name] = {key: float(np.mean([i[key] for i in chunk])) for key in ("s", "files", "rows")}
    blocks = [] if args.ingest_only else [("blocks 8-12", per_block[8:13]),
                                          (f"blocks {per_block[-5]['block']}-{per_block[-1]['block']}", per_block[-5:])]
    for name, chunk in blocks:
        summary[name] = {step: {key: float(np.mean([b[step][key] for b in chunk])) for key in ("s", "files", "rows")}
                         for step in ("cut", "read", "commit")}
        summary[name]["ingest_s"] = float(np.mean([b["ingest_s"] for b in chunk]))
        summary[name]["stored_rows"] = float(np.mean([b["stored_rows"] for b in chunk]))
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "blocks": per_block, "ingests": per_ingest}, indent=1))


if __name__ == "__main__":
    main()
