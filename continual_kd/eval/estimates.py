"""Evaluation that sees past the log: what a model is worth for what users prefer, not what they were shown.

A log is written by exposure: popular items are shown, so clicked, so every logged metric rewards
recommending them. Four views that correct for it, each a pure, vectorised function:

- **inverse-propensity estimates** (Yang et al., RecSys'18): each logged test pair is weighted by
  1 / p_i, p_i = clip((pop_i / max pop)^η, p_min, 1) from the item's training popularity, and the
  recall is self-normalised per user: ips_recall@K = Σ_hits w / Σ_relevant w (the user's recall over
  every item they would find relevant); ips_ndcg@K = Σ_hits w / log2(rank + 1) / IDCG(min(n̂, K)) with
  n̂ = Σ_relevant w. η = 0 gives back the logged metrics exactly.
- **an intervened test split** (PDA, MACR, DICE): the test pairs resampled so every item is equally
  likely: each item with at least ``per_item`` test pairs keeps exactly that many, drawn at random.
- **a missing-at-random labelled set** (Yahoo!R3, Coat, KuaiRec): per user, the labelled items are
  ranked by the model and NDCG/Recall@K computed with label ≥ threshold as relevant.
- **a simulator's truth** (``data.simulate``): the share of the best achievable true relevance in
  the model's top-K, and the labelled-set metrics on items drawn uniformly and labelled by the truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import CkdError, excerpt
from ..sparse import UserItemSet
from .metrics import METRICS

# ---------------------------------------------------------------------------- inverse propensity


def popularity_propensity(train_counts: torch.Tensor, exponent: float = 0.5, clip: float = 0.05) -> torch.Tensor:
    """(I,) float64 propensity of a pair of each item being observed: (count / max count)^exponent, clipped
    from below at ``clip`` (an item never trained on gets ``clip``); the most popular item has 1."""
    counts = train_counts.double()
    top = float(counts.max()) if len(counts) else 0.0
    if top <= 0:
        return torch.ones_like(counts)
    return (counts / top).pow(exponent).clamp(min=clip, max=1.0)


def snips_recall_at_k(hit_weight: torch.Tensor, relevant_weight: torch.Tensor) -> torch.Tensor:
    """hit_weight: (B, K) 1/p of the relevant item at each rank (0 where no hit); relevant_weight: (B,)
    Σ 1/p over the user's relevant items → (B,) self-normalised recall."""
    return hit_weight.sum(1) / relevant_weight.clamp(min=1e-300)


def ips_ndcg_at_k(hit_weight: torch.Tensor, relevant_weight: torch.Tensor) -> torch.Tensor:
    """(B,) inverse-propensity NDCG@K: Σ_r w_r / log2(r + 1) over the hits (the IPS estimate of the user's
    DCG) over IDCG(min(n̂, K)), n̂ = Σ w the IPS estimate of how many items the user finds relevant
    (IDCG linear between whole counts). Scale matters here: propensities are relative to the most popular
    item's, taken as 1."""
    k = hit_weight.shape[1]
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=hit_weight.device))  # (K,)
    cum = torch.cat([torch.zeros(1, dtype=torch.float64, device=hit_weight.device), torch.cumsum(discount, 0)])
    x = relevant_weight.double().clamp(min=1.0, max=float(k))
    whole = x.floor().long()
    ideal = cum[whole] + (x - whole) * torch.cat([discount, discount[-1:]])[whole.clamp(max=k)]
    return (hit_weight * discount).sum(1) / ideal


# ------------------------------------------------------------------------------- intervened split


def intervened_split(users: np.ndarray, items: np.ndarray, per_item: int = 1, seed: int = 0) -> np.ndarray:
    """(n,) bool: the test pairs kept so that every item is equally likely: each item with ≥ ``per_item``
    pairs keeps exactly ``per_item`` of them, drawn uniformly (seeded); items with fewer are left out."""
    n = len(items)
    if n == 0:
        return np.zeros(0, dtype=bool)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(17,)))
    order = np.lexsort((rng.random(n), items))  # by item, random within an item
    sorted_items = items[order]
    first = np.r_[0, np.flatnonzero(np.diff(sorted_items)) + 1]  # start of each item's run
    counts = np.diff(np.r_[first, n])
    rank = np.arange(n) - np.repeat(first, counts)  # position within the item's run
    keep_sorted = (rank < per_item) & (np.repeat(counts, counts) >= per_item)
    keep = np.zeros(n, dtype=bool)
    keep[order] = keep_sorted
    return keep


# ---------------------------------------------------------------------------- labelled item sets


