"""Memory and time of RRD's per-block targets at a large shape (issue 12): the pool kept as sorted keys
(``sparse.ListSet``, past ``distill.rrd.LEAN_POOL_PAIRS``) against the full exclusion set + complement sampler.

    python bench/rrd_memory.py            # both paths, each in its own process: 250k users × pool 500, 300k × 100k

Prints, per path, the process's peak RSS before and after building the targets and one resample, and the
seconds of each (one torch thread). The knowledge lists are random (not distinct in a row: memory and time
are what is measured).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(path: str, users_k: int = 250_000, num_users: int = 300_000, num_items: int = 100_000, pool: int = 500,
            observed: int = 4_000_000) -> str:
    import torch

    import continual_kd.distill.rrd as rrd
    from continual_kd.distill import RRDConfig, RRDTargets
    from continual_kd.sparse import UserItemSet

    torch.set_num_threads(1)
    if path == "full":
        rrd.LEAN_POOL_PAIRS = 1 << 62
    g = torch.Generator().manual_seed(0)
    known = UserItemSet(torch.randint(0, num_users, (observed,), generator=g),
                        torch.randint(0, num_items, (observed,), generator=g), num_users, num_items)
    users = torch.randperm(num_users, generator=g)[:users_k]
    items = torch.randint(0, num_items, (users_k, pool), generator=g)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    t0 = time.perf_counter()
    targets = RRDTargets(RRDConfig(k=40, pool=pool, uninteresting=40), users, items, known, num_users, num_items)
    t1 = time.perf_counter()
    targets.resample(g)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return (f"{path:5s} {users_k:,} users × pool {pool}: peak RSS {before:.2f} → {peak:.2f} GB (+{peak - before:.2f}), "
            f"build {t1 - t0:.1f} s, one resample {t2 - t1:.1f} s")


def main() -> None:
    if len(sys.argv) > 1:
        print(measure(sys.argv[1]), flush=True)
        return
    for path in ("lean", "full"):
        subprocess.run([sys.executable, __file__, path], check=True)
    print("reproduce: python bench/rrd_memory.py")


if __name__ == "__main__":
    main()
