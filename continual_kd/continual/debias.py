"""A model's ``train.debias`` setting → the per-item tables its ``base_loss`` is shaped with (``models.debias``).

    ips:  w_i = c / p_i,  p_i = clip((n_i / max n)^η, p_min, 1)      n: training popularity (eval.estimates'
          c = P / Σ_pairs 1/p_item                                  propensity, the estimator's own)
    pda:  m_i^γ,  m_i = (n_i + 1) / (max n + 1)

c self-normalises the IPS weights over the update's positive pairs (Σ w = number of pairs), so the loss
keeps the plain loss's scale and KD weights tuned without IPS keep their balance. Popularity is what the
training loop gets as ``item_popularity`` (the Learner's ``item_counts``: every pair the model may see
now); without one, the counts of the positives themselves.
"""

from __future__ import annotations

import torch

from ..config import TrainSpec
from ..eval.estimates import popularity_propensity
from ..models.debias import LossShaping


def ips_item_weights(popularity: torch.Tensor, positives: torch.Tensor, exponent: float, clip: float) -> torch.Tensor:
    """(I,) float32 c / p_i with the weights of ``positives`` (item ids of the positive pairs) averaging 1."""
    inverse = 1.0 / popularity_propensity(popularity, exponent, clip)  # float64
    if len(positives):
        inverse = inverse * (len(positives) / float(inverse[positives].sum()))
    return inverse.float()


def pda_pop_factor(popularity: torch.Tensor, gamma: float) -> torch.Tensor:
    """(I,) float32 m_i^γ with m_i = (n_i + 1) / (max n + 1) ∈ (0, 1]."""
    counts = popularity.double()
    top = float(counts.max()) if len(counts) else 0.0
    return ((counts + 1.0) / (top + 1.0)).pow(gamma).float()


def loss_shaping(spec: TrainSpec, num_items: int, positives: torch.Tensor,
                 item_popularity: torch.Tensor | None = None) -> LossShaping | None:
    """The shaping of a model with ``spec`` (None for ``debias: none``), over ``num_items`` items, on the
    device of ``positives``. Items beyond ``item_popularity`` count 0."""
    if spec.debias == "none":
        return None
    device = positives.device
    counts = torch.zeros(num_items, dtype=torch.float64)
    if item_popularity is not None:
        pop = item_popularity.detach().double().cpu()[:num_items]
        counts[: len(pop)] = pop
    else:
        counts += torch.bincount(positives.cpu(), minlength=num_items)[:num_items].double()
    if spec.debias == "ips":
        return LossShaping(item_weight=ips_item_weights(counts, positives.cpu(), spec.ips_exponent,
                                                        spec.ips_clip).to(device))
    return LossShaping(pop_factor=pda_pop_factor(counts, spec.pda_gamma).to(device))
