"""Live block policies: new data becomes new blocks of the same plan, cut once and never changed.

A live plan grows. Each time it is advanced, the rows not yet in any of its blocks ("pending") are
cut into the blocks that are complete:

- ``window``: one block per time window of ``window_s`` seconds. Windows follow the base block (or,
  without one, start at the UTC-aligned window of the first row). A window is complete when a row
  with a timestamp at or past its end is stored (or on flush). Its block takes every pending row
  before its end, so rows that arrive after their own window was cut ("late") join the next block.
  Windows that hold no row are skipped.
- ``rows``: one block per ``rows`` pending rows, in (timestamp, offset) order; on flush the rest.
- an optional base block first: rows before ``base_until`` (complete once a row at or past it is
  stored), or the first ``base_fraction`` of the rows stored when the plan is first cut (resolved
  to a timestamp then, so the rule is time-based afterwards).

Each block's rows are split train/valid/test per user with a seed derived from (seed, block), so a
block's split depends only on its own rows. Pure numpy: the store persists and reads the result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from continual_kd.errors import CkdError
from continual_kd.stream.plan import split_per_user

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class LivePolicy:
    window_s: int | None  # one block per window of this many seconds, or
    rows: int | None  # one block per this many rows
    base_fraction: float | None  # a base block: the first fraction of the rows stored at the first cut, or
    base_until: int | None  # every row before this timestamp (epoch seconds)
    split: tuple[float, ...]
    seed: int

    def __post_init__(self):
        if (self.window_s is None) == (self.rows is None):
            raise ValueError("a live policy needs exactly one of window_s and rows")
        if self.base_fraction is not None and self.base_until is not None:
            raise ValueError("base_fraction and base_until exclude each other")

    def describe(self) -> str:
        what = f"window {_human(self.window_s)}" if self.window_s else f"rows {self.rows:,}"
        if self.base_until is not None:
            until = datetime.fromtimestamp(self.base_until, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            what = f"base until {until}, then {what}"
        elif self.base_fraction is not None:
            what = f"base {self.base_fraction:g} of the first data, then {what}"
        return what

    def to_json(self) -> str:
        return json.dumps({"window_s": self.window_s, "rows": self.rows, "base_fraction": self.base_fraction,
                           "base_until": self.base_until}, sort_keys=True)

    @staticmethod
    def from_json(text: str, split: tuple[float, ...], seed: int) -> "LivePolicy":
        d = json.loads(text)
        return LivePolicy(d["window_s"], d["rows"], d["base_fraction"], d["base_until"], tuple(split), int(seed))


def _human(seconds: int) -> str:
    for unit in ("w", "d", "h", "m"):
        if seconds % UNITS[unit] == 0:
            return f"{seconds // UNITS[unit]}{unit}"
    return f"{seconds}s"


def policy_of(blocks, seed: int) -> LivePolicy:
    """The live policy of a job's ``blocks`` spec (config.BlockSpec with ``window`` or ``rows``)."""
    return LivePolicy(blocks.window_seconds, blocks.rows, blocks.base_fraction, blocks.base_until,
                      tuple(blocks.plan_split), int(seed))


def live_plan_id(policy: LivePolicy) -> str:
    key = json.dumps(["live", policy.to_json(), [float(s) for s in policy.split], int(policy.seed)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def block_seed(seed: int, block: int) -> int:
    """The split seed of one live block: depends on (seed, block) only, not on the rest of the stream."""
    digest = hashlib.sha256(f"ckd-live-split:{int(seed)}:{int(block)}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class Cursor:
    """Where the cut stands: blocks cut so far and the end of the last one (exclusive time bound for a
    base or window block, the newest timestamp for a rows block)."""

    blocks: int = 0
    last_end: int | None = None


@dataclass(frozen=True)
class Cut:
    """One new block: ``take`` indexes the pending rows (sorted by ts, offset) it holds."""

    take: np.ndarray
    bound_start: int
    bound_end: int
    late: int  # rows whose time falls before the block's own window (they arrived after theirs was cut)


def next_window_end(policy: LivePolicy, cursor: Cursor) -> int | None:
    """The time a row must reach for the next block to be complete (None: not a time rule / unknown yet)."""
    if cursor.blocks == 0:
        return policy.base_until if policy.base_until is not None else None
    if policy.window_s is None or cursor.last_end is None:
        return None
    return cursor.last_end + policy.window_s


def cut_blocks(policy: LivePolicy, cursor: Cursor, ts: np.ndarray, max_ts: int, flush: bool = False) -> list[Cut]:
    """The complete blocks among the pending rows ``ts`` (sorted ascending), given every stored row's
    newest timestamp ``max_ts``. With ``flush`` the incomplete rest becomes a block too."""
    n = len(ts)
    cuts: list[Cut] = []
    taken = 0  # pending rows are consumed from the front: blocks take every pending row before an end
    blocks, last_end = cursor.blocks, cursor.last_end
    if n == 0:
        return cuts
    if blocks == 0 and (policy.base_until is not None or policy.base_fraction is not None):
        if policy.base_until is not None:
            end = int(policy.base_until)
            if not (max_ts >= end or flush):
                return cuts
        else:
            at = int(round(policy.base_fraction * n))
            if at < 1 or at >= n:
                raise CkdError(f"blocks.base_fraction: {policy.base_fraction} of the {n} stored rows leaves the base "
                               f"block or the rest empty; ingest more data first, or use blocks.base_until")
            end = int(ts[at])
        size = int(np.searchsorted(ts, end, side="left"))
        if size == 0:
            raise CkdError(f"blocks.base_until: no stored interaction is before {end} (the first is at {int(ts[0])}); "
                           f"choose a later base_until or drop it")
        cuts.append(Cut(np.arange(0, size), int(ts[0]), end, 0))
        taken, blocks, last_end = size, 1, end
    if policy.window_s is not None:
        w = int(policy.window_s)
        start = last_end if last_end is not None else (int(ts[taken]) // w) * w
        while taken < n:
            end = start + w
            complete = max_ts >= end
            if not complete and not flush:
                break
            upto = int(np.searchsorted(ts, end, side="left"))
            if upto > taken:
                late = int(np.searchsorted(ts, start, side="left")) - taken
                cuts.append(Cut(np.arange(taken, upto), start, end, max(late, 0)))
                taken, blocks = upto, blocks + 1
                start = end
            else:  # an empty window: jump to the window of the next pending row
                start = end + ((int(ts[taken]) - end) // w) * w if ts[taken] >= end else end
    else:
        r = int(policy.rows)
        while taken < n and (n - taken >= r or flush):
            upto = min(n, taken + r)
            part = ts[taken:upto]
            late = int((part < last_end).sum()) if last_end is not None else 0
            cuts.append(Cut(np.arange(taken, upto), int(part[0]), int(part[-1]), late))
            taken, blocks, last_end = upto, blocks + 1, int(part[-1])
    return cuts


def block_split(users: np.ndarray, split: tuple[float, ...], seed: int, block: int) -> np.ndarray:
    """TRAIN/VALID/TEST for the rows of one live block (in ts, offset order), as the research plan splits."""
    return split_per_user(np.zeros(len(users), dtype=np.int16), users, split, block_seed(seed, block))
