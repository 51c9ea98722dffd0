"""UnKD: unbiased knowledge distillation (WSDM'23; reference code chengang95/UnKD, UnKD/sample.py).

Items are cut into popularity groups of about equal interaction mass. The teacher ranks each
group's unobserved items separately, so the student learns the teacher's order *inside* a group
(where popularity is roughly constant) and not the popularity bias between groups:

    per user u and group g, n_g position pairs (a, b) drawn with p(r) ∝ exp(-(r+1)/T),
    pos = the better-ranked item, neg = the other;
    L_KD = Σ_u Σ_pairs -log(σ(s(u,pos) - s(u,neg)) + 1e-10)

Reduction: **sum** over the batch's unique users and their pairs (the repo's convention: BPR and
RRD are sums too, total = BPR_sum + w·L_KD). The reference averages both BPR and L_KD (w = 1); to
reproduce its balance with sums use w ≈ batch_size / (unique users per batch · pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Batch, KDTerm, TermContext, register_term
from .fusion import fuse_rankings


def popularity_groups(item_counts: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(I,) int64 popularity group per item, 0 = most popular.

    Items are sorted by count (descending, ties by smaller id) and cut where the cumulative mass
    crosses g·total/G: an item goes to group ⌊G · (mass before it + count/2) / total⌋ (its
    midpoint), so each cut lies within half a boundary item's count of its ideal place and each
    group holds total/G ± one item's count. Groups left empty by a very popular item are dropped
    (ids stay consecutive); a last group with less than half the average mass (total / groups)
    merges into the previous one. So fewer than ``num_groups`` groups may come out. Items with
    count 0 fall in the last group.
    """
    n = item_counts.shape[0]
    device = item_counts.device
    counts = item_counts.to(torch.float64)
    total = float(counts.sum())
    if num_groups <= 1 or n == 0 or total <= 0:
        return torch.zeros(n, dtype=torch.int64, device=device)
    order = torch.sort(counts, descending=True, stable=True).indices
    c = counts[order]
    mid = torch.cumsum(c, 0) - c / 2
    raw = torch.floor(mid * num_groups / total).long().clamp(0, num_groups - 1)  # non-decreasing
    group = torch.zeros(n, dtype=torch.int64, device=device)
    group[1:] = torch.cumsum((raw[1:] != raw[:-1]).long(), 0)  # consecutive ids
    n_groups = int(group[-1]) + 1
    mass = torch.zeros(n_groups, dtype=torch.float64, device=device).index_add_(0, group, c)
    if n_groups > 1 and float(mass[-1]) < 0.5 * total / n_groups:
        group[group == n_groups - 1] = n_groups - 2
    out = torch.empty(n, dtype=torch.int64, device=device)
    out[order] = group
    return out


def group_rankings(full_scores: torch.Tensor, item_group: torch.Tensor, per_group: int) -> torch.Tensor:
    """(B, G, per_group) the best items of each group by ``full_scores`` (B, I), best first.

    Known pairs must already be -inf in ``full_scores``; they and the slots past a group's size are
    -1 (always at the end of a row). Inside the kept list equal scores go to the smaller item id
    (which of several items tied exactly at the cut-off is kept follows ``torch.topk``).
    A loop over the G groups, each a ``topk`` over the group's columns (several times faster than
    sorting whole rows), then a small stable sort of the kept (B, per_group) block.
    """
    b, n_items = full_scores.shape
    device = full_scores.device
    item_group = item_group.to(device).long()
    n_groups = int(item_group.max()) + 1 if n_items else 0
    by_group = torch.sort(item_group, stable=True).indices  # item ids grouped, ascending inside a group
    sizes = torch.bincount(item_group, minlength=n_groups).tolist()
    out = torch.full((b, n_groups, per_group), -1, dtype=torch.int64, device=device)
    for g, cols in enumerate(torch.split(by_group, sizes)):
        m = min(per_group, len(cols))
        if m == 0:
            continue
        scores = full_scores[:, cols]  # (B, n_g)
        kept = torch.sort(torch.topk(scores, m, dim=1).indices, dim=1).values  # (B, m) column order = id order
        values = torch.gather(scores, 1, kept)
        order = torch.sort(values, dim=1, descending=True, stable=True).indices
        kept, values = torch.gather(kept, 1, order), torch.gather(values, 1, order)
        out[:, g, :m] = torch.where(torch.isneginf(values), torch.full_like(kept, -1), cols[kept])
    return out


