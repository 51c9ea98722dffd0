"""Importing continual_kd before torch turns on transparent huge pages for torch's large CPU buffers (the
embedding tables, their optimiser moments, ranking chunks); THP_MEM_ALLOC_ENABLE=0 keeps them off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# prints the kB of huge pages backing the process's anonymous memory after a 64 MB tensor is written
CODE = """
import sys
if sys.argv[1] == "package first":
    import continual_kd
import torch
x = torch.ones(16 << 20)  # 64 MB of float32, every page written
print(sum(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages:")))
"""


def _huge_kb(order: str, **env) -> int:
    base = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    done = subprocess.run([sys.executable, "-c", CODE, order], cwd=ROOT, env={**base, **env}, capture_output=True,
                          text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not MODE.exists() or "[never]" in MODE.read_text(), reason="no transparent huge pages here")
def test_large_tensors_get_huge_pages_when_the_package_is_imported_first():
    assert _huge_kb("package first") >= 16 * 1024  # at least a quarter of the tensor (compaction may not find all)
    if "[madvise]" in MODE.read_text():  # only madvised memory gets them (under "always" every buffer does)
        assert _huge_kb("package first", THP_MEM_ALLOC_ENABLE="0") == 0  # the user's choice stands
        assert _huge_kb("torch alone") == 0
