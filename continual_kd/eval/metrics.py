"""Full-ranking metrics. Metric math is pure functions over a top-K hit matrix; ``evaluate_ranking``
builds that matrix once per user chunk (scores over every item, observed items masked)."""

from __future__ import annotations

import math

import torch

from ..sparse import UserItemSet
from .bias import average_popularity, coverage, covered_items, group_names, group_recall_at_k, item_popularity_groups


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


SCORE_MEMORY_MB = 256  # default memory budget of one chunk of full scores on the CPU (knowledge, evaluation)
SCORE_COPIES = 3  # (B, I) float32 buffers alive at once: the scores, a model's temporaries, top-k's work
# on a CUDA device with no budget given: this share of the GPU's free memory (an eighth: several actors may share
# one GPU, each sizing its chunks by what is free when it scores) ...
CUDA_SCORE_SHARE = 0.125
CUDA_SCORE_MAX_MB = 4096  # ... up to this much (and never less than SCORE_MEMORY_MB)


def cuda_budget_mb(free_bytes: int) -> float:
    """A chunk's budget on a CUDA device with ``free_bytes`` free: a share of it, between the CPU's budget and
    ``CUDA_SCORE_MAX_MB`` (a GPU scores thousands of users at once; small chunks leave it waiting on launches)."""
    return max(float(SCORE_MEMORY_MB), min(float(CUDA_SCORE_MAX_MB), CUDA_SCORE_SHARE * free_bytes / 2**20))


def score_budget_mb(device: str | torch.device | None = None) -> float:
    """The default budget of one chunk of full scores where the scores live: ``SCORE_MEMORY_MB`` on the CPU,
    ``cuda_budget_mb`` of the device's free memory on a CUDA device."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return cuda_budget_mb(torch.cuda.mem_get_info(device)[0])
    return float(SCORE_MEMORY_MB)


def users_per_chunk(num_items: int, chunk_size: int | None = None, memory_mb: float | None = None,
                    device: str | torch.device | None = None) -> int:
    """Users whose full scores are ranked at once: ``chunk_size`` when given (> 0), else as many as fit
    ``memory_mb`` (default ``score_budget_mb(device)``: 256 MB on the CPU, a share of a GPU's free memory)
    with ``SCORE_COPIES`` float32 (B, I) buffers, so a chunk never holds more than the budget whatever the
    number of items (20k items: 1,118 users at 256 MB)."""
    if chunk_size:
        return int(chunk_size)
    budget = (score_budget_mb(device) if memory_mb is None else memory_mb) * 2**20
    return max(1, int(budget // (SCORE_COPIES * 4 * max(int(num_items), 1))))


def device_of(model) -> torch.device | None:
    """Where a model's scores are computed (its first parameter's device; None for a model without any)."""
    try:
        return next(iter(model.parameters())).device
    except (AttributeError, StopIteration, TypeError):
        return None


@torch.no_grad()
def top_k_items(model, users: torch.Tensor, k: int, exclude: UserItemSet | None = None,
                chunk_size: int | None = None, only: UserItemSet | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, k) best items of each user by the model's full scores, excluding known pairs; and their scores.

    Users are scored in chunks (``users_per_chunk``: sized to a memory budget unless ``chunk_size``);
    masks are written into the chunk's scores from the sets' CSR (no dense mask); only the chunk's
    (B, I) scores and the (U, k) answer are ever held.
    With ``only``, just the user's pairs in that set are ranked (slots past them: item -1, score -inf).
    """
    step = users_per_chunk(_items_of(model, exclude, only), chunk_size, device=device_of(model))
    ids = scores = None  # the (U, k) answer, filled chunk by chunk (no list of chunks joined at the end)
    for start in range(0, len(users), step):
        cu = users[start : start + step]
        s = model.full_scores(cu)  # (B, I)
        if exclude is not None:
            exclude.mask_(s, cu)
        if only is not None:
            rows, cols = only.rows_for(cu)
            keep = cols < s.shape[1]
            rows, cols = rows[keep], cols[keep]
            kept = s[rows, cols]
            s = s.fill_(float("-inf")) if s.is_contiguous() else torch.full_like(s, float("-inf"))
            s[rows, cols] = kept
        top = torch.topk(s, min(k, s.shape[1]), dim=1)
        if ids is None:
            ids = torch.empty(len(users), top.indices.shape[1], dtype=top.indices.dtype, device=s.device)
            scores = torch.empty(len(users), top.values.shape[1], dtype=top.values.dtype, device=s.device)
        ids[start : start + len(cu)] = (torch.where(torch.isinf(top.values) & (top.values < 0), -1, top.indices)
                                        if only is not None else top.indices)
        scores[start : start + len(cu)] = top.values
        del s, top
    if ids is None:
        return torch.zeros(0, k, dtype=torch.int64), torch.zeros(0, k)
    return ids, scores


