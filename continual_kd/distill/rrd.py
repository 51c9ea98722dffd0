"""RRD: relaxed ranking distillation (DE-RRD, CIKM'20).

For each user the teacher's top-K unobserved items ("interesting", in teacher order) must keep
their order in the student, and L uniformly drawn "uninteresting" items (neither observed nor in
the teacher's top-``pool``) only have to fall below all of them:

    L = -Σ_u Σ_k [ S1_k - log( Σ_{l≥k} exp(S1_l) + Σ_j exp(S2_j) ) ]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..sparse import ComplementSampler, ListSet, UserItemSet, popularity_weights, sample_excluding
from .base import Batch, KDTerm, TermContext, register_term


def relaxed_ranking_loss(interesting: torch.Tensor, uninteresting: torch.Tensor) -> torch.Tensor:
    """Summed RRD loss. interesting: (B, K) student scores in teacher order; uninteresting: (B, L)."""
    return ranked_above_loss(torch.cat([interesting, uninteresting], -1), interesting.shape[-1])


def ranked_above_loss(scores: torch.Tensor, k: int, listed: torch.Tensor | None = None) -> torch.Tensor:
    """The RRD loss of (B, K + L) scores: the first ``k`` columns the interesting items in teacher order,
    the rest the uninteresting ones. ``listed`` (B, K) bool: False where a user's list ran out (a padding
    slot at its end): those slots neither count nor stand above anything (the loss of the shorter list).

    Σ_{l≥k} exp(S1_l) + Σ_j exp(S2_j) is exact for any spread of scores: on the CPU a reversed cumulative sum in
    exp space shifted by the row's largest score (float64; about 5× cheaper than a scan in log space) while every
    slot's sum stays above e⁻⁶⁰⁰ (its backward divides by it: a sum near float64's smallest normal gives inf
    and then NaN gradients although the loss is finite, as an 8-dim student's new users reached at 10M
    interactions); past that, and always on a GPU (no host sync per batch), in log space (``logcumsumexp``)."""
    s = scores.double()
    if listed is not None:  # a finite floor, not -inf: no inf - inf in the backward of the log-space scan
        s = torch.cat([s[..., :k].masked_fill(~listed, -1e300), s[..., k:]], -1)
    terms = None
    if not s.is_cuda:
        top = s.max(-1, keepdim=True).values.detach()  # (B, 1)
        e = torch.exp(s - top)  # (B, K + L), ≤ 1
        tail = e[..., :k].flip(-1).cumsum(-1).flip(-1) + e[..., k:].sum(-1, keepdim=True)  # (B, K)
        if bool((tail > SAFE_TAIL).all()):  # padding slots too: their zero upstream gradient is divided by it
            terms = torch.log(tail) - (s[..., :k] - top)
    if terms is None:
        terms = _log_space_terms(s, k)
    if listed is not None:
        terms = terms.masked_fill(~listed, 0.0)
    return terms.sum().to(scores.dtype)


SAFE_TAIL = math.exp(-600.0)  # the smallest exp-space sum whose reciprocal, summed over a list, stays finite


def _log_space_terms(s: torch.Tensor, k: int) -> torch.Tensor:
    """log(Σ_{l≥k} exp(S1_l) + Σ_j exp(S2_j)) - S1_k per slot, every sum taken in log space."""
    tail = torch.logcumsumexp(s[..., :k].flip(-1), -1).flip(-1)  # (B, K)
    if s.shape[-1] > k:
        tail = torch.logaddexp(tail, torch.logsumexp(s[..., k:], -1, keepdim=True))
    return tail - s[..., :k]


LEAN_POOL_PAIRS = 1 << 24  # users × pool above which the pool is kept as sorted keys alone (ListSet)


@dataclass(frozen=True)
class RRDConfig:
    weight: float = 0.01  # λ in BPR + λ·RRD (both summed over the batch)
    k: int = 40  # interesting items per user
    pool: int = 500  # teacher top-N that uninteresting items avoid (and "sample" mode draws from)
    uninteresting: int = 40  # L uniform items per user
    mode: str = "direct"  # "direct": teacher top-K as is; "sample": K of the pool, p(r) ∝ exp(-r/T)
    temperature: float = 10.0  # T of the "sample" mode
    score_clamp: float | None = None  # clamp student scores in the loss (CCD uses 10)
    uninteresting_exponent: float = 0.0  # uninteresting items ∝ (popularity + 1)^e (0: uniform)


class RRDTargets:
    """Per-user interesting / uninteresting items, redrawn by ``resample`` once per epoch.

    knowledge_users: (U,) users the teacher produced knowledge for; knowledge_items: (U, P) the
    teacher's top-P unobserved items, best first (P ≥ k). ``observed`` are the users' known items.
    """

    def __init__(self, cfg: RRDConfig, knowledge_users: torch.Tensor, knowledge_items: torch.Tensor,
                 observed: UserItemSet, num_users: int, num_items: int, item_popularity: torch.Tensor | None = None):
        if knowledge_items.shape[1] < cfg.k:
            raise ValueError(f"teacher knowledge has {knowledge_items.shape[1]} items per user, RRD needs k={cfg.k}")
        self.cfg = cfg
        self.users = knowledge_users.long()
        self.pool_items = knowledge_items[:, : max(cfg.pool, cfg.k)].long()
        # a list shorter than the pool (a small catalogue, a user who knows most of it) ends in -1 slots
        self.padded = bool((self.pool_items < 0).any())
        self.observed = observed
        self.num_items = num_items
        # row of each user in the (U, ·) tables, -1 for users without knowledge
        self.row = torch.full((num_users,), -1, dtype=torch.int64, device=self.users.device)
        self.row[self.users] = torch.arange(len(self.users), device=self.users.device)
        self.interesting = self.pool_items[:, : cfg.k]
        self.uninteresting = self.pool_items[:, :0]
        self.targets = self.interesting
        self.sampler = self.pool_keys = self.weights = None
        if cfg.uninteresting_exponent > 0 and item_popularity is not None:  # drawn ∝ popularity by rejection
            self.weights = popularity_weights(item_popularity, num_items, cfg.uninteresting_exponent)
        if self.pool_items.numel() > LEAN_POOL_PAIRS or self.weights is not None:
            # many users × a long pool (300k × 500 at 10M interactions): the pool's sorted keys alone
            # (8 bytes a pair, no union with the observed pairs), uninteresting items drawn by rejection
            # against both; a draw lands in either with probability (pool + degree) / items, small here.
            # Popularity-weighted draws (uninteresting_exponent) take this path too
            self.pool_keys = ListSet(self.users, self.pool_items, num_users, num_items)
            if cfg.mode != "sample":
                self.interesting = self.interesting.clone()
                self.pool_items = self.interesting  # the rest of the pool is only needed as keys
            return
        listed = self.pool_items.reshape(-1) >= 0
        pool_set = UserItemSet(self.users.repeat_interleave(self.pool_items.shape[1])[listed],
                               self.pool_items.reshape(-1)[listed], num_users, num_items, self.users.device)
        # uninteresting items come from outside observed ∪ pool: fixed for the block, so the sampler
        # (no rejection rounds) is built once here
        exclude = observed.union(pool_set)
        if exclude.num_items > num_items:
            keep = exclude.items < num_items
            exclude = UserItemSet(exclude.users[keep], exclude.items[keep], exclude.num_users, num_items,
                                  self.users.device)
        self.sampler = ComplementSampler(exclude, num_items)

    def resample(self, generator: torch.Generator) -> None:
        cfg = self.cfg
        if cfg.mode == "sample" and self.pool_items.shape[1] > cfg.k:
            p = self.pool_items.shape[1]
            w = torch.exp(-torch.arange(p, dtype=torch.float32) / cfg.temperature).expand(len(self.users), -1)
            if self.padded:  # padding drawn only where a list has fewer than k items (then left out of the loss)
                w = torch.where(self.pool_items.cpu() >= 0, w, torch.full_like(w, 1e-30))
            pos = torch.multinomial(w, cfg.k, replacement=False, generator=generator).sort(dim=1).values
            self.interesting = torch.gather(self.pool_items, 1, pos.to(self.pool_items.device))
        if self.sampler is not None:
            self.uninteresting = self.sampler.sample(self.users, cfg.uninteresting, generator)
        else:
            self.uninteresting = sample_excluding(self.users, cfg.uninteresting, self.num_items,
                                                  [self.observed, self.pool_keys], generator, weights=self.weights)
        self.targets = torch.cat([self.interesting, self.uninteresting], 1)  # (U, K + L): one score call

    def loss(self, model, batch_users: torch.Tensor) -> torch.Tensor:
        """RRD over the unique users of a training batch that have teacher knowledge."""
        users = torch.unique(batch_users)
        rows = self.row[users]
        keep = rows >= 0
        users, rows = users[keep], rows[keep]
        if len(users) == 0:
            return torch.zeros((), device=batch_users.device)
        if self.targets.shape[1] != self.interesting.shape[1] + self.uninteresting.shape[1]:
            self.targets = torch.cat([self.interesting, self.uninteresting], 1)
        targets = self.targets[rows]
        k = self.interesting.shape[1]
        listed = targets[:, :k] >= 0 if self.padded else None
        scores = model.score(users, targets.clamp(min=0) if self.padded else targets)  # (B, K + L)
        if self.cfg.score_clamp is not None:
            scores = scores.clamp(max=self.cfg.score_clamp)
        return ranked_above_loss(scores, k, listed)


@register_term("rrd")
class RRDTerm(KDTerm):
    """RRD on the (fused) lists handed over: the other side's top-k in order, above L uninteresting items."""

    def __init__(self, spec, ctx: TermContext):
        super().__init__(spec, ctx)
        cfg = RRDConfig(weight=spec.weight, k=spec.k, pool=spec.pool, uninteresting=spec.uninteresting,
                        mode=spec.mode, temperature=spec.temperature, score_clamp=spec.score_clamp,
                        uninteresting_exponent=spec.uninteresting_exponent)
        self.targets = RRDTargets(cfg, ctx.users, ctx.fused_items(max(spec.pool, spec.k)), ctx.known,
                                  ctx.num_users, ctx.num_items, item_popularity=ctx.item_popularity)

    def resample(self, generator: torch.Generator, epoch: int) -> None:
        self.targets.resample(generator)

    def loss(self, model, batch: Batch, epoch: int) -> torch.Tensor:
        return self.targets.loss(model, batch.users)