@torch.no_grad()
def teacher_group_rankings(model, users: torch.Tensor, item_group: torch.Tensor, per_group: int,
                           exclude=None, chunk_size: int = 1024) -> torch.Tensor:
    """(U, G, per_group) ``group_rankings`` of a model's full scores, user chunk by user chunk.

    ``exclude`` (a ``UserItemSet``) holds the known pairs to mask. Items past the end of
    ``item_group`` (ids newer than the grouping) join the last, least popular group.
    """
    parts = []
    n_last = int(item_group.max()) if len(item_group) else 0
    for start in range(0, len(users), chunk_size):
        cu = users[start : start + chunk_size]
        s = model.full_scores(cu)  # (B, I)
        if exclude is not None:
            exclude.mask_(s, cu)
        groups = item_group[: s.shape[1]]
        if len(groups) < s.shape[1]:
            groups = torch.cat([groups, groups.new_full((s.shape[1] - len(groups),), n_last)])
        parts.append(group_rankings(s, groups, per_group))
    if not parts:
        n_groups = int(item_group.max()) + 1 if len(item_group) else 0
        return torch.zeros(0, n_groups, per_group, dtype=torch.int64, device=users.device)
    return torch.cat(parts)


def fuse_group_rankings(group_lists: list[torch.Tensor], per_group: int | None = None, method: str = "rank",
                        weights: list[float] | None = None, *, num_items: int, rank_power: float = 0.05,
                        temperature: float = 10.0) -> torch.Tensor:
    """Unbiased multi-teacher mode: fuse each popularity group's lists separately.

    group_lists: one (U, G, M_t) tensor per teacher (-1 padding ignored); returns (U, G, M') items
    with M' = ``per_group`` or max M_t, best first, -1 padded. See ``fuse_rankings``.
    """
    n_groups = group_lists[0].shape[1]
    if any(g.shape[:2] != group_lists[0].shape[:2] for g in group_lists):
        raise ValueError("every teacher's group rankings must be (U, G, M_t) over the same users and groups")
    m = per_group or max(g.shape[2] for g in group_lists)
    fused = [fuse_rankings([g[:, j] for g in group_lists], m, method, weights, num_items=num_items,
                           rank_power=rank_power, temperature=temperature)[0] for j in range(n_groups)]
    return torch.stack(fused, dim=1)


