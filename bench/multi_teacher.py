"""Multi-teacher benchmark: every teacher, their fused ensemble, and one student per distillation
variant — no KD, RRD from each single teacher, RRD from the fused teachers, HetComp, and the job's own
terms (RRD + UnKD in jobs/stream.yaml) — through the one stage pipeline.

    python bench/multi_teacher.py [jobs/stream.yaml] [--blocks N] [--json out.json]

A thin front of bench/methods.py (same table: plasticity, stability, H-mean, validation NDCG@20,
tail recall, seconds per block, parameters).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods  # noqa: E402

from continual_kd.config import load_job  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    job = next((a for a in args if a.endswith((".yaml", ".yml"))), "jobs/stream.yaml")
    if "--methods" not in args:
        singles = [f"single:{t.name}" for t in load_job(job).teachers]
        args += ["--methods", ",".join(["finetune", *singles, "rrd", "hetcomp", "job"])]
    sys.argv = [sys.argv[0], *args]
    methods.main()
