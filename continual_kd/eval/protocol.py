"""The block protocol: which pairs are held out and which are masked when a model is evaluated.

A snapshot taken after block k is evaluated on the test part of every block j ≤ k. For block j
the relevant pairs are test(j); every other pair of blocks ≤ k is masked (it is known, not a target).
"""

from __future__ import annotations

import numpy as np

from ..sparse import UserItemSet
from ..types import TEST, TRAIN, VALID, Interactions


def eval_sets(seen: Interactions, block: int, split: int = TEST, device="cpu") -> tuple[UserItemSet, UserItemSet]:
    """(relevant, exclude) for evaluating on ``split`` of ``block`` given everything ``seen``."""
    target = (seen.block == block) & (seen.split == split)
    n_items = max(seen.num_items, 1)
    keys = seen.users * n_items + seen.items
    held_out = np.isin(keys, keys[target])
    relevant = UserItemSet(seen.users[target], seen.items[target], seen.num_users, seen.num_items, device)
    exclude = UserItemSet(seen.users[~held_out], seen.items[~held_out], seen.num_users, seen.num_items, device)
    return relevant, exclude


def model_pairs_mask(seen: Interactions, block: int | None = None) -> np.ndarray:
    """(n,) bool: the pairs a model may train on, hold in its graph / input rows and treat as known
    while block ``block`` (default: the newest seen) is trained, validated or tested: the training
    pairs of blocks ≤ block and the validation pairs of earlier blocks (their block is done). A block's
    own validation and test pairs, and every test pair, stay out: they are what it is judged on."""
    current = int(seen.block.max()) if block is None and len(seen) else (block or 0)
    return ((seen.split == TRAIN) & (seen.block <= current)) | ((seen.split == VALID) & (seen.block < current))


def model_pairs(seen: Interactions, block: int | None = None, device="cpu") -> UserItemSet:
    """``model_pairs_mask`` as a ``UserItemSet``."""
    ok = model_pairs_mask(seen, block)
    return UserItemSet(seen.users[ok], seen.items[ok], seen.num_users, seen.num_items, device)


def known_pairs(seen: Interactions, device="cpu") -> UserItemSet:
    """Every pair seen so far (all splits): what knowledge and negative sampling must avoid."""
    return UserItemSet(seen.users, seen.items, seen.num_users, seen.num_items, device)
