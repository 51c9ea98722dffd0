"""Does an explanation matter? Remove the interaction it cites and see the item's score fall, against
removing a random other interaction of the same user.

For the path model the removal is exact without retraining: taking (u, i*) out of the graph changes the
user's input row (i* leaves, the remaining n-1 items are re-weighted by 1/√(n-1)) and nothing else the
user's score of an unseen item reads (other users' paths do not pass through u; i*'s own degree only
weighs paths that start at i*, which is gone). So with s = path score, c = i*'s contribution,

    drop(i*) = score(u, i) − score_without(u, i) = c · √(n/(n−1)) − s · (√(n/(n−1)) − 1)

and the cited item is faithful when its drop exceeds a random known item's. Users with one known item
are left out (nothing to compare).
"""

from __future__ import annotations

import torch

from ..models.pathrec import PathRec
from .paths import Reasons, reasons


@torch.no_grad()
def removal_drops(model: PathRec, users: torch.Tensor, items: torch.Tensor, removed: torch.Tensor,
                  computed: Reasons | None = None) -> torch.Tensor:
    """(B, k) exact score drop of each (user, item) when the user's interaction with ``removed`` (B, k) is taken
    out of the graph (``removed`` must be known items of the user); ``computed``: ``reasons`` of the same
    users and items, if already at hand."""
    r = computed if computed is not None else reasons(model, users, items, top=1)
    n = model.graphs().known.degree[users].to(r.path_score.dtype).unsqueeze(1)  # (B, 1)
    scale = torch.sqrt(n / (n - 1).clamp(min=1))
    c = torch.gather(r.contributions, 2, removed.unsqueeze(-1)).squeeze(-1)
    return c * scale - r.path_score * (scale - 1)


@torch.no_grad()
def faithfulness(model: PathRec, users: torch.Tensor, items: torch.Tensor, generator: torch.Generator,
                 chunk: int = 256, listed: torch.Tensor | None = None) -> dict:
    """Over (user, recommended item) cases: mean drop when the cited interaction (the top reason) is removed,
    mean drop for a random other known item, and how often the cited one drops more (ties count ½).
    ``listed`` (B, k): the cases that count (a list shorter than k, padded with items the user knows: False)."""
    known = model.graphs().known
    cited_all, random_all = [], []
    for start in range(0, len(users), chunk):  # chunks bound the (B, k, I) contributions' memory
        u, it = users[start : start + chunk], items[start : start + chunk]
        ok = known.degree[u] >= 2
        u, it = u[ok], it[ok]
        keep = (torch.ones_like(it, dtype=torch.bool) if listed is None else listed[start : start + chunk][ok]).reshape(-1)
        if len(u) == 0:
            continue
        r = reasons(model, u, it, top=1)
        cited = r.via[..., 0]  # (B, k)
        mask = known.dense(u).unsqueeze(1).expand(-1, it.shape[1], -1).clone()  # (B, k, I) the user's known items
        mask.scatter_(2, cited.clamp(min=0).unsqueeze(-1), False)
        weights = mask.reshape(-1, mask.shape[-1]).to(torch.float32)
        rand = torch.multinomial(weights.cpu(), 1, generator=generator).to(u.device).reshape(cited.shape)
        cited_all.append(removal_drops(model, u, it, cited, r).reshape(-1)[keep])
        random_all.append(removal_drops(model, u, it, rand, r).reshape(-1)[keep])
    if not cited_all or not sum(len(c) for c in cited_all):
        return {"cases": 0, "cited_drop": None, "random_drop": None, "cited_wins": None}
    c, r = torch.cat(cited_all), torch.cat(random_all)
    wins = (c > r).float() + 0.5 * (c == r).float()
    return {"cases": int(len(c)), "cited_drop": float(c.mean()), "random_drop": float(r.mean()),
            "cited_wins": float(wins.mean())}
