"""IR-RRD: item-side relaxed ranking distillation (Information Sciences'21): RRD with the roles of
users and items swapped.

For each item with a per-item list (``Knowledge.item_ids`` / ``item_users``; several lists are fused
over users with ``ctx.fusion``), the other side's top-``k`` users must keep their order under the
trained model, and ``uninteresting`` users drawn uniformly (redrawn every epoch) from users who
neither know the item nor are in its top-``pool`` only have to fall below all of them. The loss is
``relaxed_ranking_loss`` on item-major score tables. A batch step covers the unique positive and
negative items of the batch that have lists; for a row model (``batch_unit = "user"``, no
positives/negatives) the items the batch users know. Items listing fewer than ``k`` users are left out.
"""

from __future__ import annotations

import torch

from ..sparse import UserItemSet, sample_excluding
from .base import Batch, KDTerm, TermContext, register_term
from .fusion import fuse_rankings
from .rrd import relaxed_ranking_loss


def item_major_scores(model, items: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
    """(J, M) scores s(users[j, m], items[j]) for (J,) items and (J, M) users."""
    m = users.shape[1]
    return model.score(users.reshape(-1), items.repeat_interleave(m)).view(len(items), m)


@register_term("ir_rrd")
class IRRRDTerm(KDTerm):
    """Item-side RRD on the per-item user lists handed over (fused when there are several)."""

    def __init__(self, spec, ctx: TermContext):
        super().__init__(spec, ctx)
        if not ctx.knowledge or any(k.item_ids is None or k.item_users is None for k in ctx.knowledge):
            raise ValueError("ir_rrd: every knowledge list needs per-item user lists (item_ids, item_users)")
        item_ids = ctx.tensor(ctx.knowledge[0].item_ids)
        if any(len(k.item_ids) != len(item_ids) or not torch.equal(ctx.tensor(k.item_ids), item_ids)
               for k in ctx.knowledge):
            raise ValueError("ir_rrd: every knowledge list must cover the same items in the same order")
        self.k, self.uninteresting = int(spec.k), int(spec.uninteresting)
        self.score_clamp = getattr(spec, "score_clamp", None)
        size = max(int(spec.pool), self.k)
        lists = [ctx.tensor(k.item_users) for k in ctx.knowledge]  # (J, M_t) users, best first
        pool = lists[0][:, :size] if len(lists) == 1 else fuse_rankings(
            lists, size, ctx.fusion, ctx.weights, num_items=ctx.num_users)[0]
        enough = (pool[:, : self.k] >= 0).all(1) & (pool.shape[1] >= self.k)  # (J,) items with k listed users
        self.items, pool = item_ids[enough].long(), pool[enough].long()  # (J,), (J, P)
        self.interesting = pool[:, : self.k]  # (J, k)
        num_items = max(ctx.num_items, int(self.items.max()) + 1 if len(self.items) else 0)
        num_users = ctx.num_users
        # item → users sets: the pairs known to the model, and every item's top-pool
        self.known_by_item = UserItemSet(ctx.known.items, ctx.known.users, num_items, num_users, self.items.device)
        listed = pool >= 0
        self.pool_set = UserItemSet(self.items.unsqueeze(1).expand_as(pool)[listed], pool[listed], num_items,
                                    num_users, self.items.device)
        self.known = ctx.known
        self.num_users = num_users
        self.row = torch.full((num_items,), -1, dtype=torch.int64, device=self.items.device)
        self.row[self.items] = torch.arange(len(self.items), device=self.items.device)
        self.uninteresting_users = self.interesting[:, :0]  # (J, L) after resample

    def resample(self, generator: torch.Generator, epoch: int) -> None:
        self.uninteresting_users = sample_excluding(self.items, self.uninteresting, self.num_users,
                                                    [self.known_by_item, self.pool_set], generator)

    def step_items(self, model, batch: Batch) -> torch.Tensor:
        """The unique items a batch step distils (those with lists)."""
        if getattr(model, "batch_unit", "interaction") == "user":  # row model: pos = neg = users
            items = self.known.rows_for(torch.unique(batch.users))[1]
        else:
            items = torch.cat([batch.pos, batch.neg])
        items = torch.unique(items)
        items = items[items < len(self.row)]
        return items[self.row[items] >= 0]

    def loss(self, model, batch: Batch, epoch: int) -> torch.Tensor:
        items = self.step_items(model, batch)
        if len(items) == 0:
            return torch.zeros((), device=batch.users.device)
        rows = self.row[items]
        s1 = item_major_scores(model, items, self.interesting[rows])  # (J', k) in the list's order
        s2 = item_major_scores(model, items, self.uninteresting_users[rows])  # (J', L)
        if self.score_clamp is not None:
            s1, s2 = s1.clamp(max=self.score_clamp), s2.clamp(max=self.score_clamp)
        return relaxed_ranking_loss(s1, s2)


__all__ = ["IRRRDTerm", "item_major_scores"]
