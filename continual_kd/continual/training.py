"""The training loop shared by every model: BPR on (user, positive, sampled negative) + optional KD.

One visible loop over epochs and mini-batches; sampling is a tensor operation per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import TrainSpec
from ..sparse import UserItemSet, sample_excluding


@dataclass
class EpochLog:
    epoch: int
    base_loss: float
    kd_loss: float


def train_epochs(model, users: torch.Tensor, items: torch.Tensor, known: UserItemSet, epochs: int,
                 spec: TrainSpec, generator: torch.Generator, kd_terms: list | None = None,
                 base_weight: float = 1.0, on_epoch_end: Callable[[int], None] | None = None) -> list[EpochLog]:
    """Train ``model`` for ``epochs`` on the (users, items) positives; negatives avoid ``known``.

    ``kd_terms``: (targets, weight) pairs; targets have ``resample(generator)`` (called once per epoch)
    and ``loss(model, batch_users)``. The batch loss is ``base_weight · base_loss + Σ weight · loss``
    (all summed over the batch). ``on_epoch_end(epoch)`` runs after each epoch (1-based), e.g. to
    record a teacher checkpoint or to advance a HetComp schedule. A model with
    ``batch_unit = "user"`` is trained on batches of ``batch_size`` users (its loss reads their rows).
    """
    kd_terms = [(t, w) for t, w in (kd_terms or []) if w > 0]
    logs: list[EpochLog] = []
    n = len(users)
    if n == 0 or epochs == 0:
        return logs
    device = users.device
    # L2 only on what the batch touches (model.regularization), not Adam's weight_decay: that
    # would shrink every user/item absent from the block by ~lr per step and erase old knowledge
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    model.train()
    by_user = getattr(model, "batch_unit", "interaction") == "user"  # e.g. MultVAE: one row per user
    if by_user:
        users = torch.unique(users)
        n = len(users)
    for epoch in range(epochs):
        for target, _ in kd_terms:
            target.resample(generator)
        perm = torch.randperm(n, generator=generator).to(device)
        u_all = users[perm]
        if by_user:  # the model's loss reads the users' whole rows; no positives/negatives to draw
            p_all = n_all = u_all
        else:
            p_all = items[perm]
            n_all = sample_excluding(u_all, 1, model.num_items, [known], generator).squeeze(1)  # (n,)
        base_sum = kd_sum = 0.0
        for start in range(0, n, spec.batch_size):
            u = u_all[start : start + spec.batch_size]
            p, ng = p_all[start : start + spec.batch_size], n_all[start : start + spec.batch_size]
            loss = model.base_loss(u, p, ng)
            base_sum += float(loss.detach())
            loss = base_weight * loss
            if spec.weight_decay > 0:
                loss = loss + spec.weight_decay * model.regularization(u, p, ng)
            for target, weight in kd_terms:
                kd_loss = target.loss(model, u)
                kd_sum += float(kd_loss.detach())
                loss = loss + weight * kd_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        logs.append(EpochLog(epoch, base_sum / n, kd_sum / n))
        if on_epoch_end is not None:
            model.eval()
            on_epoch_end(epoch + 1)
            model.train()
    model.eval()
    return logs
