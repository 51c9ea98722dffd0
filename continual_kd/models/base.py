"""What every backbone answers, and the registry of backbones by the names used in job files.

A backbone is a plain ``nn.Module`` built from a frozen config and explicit sizes: it knows nothing
of Ray, DuckDB or the stream. ``continual/`` trains it; ``runtime/`` decides where it lives.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn


class Recommender(Protocol):
    num_users: int
    num_items: int

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B,) users × (B, ...) items → scores of the same shape as items."""

    def full_scores(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) users → (B, num_items) scores over every item."""

    def observe(self, users: torch.Tensor, items: torch.Tensor) -> None:
        """The interactions the model may use when it scores (LightGCN's graph, MultVAE's input
        rows): every known non-test pair so far. Called before training, knowledge and evaluation."""

    def base_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, shaping=None) -> torch.Tensor:
        """The backbone's own training loss on (user, positive, negative) triples, summed.
        A backbone may use less of the batch: MultVAE takes only its unique users (their whole rows).
        ``shaping`` (a ``models.debias.LossShaping``, given only when a de-biasing option is on): per-item
        IPS weights on the positives' terms and PDA's popularity factor in the training score."""

    def grow(self, num_users: int, num_items: int, users: torch.Tensor | None = None,
             items: torch.Tensor | None = None, init: str = "neighbor",
             generator: torch.Generator | None = None) -> None:
        """Extend the id spaces; new rows get ``init`` ("neighbor": mean of 1-hop neighbours
        in the given (users, items) interactions, "random": N(0, 0.01) drawn from ``generator``)."""

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users (U, d), items (I, d)) whose dot products are the scores (MF: its tables; LightGCN:
        the propagated tables; MultVAE: decoder hidden state + 1 and output weights + bias)."""

    def state_dict(self) -> dict: ...


def pair_dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scores of gathered rows: (B, d) · (B, d) → (B,), or (B, d) · (B, L, d) → (B, L) (a broadcast product:
    about half einsum's batched products' time, forward and backward, on the CPU for RRD-sized lists)."""
    if v.dim() == 3:
        return (u.unsqueeze(1) * v).sum(-1)
    return (u * v).sum(-1)


def rows_before(model: nn.Module, num_users: int, num_items: int) -> dict[nn.Parameter, int]:
    """Every parameter of ``model`` → how many of its leading rows it had at (num_users, num_items):
    a table named ``user_*`` has ``num_users`` of them, ``item_*`` ``num_items``, any other parameter all
    of its rows (the backbones' naming convention: tables grow by appending rows); a 0-d parameter, none."""
    out = {}
    for name, param in model.named_parameters():
        if param.dim() == 0:
            continue
        leaf = name.rsplit(".", 1)[-1]
        n = num_users if leaf.startswith("user") else num_items if leaf.startswith("item") else param.shape[0]
        out[param] = min(int(n), param.shape[0])
    return out


BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(cls):
        BACKBONES[name] = cls
        return cls

    return deco


def build_backbone(name: str, num_users: int, num_items: int, **params) -> nn.Module:
    if name not in BACKBONES:
        raise KeyError(name)
    return BACKBONES[name](num_users=num_users, num_items=num_items, **params)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def neighbor_mean(table: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``table[dst]`` grouped by ``src`` into ``size`` rows; also the per-row counts.

    Used to initialise a new entity from the entities it interacted with (CCD's 1-hop init).
    """
    sums = torch.zeros(size, table.shape[1], dtype=table.dtype, device=table.device)
    sums.index_add_(0, src, table[dst])
    counts = torch.zeros(size, dtype=table.dtype, device=table.device)
    counts.index_add_(0, src, torch.ones_like(src, dtype=table.dtype))
    return sums / counts.clamp(min=1).unsqueeze(1), counts


INITS = ("neighbor", "neighbor_capped", "random")  # growth rules of new rows (config's ModelSpec.init)


@torch.no_grad()
def grow_tables(user_emb: torch.Tensor, item_emb: torch.Tensor, num_users: int, num_items: int,
                users: torch.Tensor | None, items: torch.Tensor | None, init: str,
                generator: torch.Generator | None, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """User and item tables extended to the new sizes; old rows unchanged (the one growth rule of
    the table backbones). New rows: "neighbor" — mean of their 1-hop neighbours among the given
    (users, items) pairs (new users from old items, new items from old users), N(0, std) where a
    row has none; "neighbor_capped" — the same means, each no longer than its own table's median row norm
    (``capped``; N(0, std) where a row has none, as "neighbor"); "random" — N(0, std) drawn from ``generator``."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}")
    old_u, old_i, dim = user_emb.shape[0], item_emb.shape[0], user_emb.shape[1]
    device, dtype = user_emb.device, user_emb.dtype
    new_u = (torch.randn(max(num_users - old_u, 0), dim, generator=generator) * std).to(device, dtype)
    new_i = (torch.randn(max(num_items - old_i, 0), dim, generator=generator) * std).to(device, dtype)
    if init in ("neighbor", "neighbor_capped") and users is not None and items is not None:
        users, items = users.to(device), items.to(device)
        if len(new_u):
            sel = (users >= old_u) & (items < old_i)
            mean, cnt = neighbor_mean(item_emb, users[sel] - old_u, items[sel], len(new_u))
            mean = capped(mean, user_emb) if init == "neighbor_capped" else mean  # no longer than a user's row
            new_u = torch.where(cnt.unsqueeze(1) > 0, mean, new_u)
        if len(new_i):
            sel = (items >= old_i) & (users < old_u)
            mean, cnt = neighbor_mean(user_emb, items[sel] - old_i, users[sel], len(new_i))
            mean = capped(mean, item_emb) if init == "neighbor_capped" else mean
            new_i = torch.where(cnt.unsqueeze(1) > 0, mean, new_i)
    return torch.cat([user_emb, new_u]), torch.cat([item_emb, new_i])


def capped(new: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """``new`` rows (1-hop means of the other table's rows) no longer than the median row norm of their ``own`` table;
    shorter ones are left as they are. A dot-product model's scores do not change when one table is scaled by c and
    the other by 1/c, so the two tables' scales drift apart (an 8-dim student with little L2: items up to 20-50 long,
    users ~0.3-1), and a new user's plain mean of (popular, long) item rows put its scores 10-100× every old user's —
    its losses saturated, and RRD's list of a new user spread over ~1,500 (issue 12, 10M interactions). A mean shorter
    than the table's typical row (its neighbours disagree, or the tables share a scale, as an L2-regularised teacher's
    do) keeps its length: that shortness is the model's uncertainty about the new row."""
    if not len(new) or not len(own):
        return new
    norm = new.norm(dim=1, keepdim=True)
    return new * (own.norm(dim=1).median() / norm.clamp(min=1e-30)).clamp(max=1.0)
