"""Fusing several teachers' top-N lists into one target ranking per user (the ensemble teacher).

Two scorings of an item ``i`` for user ``u`` from each teacher ``t`` that lists it at 1-based rank
``r_t`` (0-based position ``p_t = r_t - 1``), weighted by ``w_t`` and normalised by ``Σ_t w_t``:

- ``"rank"`` (CCD's rank fusion): ``score = Σ_t w_t · (1 / r_t)^rank_power / Σ_t w_t``;
- ``"importance"`` (HetComp): ``score = Σ_t w_t · exp(-p_t / temperature) / Σ_t w_t``, the rank
  importance HetComp uses for its teachers' permutations (``exp(-pos/10)``, best item = 1).
  Dividing by ``Σ_t w_t`` only rescales HetComp's plain sum; the order is the same.

A teacher that does not list an item contributes 0 for it (it is outside that teacher's top-N_t;
it is *not* treated as rank N_t + 1). Entries < 0 in a list are padding and ignored.

A popularity-matched fusion (``distill.fusion_popularity: least_teacher``) ranks the candidates by the
fused score less ``β · log(1 + n_i)`` (``n_i`` the item's training count), with β the least for which the
fused top-20 is on average no more popular than the least popular teacher's top-20
(``popularity_matched_beta``): fusing by rank rewards the items every teacher lists, the popular ones, so
the fused ranking is more popular than any teacher's, and a student that learns it inherits that.

Implemented as a sparse (user, item) aggregation: per user chunk, every listed pair becomes a key
``row · num_items + item``; ``unique`` + ``index_add_`` sum the contributions, one sort orders each
user's candidates. Memory is O(chunk · Σ_t N_t), never users × items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FUSION_METHODS = ("rank", "importance")
_SCORE_QUANT = float(2**40)  # fused scores lie in [0, 1]; ties are compared on this grid (float noise ≪ 1e-12)


@dataclass(frozen=True)
class FusionConfig:
    method: str = "rank"  # "rank" (CCD) or "importance" (HetComp)
    rank_power: float = 0.05  # exponent of 1/rank in "rank" mode (CCD: 0.05)
    temperature: float = 10.0  # T of exp(-pos/T) in "importance" mode (HetComp: 10)
    chunk_size: int = 4096  # users aggregated at once


def rank_contribution(n: int, method: str, rank_power: float, temperature: float,
                      device=None) -> torch.Tensor:
    """(n,) float64 contribution of list positions 0..n-1 (best first) for one teacher with weight 1."""
    pos = torch.arange(n, dtype=torch.float64, device=device)
    if method == "rank":
        return (1.0 / (pos + 1.0)) ** rank_power
    if method == "importance":
        return torch.exp(-pos / temperature)
    raise ValueError(f"unknown fusion method {method!r}; expected one of {FUSION_METHODS}")


def fuse_rankings(item_lists: list[torch.Tensor], k: int, method: str = "rank",
                  weights: list[float] | None = None, *, num_items: int, rank_power: float = 0.05,
                  temperature: float = 10.0, chunk_size: int = 4096,
                  item_penalty: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse per-teacher top-N lists into one top-``k`` list per user.

    item_lists: one (U, N_t) int64 tensor per teacher, best first, same U users in the same order;
    N_t may differ; entries < 0 are padding. Each list should hold distinct items.
    Returns (U, k) item ids and (U, k) float32 fused scores, best first; ties go to the smaller item
    id. A user with fewer than ``k`` candidates is padded with item -1 and score 0. ``item_penalty``
    (I,): subtracted from every candidate's fused score before the order is taken (the scores returned
    are the penalised ones).
    """
    if not item_lists:
        raise ValueError("fuse_rankings needs at least one teacher list")
    if method not in FUSION_METHODS:
        raise ValueError(f"unknown fusion method {method!r}; expected one of {FUSION_METHODS}")
    n_users = item_lists[0].shape[0]
    if any(lst.dim() != 2 or lst.shape[0] != n_users for lst in item_lists):
        raise ValueError("every teacher list must be a (U, N_t) tensor over the same U users")
    if weights is None:
        weights = [1.0] * len(item_lists)
    if len(weights) != len(item_lists):
        raise ValueError(f"{len(weights)} weights for {len(item_lists)} teachers")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"teacher weights must be finite, ≥ 0 and not all 0, got {weights}")
    device = item_lists[0].device
    w_sum = float(sum(weights))
    contrib = [rank_contribution(lst.shape[1], method, rank_power, temperature, device) * (w / w_sum)
               for lst, w in zip(item_lists, weights)]  # (N_t,) each
    out_items = torch.full((n_users, k), -1, dtype=torch.int64, device=device)
    out_scores = torch.zeros(n_users, k, dtype=torch.float32, device=device)
    for start in range(0, n_users, chunk_size):
        end = min(start + chunk_size, n_users)
        items, scores = _fuse_chunk([lst[start:end].long() for lst in item_lists], contrib, k, num_items,
                                    item_penalty)
        out_items[start:end], out_scores[start:end] = items, scores
    return out_items, out_scores