def _items_of(model, *sets) -> int:
    """The width of the model's score rows (a set's item space for a model that does not say)."""
    n = getattr(model, "num_items", None)
    return int(n) if n else max([s.num_items for s in sets if s is not None] + [1])


def sample_users(users: torch.Tensor, size: int | None, seed: int = 0) -> torch.Tensor:
    """A seeded uniform sample of ``size`` of ``users`` (without replacement), in their given order;
    all of them when ``size`` is None or not smaller (the same tensor, so the same figures)."""
    if size is None or size >= len(users):
        return users
    pick = torch.randperm(len(users), generator=torch.Generator().manual_seed(int(seed)))[: int(size)]
    return users[torch.sort(pick).values.to(users.device)]


@torch.no_grad()
def evaluate_ranking(model, relevant: UserItemSet, exclude: UserItemSet | None, ks=(10, 20, 50),
                     chunk_size: int = 1024, device: str | torch.device = "cpu",
                     item_popularity: torch.Tensor | None = None,
                     item_group: torch.Tensor | dict[str, torch.Tensor] | None = None,
                     item_weight: torch.Tensor | None = None, sample: int | None = None, seed: int = 0,
                     keep_relevant: bool = False) -> dict[str, float]:
    """Mean Recall@K and NDCG@K over users with at least one relevant item, full ranking.

    Users are scored in chunks sized to memory (``users_per_chunk``; ``chunk_size`` > 0 fixes it); hits
    come from membership of the top-K in ``relevant`` (no dense (B, I) mask). ``sample``: a seeded
    uniform sample of that many of the users (each still ranked over every item); ``users`` in the
    result is the number evaluated, and ``users_of`` the number there were (added only with ``sample``).
    ``keep_relevant``: ``exclude`` may hold the relevant pairs too; they are ranked anyway (the target is
    never masked), so one mask set serves every block's evaluation.

    ``relevant``: the held-out pairs (e.g. a block's test part). ``exclude``: pairs to mask (what the
    evaluation's mask hides: see ``eval.protocol``).

    Bias-aware keys, added when ``item_popularity`` (I,) training interaction counts and/or
    ``item_group`` (I,) popularity groups are given (groups default to ``item_popularity_groups``
    of the popularity; items past either tensor's end count as popularity 0 / the last group):
    ``recall@K/<group>`` (head, mid, tail for 3 groups): hits on relevant items of the group over the
    user's relevant items of the group, averaged over users with ≥1 relevant item in it;
    ``avgpop@K`` (needs ``item_popularity``): mean popularity of the top-K items, averaged over users;
    ``coverage@K``: fraction of all items recommended to at least one evaluated user.
    ``item_group`` may also be a dict of groupings by key prefix (``bias.popularity_groupings``):
    prefix "" names groups head/mid/tail (g0, g1, … for other counts), a prefix p names them p0, p1, ….
    With ``item_weight`` (I,) inverse propensities, self-normalised inverse-propensity estimates
    ``ips_recall@K`` / ``ips_ndcg@K`` (``eval.estimates``) come from the same top-K.
    All come from the same top-K tensor as Recall/NDCG. A metric that is undefined here (no user with
    a relevant item: no users at all, or none in a group) is None, never NaN: JSON null, shown as "–".
    """
    return evaluate_many(model, {None: relevant}, exclude, ks, chunk_size, device, item_popularity, item_group,
                         item_weight, sample, {None: seed}, keep_relevant)[None]


