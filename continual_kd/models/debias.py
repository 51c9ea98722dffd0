"""How a backbone's own loss is shaped to de-bias it: per-item tables the training loop hands to ``base_loss``.

Two shapings (``continual.debias.loss_shaping`` builds them from a model's ``train`` settings):

- **inverse-propensity weights** (IPS-weighted BPR; Saito et al., WSDM'20): each positive pair's loss
  term is multiplied by ``item_weight[pos]`` = c / p_pos, p the item's (clipped) exposure propensity,
  c chosen so the weights average 1 over the update's positives (self-normalised: the loss keeps its
  scale, only its balance between popular and rare positives moves);
- **popularity in the training score** (PDA; Zhang et al., SIGIR'21): the score a pair is trained on is
  ELU'(f(u, i)) · m_i^γ with ELU'(x) = ELU(x) + 1 > 0 and ``pop_factor[i]`` = m_i^γ, so the popularity
  of an item explains part of its clicks and f(u, i) only has to explain the rest. Only training sees
  it: scoring (``full_scores``, knowledge, evaluation, serving) uses f alone (the paper's PD
  inference: ELU' is increasing, so ranking by f is ranking by ELU'(f)).

A softmax backbone (MultVAE) takes the same tables: weights on its row's log-likelihood terms, and
log m_i^γ added to the training logits (softmax(f + γ log m) ∝ exp(f) · m^γ, PDA's product with exp
as the positive function).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossShaping:
    item_weight: torch.Tensor | None = None  # (I,) weight of a positive pair by its item (IPS)
    pop_factor: torch.Tensor | None = None  # (I,) m_i^γ > 0 multiplied into the training score (PDA)

    def to(self, device) -> "LossShaping":
        move = (lambda t: None if t is None else t.to(device))
        return LossShaping(move(self.item_weight), move(self.pop_factor))


def pda_score(scores: torch.Tensor, pop_factor: torch.Tensor) -> torch.Tensor:
    """PDA's training score: ELU'(f) · m^γ, elementwise (``pop_factor`` gathered to the scores' shape)."""
    return (F.elu(scores) + 1.0) * pop_factor


def bpr_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
             shaping: LossShaping | None = None) -> torch.Tensor:
    """Σ -log σ(s⁺ - s⁻) over the batch (B,), shaped: PDA's training score in place of s, each term
    weighted by its positive item's IPS weight."""
    if shaping is not None and shaping.pop_factor is not None:
        pos_scores = pda_score(pos_scores, shaping.pop_factor[pos])
        neg_scores = pda_score(neg_scores, shaping.pop_factor[neg])
    loss = -F.logsigmoid(pos_scores - neg_scores)  # (B,)
    if shaping is not None and shaping.item_weight is not None:
        loss = loss * shaping.item_weight[pos]
    return loss.sum()