def truncated_geometric(length: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """One position r in [0, length) per entry of ``length``, p(r) ∝ exp(-(r+1)/T) (inverse CDF).

    With q = exp(-1/T): F(r) = (1 - q^{r+1}) / (1 - q^L), so r = ⌈log(1 - u(1 - q^L)) / log q⌉ - 1.
    """
    q = torch.exp(torch.tensor(-1.0 / temperature, dtype=torch.float64))
    u = torch.rand(length.shape, generator=generator, dtype=torch.float64)
    mass = 1.0 - q ** length.to(torch.float64).cpu()
    r = torch.ceil(torch.log1p(-u * mass) / torch.log(q)) - 1
    return r.clamp(min=0).minimum((length.cpu() - 1).clamp(min=0).to(torch.float64)).long()


@dataclass(frozen=True)
class UnKDConfig:
    weight: float = 1.0  # w in BPR + w·L_KD (both summed; see the module note on the reference's means)
    groups: int = 4  # popularity groups G (fewer may come out of popularity_groups)
    pairs: int = 30  # pairs per user, n_g = pairs // G per group
    per_group: int = 1000  # teacher top items kept per group
    temperature: float = 20.0  # T of p(r) ∝ exp(-(r+1)/T)


class UnKDTargets:
    """Per-user, per-group position pairs, redrawn by ``resample`` once per epoch.

    users: (U,) users with teacher knowledge; group_items: (U, G, M) the teacher's ranking of each
    popularity group's unobserved items, best first, -1 padded at the end (``group_rankings``).
    G is taken from ``group_items`` (merged groups are simply absent), n_g = cfg.pairs // G.
    """

    def __init__(self, cfg: UnKDConfig, users: torch.Tensor, group_items: torch.Tensor):
        if group_items.dim() != 3 or group_items.shape[0] != len(users):
            raise ValueError(f"group_items must be (U, G, M) for {len(users)} users, got {tuple(group_items.shape)}")
        self.cfg = cfg
        self.users = users.long()
        self.group_items = group_items.long()
        n_users, n_groups, m = self.group_items.shape
        self.length = (self.group_items >= 0).sum(-1)  # (U, G) valid positions
        if m and bool(((self.group_items[..., 1:] >= 0) & (self.group_items[..., :-1] < 0)).any()):
            raise ValueError("group_items: -1 padding must come after every item of a group")
        self.pairs_per_group = cfg.pairs // n_groups if n_groups else 0
        # sorted users → row, for looking batch users up without a num_users-sized table
        self.sorted_users, self.sorted_rows = torch.sort(self.users)
        shape = (n_users, n_groups, self.pairs_per_group)
        self.pos_items = torch.full(shape, -1, dtype=torch.int64, device=self.users.device)
        self.neg_items = self.pos_items.clone()
        self.valid = torch.zeros(shape, dtype=torch.bool, device=self.users.device)
        self.pos_rank = self.neg_rank = self.pos_items  # (U, G, n) positions of the drawn pairs

    def resample(self, generator: torch.Generator, rounds: int = 50) -> None:
        """Draw n_g pairs of distinct positions per (user, group); the better-ranked one is positive.

        A pair that drew the same position twice is redrawn whole (rejection, by rounds over all
        pairs at once, as the reference does); groups with fewer than 2 items get no valid pair.
        """
        n = self.pairs_per_group
        if n == 0 or self.group_items.shape[2] == 0:
            return
        device = self.users.device
        length = self.length.unsqueeze(-1).expand(-1, -1, n).cpu()  # (U, G, n)
        a = truncated_geometric(length, self.cfg.temperature, generator)
        b = truncated_geometric(length, self.cfg.temperature, generator)
        for _ in range(rounds):
            same = (a == b) & (length >= 2)
            if not bool(same.any()):
                break
            a[same] = truncated_geometric(length[same], self.cfg.temperature, generator)
            b[same] = truncated_geometric(length[same], self.cfg.temperature, generator)
        self.valid = ((a != b) & (length >= 2)).to(device)
        better, worse = torch.minimum(a, b).to(device), torch.maximum(a, b).to(device)
        self.pos_items = torch.gather(self.group_items, 2, better)
        self.neg_items = torch.gather(self.group_items, 2, worse)
        self.pos_rank, self.neg_rank = better, worse

    def loss(self, model, batch_users: torch.Tensor) -> torch.Tensor:
        """Summed pairwise KD over the unique users of a training batch that have teacher knowledge."""
        users = torch.unique(batch_users)
        if len(self.sorted_users) == 0 or self.pairs_per_group == 0:
            return torch.zeros((), device=batch_users.device)
        at = torch.searchsorted(self.sorted_users, users).clamp(max=len(self.sorted_users) - 1)
        found = self.sorted_users[at] == users
        users, rows = users[found], self.sorted_rows[at[found]]
        if len(users) == 0:
            return torch.zeros((), device=batch_users.device)
        pos = self.pos_items[rows].reshape(len(rows), -1)  # (B, G·n)
        neg = self.neg_items[rows].reshape(len(rows), -1)
        valid = self.valid[rows].reshape(len(rows), -1)
        scores = model.score(users, torch.cat([pos, neg], 1).clamp(min=0))  # (B, 2·G·n): one score call
        diff = scores[:, : pos.shape[1]] - scores[:, pos.shape[1]:]
        terms = -torch.log(torch.sigmoid(diff) + 1e-10)
        return torch.where(valid, terms, torch.zeros_like(terms)).sum()


@register_term("unkd")
class UnKDTerm(KDTerm):
    """UnKD's in-group pairs from the (fused) per-popularity-group rankings handed over."""

    def __init__(self, spec, ctx: TermContext):
        super().__init__(spec, ctx)
        groups = [ctx.tensor(k.group_items) for k in ctx.knowledge if k.group_items is not None]
        if len(groups) != len(ctx.knowledge):
            raise ValueError("unkd: every knowledge list needs per-group rankings (knowledge(unkd_groups=...))")
        fused = groups[0] if len(groups) == 1 else fuse_group_rankings(groups, spec.per_group, ctx.fusion, ctx.weights,
                                                                      num_items=ctx.num_items)
        cfg = UnKDConfig(weight=spec.weight, groups=fused.shape[1], pairs=spec.pairs, per_group=spec.per_group,
                         temperature=spec.temperature)
        self.targets = UnKDTargets(cfg, ctx.users, fused)

    def resample(self, generator: torch.Generator, epoch: int) -> None:
        self.targets.resample(generator)

    def loss(self, model, batch: Batch, epoch: int) -> torch.Tensor:
        return self.targets.loss(model, batch.users)