@torch.no_grad()
def evaluate_many(model, relevants: dict, exclude: UserItemSet | None, ks=(10, 20, 50),
                  chunk_size: int = 1024, device: str | torch.device = "cpu",
                  item_popularity: torch.Tensor | None = None,
                  item_group: torch.Tensor | dict[str, torch.Tensor] | None = None,
                  item_weight: torch.Tensor | None = None, sample: int | None = None, seeds: dict | None = None,
                  keep_relevant: bool = False) -> dict:
    """``evaluate_ranking`` of several relevant sets under one mask, in ONE full-ranking pass: each user
    of any set is scored and ranked once, and every set's metrics come from that same top-K (key → the
    dict ``evaluate_ranking`` returns for that set alone). With ``keep_relevant`` the union of the sets'
    targets survives the mask, so the figures equal separate passes when ``exclude`` hides no target
    (e.g. every block's test pairs under the standard mask: train + valid hidden, no pair repeated);
    when it hides one, each set gets its own pass (the same figures, no saving).
    ``sample``: each set's users are sampled as ``evaluate_ranking`` would with ``seeds[key]``."""
    seeds = seeds or {}
    if keep_relevant and exclude is not None and len(relevants) > 1 and any(
            bool(exclude.contains(r.users, r.items).any()) for r in relevants.values()):
        # a target the mask hides (a pair repeated in another split or block, or a mask that hides targets)
        # would survive in the other sets' rankings too: one pass per set, as evaluate_ranking
        return {key: evaluate_many(model, {key: r}, exclude, ks, chunk_size, device, item_popularity, item_group,
                                   item_weight, sample, {key: seeds.get(key, 0)}, keep_relevant)[key]
                for key, r in relevants.items()}
    accs, members = {}, {}
    num_users = max(r.num_users for r in relevants.values()) if relevants else 0
    for key, relevant in relevants.items():
        eligible = torch.nonzero(relevant.degree > 0).flatten().to(device)
        users = sample_users(eligible, sample, seeds.get(key, 0))
        accs[key] = _Metrics(relevant, ks, item_popularity, item_group, item_weight, len(users),
                             len(eligible) if sample is not None else None)
        member = torch.zeros(num_users, dtype=torch.bool, device=device)
        member[users] = True
        members[key] = member
    union = torch.nonzero(torch.stack(list(members.values())).any(0)).flatten() if members else \
        torch.zeros(0, dtype=torch.int64, device=device)
    if len(relevants) == 1:
        union = users  # the sampled order of the single set (the same figures either way)
    max_k = max(ks)
    width = _items_of(model, *relevants.values())
    step = users_per_chunk(width, chunk_size, device=device)
    for start in range(0, len(union), step):
        cu = union[start : start + step]
        s = model.full_scores(cu)
        if exclude is not None:
            if keep_relevant:  # the targets' own scores survive the mask
                kept = [r.rows_for(cu) for r in relevants.values()]
                rows = torch.cat([k[0] for k in kept]) if len(kept) > 1 else kept[0][0]
                cols = torch.cat([k[1] for k in kept]) if len(kept) > 1 else kept[0][1]
                inside = cols < s.shape[1]
                rows, cols = rows[inside], cols[inside]
                target_scores = s[rows, cols]
            exclude.mask_(s, cu)
            if keep_relevant:
                s[rows, cols] = target_scores
        top = torch.topk(s, min(max_k, s.shape[1]), dim=1).indices  # (B, K)
        n_items = s.shape[1]
        del s
        for key, acc in accs.items():
            if len(accs) == 1:
                acc.add(cu, top, n_items)
                continue
            sel = members[key][cu]
            if bool(sel.any()):
                acc.add(cu[sel], top[sel], n_items)
    return {key: acc.result() for key, acc in accs.items()}


