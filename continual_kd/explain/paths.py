"""Why the path model scores an item: the exact decomposition of its score into the user's known items
(the "reasons") and, per reason, into path types (relations, the collaborative path).

For an item i the user has not interacted with,

    score(u, i) = Σ_{i' known} x_ui' · M[i', i] + b_i,    M = Σ_r w_r S_r + w_cf C    (models/pathrec.py)

so a reason is one known item i' with weight x_ui' · M[i', i], and its parts are the terms of M. All of
it is computed for batches of users with tensor operations (no loop per user): ``reasons`` for the
known items behind a batch's recommendations, ``reason_parts`` for the path types of chosen pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.pathrec import RELATION_SLOTS, PathRec, expand_rows


@torch.no_grad()
def paths_into(model: PathRec, items: torch.Tensor) -> torch.Tensor:
    """(I, J) M[:, items]: the weighted paths from every item into each of ``items`` (self-paths zero)."""
    g = model.graphs()
    dev, dtype = model.item_bias.device, model.item_bias.dtype
    cols = torch.arange(len(items), device=dev)
    onehot = torch.zeros(model.num_items, len(items), dtype=dtype, device=dev)
    onehot[items, cols] = 1.0
    m = model.cf_weight() * torch.sparse.mm(g.RT, torch.sparse.mm(g.R, onehot))
    if g.A.shape[1]:
        w = model.relation_weights()[g.col_relation].unsqueeze(1)
        m = m + torch.sparse.mm(g.A, torch.sparse.mm(g.AT, onehot) * w)
    m[items, cols] = 0.0
    return m


@dataclass
class Reasons:
    """For B users × k items: the top known items behind each item's path score."""

    via: torch.Tensor  # (B, k, top) known item ids, strongest first (-1 where the user has fewer)
    weight: torch.Tensor  # (B, k, top) their contributions x_ui' M[i', i]
    path_score: torch.Tensor  # (B, k) Σ over every known item (score - item bias)
    contributions: torch.Tensor  # (B, k, I) every known item's contribution (0 for unknown items)


@torch.no_grad()
def reasons(model: PathRec, users: torch.Tensor, items: torch.Tensor, top: int = 3) -> Reasons:
    """The known items behind each (user, item) of ``items`` (B, k), from the model's current graphs."""
    g = model.graphs()
    uniq, col = torch.unique(items.reshape(-1), return_inverse=True)
    m = paths_into(model, uniq)  # (I, J)
    x = g.rows(users)  # (B, I)
    contrib = m.T[col.reshape(items.shape)] * x.unsqueeze(1)  # (B, k, I)
    known = (x > 0).unsqueeze(1).expand_as(contrib)
    ranked = torch.where(known, contrib, torch.full_like(contrib, float("-inf")))
    top = min(top, model.num_items)
    weight, via = ranked.topk(top, dim=-1)
    missing = ~(weight > 0)  # every path weighs > 0: a known item with no path to the item is no reason
    return Reasons(via=torch.where(missing, -1, via), weight=torch.where(missing, 0.0, weight),
                   path_score=contrib.sum(-1), contributions=contrib)


def _intersect(crow, col_idx, values, a: torch.Tensor, b: torch.Tensor, width: int):
    """Entries shared by CSR rows a[q] and b[q] (same column): (pair index q, column, value in a, value in b)."""
    rep_a, pos_a = expand_rows(crow, a)
    rep_b, pos_b = expand_rows(crow, b)
    key_a = rep_a * width + col_idx[pos_a]  # sorted: rows in query order, columns sorted inside a row
    key_b = rep_b * width + col_idx[pos_b]
    if len(key_a) == 0 or len(key_b) == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=a.device)
        return empty, empty, values[:0], values[:0]
    at = torch.searchsorted(key_a, key_b).clamp(max=len(key_a) - 1)
    hit = key_a[at] == key_b
    return rep_b[hit], col_idx[pos_b[hit]], values[pos_a[at[hit]]], values[pos_b[hit]]


@torch.no_grad()
def reason_parts(model: PathRec, users: torch.Tensor, via: torch.Tensor, items: torch.Tensor):
    """Path types of Q (user, known item via, item) reasons: → (kg (Q, RELATION_SLOTS) weight per relation,
    cf (Q,) weight of the collaborative paths, entity (Q, RELATION_SLOTS) one shared entity per relation, -1
    where none). kg.sum(1) + cf equals the reason's weight."""
    g = model.graphs()
    x = g.x_user[users]  # (Q,) the user's input weight (via is known)
    q = len(items)
    kg = torch.zeros(q, RELATION_SLOTS, dtype=x.dtype, device=x.device)
    entity = torch.full((q, RELATION_SLOTS), -1, dtype=torch.int64, device=x.device)
    if g.A.shape[1]:
        rep, cols, va, vb = _intersect(g.A.crow_indices(), g.A.col_indices(), g.A.values(), items, via, g.A.shape[1])
        rel = g.col_relation[cols]
        w = model.relation_weights()[rel]
        kg.index_put_((rep, rel), va * vb * w * x[rep], accumulate=True)
        entity[rep, rel] = g.col_entity[cols]
    rep, _, va, vb = _intersect(g.RT.crow_indices(), g.RT.col_indices(), g.RT.values(), items, via, model.num_users)
    cf = torch.zeros(q, dtype=x.dtype, device=x.device).index_add_(0, rep, va * vb * x[rep]) * model.cf_weight()
    return kg, cf, entity