def labelled_metrics(model, users: torch.Tensor, items: torch.Tensor, labels: torch.Tensor, ks=(5, 10, 20),
                     chunk_size: int = 1024) -> dict[str, float | None]:
    """NDCG/Recall@K of ranking each user's labelled items (only those; no masking).

    users: (N,) dense ids; items: (N, n) labelled item ids per user (-1 = padding); labels: (N, n) bool
    relevant. Users without a relevant label are left out (``users`` says how many counted)."""
    sums = {f"{m}@{k}": 0.0 for m in METRICS for k in ks}
    counted = 0
    with torch.no_grad():
        chunk_size = chunk_size or 1024  # 0 (eval.chunk_size's default): this fixed size
        for start in range(0, len(users), chunk_size):
            cu, it, lab = (x[start:start + chunk_size] for x in (users, items, labels))
            n_rel = lab.sum(1)
            keep = n_rel > 0
            if not bool(keep.any()):
                continue
            cu, it, lab, n_rel = cu[keep], it[keep], lab[keep], n_rel[keep]
            s = model.full_scores(cu)  # (B, I)
            valid = it >= 0
            scores = torch.gather(s, 1, it.clamp(min=0)).masked_fill(~valid, float("-inf"))  # (B, n)
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices
            hits = torch.gather(lab & valid, 1, order)  # (B, n) by the model's rank
            for k in ks:
                hk = hits[:, :k] if hits.shape[1] >= k else torch.nn.functional.pad(hits, (0, k - hits.shape[1]))
                for name, fn in METRICS.items():
                    sums[f"{name}@{k}"] += float(fn(hk, n_rel).sum())
            counted += len(cu)
    out = {key: v / counted if counted else None for key, v in sums.items()}
    out["users"] = float(counted)
    return out


def read_labelled_columns(path: str | Path, what: str = "eval.mar_test", times: bool = False):
    """A labelled file (CSV / Parquet; columns user, item, label and, with ``times``, optionally timestamp / ts)
    → (external users and items as `ckd ingest` reads ids — pyarrow strings, trimmed, null where missing —, labels
    float64 (NaN where missing), (seconds int64, bad-time mask) or None). ``what`` names it in errors."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from ..stream.ingest import _ids, _timestamps

    path = Path(path)
    try:
        table = pq.read_table(path) if path.suffix.lower() in (".parquet", ".pq") else pacsv.read_csv(path)
    except (OSError, ValueError) as e:
        raise CkdError(f"{what} {path}: cannot read it ({excerpt(e)}); give a CSV or Parquet file with user, item "
                       f"and label columns") from None
    missing = [c for c in ("user", "item", "label") if c not in table.column_names]
    if missing:
        raise CkdError(f"{what} {path}: no column {missing[0]!r} (it has {', '.join(table.column_names)}); "
                       f"name the columns user, item and label")
    ext_u = _ids(table.column("user").combine_chunks(), str(path), "user")
    ext_i = _ids(table.column("item").combine_chunks(), str(path), "item")
    column = table.column("label").combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        # a CSV column with some text in it: the numbers count, the rest is a missing label (dropped and counted)
        text = pc.utf8_trim_whitespace(column)
        number = pc.fill_null(pc.match_substring_regex(text, r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"), False)
        if len(column) and not pc.any(number).as_py():
            raise CkdError(f"{what} {path}: the label column is not numeric; use 0/1 or ratings")
        column = pc.if_else(number, text, pa.scalar(None, column.type))
    try:
        label = np.asarray(pc.cast(column, "float64").to_numpy(zero_copy_only=False), dtype=np.float64)
    except Exception:  # noqa: BLE001 - any cast failure is the file's
        raise CkdError(f"{what} {path}: the label column is not numeric; use 0/1 or ratings") from None
    name = next((c for c in ("timestamp", "ts") if c in table.column_names), None) if times else None
    when = None
    if name is not None:
        seconds, bad, out_of_range = _timestamps(table.column(name).combine_chunks())
        when = (seconds, bad | out_of_range)
    return ext_u, ext_i, label, when


def read_labelled_file(path: str | Path, user_ids: dict[str, int], item_ids: dict[str, int],
                       positive: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A missing-at-random test file (CSV / Parquet; columns user, item, label) in dense ids:
    (users (N,), items (N, n) padded with -1, labels (N, n) bool = label ≥ positive, rows dropped because
    their user or item is unknown to the store)."""
    ext_u, ext_i, label, _ = read_labelled_columns(path)  # (its times are not used)
    u = np.array([user_ids.get(x, -1) for x in ext_u.to_pylist()], dtype=np.int64)
    i = np.array([item_ids.get(x, -1) for x in ext_i.to_pylist()], dtype=np.int64)
    ok = (u >= 0) & (i >= 0) & np.isfinite(label)
    users, items, labels = group_by_user(u[ok], i[ok], label[ok] >= positive)
    return users, items, labels, int((~ok).sum())


