"""RD: ranking distillation (Tang & Wang, KDD'18).

The other side's top-``k`` unobserved items π of each user become extra positives of the trained
model, weighted by position:

    L_RD = Σ_pairs Σ_k w_k · (-log σ(s(u, π_k)))          (one user per training pair of the batch)
    w_k  = w_static_k · w_dyn_k, renormalised to sum 1 per user (an all-zero row stays zero)
    w_static_k ∝ exp(-k / λ)                                 k = 1..K, normalised to sum 1
    w_dyn_k    = max(tanh(μ · (r̂_k - k)), 0)                 from epoch ``dynamic_start`` on (else 1)
    r̂_k        = ⌊(I - 1) · c_k / n⌋ + 1                     the model's rank of π_k estimated from
                                                              ``dynamic_samples`` = n unobserved items,
                                                              c_k of which it scores above π_k

so an item the model already ranks at least as high as the teacher does gets no weight, one it ranks
far below gets up to its static weight. Ranks are 1-based on both sides (the paper's; the peer
library compares the estimate with the 0-based position, one place apart).

Everything that does not change within an epoch is drawn in ``resample``: the n uniform unobserved
items and the dynamic weights of every user, from the model's scores at the start of the epoch (the
reference re-estimates per batch; once per epoch costs U·(K + n) scores per epoch instead of per batch).
Several lists are fused first (``ctx.fused_items``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sparse import sample_excluding
from .base import Batch, KDTerm, TermContext, register_term, knowledge_rows


def rd_static_weights(k: int, lam: float) -> torch.Tensor:
    """(k,) exp(-r/λ) for r = 1..k, normalised to sum 1."""
    w = torch.exp(-torch.arange(1, k + 1, dtype=torch.float64) / lam)
    return (w / w.sum()).float()


def estimated_ranks(top_scores: torch.Tensor, sample_scores: torch.Tensor, num_items: int) -> torch.Tensor:
    """(B, K) 1-based rank estimates ⌊(I-1)·c/n⌋ + 1 of the K items scored ``top_scores`` (B, K), with c
    the number of the n ``sample_scores`` (B, n) strictly above each."""
    n = sample_scores.shape[1]
    above = (sample_scores.unsqueeze(1) > top_scores.unsqueeze(2)).sum(-1)  # (B, K)
    return torch.floor((num_items - 1) * above.double() / max(n, 1)).float() + 1


def rd_dynamic_weights(ranks: torch.Tensor, mu: float) -> torch.Tensor:
    """(B, K) max(tanh(μ·(r̂_k - k)), 0) for 1-based estimated ranks r̂ (B, K) of the list positions k."""
    k = torch.arange(1, ranks.shape[1] + 1, dtype=ranks.dtype, device=ranks.device)
    return torch.tanh(mu * (ranks - k)).clamp(min=0.0)


def rd_weights(static: torch.Tensor, dynamic: torch.Tensor | None, renormalize: bool = True) -> torch.Tensor:
    """(B, K) the per-position weights: static (K,) alone, or static·dynamic (B, K), L1-renormalised."""
    if dynamic is None:
        return static.unsqueeze(0)
    w = static.unsqueeze(0) * dynamic
    return F.normalize(w, p=1, dim=1) if renormalize else w


@register_term("rd")
class RDTerm(KDTerm):
    """RD on the (fused) top-k lists handed over."""

    def __init__(self, spec, ctx: TermContext):
        super().__init__(spec, ctx)
        self.k, self.mu, self.samples = int(spec.k), float(spec.mu), int(spec.dynamic_samples)
        self.dynamic_start, self.renormalize = int(spec.dynamic_start), bool(spec.renormalize)
        self.users = ctx.users.long()  # (U,)
        self.top = ctx.fused_items(self.k).long()  # (U, ≤k) best first, -1 padded
        self.valid = self.top >= 0
        self.top = self.top.clamp(min=0)
        self.static = rd_static_weights(self.top.shape[1], float(spec.lam)).to(self.users.device)  # (K,)
        self.known, self.num_items = ctx.known, ctx.num_items
        self.row = torch.full((ctx.num_users,), -1, dtype=torch.int64, device=self.users.device)
        self.row[self.users] = torch.arange(len(self.users), device=self.users.device)
        self.__dict__["_model"] = ctx.model  # read, never owned: not a submodule
        self.weights = torch.where(self.valid, rd_weights(self.static, None), 0.0)  # (U, K)

    @torch.no_grad()
    def resample(self, generator: torch.Generator, epoch: int) -> None:
        if epoch < self.dynamic_start or len(self.users) == 0:
            self.weights = torch.where(self.valid, rd_weights(self.static, None), 0.0)
            return
        model = self._model
        was_training = model.training
        model.eval()
        sampled = sample_excluding(self.users, self.samples, self.num_items, [self.known], generator)  # (U, n)
        chunk = 4096  # users scored at once
        ranks = []
        for start in range(0, len(self.users), chunk):
            u = self.users[start : start + chunk]
            top = model.score(u, self.top[start : start + chunk]).float()  # (B, K)
            other = model.score(u, sampled[start : start + chunk]).float()  # (B, n)
            ranks.append(estimated_ranks(top, other, self.num_items))
        model.train(was_training)
        dynamic = torch.where(self.valid, rd_dynamic_weights(torch.cat(ranks), self.mu), 0.0)
        self.weights = rd_weights(self.static, dynamic, self.renormalize)

    def loss(self, model, batch: Batch, epoch: int) -> torch.Tensor:
        users, rows = knowledge_rows(self.row, batch.users)
        if len(users) == 0:
            return torch.zeros((), device=batch.users.device)
        s = model.score(users, self.top[rows])  # (B', K)
        return -(self.weights[rows] * F.logsigmoid(s)).sum()


__all__ = ["RDTerm", "estimated_ranks", "rd_dynamic_weights", "rd_static_weights", "rd_weights"]
