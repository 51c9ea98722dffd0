"""The block protocol: which pairs are held out and which are masked when a model is evaluated.

A snapshot taken after block k is evaluated on the test part of every block j ≤ k (or on all of
them pooled: one test set). For block j the relevant pairs are test(j); which other pairs of blocks
≤ k are masked (known, not ranked) is the evaluation's *mask* (``eval.mask`` in a job):

- ``standard`` (default): the user's train + valid pairs, as the standard full-ranking protocol
  (RecBole's test phase, the HetComp and CCD evaluation code). Other blocks' test pairs stay in the
  ranking as candidates: a model may not know them, and masking them would use held-out labels.
- ``train``: training pairs only; validation items stay in the ranking as negatives (KDs and
  RecBole-style evaluators on a fixed split; issue 11's ``eval.exclude: train``).
- ``all_seen``: every seen pair except the target's (this project's earlier rule; it lifts every
  figure, so it is kept only to compare with old numbers).

The target's own pairs are never masked, whatever the mask (a pair both trained in a later block and
held out here still counts as a target). The held-out part of ``blocks.holdout`` (HOLDOUT) is masked by
``standard`` and ``train`` like the training pairs it was taken from: they are the user's known pairs,
withheld from the models by design, so test figures stay comparable to a run without the held-out share.
Ranking the held-out part itself, the other blocks' test pairs stay candidates as above: that figure
never uses a test label.
"""

from __future__ import annotations

import numpy as np
import torch

from ..sparse import UserItemSet
from ..types import HOLDOUT, TEST, TRAIN, VALID, Interactions

from ..config import EVAL_MASKS as MASKS, MASK_LABELS  # noqa: E402,F401  (one list of masks, in the job spec)


def masked_pairs_mask(seen: Interactions, mask: str = "standard") -> np.ndarray:
    """(n,) bool: the rows of ``seen`` that ``mask`` hides from the ranking (targets excepted later)."""
    if mask == "standard":
        return (seen.split == TRAIN) | (seen.split == VALID) | (seen.split == HOLDOUT)
    if mask == "train":
        return (seen.split == TRAIN) | (seen.split == HOLDOUT)
    if mask == "all_seen":
        return np.ones(len(seen), dtype=bool)
    raise ValueError(f"unknown evaluation mask {mask!r}; use one of {', '.join(MASKS)}")


def eval_sets(seen: Interactions, block: int | None, split: int = TEST, device="cpu",
              mask: str = "standard") -> tuple[UserItemSet, UserItemSet]:
    """(relevant, exclude) for evaluating on ``split`` of ``block`` given everything ``seen``.

    ``block=None`` pools ``split`` of every block into one target set (the pooled figure of a
    snapshot). ``exclude`` holds the pairs ``mask`` hides, less any pair that is itself a target."""
    target = seen.split == split
    if block is not None:
        target &= seen.block == block
    n_items = max(seen.num_items, 1)
    keys = seen.users * n_items + seen.items
    hidden = masked_pairs_mask(seen, mask) & ~np.isin(keys, keys[target])
    relevant = UserItemSet(seen.users[target], seen.items[target], seen.num_users, seen.num_items, device)
    exclude = UserItemSet(seen.users[hidden], seen.items[hidden], seen.num_users, seen.num_items, device)
    return relevant, exclude


def training_popularity(seen: Interactions, device="cpu") -> torch.Tensor:
    """(I,) float32 item popularity for the bias metrics: training pairs per item (blocks in ``seen``)."""
    counts = np.bincount(seen.items[seen.split == TRAIN], minlength=seen.num_items)
    return torch.as_tensor(counts, dtype=torch.float32, device=device)


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
