"""Speed of a data-parallel teacher: the same job under Ray with the MF teacher on 1 and on 2 Ray Train workers.

    python bench/train_workers.py [--interactions 60000] [--dim 128] [--out bench-out/train-workers]

Prints, per block, the teacher's update wall seconds (with 2 workers: including the worker group's start-up)
and the seconds its workers spent training, the speed-up of each, and the largest metric difference between
the two runs. Each worker and the one-worker actor get 1 CPU (1 torch thread); the embedded Ray is given
4 logical CPUs so the teacher's actor, its 2 workers and the student fit whatever the machine has.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

JOB = """
name: train-workers-{workers}
seed: 0
source:
  dataset: synthetic
  store: {store}
  synthetic: {{users: 2000, items: 1000, interactions: {interactions}, periods: 4, seed: 0}}
blocks: {{base_fraction: 0.5, incremental: 1}}
teachers:
  - name: mf
    backbone: mf
    dim: {dim}
    workers: {workers}
    train: {{epochs_base: 10, epochs_block: 5, batch_size: 1024, select: last}}
    resources: {{num_cpus: 1}}
student:
  dim: 8
  train: {{epochs_base: 1, epochs_block: 1, select: last}}
  resources: {{num_cpus: 0.5}}
eval: {{ks: [20]}}
snapshots: {{dir: {out}/runs-{workers}}}
runtime: {{num_cpus: 4}}
"""


def main() -> None:
    from continual_kd.config import parse_job
    from continual_kd.runtime.coordinator import run_job

    ap = argparse.ArgumentParser()
    ap.add_argument("--interactions", type=int, default=60000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("bench-out/train-workers"))
    args = ap.parse_args()
    runs = {}
    for workers in (1, 2):
        text = JOB.format(workers=workers, store=args.out / "store", interactions=args.interactions, dim=args.dim,
                          out=args.out)
        job = parse_job(yaml.safe_load(text), f"bench/train_workers.py (workers {workers})")
        t0 = time.perf_counter()
        runs[workers] = run_job(job, restart=True)
        print(f"workers {workers}: job {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"{'block':>5} {'1 worker s':>11} {'2 workers s':>12} {'(training)':>11} {'speed-up':>9} {'(training)':>11}")
    for one, two in zip(runs[1].results, runs[2].results):
        a, b = one.updates["teacher:mf"], two.updates["teacher:mf"]
        print(f"{one.block:>5} {a['seconds']:>11.2f} {b['seconds']:>12.2f} {b['worker_seconds']:>11.2f} "
              f"{a['seconds'] / b['seconds']:>9.2f} {a['seconds'] / b['worker_seconds']:>11.2f}")
    diff = max(abs(one.metrics[m][k] - two.metrics[m][k]) for one, two in zip(runs[1].results, runs[2].results)
               for m in one.metrics for k in ("ndcg@20", "recall@20"))
    print(f"largest test-metric difference between the runs: {diff:.2e}")


if __name__ == "__main__":
    main()
