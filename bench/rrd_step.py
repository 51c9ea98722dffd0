"""Training rows/s of the scale job's student (MF-8 + RRD, ``lazy_adam``) at the 1M and 10M shapes (issue 12).

    python bench/rrd_step.py                 # both shapes, each in its own process, one torch thread
    python bench/rrd_step.py 10M             # one shape
    python bench/rrd_step.py --threads 2     # torch's intra-op threads (both cores of the 2-core box)

One epoch of ``continual.training.train_epochs`` at the shapes of an incremental block of
``bench/scale.py``'s streams: 1M = 50k users × 20k items, 167k block rows from 45k users with teacher
knowledge; 10M = 300k × 100k, 1.67M rows from 283k users. Uniformly random rows and knowledge lists of
500 items (distinct in a row), batch 1024, RRD k 40 / pool 500 / 40 uninteresting items. Printed per
shape: rows/s of the epoch without KD and with RRD (the same model and data; the epoch's resampling,
negatives and steps included), and RRD's per-epoch resample alone. The ratio 10M / 1M is what issue 12's
"training rows/s no lower at 10M than at 1M" asks of the student; the two shapes differ in what the
tables are (5× the items: a batch's ~84k item rows no longer sit in the cache), not in work per row.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"1M": (50_000, 20_000, 45_000, 166_667, 400_000), "10M": (300_000, 100_000, 283_000, 1_666_667, 3_300_000)}


def measure(label: str, threads: int = 1) -> dict:
    import continual_kd  # noqa: F401  (before torch: huge pages for its large buffers, as in `ckd`)
    import torch

    from continual_kd.config import TrainSpec
    from continual_kd.continual.training import train_epochs
    from continual_kd.distill.base import KDTerm
    from continual_kd.distill.rrd import RRDConfig, RRDTargets
    from continual_kd.models.mf import BPRMF
    from continual_kd.sparse import UserItemSet

    torch.set_num_threads(threads)
    num_users, num_items, with_knowledge, rows, history = SHAPES[label]
    g = torch.Generator().manual_seed(0)
    users = torch.randperm(num_users, generator=g)[:with_knowledge]
    lists = (torch.randperm(num_items, generator=g)[:500].unsqueeze(0) + users.unsqueeze(1) * 7) % num_items
    bu = users[torch.randint(0, with_knowledge, (rows,), generator=g)]
    bi = torch.randint(0, num_items, (rows,), generator=g)
    known = UserItemSet(torch.cat([bu, torch.randint(0, num_users, (history,), generator=g)]),
                        torch.cat([bi, torch.randint(0, num_items, (history,), generator=g)]), num_users, num_items)

    class RRD(KDTerm):  # the registered term's loss, on these lists (no TermContext to build here)
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.weight, self.base_weight = 0.01, 1.0
            self.targets = RRDTargets(RRDConfig(), users, lists, known, num_users, num_items)

        def resample(self, generator, epoch):
            self.targets.resample(generator)

        def loss(self, model, batch, epoch):
            return self.targets.loss(model, batch.users)

    spec = TrainSpec(lr=0.005, batch_size=1024, optimizer="lazy_adam", weight_decay=1e-4)
    out = {}
    for name, terms in (("no KD", []), ("RRD", [RRD()])):
        model = BPRMF(num_users, num_items, 8)
        log = train_epochs(model, bu, bi, known, 1, spec, torch.Generator().manual_seed(1), terms)[0]
        out[name] = log.rows / log.seconds
    t0 = time.perf_counter()
    terms[0].resample(g, 0)
    out["resample_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 1
    if "--child" in sys.argv:
        label = sys.argv[1]
        r = measure(label, threads)
        print(f"{label:>4}: no KD {r['no KD']:>9,.0f} rows/s   RRD {r['RRD']:>8,.0f} rows/s   "
              f"RRD resample {r['resample_s']:.2f} s", flush=True)
        return
    labels = [a for a in sys.argv[1:] if a in SHAPES] or list(SHAPES)
    for label in labels:  # each shape in a fresh process: no cache or allocator state carried over
        subprocess.run([sys.executable, __file__, label, "--child", "--threads", str(threads)], check=True)
    print("reproduce: python bench/rrd_step.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
