"""Full-ranking metrics. Metric math is pure functions over a top-K hit matrix; ``evaluate_ranking``
builds that matrix once per user chunk (scores over every item, observed items masked)."""

from __future__ import annotations

import math

import torch

from ..sparse import UserItemSet


def recall_at_k(hits: torch.Tensor, n_relevant: torch.Tensor) -> torch.Tensor:
    """hits: (B, K) bool, row b true at rank r if the r-th item is relevant; → (B,) hits / |relevant|."""
    return hits.float().sum(1) / n_relevant.clamp(min=1).float()


def ndcg_at_k(hits: torch.Tensor, n_relevant: torch.Tensor) -> torch.Tensor:
    """Binary-relevance NDCG: DCG of the hits over the DCG of min(|relevant|, K) hits at the top."""
    k = hits.shape[1]
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float32, device=hits.device))  # (K,)
    dcg = (hits.float() * discount).sum(1)
    ideal_cum = torch.cumsum(discount, 0)  # ideal_cum[m-1] = DCG of m hits at the top
    idcg = ideal_cum[(n_relevant.clamp(min=1, max=k) - 1).long()]
    return dcg / idcg


METRICS = {"recall": recall_at_k, "ndcg": ndcg_at_k}


@torch.no_grad()
def top_k_items(model, users: torch.Tensor, k: int, exclude: UserItemSet | None = None,
                chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, k) best items of each user by the model's full scores, excluding known pairs; and their scores."""
    ids, scores = [], []
    for start in range(0, len(users), chunk_size):
        cu = users[start : start + chunk_size]
        s = model.full_scores(cu)  # (B, I)
        if exclude is not None:
            exclude.mask_(s, cu)
        top = torch.topk(s, min(k, s.shape[1]), dim=1)
        ids.append(top.indices)
        scores.append(top.values)
    if not ids:
        return torch.zeros(0, k, dtype=torch.int64), torch.zeros(0, k)
    return torch.cat(ids), torch.cat(scores)


@torch.no_grad()
def evaluate_ranking(model, relevant: UserItemSet, exclude: UserItemSet | None, ks=(10, 20, 50),
                     chunk_size: int = 1024, device: str | torch.device = "cpu") -> dict[str, float]:
    """Mean Recall@K and NDCG@K over users with at least one relevant item, full ranking.

    ``relevant``: the held-out pairs (e.g. a block's test part). ``exclude``: pairs to mask
    (everything known except the held-out pairs themselves: see ``eval.protocol``).
    """
    users = torch.nonzero(relevant.degree > 0).flatten().to(device)
    max_k = max(ks)
    sums = {f"{m}@{k}": 0.0 for m in METRICS for k in ks}
    for start in range(0, len(users), chunk_size):
        cu = users[start : start + chunk_size]
        s = model.full_scores(cu)
        rel = relevant.dense(cu, s.shape[1])  # (B, I)
        if exclude is not None:
            exclude.mask_(s, cu)
        top = torch.topk(s, min(max_k, s.shape[1]), dim=1).indices  # (B, K)
        hits = torch.gather(rel, 1, top)
        n_rel = rel.sum(1)
        for k in ks:
            for name, fn in METRICS.items():
                sums[f"{name}@{k}"] += float(fn(hits[:, :k], n_rel).sum())
    n = max(len(users), 1)
    out = {key: v / n for key, v in sums.items()}
    out["users"] = float(len(users))
    return out


def nan_mean(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")
