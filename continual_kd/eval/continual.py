"""Plasticity and stability of a model after block k (CCD's protocol).

plasticity = a metric on block k's test part (what it learned from the new block);
stability = the same metric averaged over the test parts of blocks 0..k-1 (what it kept);
H-mean = their harmonic mean. Undefined values are None (block 0 has no earlier blocks), never NaN.
"""

from __future__ import annotations

import math

CONTINUAL_KEYS = ("ndcg@20", "recall@20")


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return None
    return 0.0 if a + b <= 0 else 2 * a * b / (a + b)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def plasticity_stability(per_block: dict[int, dict[str, float]], block: int,
                         keys: tuple[str, ...] = CONTINUAL_KEYS) -> dict[str, float | None]:
    """{"plasticity/<key>", "stability/<key>", "hmean/<key>"} from test metrics of blocks ≤ ``block``."""
    out: dict[str, float | None] = {}
    for key in keys:
        now = per_block.get(block, {}).get(key)
        now = None if now is None or math.isnan(now) else float(now)
        before = _mean([m.get(key) for b, m in per_block.items() if b < block])
        out[f"plasticity/{key}"] = now
        out[f"stability/{key}"] = before
        out[f"hmean/{key}"] = harmonic_mean(now, before)
    return out