def _fuse_chunk(lists: list[torch.Tensor], contrib: list[torch.Tensor], k: int,
                num_items: int, item_penalty: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    b = lists[0].shape[0]
    device = lists[0].device
    rows, items, values = [], [], []
    for lst, c in zip(lists, contrib):
        valid = lst >= 0  # (B, N_t)
        r = torch.arange(b, device=device).unsqueeze(1).expand_as(lst)
        rows.append(r[valid])
        items.append(lst[valid])
        values.append(c.unsqueeze(0).expand_as(lst)[valid])
    rows, items, values = torch.cat(rows), torch.cat(items), torch.cat(values)
    if items.numel() and int(items.max()) >= num_items:
        raise ValueError(f"item id {int(items.max())} ≥ num_items={num_items}")
    keys, inverse = torch.unique(rows * num_items + items, return_inverse=True)  # sorted by (row, item)
    score = torch.zeros(len(keys), dtype=torch.float64, device=device).index_add_(0, inverse, values)
    rows, items = keys // num_items, keys % num_items
    if item_penalty is not None:
        score = score - item_penalty.to(device, torch.float64)[items]
    # order by (row asc, score desc, item asc): two stable sorts over the (row, item)-sorted keys
    quant = torch.round(score * _SCORE_QUANT).long()  # scores compared on a 2^-40 grid (|score| < 2^23 fits)
    order = torch.sort(-quant, stable=True).indices
    order = order[torch.sort(rows[order], stable=True).indices]
    rows, items, score = rows[order], items[order], score[order]
    counts = torch.bincount(rows, minlength=b)
    first = torch.cumsum(counts, 0) - counts  # start of each row in the sorted arrays
    pos = torch.arange(len(rows), device=device) - first[rows]
    keep = pos < k
    out_items = torch.full((b, k), -1, dtype=torch.int64, device=device)
    out_scores = torch.zeros(b, k, dtype=torch.float32, device=device)
    out_items[rows[keep], pos[keep]] = items[keep]
    out_scores[rows[keep], pos[keep]] = score[keep].float()
    return out_items, out_scores


def padded_counts(popularity: torch.Tensor, num_items: int, device=None) -> torch.Tensor:
    """(``num_items``,) float64 training counts ``popularity`` (items past its end: 0)."""
    counts = torch.zeros(num_items, dtype=torch.float64, device=device)
    pop = popularity.detach().to(device, torch.float64)[:num_items]
    counts[: len(pop)] = pop
    return counts


def log_popularity(popularity: torch.Tensor, num_items: int, device=None) -> torch.Tensor:
    """(``num_items``,) float64 log(1 + n_i) of training counts ``popularity`` (items past its end: n = 0)."""
    return torch.log1p(padded_counts(popularity, num_items, device))


def lists_avgpop(items: torch.Tensor, counts: torch.Tensor, k: int = 20) -> float:
    """Mean of ``counts`` (I,) over the listed items of every row's top-``k`` of ``items`` (U, N; -1 = padding);
    0 when nothing is listed."""
    top = items[:, :k]
    listed = top >= 0
    return float(counts[top.clamp(min=0)][listed].mean()) if bool(listed.any()) else 0.0


def sampled_rows(n: int, sample: int, seed: int) -> torch.Tensor | None:
    """The rows of ``n`` that ``popularity_matched_beta`` measures on: ``sample`` of them drawn with ``seed`` (None:
    every row, when there are no more than ``sample``)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:sample] if n > sample else None


def popularity_matched_beta(item_lists: list[torch.Tensor], popularity: torch.Tensor, method: str = "rank",
                            weights: list[float] | None = None, *, num_items: int, k: int = 20, sample: int = 1024,
                            seed: int = 0, iterations: int = 16, target_scale: float = 1.0) -> tuple[float, dict]:
    """(β, figures): the least β ≥ 0 (to a 2^-``iterations`` share of its bracket) for which the lists fused
    with the penalty β · log(1 + n_i) have a top-``k`` no more popular on average than the least popular
    teacher's top-``k`` — over ``sample`` users drawn with ``seed`` (every user when fewer). ``popularity``:
    (I',) training counts n (items past its end count 0). Such a β exists: at a large β the fused top-``k``
    is the ``k`` least popular candidates, and every teacher's top-``k`` is among the candidates.
    ``target_scale``: the target is that teacher's popularity × this (``fusion_popularity: served``'s correction).
    ``figures``: the teachers' and the fused lists' average popularity@``k`` on the sample, before and after."""
    n_users = item_lists[0].shape[0]
    device = item_lists[0].device
    counts = padded_counts(popularity, num_items, device)
    log_count = torch.log1p(counts)
    take = sampled_rows(n_users, sample, seed)
    if take is not None:
        item_lists = [lst[take.to(device)] for lst in item_lists]
    item_lists = [lst.long() for lst in item_lists]

    def avgpop(items: torch.Tensor) -> float:
        return lists_avgpop(items, counts, k)

    # every candidate of every user once, with its fused score: each β then re-ranks them (one top-k), no fusing
    width = sum(lst.shape[1] for lst in item_lists)
    cand, score = fuse_rankings(item_lists, width, method, weights, num_items=num_items)
    listed = cand >= 0
    score = torch.where(listed, score.double(), -math.inf)
    log_pop = log_count[cand.clamp(min=0)]
    top_k = min(k, width)

    def fused(beta: float) -> float:
        return avgpop(cand.gather(1, (score - beta * log_pop).topk(top_k, dim=1).indices)) if beta > 0 else avgpop(cand)

    teachers = [avgpop(lst) for lst in item_lists]
    least, before = min(teachers), fused(0.0)
    target = least * target_scale
    figures = {"teachers_avgpop": teachers, "fused_avgpop": before, "least_avgpop": least, "target_avgpop": target,
               "users": len(cand)}
    if before <= target:
        return 0.0, {**figures, "fused_avgpop_after": before}
    lo, hi = 0.0, 1.0 / 64
    while fused(hi) > target and hi < 2.0**16:  # bracket: at a large β the k least popular candidates (and
        # β·log(1 + n) stays far inside the fused scores' 2^-40 grid's int64 range)
        lo, hi = hi, hi * 2
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fused(mid) > target else (lo, mid)
    return hi, {**figures, "fused_avgpop_after": fused(hi)}


def teacher_weights_from_ndcg(ndcgs: list[float], floor: float = 1e-3) -> list[float]:
    """Teacher weights proportional to validation NDCG, summing to 1.

    A NaN, non-positive or tiny NDCG is raised to ``floor`` so that teacher still counts a little
    (and all-NaN gives equal weights).
    """
    if not ndcgs:
        return []
    raw = [v if (v is not None and math.isfinite(v) and v > floor) else floor for v in ndcgs]
    total = sum(raw)
    return [v / total for v in raw]


# Sharpness of the teachers' fusion weights chosen on validation (``distill.teacher_weights: chosen``):
# w_t ∝ ndcg_t^power, ndcg_t = teacher t's validation NDCG@20. 0 is uniform; inf keeps the best teacher alone.
WEIGHT_POWERS = (0.0, 1.0, 2.0, 4.0, math.inf)


def sharpened_weights(ndcgs: list[float], power: float, floor: float = 1e-3) -> list[float]:
    """Weights ∝ ``ndcgs``^``power`` summing to 1 (0: uniform; inf: the best teachers alone, ties shared);
    a NaN, non-positive or tiny NDCG counts as ``floor``."""
    raw = [v if (v is not None and math.isfinite(v) and v > floor) else floor for v in ndcgs]
    if math.isinf(power):
        top = max(raw)
        raw = [1.0 if v == top else 0.0 for v in raw]
    else:
        top = max(raw)
        raw = [(v / top) ** power for v in raw]
    total = sum(raw)
    return [v / total for v in raw]


def list_ndcg(items: torch.Tensor, users: torch.Tensor, relevant, k: int = 20) -> torch.Tensor:
    """(U,) NDCG@``k`` of each user's ranked ``items`` (U, N ≥ k; -1 = padding) against ``relevant``
    (a ``UserItemSet``), binary relevance."""
    from ..eval.metrics import ndcg_at_k

    top = items[:, :k]
    hits = (top >= 0) & relevant.contains(users.unsqueeze(1).expand_as(top), top.clamp(min=0))
    return ndcg_at_k(hits, relevant.degree[users])


def without(items: torch.Tensor, users: torch.Tensor, hidden) -> torch.Tensor:
    """``items`` (U, N) with every pair in ``hidden`` (a ``UserItemSet``) taken out, the order of the rest
    kept and the freed slots at the end as -1."""
    drop = (items < 0) | hidden.contains(users.unsqueeze(1).expand_as(items), items.clamp(min=0))
    order = torch.sort(drop.to(torch.int8), dim=1, stable=True).indices
    out = items.gather(1, order)
    out[drop.gather(1, order)] = -1
    return out


def fusion_evidence(item_lists: list[torch.Tensor], users: torch.Tensor, relevant, hidden, method: str, *,
                    num_items: int, powers=WEIGHT_POWERS, k: int = 20, rank_power: float = 0.05,
                    temperature: float = 10.0, ndcgs: list[float] | None = None) -> tuple[list[float], dict[float, float]]:
    """Each teacher's validation NDCG@``k`` (mean over ``users``) and, per candidate power, the sum over
    ``users`` of the NDCG@``k`` of the lists fused with ``sharpened_weights(ndcgs, power)`` (``ndcgs``:
    the teachers' NDCG to sharpen, default those just measured).

    ``item_lists``: one (U, N_t) list per teacher for ``users`` (best first); ``relevant``: the held-out
    pairs; ``hidden``: pairs no ranking may show (taken out of the lists first, as evaluation masks them;
    None: the lists are taken as they are)."""
    lists = item_lists if hidden is None else [without(lst, users, hidden) for lst in item_lists]
    measured = [float(list_ndcg(lst, users, relevant, k).mean()) if len(users) else float("nan") for lst in lists]
    ndcgs = measured if ndcgs is None else ndcgs
    sums = {}
    for power in powers:
        if not len(users):
            sums[power] = 0.0
            continue
        fused = fuse_rankings(lists, k, method, sharpened_weights(ndcgs, power), num_items=num_items,
                              rank_power=rank_power, temperature=temperature)[0]
        sums[power] = float(list_ndcg(fused, users, relevant, k).sum())
    return measured, sums


def choose_power(evidence: dict[float, float], powers=WEIGHT_POWERS) -> float:
    """The power with the most validation NDCG summed so far (ties: the smaller power, uniform first)."""
    best = powers[0]
    for power in powers:
        if evidence.get(power, 0.0) > evidence.get(best, 0.0) + 1e-9:
            best = power
    return best