def group_by_user(users: np.ndarray, items: np.ndarray, labels: np.ndarray):
    """Flat (user, item, label) rows → (users (N,), items (N, n) padded with -1, labels (N, n) bool)."""
    if len(users) == 0:
        return (torch.zeros(0, dtype=torch.int64), torch.zeros(0, 1, dtype=torch.int64),
                torch.zeros(0, 1, dtype=torch.bool))
    order = np.lexsort((items, users))
    u, i, lab = users[order], items[order], labels[order]
    uniq, first, counts = np.unique(u, return_index=True, return_counts=True)
    col = np.arange(len(u)) - np.repeat(first, counts)
    row = np.repeat(np.arange(len(uniq)), counts)
    it = np.full((len(uniq), int(counts.max())), -1, dtype=np.int64)
    lb = np.zeros(it.shape, dtype=bool)
    it[row, col], lb[row, col] = i, lab
    return torch.as_tensor(uniq), torch.as_tensor(it), torch.as_tensor(lb)


# --------------------------------------------------------------------------------------- truth


PreferenceFn = Callable[[torch.Tensor], torch.Tensor]  # dense users (B,) → (B, I) true preference in [0, 1]


def relevance_share(model, preference: PreferenceFn, users: torch.Tensor, exclude: UserItemSet | None,
                    ks=(20,), chunk_size: int = 1024) -> dict[str, float | None]:
    """``truth_share@K``: per user, Σ true preference of the model's top-K over the best Σ any K rankable
    items reach (the same items masked), averaged over users."""
    sums = {k: 0.0 for k in ks}
    max_k = max(ks)
    with torch.no_grad():
        chunk_size = chunk_size or 1024  # 0 (eval.chunk_size's default): this fixed size
        for start in range(0, len(users), chunk_size):
            cu = users[start:start + chunk_size]
            s = model.full_scores(cu)
            pref = preference(cu).to(s.device, torch.float64)[:, : s.shape[1]]  # (B, I)
            blocked = exclude.dense(cu, s.shape[1]) if exclude is not None else torch.zeros_like(s, dtype=torch.bool)
            s = s.masked_fill(blocked, float("-inf"))
            pref_rank = pref.masked_fill(blocked, float("-inf"))
            kk = min(max_k, s.shape[1])
            top = torch.topk(s, kk, dim=1).indices
            got = torch.gather(pref, 1, top).masked_fill(torch.gather(blocked, 1, top), 0.0)  # (B, K)
            best = torch.topk(pref_rank, kk, dim=1).values.clamp(min=0)  # (B, K) descending
            for k in ks:
                ratio = got[:, :k].sum(1) / best[:, :k].sum(1).clamp(min=1e-300)
                sums[k] += float(ratio.sum())
    n = len(users)
    return {f"truth_share@{k}": v / n if n else None for k, v in sums.items()}


def truth_labelled_set(preference: PreferenceFn, users: torch.Tensor, num_items: int, exclude: UserItemSet | None,
                       per_user: int = 100, seed: int = 0, chunk_size: int = 1024):
    """Per user, ``per_user`` items drawn uniformly among those the user can be recommended (not masked),
    each labelled relevant with probability = its true preference (seeded): a missing-at-random set as
    a uniform-exposure survey would collect it. → (users, items (N, n) padded -1, labels (N, n) bool)."""
    gen = torch.Generator().manual_seed(int(seed))
    its, labs = [], []
    n = min(per_user, num_items)
    chunk_size = chunk_size or 1024  # 0 (eval.chunk_size's default): this fixed size (the draws depend on it)
    for start in range(0, len(users), chunk_size):
        cu = users[start:start + chunk_size]
        keys = torch.rand(len(cu), num_items, generator=gen, dtype=torch.float64)
        if exclude is not None:
            exclude.mask_(keys, cu)  # masked items get -inf: drawn last, then dropped
        top = torch.topk(keys, n, dim=1)
        items = torch.where(torch.isinf(top.values), -1, top.indices)
        pref = preference(cu).to(torch.float64)
        p = torch.gather(pref, 1, items.clamp(min=0))
        labels = (torch.rand(p.shape, generator=gen, dtype=torch.float64) < p) & (items >= 0)
        its.append(items)
        labs.append(labels)
    if not its:
        return users, torch.zeros(0, n, dtype=torch.int64), torch.zeros(0, n, dtype=torch.bool)
    return users, torch.cat(its), torch.cat(labs)
