"""A user→items set as CSR + sorted pair keys (torch), for masking, membership and sampling.

Built once per block from index arrays; every query is a tensor operation (no loop per user).
"""

from __future__ import annotations

import numpy as np
import torch


class UserItemSet:
    def __init__(self, users, items, num_users: int, num_items: int, device: str | torch.device = "cpu"):
        users = torch.as_tensor(np.asarray(users), dtype=torch.int64, device=device)
        items = torch.as_tensor(np.asarray(items), dtype=torch.int64, device=device)
        self.num_users, self.num_items = int(num_users), int(num_items)
        keys = torch.unique(users * self.num_items + items)  # sorted, deduplicated
        self.keys = keys
        self.users = keys // self.num_items
        self.items = keys % self.num_items
        self.degree = torch.bincount(self.users, minlength=self.num_users)
        self.indptr = torch.zeros(self.num_users + 1, dtype=torch.int64, device=device)
        self.indptr[1:] = torch.cumsum(self.degree, 0)

    def __len__(self) -> int:
        return len(self.keys)

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Elementwise membership of (users, items) pairs of any equal shape."""
        if len(self.keys) == 0:
            return torch.zeros_like(users, dtype=torch.bool)
        q = users * self.num_items + items
        pos = torch.searchsorted(self.keys, q).clamp(max=len(self.keys) - 1)
        return self.keys[pos] == q

    def rows_for(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row index into ``users``, item) for every stored pair of the given users."""
        inside = users < self.num_users
        deg = torch.where(inside, self.degree[users.clamp(max=self.num_users - 1)], 0)
        starts = torch.where(inside, self.indptr[users.clamp(max=self.num_users - 1)], 0)
        total = int(deg.sum())  # output_size spares repeat_interleave a slow size pass
        rows = torch.repeat_interleave(torch.arange(len(users), device=users.device), deg, output_size=total)
        first = torch.repeat_interleave(torch.cumsum(deg, 0) - deg, deg, output_size=total)
        pos = torch.repeat_interleave(starts, deg, output_size=total) + torch.arange(total, device=users.device) - first
        return rows, self.items[pos]

    def mask_(self, scores: torch.Tensor, users: torch.Tensor, value: float = float("-inf")) -> torch.Tensor:
        """Set scores[(b, i)] = value for every stored pair of users[b]; in place."""
        rows, cols = self.rows_for(users)
        cols_ok = cols < scores.shape[1]
        scores[rows[cols_ok], cols[cols_ok]] = value
        return scores

    def dense(self, users: torch.Tensor, num_items: int | None = None) -> torch.Tensor:
        """(B, num_items) bool matrix of the given users' pairs (for one chunk at a time)."""
        out = torch.zeros(len(users), num_items or self.num_items, dtype=torch.bool, device=users.device)
        rows, cols = self.rows_for(users)
        out[rows, cols] = True
        return out

    def union(self, other: "UserItemSet") -> "UserItemSet":
        nu, ni = max(self.num_users, other.num_users), max(self.num_items, other.num_items)
        return UserItemSet(torch.cat([self.users, other.users]), torch.cat([self.items, other.items]), nu, ni,
                           self.keys.device)


def sample_excluding(users: torch.Tensor, count: int, num_items: int, exclude: list, generator: torch.Generator,
                     rounds: int = 20, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, count) items drawn uniformly (or ∝ ``weights``, (num_items,) CPU floats) for each of
    ``users``, avoiding pairs in any of ``exclude``.

    Rejection sampling by rounds over the whole batch (not per user); after ``rounds`` the few
    remaining collisions (users who have seen almost every item) are left as drawn.
    """
    device = users.device

    def draw_items(shape) -> torch.Tensor:
        if weights is None:
            return torch.randint(0, num_items, shape, generator=generator, device="cpu")
        n = int(torch.Size(shape).numel())
        return torch.multinomial(weights, n, replacement=True, generator=generator).reshape(shape)

    u = users.unsqueeze(1).expand(-1, count)
    draw = draw_items(u.shape).to(device)
    for _ in range(rounds):
        bad = torch.zeros_like(draw, dtype=torch.bool)
        for s in exclude:
            bad |= s.contains(u, draw)
        n_bad = int(bad.sum())
        if n_bad == 0:
            break
        draw[bad] = draw_items((n_bad,)).to(device)
    return draw
