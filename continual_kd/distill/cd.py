"""CD: collaborative distillation (Lee et al., ICDM'19), teacher-guided.

Unobserved items are drawn from the other side's top-``pool`` list by rank, and the trained model
learns the other side's soft label of each:

    per user and epoch: ``samples`` distinct list positions r (0-based) with p(r) ∝ exp(-r / T_rank)
    L_CD = Σ_pairs Σ_j BCE(σ(s(u, j)), σ(t(u, j) / T))      (one user per training pair, as the reference)

``t(u, j)`` is the score the list carries (``Knowledge.scores``). With several lists they are fused
first (``ctx.fusion``, ordered by the fused score less ``ctx.fusion_penalty`` when
``distill.fusion_popularity`` sets one); the score of a fused item is the weighted mean of the raw scores of the lists
that hold it (``bd.fuse_scored_lists``), so the label stays on the models' score scale. The draw is
one Gumbel-top-k over the (U, pool) table per epoch (``resample``); a batch only gathers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Batch, KDTerm, TermContext, register_term, knowledge_rows
from .bd import fuse_scored_lists


def cd_soft_labels(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """σ(t / T) of the other side's scores."""
    return torch.sigmoid(scores / temperature)


def rank_positions(valid: torch.Tensor, samples: int, rank_temperature: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, samples) distinct positions per row drawn with p(r) ∝ exp(-r/T_rank) among the ``valid``
    (U, P) positions (Gumbel-top-k: without replacement), and whether each drawn position is valid
    (a row with fewer valid positions than ``samples`` fills up with invalid ones)."""
    n, p = valid.shape
    logits = -torch.arange(p, dtype=torch.float32) / rank_temperature  # (P,)
    u = torch.rand((n, p), generator=generator).clamp(1e-12, 1 - 1e-7)
    keys = (logits - torch.log(-torch.log(u))).to(valid.device)
    keys = torch.where(valid, keys, float("-inf"))
    pos = torch.topk(keys, min(samples, p), dim=1).indices  # (U, samples)
    return pos, torch.gather(valid, 1, pos)


@register_term("cd")
class CDTerm(KDTerm):
    """CD on the (fused) scored top-pool lists handed over."""

    def __init__(self, spec, ctx: TermContext):
        super().__init__(spec, ctx)
        if not ctx.knowledge:
            raise ValueError("cd needs the other side's knowledge (ctx.knowledge is empty)")
        self.samples, self.rank_temperature = int(spec.samples), float(spec.rank_temperature)
        self.users = ctx.users.long()
        size = min(int(spec.pool), max(k.items.shape[1] for k in ctx.knowledge))
        items, scores = fuse_scored_lists([ctx.tensor(k.items) for k in ctx.knowledge],
                                          [ctx.tensor(k.scores, torch.float32) for k in ctx.knowledge],
                                          size, ctx.fusion, ctx.weights, ctx.num_items,
                                          ctx.fusion_penalty)  # (U, P) each
        self.items = items.long()
        # an item the trained model already knows (a pair learned since the list was made) is no target
        self.valid = (self.items >= 0) & ~ctx.known.contains(self.users.unsqueeze(1).expand_as(self.items),
                                                             self.items.clamp(min=0))
        self.labels = cd_soft_labels(scores, float(spec.temperature))  # (U, P)
        self.row = torch.full((ctx.num_users,), -1, dtype=torch.int64, device=self.users.device)
        self.row[self.users] = torch.arange(len(self.users), device=self.users.device)
        self.targets = self.items[:, :0]  # (U, samples) after resample
        self.target_labels = self.labels[:, :0]
        self.target_valid = self.valid[:, :0]

    def resample(self, generator: torch.Generator, epoch: int) -> None:
        pos, ok = rank_positions(self.valid, self.samples, self.rank_temperature, generator)
        self.targets = torch.gather(self.items, 1, pos).clamp(min=0)
        self.target_labels = torch.gather(self.labels, 1, pos)
        self.target_valid = ok

    def loss(self, model, batch: Batch, epoch: int) -> torch.Tensor:
        users, rows = knowledge_rows(self.row, batch.users)
        if len(users) == 0 or self.targets.shape[1] == 0:
            return torch.zeros((), device=batch.users.device)
        s = model.score(users, self.targets[rows])  # (B', samples)
        bce = F.binary_cross_entropy_with_logits(s, self.target_labels[rows].to(s.dtype), reduction="none")
        return torch.where(self.target_valid[rows], bce, torch.zeros_like(bce)).sum()


__all__ = ["CDTerm", "cd_soft_labels", "rank_positions"]
