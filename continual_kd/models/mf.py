"""BPR-MF: user and item embedding tables, score = dot product (teacher and student alike)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import neighbor_mean, register

INIT_STD = 0.01


@register("mf")
class BPRMF(nn.Module):
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

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        u = self.user_emb[users]  # (B, d)
        v = self.item_emb[items]  # (B, d) or (B, L, d)
        if v.dim() == 3:
            return torch.einsum("bd,bld->bl", u, v)
        return (u * v).sum(-1)

    def full_scores(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_emb[users] @ self.item_emb.T  # (B, I)

    def observe(self, users: torch.Tensor, items: torch.Tensor) -> None:
        """MF scores from its tables alone."""

    def base_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        diff = self.score(users, pos) - self.score(users, neg)
        return -F.logsigmoid(diff).sum()

    def regularization(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        return (self.user_emb[users].pow(2).sum() + self.item_emb[pos].pow(2).sum()
                + self.item_emb[neg].pow(2).sum())

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_emb, self.item_emb

    @torch.no_grad()
    def grow(self, num_users: int, num_items: int, users: torch.Tensor | None = None,
             items: torch.Tensor | None = None, init: str = "neighbor",
             generator: torch.Generator | None = None) -> None:
        old_u, old_i = self.num_users, self.num_items
        if num_users <= old_u and num_items <= old_i:
            return
        device = self.user_emb.device
        new_u = torch.randn(max(num_users - old_u, 0), self.dim, generator=generator).to(device) * INIT_STD
        new_i = torch.randn(max(num_items - old_i, 0), self.dim, generator=generator).to(device) * INIT_STD
        if init == "neighbor" and users is not None and items is not None:
            users, items = users.to(device), items.to(device)
            # new users: mean of the (already known) items they interacted with, and vice versa
            known_item = items < old_i
            if len(new_u):
                sel = (users >= old_u) & known_item
                mean, cnt = neighbor_mean(self.item_emb.data, users[sel] - old_u, items[sel], len(new_u))
                new_u = torch.where(cnt.unsqueeze(1) > 0, mean, new_u)
            if len(new_i):
                sel = (items >= old_i) & (users < old_u)
                mean, cnt = neighbor_mean(self.user_emb.data, items[sel] - old_i, users[sel], len(new_i))
                new_i = torch.where(cnt.unsqueeze(1) > 0, mean, new_i)
        elif init not in ("neighbor", "random"):
            raise ValueError(f"unknown init {init!r}")
        self.user_emb = nn.Parameter(torch.cat([self.user_emb.data, new_u]))
        self.item_emb = nn.Parameter(torch.cat([self.item_emb.data, new_i]))