class _Metrics:
    """The running sums of one relevant set's metrics over the chunks of its users' top-K lists."""

    def __init__(self, relevant: UserItemSet, ks, item_popularity, item_group, item_weight, n_users: int,
                 n_eligible: int | None):
        self.relevant, self.ks, self.n_users, self.n_eligible = relevant, tuple(ks), n_users, n_eligible
        self.item_popularity, self.item_weight = item_popularity, item_weight
        self.sums = {f"{m}@{k}": 0.0 for m in METRICS for k in ks}
        self.bias = item_popularity is not None or item_group is not None
        if item_group is None and item_popularity is not None:
            item_group = item_popularity_groups(item_popularity)
        self.groupings = {} if item_group is None else item_group if isinstance(item_group, dict) else {"": item_group}
        self.names = {p: _group_names(p, g) for p, g in self.groupings.items()}
        self.group_sums = {p: {k: torch.zeros(len(n), dtype=torch.float64) for k in ks} for p, n in self.names.items()}
        self.group_users = {p: torch.zeros(len(n), dtype=torch.float64) for p, n in self.names.items()}
        self.pop_sums = {k: 0.0 for k in ks}
        self.ips_sums = {f"ips_{m}@{k}": 0.0 for m in METRICS for k in ks}
        self.covered = {}

    def add(self, cu: torch.Tensor, top: torch.Tensor, n_items: int) -> None:
        relevant, ks = self.relevant, self.ks
        hits = relevant.contains(cu.unsqueeze(1).expand_as(top), top)  # (B, K)
        n_rel = relevant.degree[cu]
        for k in ks:
            for name, fn in METRICS.items():
                self.sums[f"{name}@{k}"] += float(fn(hits[:, :k], n_rel).sum())
        need_rel = self.item_weight is not None or self.groupings
        rel_rows, rel_cols = relevant.rows_for(cu) if need_rel else (None, None)
        if self.item_weight is not None:
            from .estimates import ips_ndcg_at_k, snips_recall_at_k

            item_weight = self.item_weight
            w = _fit(item_weight.to(top.device).double(), n_items, float(item_weight.max()) if len(item_weight) else 1.0)
            ok = rel_cols < n_items
            rel_w = torch.zeros(len(cu), dtype=torch.float64, device=top.device).index_add_(
                0, rel_rows[ok], w[rel_cols[ok]])  # (B,)
            hit_w = torch.where(hits, w[top], torch.zeros((), dtype=torch.float64, device=top.device))  # (B, K)
            for k in ks:
                self.ips_sums[f"ips_recall@{k}"] += float(snips_recall_at_k(hit_w[:, :k], rel_w).sum())
                self.ips_sums[f"ips_ndcg@{k}"] += float(ips_ndcg_at_k(hit_w[:, :k], rel_w).sum())
        if not self.bias:
            return
        for p, grouping in self.groupings.items():
            groups = _fit(grouping.to(top.device).long(), n_items, len(self.names[p]) - 1)
            keep = rel_cols < n_items
            rel_per_group = torch.zeros(len(cu), len(self.names[p]), dtype=torch.int64, device=top.device)
            rel_per_group.index_put_((rel_rows[keep], groups[rel_cols[keep]]), torch.ones_like(rel_rows[keep]),
                                     accumulate=True)
            self.group_users[p] += (rel_per_group > 0).sum(0).double().cpu()
            for k in ks:
                recall, has = group_recall_at_k(hits[:, :k], groups[top[:, :k]], rel_per_group)
                self.group_sums[p][k] += torch.where(has, recall, torch.zeros_like(recall)).sum(0).double().cpu()
        if self.item_popularity is not None:
            pop = _fit(self.item_popularity.to(top.device), n_items, 0)
            for k in ks:
                self.pop_sums[k] += float(average_popularity(top[:, :k], pop).sum())
        for k in ks:
            chunk_cov = covered_items(top[:, :k], n_items)
            self.covered[k] = chunk_cov if k not in self.covered else self.covered[k] | chunk_cov

    def result(self) -> dict[str, float]:
        n, ks = self.n_users, self.ks
        out = {key: v / n if n else None for key, v in self.sums.items()}
        if self.item_weight is not None:
            out.update({key: v / n if n else None for key, v in self.ips_sums.items()})
        out["users"] = float(n)
        if self.n_eligible is not None:
            out["users_of"] = float(self.n_eligible)
        if self.bias:
            for k in ks:
                for p in self.groupings:
                    for g, name in enumerate(self.names[p]):
                        cnt = float(self.group_users[p][g])
                        out[f"recall@{k}/{name}"] = float(self.group_sums[p][k][g]) / cnt if cnt > 0 else None
                if self.item_popularity is not None:
                    out[f"avgpop@{k}"] = self.pop_sums[k] / n if n else None
                out[f"coverage@{k}"] = coverage(self.covered[k]) if k in self.covered else None
        return out


