"""The teachers' fused ensemble as a model that can be evaluated like any other (full ranking).

Scores follow CCD's rank fusion over every item: score(u, i) = Σ_t w_t · (1/rank_t(u, i))^p / Σ_t w_t
with rank_t the 1-based position of i in teacher t's full ranking for u (known items masked first).
It is the reference the student is compared with; it is not trained.
"""

from __future__ import annotations

import torch


class RankFusionEnsemble(torch.nn.Module):
    def __init__(self, models: list, weights: list[float] | None = None, power: float = 0.05, exclude=None):
        super().__init__()
        self.members = list(models)
        w = torch.tensor(weights if weights is not None else [1.0] * len(models), dtype=torch.float32)
        self.weights = w / w.sum()
        self.power = power
        self.exclude = exclude  # UserItemSet of known pairs: ranked last by every member
        self.num_items = min(m.num_items for m in models)
        self.num_users = min(m.num_users for m in models)

    def observe(self, users: torch.Tensor, items: torch.Tensor) -> None:
        for m in self.members:
            m.observe(users, items)

    @torch.no_grad()
    def full_scores(self, users: torch.Tensor) -> torch.Tensor:
        fused = torch.zeros(len(users), self.num_items, device=users.device)
        for w, m in zip(self.weights.tolist(), self.members):
            s = m.full_scores(users)[:, : self.num_items]
            if self.exclude is not None:
                self.exclude.mask_(s, users)
            order = torch.argsort(s, dim=1, descending=True, stable=True)  # (B, I)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(1, self.num_items + 1, device=users.device).expand_as(order))
            fused += w * rank.float().pow(-self.power)
        return fused

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        full = self.full_scores(users)
        if items.dim() == 1:
            return full.gather(1, items.unsqueeze(1)).squeeze(1)
        return full.gather(1, items)


def evaluate_ensemble(teachers: list, seen, block: int, spec) -> dict:
    """The teachers' rank-fusion ensemble (uniform weights) evaluated like a model after ``block``:
    {"test": block's test metrics, "earlier": {j: metrics} for j < block, "continual": plasticity /
    stability / H-mean}. ``teachers`` are ``Learner``s holding the block's weights; the masks are the
    ones ``Learner.evaluate`` uses (``eval.mask``: by default the user's train + valid pairs)."""
    from ..eval import eval_sets, evaluate_ranking, plasticity_stability
    from ..eval.bias import popularity_groupings
    from ..eval.metrics import users_per_chunk
    from ..eval.protocol import training_popularity

    device = teachers[0].device
    for t in teachers:
        t.observe(seen)
    popularity = training_popularity(seen, device)
    groups = popularity_groupings(popularity, spec.mass_groups)
    per_block = {}
    # the fusion holds about twice a model's (B, I) buffers (every teacher's scores, their ranks): a doubled width
    step = users_per_chunk(2 * seen.num_items, spec.chunk_size, spec.memory_mb, device)
    for b in range(block + 1):
        relevant, exclude = eval_sets(seen, b, device=device, mask=spec.mask)
        model = RankFusionEnsemble([t.model for t in teachers], exclude=exclude)
        per_block[b] = evaluate_ranking(model, relevant, exclude, spec.ks, step, device,
                                        item_popularity=popularity, item_group=groups)
    return {"test": per_block[block], "earlier": {b: m for b, m in per_block.items() if b < block},
            "continual": plasticity_stability(per_block, block)}
