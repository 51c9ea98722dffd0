"""Block plans (as in CCD): a base block then equal-sized incremental blocks, consecutive in time,
each split train/valid/test (and held out, ``blocks.holdout``) per user. Pure numpy; the store persists and reads the result."""

from __future__ import annotations

import hashlib
import json
from numbers import Real
from dataclasses import dataclass

import numpy as np

from continual_kd.errors import CkdError
from continual_kd.types import HOLDOUT, TEST, TRAIN, VALID

_EPS = 1e-9  # keeps floor(0.1 * 15 + 0.5) at 2 despite 0.1 * 15 == 1.5000000000000002


@dataclass(frozen=True)
class BlockInfo:
    index: int
    rows: int
    ts_start: int
    ts_end: int
    num_users: int  # dense id space size after this block (max id in blocks <= index, + 1)
    num_items: int
    new_users: int  # ids first seen in this block
    new_items: int
    late: int = 0  # live plans: rows that arrived after their own window was cut (stream/live.py)
    bound_start: int | None = None  # live plans: the block's time bounds (window, or the base block's end)
    bound_end: int | None = None


@dataclass(frozen=True)
class BlockPlan:
    plan_id: str
    base_fraction: float
    incremental: int
    split: tuple[float, ...]  # train, valid, test[, holdout]: a fourth share only where one is held out
    seed: int
    total_rows: int
    blocks: tuple[BlockInfo, ...]  # len = incremental + 1; blocks[0] is the base block
    policy: str | None = None  # None: the research protocol (fixed); else a live policy (JSON, stream/live.py)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def is_live(self) -> bool:
        return self.policy is not None


def validate_plan_args(base_fraction: float, incremental: int, split: tuple[float, ...], seed: int) -> None:
    if not (isinstance(base_fraction, Real) and 0.0 < base_fraction < 1.0):
        raise CkdError(f"base_fraction must be strictly between 0 and 1, got {base_fraction!r}; e.g. 0.5.")
    if isinstance(incremental, bool) or not isinstance(incremental, (int, np.integer)) or incremental < 1:
        raise CkdError(f"incremental must be an integer >= 1 (the number of incremental blocks), got {incremental!r}.")
    if (not isinstance(split, (tuple, list)) or len(split) not in (3, 4)
            or any(not isinstance(s, Real) or not s >= 0 for s in split)):
        raise CkdError(f"split must be three non-negative fractions (train, valid, test) or four (+ held out), "
                       f"got {split!r}; "
                       f"e.g. (0.8, 0.1, 0.1).")
    if not abs(sum(split) - 1.0) <= 1e-6:
        raise CkdError(f"split fractions must sum to 1, got {split!r} (sum {sum(split):g}); e.g. (0.8, 0.1, 0.1).")
    if split[0] <= 0:
        raise CkdError(f"the train fraction of split must be > 0, got {split!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CkdError(f"seed must be a non-negative integer, got {seed!r}.")


def plan_id_for(base_fraction: float, incremental: int, split: tuple[float, ...], seed: int,
                segment_hashes: list[str]) -> str:
    key = json.dumps([float(base_fraction), int(incremental), [float(s) for s in split], int(seed),
                      sorted(segment_hashes)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def block_sizes(n: int, base_fraction: float, incremental: int) -> np.ndarray:
    """Rows per block: round(base_fraction * n), then the rest in `incremental` near-equal parts."""
    base = int(round(base_fraction * n))
    rest = n - base
    if base < 1 or rest < incremental:
        raise CkdError(
            f"Cannot cut {n} stored rows into a base block and {incremental} non-empty incremental blocks "
            f"with base_fraction={base_fraction} (base {base} rows, {rest} left); "
            f"lower incremental, change base_fraction or ingest more data."
        )
    sizes = np.full(incremental, rest // incremental, dtype=np.int64)
    sizes[: rest % incremental] += 1
    return np.concatenate([[base], sizes])


def split_per_user(block: np.ndarray, users: np.ndarray, split: tuple[float, ...], seed: int) -> np.ndarray:
    """TRAIN/VALID/TEST per row: in each (block, user) group a seeded random order, the first
    floor(f_test*n + 0.5) rows test, the next floor(f_valid*n + 0.5) valid, the rest train. A fourth share
    (held out) takes the next floor(f_holdout*n + 0.5) rows after valid (HOLDOUT), never a user's last
    training row; with three shares every row splits as it always did."""
    n = len(users)
    keys = np.random.default_rng(seed).random(n)
    order = np.lexsort((keys, users, block))  # (n,) grouped by block, then user, random within
    b, u = block[order], users[order]
    starts_mask = np.ones(n, dtype=bool)
    starts_mask[1:] = (b[1:] != b[:-1]) | (u[1:] != u[:-1])
    group = np.cumsum(starts_mask) - 1
    starts = np.flatnonzero(starts_mask)
    size = np.diff(np.append(starts, n))[group]
    rank = np.arange(n) - starts[group]
    n_test = np.floor(split[2] * size + 0.5 + _EPS).astype(np.int64)
    n_valid = np.minimum(np.floor(split[1] * size + 0.5 + _EPS).astype(np.int64), size - n_test)
    sorted_split = np.where(rank < n_test, TEST, np.where(rank < n_test + n_valid, VALID, TRAIN)).astype(np.int8)
    if len(split) > 3 and split[3] > 0:
        held = np.minimum(np.floor(split[3] * size + 0.5 + _EPS).astype(np.int64),
                          np.maximum(size - n_test - n_valid - 1, 0))
        first = n_test + n_valid
        sorted_split[(rank >= first) & (rank < first + held)] = HOLDOUT
    out = np.empty(n, dtype=np.int8)
    out[order] = sorted_split
    return out


def _first_seen_counts(ids: np.ndarray, block: np.ndarray, num_blocks: int) -> np.ndarray:
    """Per block, how many ids appear there for the first time (rows are in block order)."""
    _, first_row = np.unique(ids, return_index=True)
    return np.bincount(block[first_row], minlength=num_blocks)


def compute_plan(ts: np.ndarray, users: np.ndarray, items: np.ndarray, base_fraction: float,
                 incremental: int, split: tuple[float, ...], seed: int
                 ) -> tuple[list[BlockInfo], np.ndarray, np.ndarray]:
    """Rows must be sorted by (ts, offset). Returns (blocks, block per row int16, split per row int8)."""
    n = len(ts)
    sizes = block_sizes(n, base_fraction, incremental)
    num_blocks = len(sizes)
    block = np.repeat(np.arange(num_blocks, dtype=np.int16), sizes)
    row_split = split_per_user(block, users, split, seed)

    ends = np.cumsum(sizes)
    starts = ends - sizes
    max_user = np.maximum.accumulate(np.maximum.reduceat(users, starts))
    max_item = np.maximum.accumulate(np.maximum.reduceat(items, starts))
    new_users = _first_seen_counts(users, block, num_blocks)
    new_items = _first_seen_counts(items, block, num_blocks)
    blocks = [
        BlockInfo(index=k, rows=int(sizes[k]), ts_start=int(ts[starts[k]]), ts_end=int(ts[ends[k] - 1]),
                  num_users=int(max_user[k]) + 1, num_items=int(max_item[k]) + 1,
                  new_users=int(new_users[k]), new_items=int(new_items[k]))
        for k in range(num_blocks)
    ]
    return blocks, block, row_split
