"""BPR-MF: user and item embedding tables, score = dot product (teacher and student alike)."""

from __future__ import annotations

import torch
from torch import nn

from ..gather import gather_rows
from .base import grow_tables, pair_dot, register
from .debias import LossShaping, bpr_loss

INIT_STD = 0.01


@register("mf")
class BPRMF(nn.Module):
    row_tape = None  # set while a lazy_adam update trains: lookups recorded for row-sparse steps (continual/optim.py)

    def __init__(self, num_users: int, num_items: int, dim: int = 64):
        super().__init__()
        self.dim = dim
        self.user_emb = nn.Parameter(torch.randn(num_users, dim) * INIT_STD)
        self.item_emb = nn.Parameter(torch.randn(num_items, dim) * INIT_STD)

    @property
    def num_users(self) -> int:
        return self.user_emb.shape[0]

    @property
    def num_items(self) -> int:
        return self.item_emb.shape[0]

    def _rows(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``table[ids]``; with a ``row_tape`` (train.optimizer lazy_adam) rows stepped alone by the optimizer."""
        if self.row_tape is not None and torch.is_grad_enabled() and table.requires_grad:
            return self.row_tape.lookup(table, ids)
        return gather_rows(table, ids)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        u = self._rows(self.user_emb, users)  # (B, d)
        v = self._rows(self.item_emb, items)  # (B, d) or (B, L, d)
        return pair_dot(u, v)

    def full_scores(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_emb[users] @ self.item_emb.T  # (B, I)

    def observe(self, users: torch.Tensor, items: torch.Tensor) -> None:
        """MF scores from its tables alone."""

    def base_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                  shaping: LossShaping | None = None) -> torch.Tensor:
        u = self._rows(self.user_emb, users)  # (B, d): gathered once for both scores
        v = self._rows(self.item_emb, torch.stack([pos, neg]))  # (2, B, d)
        scores = (u * v).sum(-1)  # (2, B)
        return bpr_loss(scores[0], scores[1], pos, neg, shaping)

    def regularization(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        return (self._rows(self.user_emb, users).pow(2).sum() + self._rows(self.item_emb, pos).pow(2).sum()
                + self._rows(self.item_emb, neg).pow(2).sum())

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_emb, self.item_emb

    @torch.no_grad()
    def grow(self, num_users: int, num_items: int, users: torch.Tensor | None = None,
             items: torch.Tensor | None = None, init: str = "neighbor",
             generator: torch.Generator | None = None) -> None:
        if num_users <= self.num_users and num_items <= self.num_items:
            return
        u, i = grow_tables(self.user_emb.data, self.item_emb.data, num_users, num_items, users, items, init,
                           generator, INIT_STD)
        self.user_emb, self.item_emb = nn.Parameter(u), nn.Parameter(i)
