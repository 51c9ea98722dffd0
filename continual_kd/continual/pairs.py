"""What a ``Learner`` keeps between blocks about the pairs it has seen, updated with each block's rows.

Every Learner call receives the interactions of blocks 0..k (``seen``). Re-deriving the known pairs,
item counts and evaluation sets from all of them at every call costs a sort of the whole history, so
a block's cost would grow with everything before it. ``PairState`` instead keeps them and, when
``seen`` is the previous ``seen`` plus new blocks, adds only the new blocks' rows:

- the model pairs of block k (``eval.protocol.model_pairs``: train of blocks ≤ k, valid of blocks < k)
  as a ``UserItemSet`` (and, for graph models, the same pairs item-major), merged in one linear pass
  (``UserItemSet.added``: only the block's pairs are sorted);
- their per-item interaction counts (``learner.item_counts``), and the training popularity of
  everything seen (``eval.protocol.training_popularity``);
- for evaluation: the pairs each mask hides (over everything seen) and every block's target sets.

Whether ``seen`` extends what was kept is checked per (block, split) by row count and id sums
(``fingerprint``, a few vectorised passes); anything else — another plan, a restore from a snapshot
with other data, a block asked out of order — rebuilds from ``seen`` alone, so the state never
decides a result: it always equals what the from-scratch functions give (tests/test_pairs.py).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from ..eval.protocol import masked_pairs_mask, model_pairs, model_pairs_mask
from ..sparse import UserItemSet
from ..types import HOLDOUT, TEST, TRAIN, VALID, Interactions

SPLITS = 4  # TRAIN, VALID, TEST, HOLDOUT


def fingerprint(seen: Interactions) -> np.ndarray:
    """(blocks, splits, 3): rows, Σ user ids and Σ item ids of every (block, split) of ``seen``."""
    if len(seen) == 0:
        return np.zeros((0, SPLITS, 3))
    blocks = int(seen.block.max()) + 1
    cell = seen.block.astype(np.int64) * SPLITS + seen.split
    n = blocks * SPLITS
    stats = [np.bincount(cell, minlength=n).astype(np.float64),
             np.bincount(cell, weights=seen.users, minlength=n), np.bincount(cell, weights=seen.items, minlength=n)]
    return np.stack(stats, 1).reshape(blocks, SPLITS, 3)


def _rows(seen: Interactions, block: int, split: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    mask = seen.block == block
    if split is not None:
        mask &= seen.split == split
    return seen.users[mask], seen.items[mask]


def _counts(items: np.ndarray, num_items: int) -> np.ndarray:
    return np.bincount(items, minlength=num_items).astype(np.float64)


def _pad(counts: np.ndarray, n: int) -> np.ndarray:
    return counts if len(counts) >= n else np.concatenate([counts, np.zeros(n - len(counts))])


def _grown(s: UserItemSet, num_users: int, num_items: int) -> UserItemSet:
    """``s`` in id spaces of at least ``num_users`` × ``num_items`` (its pairs unchanged)."""
    if s.num_users >= num_users and s.num_items >= num_items:
        return s
    return s.added(np.zeros(0, np.int64), np.zeros(0, np.int64), num_users, num_items)


class PairState:
    def __init__(self, device: str | torch.device = "cpu"):
        self.device = device
        self.rebuilds = 0  # known sets built from all of seen rather than extended (tests, bench)
        self.reset()

    def reset(self) -> None:
        self._seen_ref = None  # weak reference to the last ``seen`` synced (the same object: nothing to do)
        self.fp = np.zeros((0, SPLITS, 3))  # fingerprint of the blocks taken in
        self.num_users = self.num_items = 0
        # model pairs of block ``known_block`` (+ item-major copy, + per-item row counts)
        self.known_block: int | None = None
        self._known: UserItemSet | None = None
        self._by_item: UserItemSet | None = None
        self._counts: np.ndarray | None = None
        # over every block seen: training popularity, the pairs each mask hides, target sets
        self._popularity = np.zeros(0)
        self._hidden: dict[str, UserItemSet] = {}
        self._targets: dict[tuple[int, int | None], UserItemSet] = {}

    # ------------------------------------------------------------------ sync with seen
    def sync(self, seen: Interactions) -> None:
        """Take in the blocks of ``seen`` not seen yet; rebuild when ``seen`` does not extend what is kept."""
        if self._seen_ref is not None and self._seen_ref() is seen:
            return
        fp = fingerprint(seen)
        old = len(self.fp)
        extends = (len(fp) >= old and np.array_equal(fp[:old], self.fp)
                   and seen.num_users >= self.num_users and seen.num_items >= self.num_items)
        if not extends:
            self.reset()
            old = 0
        self.num_users, self.num_items = seen.num_users, seen.num_items
        self._popularity = _pad(self._popularity, self.num_items)
        for b in range(old, len(fp)):  # the new blocks' rows only
            u, i = _rows(seen, b, TRAIN)
            self._popularity += _counts(i, self.num_items)
            for mask in list(self._hidden):
                self._hidden[mask] = self._hide(seen, b, mask, self._hidden[mask])
            for split in (VALID, TEST, HOLDOUT):  # pooled target sets (every block's split) grow with the block
                if (split, None) in self._targets:
                    tu, ti = _rows(seen, b, split)
                    self._targets[split, None] = self._targets[split, None].added(tu, ti, self.num_users,
                                                                                  self.num_items)
        self.fp = fp
        self._seen_ref = weakref.ref(seen)

    def _hide(self, seen: Interactions, block: int, mask: str, current: UserItemSet | None) -> UserItemSet:
        rows = (seen.block == block) & masked_pairs_mask(seen, mask)
        if current is None:
            return UserItemSet(seen.users[rows], seen.items[rows], self.num_users, self.num_items, self.device)
        return current.added(seen.users[rows], seen.items[rows], self.num_users, self.num_items)

    # ------------------------------------------------------------------ what a model may see
    def known(self, seen: Interactions, block: int | None = None, by_item: bool = False) -> UserItemSet:
        """``model_pairs(seen, block)``; with ``by_item`` the set also carries ``.by_item`` (item-major)."""
        self.sync(seen)
        newest = len(self.fp) - 1
        block = newest if block is None else int(block)
        if self.known_block is not None and self.known_block == block - 1 and block <= newest:
            self._advance(seen, block)
        elif self.known_block != block:
            self._known = model_pairs(seen, block, self.device)
            self.rebuilds += 1
            self._counts = _counts(seen.items[model_pairs_mask(seen, block)], self.num_items)
            self._by_item, self.known_block = None, block
        self._known = _grown(self._known, self.num_users, self.num_items)
        if by_item and self._by_item is None:
            self._by_item = self._known.transposed()  # one sort; then kept up to date by _advance
        if self._by_item is not None:
            self._by_item = _grown(self._by_item, self.num_items, self.num_users)  # items are its rows
        self._known.by_item = self._by_item if self._by_item is not None and len(self._by_item) == len(self._known) \
            else None
        return self._known

    def _advance(self, seen: Interactions, block: int) -> None:
        """Model pairs of ``block`` from those of ``block - 1``: + train(block) + valid(block - 1)."""
        tu, ti = _rows(seen, block, TRAIN)
        vu, vi = _rows(seen, block - 1, VALID)
        u, i = np.concatenate([tu, vu]), np.concatenate([ti, vi])
        self._known = self._known.added(u, i, self.num_users, self.num_items)
        if self._by_item is not None:
            self._by_item = self._by_item.added(i, u, self.num_items, self.num_users)
        self._counts = _pad(self._counts, self.num_items) + _counts(i, self.num_items)
        self.known_block = block

    def item_counts(self, seen: Interactions, block: int | None = None) -> torch.Tensor:
        """(I,) float32 interactions per item over the model pairs of ``block`` (``learner.item_counts``)."""
        self.known(seen, block)
        return torch.as_tensor(_pad(self._counts, self.num_items), dtype=torch.float32, device=self.device)

    def popularity(self, seen: Interactions) -> torch.Tensor:
        """(I,) float32 training pairs per item over every block seen (``training_popularity``)."""
        self.sync(seen)
        return torch.as_tensor(self._popularity, dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------ evaluation sets
    def eval_sets(self, seen: Interactions, block: int | None, split: int, mask: str = "standard",
                  exact: bool = False) -> tuple[UserItemSet, UserItemSet]:
        """(relevant, hidden): ``split`` of ``block`` (None: of every block) and the pairs ``mask`` hides.
        ``hidden`` may hold targets too — rank with ``evaluate_ranking(..., keep_relevant=True)`` — unless
        ``exact``, where the targets are taken out (``eval.protocol.eval_sets``'s exclude)."""
        self.sync(seen)
        if mask not in self._hidden:
            hidden = None
            for b in range(len(self.fp)):
                hidden = self._hide(seen, b, mask, hidden)
            self._hidden[mask] = hidden if hidden is not None else UserItemSet([], [], self.num_users,
                                                                                self.num_items, self.device)
        key = (split, block)
        if key not in self._targets:
            if block is None:
                rows = seen.split == split
                tu, ti = seen.users[rows], seen.items[rows]
            else:
                tu, ti = _rows(seen, block, split)
            self._targets[key] = UserItemSet(tu, ti, self.num_users, self.num_items, self.device)
        relevant = self._targets[key] = _grown(self._targets[key], self.num_users, self.num_items)
        hidden = self._hidden[mask] = _grown(self._hidden[mask], self.num_users, self.num_items)
        return relevant, (hidden.without(relevant) if exact else hidden)