def _group_names(prefix: str, grouping: torch.Tensor) -> tuple[str, ...]:
    n = int(grouping.max()) + 1 if len(grouping) else 0
    return group_names(n) if not prefix else tuple(f"{prefix}{g}" for g in range(n))


def _fit(values: torch.Tensor, n: int, fill) -> torch.Tensor:
    """``values`` cut or padded with ``fill`` to length n (items unknown to the tensor)."""
    if len(values) >= n:
        return values[:n]
    return torch.cat([values, torch.full((n - len(values),), fill, dtype=values.dtype, device=values.device)])


def is_defined(value) -> bool:
    """A metric value that counts: a finite number (None / NaN / inf mean undefined for that block)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def defined_mean(values) -> tuple[float | None, int]:
    """(mean of the defined values, how many there were); (None, 0) when none is defined."""
    vals = [float(v) for v in values if is_defined(v)]
    return (sum(vals) / len(vals) if vals else None), len(vals)


def undefined_as_none(value):
    """``value`` with every NaN / inf float (at any depth of dicts, lists, tuples) replaced by None, so that
    JSON holds null for an undefined metric, never NaN (which strict JSON parsers refuse)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: undefined_as_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [undefined_as_none(v) for v in value]
    return value


@torch.no_grad()
def top_k_users(model, items: torch.Tensor, k: int, exclude: UserItemSet | None = None,
                chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(J, k) best users of each of ``items`` by the model's full scores, best first, and their scores
    (item-side knowledge, IR-RRD). A running top-k over chunks of users: never all users × items at
    once. Pairs in ``exclude`` are not ranked; slots past an item's rankable users hold user -1, -inf."""
    items = items.long()
    num_users = int(model.num_users)
    k = min(k, num_users)
    best = torch.full((len(items), 0), float("-inf"), device=items.device)
    best_ids = torch.zeros(len(items), 0, dtype=torch.int64, device=items.device)
    step = users_per_chunk(getattr(model, "num_items", 0) or len(items), chunk_size, device=device_of(model))
    for start in range(0, num_users, step):
        cu = torch.arange(start, min(start + step, num_users), device=items.device)
        s = model.full_scores(cu)  # (B, I)
        if exclude is not None:
            exclude.mask_(s, cu)
        cand = torch.cat([best, s[:, items].T.to(best.dtype)], dim=1)  # (J, k + B)
        cand_ids = torch.cat([best_ids, cu.unsqueeze(0).expand(len(items), -1)], dim=1)
        top = torch.topk(cand, min(k, cand.shape[1]), dim=1)
        best, best_ids = top.values, torch.gather(cand_ids, 1, top.indices)
    best_ids = torch.where(torch.isinf(best) & (best < 0), -1, best_ids)
    return best_ids, best
