"""Keep: a model keeps its own pre-block order while it learns the new block (a stability term).

``ctx.own[0]`` is the model's own Knowledge computed before this block's update. Its top-``k`` items
per user must keep their order (RRD, ``RRDTargets`` in "direct" mode), above ``uninteresting`` items
drawn uniformly every epoch from items neither known to the model nor anywhere in that own list.
"""

from __future__ import annotations

import torch

from .base import Batch, KDTerm, TermContext, register_term
from .rrd import RRDConfig, RRDTargets


@register_term("keep")
class KeepTerm(KDTerm):
    """RRD against the model's own pre-update top-k (``ctx.own[0]``)."""

    @classmethod
    def needs_knowledge(cls, spec) -> bool:
        return False  # it reads the model's own lists (ctx.own)

    @classmethod
    def needs_trained_model(cls, spec) -> bool:
        return True  # a new model has no old order to keep

    def __init__(self, spec, ctx: TermContext):
        super().__init__(spec, ctx)
        if not ctx.own:
            raise ValueError("keep needs the model's own pre-update knowledge (ctx.own is empty)")
        own = ctx.own[0]
        users, items = ctx.tensor(own.users), ctx.tensor(own.items)  # (U,), (U, N) best first
        if getattr(spec, "users", "all") == "absent" and ctx.block_users is not None:
            absent = ~torch.isin(users, ctx.block_users)
            users, items = users[absent], items[absent]
        cfg = RRDConfig(weight=spec.weight, k=int(spec.k), pool=items.shape[1], uninteresting=int(spec.uninteresting),
                        mode="direct")
        self.targets = RRDTargets(cfg, users, items, ctx.known, ctx.num_users, ctx.num_items)

    def resample(self, generator: torch.Generator, epoch: int) -> None:
        self.targets.resample(generator)

    def loss(self, model, batch: Batch, epoch: int) -> torch.Tensor:
        return self.targets.loss(model, batch.users)


__all__ = ["KeepTerm"]
