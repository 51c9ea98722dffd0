"""continual-kd: continual knowledge distillation for recommender systems."""

import os

# Transparent huge pages for torch's large CPU buffers (≥ 2 MB: the embedding tables, their optimiser moments,
# a ranking chunk's scores): PyTorch madvises them when this is set before torch's first allocation, so importing
# continual_kd first turns it on for the CLI, the Ray workers that host the models and the benches. At 300k × 100k
# the random row lookups and the full-ranking chunks otherwise miss the TLB on every 4 kB page (docs/RESULTS.md,
# session 30). THP_MEM_ALLOC_ENABLE=0 in the environment keeps it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
