"""Dense Adam against row-sparse Adam (``train.optimizer: lazy_adam``) on MF tables as users × items grow.

    python bench/optimizer.py [--rows 200000] [--dim 64] [--threads 1]

One epoch of BPR-MF (``train_epochs``, batch 1024, uniform negatives) over random pairs on tables of
5k × 2k, 50k × 20k and 300k × 100k users × items (the sizes of bench/scale.py's 0.1M, 1M and 10M
streams); prints training rows/s of each optimizer and their ratio. Dense Adam's step costs the tables
(a full gradient and every row's moments, every step); lazy_adam's costs the batch's rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continual_kd.config import TrainSpec  # noqa: E402
from continual_kd.continual.training import train_epochs  # noqa: E402
from continual_kd.models.mf import BPRMF  # noqa: E402
from continual_kd.sparse import UserItemSet  # noqa: E402

SIZES = [(5_000, 2_000), (50_000, 20_000), (300_000, 100_000)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'users × items':>16s} {'adam rows/s':>12s} {'lazy_adam rows/s':>17s} {'ratio':>6s}")
    for users, items in SIZES:
        g = torch.Generator().manual_seed(0)
        u = torch.randint(0, users, (args.rows,), generator=g)
        i = torch.randint(0, items, (args.rows,), generator=g)
        known = UserItemSet(u.numpy(), i.numpy(), users, items)
        rate = {}
        for optimizer in ("adam", "lazy_adam"):
            torch.manual_seed(0)
            model = BPRMF(users, items, args.dim)
            spec = TrainSpec(optimizer=optimizer, batch_size=1024, lr=0.005)
            t0 = time.perf_counter()
            train_epochs(model, u, i, known, 1, spec, torch.Generator().manual_seed(1), [])
            rate[optimizer] = args.rows / (time.perf_counter() - t0)
        print(f"{f'{users:,} × {items:,}':>16s} {rate['adam']:12,.0f} {rate['lazy_adam']:17,.0f} "
              f"{rate['lazy_adam'] / rate['adam']:5.1f}×")
    print(f"reproduce: python bench/optimizer.py --rows {args.rows} --dim {args.dim} --threads {args.threads}")


if __name__ == "__main__":
    main()
