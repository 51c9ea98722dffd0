"""What every KD term is, and the ``TERMS`` registry keyed by the names used in job files.

A term is built for one model and one block from its spec (``config.py``'s term specs) and a
``TermContext`` (the knowledge handed over, the model's known pairs, sizes). During training it is
asked, per epoch, to ``resample`` its targets and, per batch, for its **summed, unweighted**
``loss(model, batch, epoch)``; ``weight_at(epoch)`` gives its weight (constant, or decaying for CCD's
replay). A term is an ``nn.Module``: parameters it owns (DE's experts) are stepped by the same
optimiser as the model, and ``carry()`` returns state that outlives the block (saved in snapshots,
handed back through ``TermContext.state`` next block). A term is never part of the served model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..sparse import UserItemSet
from ..types import Knowledge


@dataclass
class Batch:
    """One training batch: (B,) users, positives, sampled negatives (row models: pos = neg = users)."""

    users: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor


@dataclass
class TermContext:
    """What a term may be built from, for one model and one block."""

    model: nn.Module  # the model being trained (the term reads its current scores; never replaces it)
    knowledge: list[Knowledge]  # from the other side: the teachers' lists for the student, the student's for a teacher
    known: UserItemSet  # pairs the model may know (training pairs so far; never held-out ones)
    num_users: int
    num_items: int
    block: int
    epochs: int  # epochs of this update
    device: str | torch.device = "cpu"
    role: str = "student"  # "student" or "teacher": which side the trained model is on (BD's weights differ)
    fusion: str = "rank"  # how several lists become one (distill.fusion)
    weights: list[float] | None = None  # per-knowledge fusion weights (None: uniform)
    fusion_penalty: torch.Tensor | None = None  # (I,) taken off the fused scores (distill.fusion_popularity)
    item_popularity: torch.Tensor | None = None  # (I,) training interactions per item
    own: list[Knowledge] = field(default_factory=list)  # the model's own lists: its pre-update top-K, proxies
    state: dict | None = None  # what this term carried from the previous block (``KDTerm.carry``)
    meta: dict = field(default_factory=dict)  # what rode along with the blocks (Interactions.meta: item knowledge)
    block_users: torch.Tensor | None = None  # (B,) users with training pairs in this block (ascending)

    def tensor(self, array, dtype=torch.int64) -> torch.Tensor:
        return torch.as_tensor(array, dtype=dtype, device=self.device)

    @property
    def users(self) -> torch.Tensor:
        """(U,) the users the knowledge is about (every list of one block covers the same users)."""
        return self.tensor(self.knowledge[0].users)

    def fused_items(self, size: int) -> torch.Tensor:
        """(U, size) one ranking from every knowledge list: as is for one list, else ``fusion`` (ordered by the
        fused score less ``fusion_penalty`` when one is set)."""
        from .fusion import fuse_rankings

        lists = [self.tensor(k.items) for k in self.knowledge]
        if len(lists) == 1:
            return lists[0][:, :size]
        return fuse_rankings(lists, size, self.fusion, self.weights, num_items=self.num_items,
                             item_penalty=self.fusion_penalty)[0]


def knowledge_rows(row: torch.Tensor, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(users, rows) of a batch's users that have knowledge: ``row`` maps a user id to its row of the
    term's tables (-1: none); ids past its end (users newer than the knowledge) have none."""
    inside = users < len(row)
    rows = torch.where(inside, row[users.clamp(max=len(row) - 1)], -1)
    keep = rows >= 0
    return users[keep], rows[keep]


class KDTerm(nn.Module):
    """Base of every KD term; subclasses set ``name`` and implement ``loss``."""

    name: str = ""
    base_weight: float = 1.0  # weight this term asks for on the model's own loss (HetComp's student: 0)

    def __init__(self, spec, ctx: TermContext):
        super().__init__()
        self.spec = spec
        self.weight = float(getattr(spec, "weight", 1.0))

    @classmethod
    def needs_knowledge(cls, spec) -> bool:
        """Whether the term reads the other side's lists (it is skipped when none came, e.g. no
        feedback before the student's first block)."""
        return True

    @classmethod
    def needs_trained_model(cls, spec) -> bool:
        """Whether the term reads what the model knew before this update (skipped for a new model)."""
        return False

    def resample(self, generator: torch.Generator, epoch: int) -> None:
        """Draw this epoch's targets (called before every epoch, 0-based)."""

    def loss(self, model, batch: Batch, epoch: int) -> torch.Tensor:
        raise NotImplementedError

    def weight_at(self, epoch: int) -> float:
        return self.weight

    def on_epoch_end(self, model, epoch: int) -> None:
        """After each epoch (1-based), with the model in eval mode (e.g. HetComp's DKC)."""

    def carry(self) -> dict | None:
        """State to keep for the next block (saved in the snapshot); None: nothing."""
        return None


TERMS: dict[str, Callable[[Any, TermContext], KDTerm]] = {}


def register_term(name: str):
    def deco(cls):
        cls.name = name
        TERMS[name] = cls
        return cls

    return deco


def build_terms(specs, ctx: TermContext) -> list[KDTerm]:
    """Every term of ``specs`` (term specs with a ``name``) built for ``ctx``; unknown names are a bug
    (the job spec only admits registered names)."""
    return [TERMS[s.name](s, ctx) for s in specs]
