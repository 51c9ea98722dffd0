"""Training throughput of an MF-16 student with each KD term vs plain BPR, on MovieLens-100K-sized data.

    OMP_NUM_THREADS=1 python bench/kd_terms_speed.py [--epochs 20] [--terms bpr,rd,cd,de,rrd] [--threads 1]
                                                    [--de-hard-tau T]

943 users × 1682 items, 79,619 training rows drawn with a power-law item popularity (seeded; the size
of the head-to-head split's training part). A BPR-MF dim-128 teacher is trained briefly (only its
lists and vectors matter here), then the student is trained for ``--epochs`` epochs per term with the
term's defaults (batch 1024, the library's one training loop) and the table reports training rows
per second averaged over those epochs (KD included; DE's early soft-mixture epochs and its later
routed ones in their annealing proportion).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from continual_kd.config import TERM_SPECS, TrainSpec
from continual_kd.continual.training import train_epochs
from continual_kd.distill.base import TermContext, build_terms
from continual_kd.eval.metrics import top_k_items
from continual_kd.models import build_backbone
from continual_kd.sparse import UserItemSet
from continual_kd.types import Knowledge

USERS, ITEMS, ROWS = 943, 1682, 79_619


def synthetic_pairs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, ITEMS + 1) ** 0.8
    pop /= pop.sum()
    users = rng.integers(0, USERS, ROWS * 2)
    items = rng.choice(ITEMS, ROWS * 2, p=pop)
    keys = np.unique(users * ITEMS + items)[: ROWS]
    rng.shuffle(keys)
    return torch.as_tensor(keys // ITEMS), torch.as_tensor(keys % ITEMS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--terms", default="bpr,rd,cd,de,rrd")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--de-hard-tau", type=float, default=None, help="DE's hard_tau (default: the spec's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    users, items = synthetic_pairs()
    known = UserItemSet(users, items, USERS, ITEMS)
    spec = TrainSpec()
    teacher = build_backbone("mf", USERS, ITEMS, dim=128)
    train_epochs(teacher, users, items, known, 5, spec, torch.Generator().manual_seed(1))
    block_users = torch.unique(users)
    with torch.no_grad():
        top, scores = top_k_items(teacher, block_users, ITEMS - 1, known)
        u_vec, i_vec = teacher.embeddings()
    knowledge = Knowledge("teacher", 0, block_users.numpy(), top.numpy(), scores.float().numpy(),
                          user_vectors=u_vec[block_users].detach().numpy(), item_vectors=i_vec.detach().numpy())
    print(f"{len(users):,} rows, {USERS} users, {ITEMS} items; student MF-16, {args.epochs} epochs, "
          f"{args.threads} thread(s), batch {spec.batch_size}")
    base = None
    for name in args.terms.split(","):
        student = build_backbone("mf", USERS, ITEMS, dim=16)
        terms = []
        if name != "bpr":
            ctx = TermContext(student, [knowledge], known, USERS, ITEMS, block=0, epochs=args.epochs)
            options = {"hard_tau": args.de_hard_tau} if name == "de" and args.de_hard_tau is not None else {}
            terms = build_terms([TERM_SPECS[name](**options)], ctx)
        t0 = time.perf_counter()
        train_epochs(student, users, items, known, args.epochs, spec, torch.Generator().manual_seed(2), terms)
        seconds = time.perf_counter() - t0
        rate = len(users) * args.epochs / seconds
        base = base or rate
        print(f"{name:>5}: {rate:>10,.0f} rows/s  ({seconds / args.epochs:.3f} s/epoch, {rate / base:.2f}× BPR)")


if __name__ == "__main__":
    main()
