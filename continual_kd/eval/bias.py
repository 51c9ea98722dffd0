"""Popularity-bias metrics: per popularity group recall, average popularity, catalogue coverage.

Pure functions over the same top-K tensor ``evaluate_ranking`` builds once per user chunk.
"""

from __future__ import annotations

import math

import torch

POPULARITY_GROUP_NAMES = ("head", "mid", "tail")


def item_popularity_groups(train_counts: torch.Tensor, shares=(0.2, 0.3, 0.5)) -> torch.Tensor:
    """(I,) int64 popularity group per item by share of *items*: 0 = head, 1 = mid, 2 = tail.

    Items are sorted by training interaction count (descending, ties by smaller id); the first
    round(0.2·I) items are the head, sorted positions [round(0.2·I), round(0.5·I)) the mid, the
    rest the tail: group g ends at round(I · Σ_{j≤g} shares_j), rounding half up. Items with no
    training interaction sort last, so they are tail items unless over half the catalogue is unseen.
    Any number of shares works (groups 0..len(shares)-1); they must be positive and sum to 1.
    (UnKD's equal-interaction-mass groups, ``distill.popularity_groups``, can be passed to
    ``evaluate_ranking`` as ``item_group`` instead.)
    """
    shares = [float(s) for s in shares]
    if not shares or any(s <= 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"popularity shares must be positive and sum to 1, got {shares}")
    n = train_counts.shape[0]
    order = torch.sort(train_counts.to(torch.float64), descending=True, stable=True).indices
    cum = torch.tensor(shares, dtype=torch.float64).cumsum(0).tolist()
    bounds = torch.tensor([math.floor(n * c + 0.5) for c in cum], dtype=torch.int64, device=train_counts.device)
    position = torch.arange(n, device=train_counts.device)
    sorted_group = torch.searchsorted(bounds, position, right=True).clamp(max=len(shares) - 1)
    out = torch.empty(n, dtype=torch.int64, device=train_counts.device)
    out[order] = sorted_group
    return out


def group_names(num_groups: int) -> tuple[str, ...]:
    """head / mid / tail for three groups, g0, g1, … otherwise."""
    return POPULARITY_GROUP_NAMES if num_groups == 3 else tuple(f"g{g}" for g in range(num_groups))


def group_recall_at_k(hits: torch.Tensor, top_groups: torch.Tensor,
                      relevant_per_group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group recall of each user's top-K.

    hits: (B, K) bool, top_groups: (B, K) group of each recommended item, relevant_per_group: (B, G)
    number of relevant items of each group. Returns (B, G) hits-in-group / relevant-in-group and a
    (B, G) bool telling which users have a relevant item in the group (only those count).
    """
    n_groups = relevant_per_group.shape[1]
    hit_counts = torch.zeros(hits.shape[0], n_groups, dtype=torch.float64, device=hits.device)
    hit_counts.scatter_add_(1, top_groups.long(), hits.double())
    has = relevant_per_group > 0
    return hit_counts / relevant_per_group.clamp(min=1).double(), has


def average_popularity(top_items: torch.Tensor, item_popularity: torch.Tensor) -> torch.Tensor:
    """(B,) mean training popularity (interaction count) of each user's recommended items."""
    return item_popularity[top_items].double().mean(1)


def covered_items(top_items: torch.Tensor, num_items: int) -> torch.Tensor:
    """(I,) bool: items recommended to at least one of the users (rows of ``top_items``)."""
    out = torch.zeros(num_items, dtype=torch.bool, device=top_items.device)
    out[top_items.reshape(-1)] = True
    return out


def coverage(covered: torch.Tensor) -> float | None:
    """Fraction of the catalogue recommended to at least one user (None for an empty catalogue)."""
    return int(covered.sum()) / covered.numel() if covered.numel() else None


def equal_interaction_groups(train_counts: torch.Tensor, num_groups: int = 3) -> torch.Tensor:
    """(I,) int64 UnKD's popularity groups: items sorted by training count, cut so that each group holds
    about the same number of *interactions* (1/G of the total), 0 = most popular. The same rule as the
    UnKD term's (``distill.unkd.popularity_groups``), so the figures are comparable with its paper;
    fewer than ``num_groups`` groups come out when one item holds more than a group's share."""
    from ..distill.unkd import popularity_groups

    return popularity_groups(train_counts, num_groups)


def popularity_groupings(train_counts: torch.Tensor, mass_groups: int = 3) -> dict[str, torch.Tensor]:
    """The item groupings the bias metrics report, by key prefix: ``""`` → head / mid / tail (20/30/50%
    of the items by training count), ``"eq"`` → eq0, eq1, … (UnKD's equal-interaction groups; left out
    when ``mass_groups`` is 0)."""
    out = {"": item_popularity_groups(train_counts)}
    if mass_groups > 0:
        out["eq"] = equal_interaction_groups(train_counts, mass_groups)
    return out
