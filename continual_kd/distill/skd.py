"""SKD: structured-knowledge distillation (after Zhang et al., WSDM'20): the student's scores reproduce
the path teacher's on sampled (user, item) pairs, while the student stays an embedding model.

Each epoch, every user the teacher handed a list for gets ``pairs`` items drawn uniformly from the
teacher's top-``k`` (with the teacher's scores). Scores of two different models live on different
scales, so the student matches the teacher's scores up to an affine map per user: both sets of scores
are standardised over the user's sampled items, and

    L = Σ_u ½ Σ_p (ẑ_student(u, p) − ẑ_teacher(u, p))²  =  Σ_u P · (1 − corr_u(student, teacher))

zero when the student's scores are a positive affine function of the teacher's, 2P when reversed. It
only reads the teacher's lists (top-k ids + scores), so the teacher can be any backbone; the student's
inference is unchanged (no path is computed when it serves).
"""

from __future__ import annotations

import torch

from .base import Batch, KDTerm, TermContext, register_term

EPS = 1e-8


def standardized(scores: torch.Tensor) -> torch.Tensor:
    """(B, P) scores → per row zero mean, unit (population) standard deviation; a constant row → 0."""
    centred = scores - scores.mean(dim=1, keepdim=True)
    return centred / (centred.pow(2).mean(dim=1, keepdim=True).sqrt() + EPS)


def structured_score_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Summed SKD loss of (B, P) student and teacher scores on the same pairs."""
    return 0.5 * (standardized(student) - standardized(teacher)).pow(2).sum()


@register_term("skd")
class SKDTerm(KDTerm):
    """Score matching on pairs sampled from one teacher's top-k (``spec.teacher``; default: the first list)."""

    def __init__(self, spec, ctx: TermContext):
        super().__init__(spec, ctx)
        lists = [k for k in ctx.knowledge if spec.teacher is None or k.source == spec.teacher]
        self.active = bool(lists)
        know = lists[0] if lists else ctx.knowledge[0]
        k = min(spec.k, know.items.shape[1])
        self.pairs = min(spec.pairs, k)
        self.users = ctx.tensor(know.users)
        self.items = ctx.tensor(know.items[:, :k])  # (U, k)
        self.scores = ctx.tensor(know.scores[:, :k], torch.float32)  # (U, k)
        self.row = torch.full((ctx.num_users,), -1, dtype=torch.int64, device=self.users.device)
        self.row[self.users] = torch.arange(len(self.users), device=self.users.device)
        self.pick = torch.zeros(len(self.users), self.pairs, dtype=torch.int64, device=self.users.device)

    def resample(self, generator: torch.Generator, epoch: int) -> None:
        """``pairs`` distinct positions of each user's top-k, uniformly (one tensor op for every user)."""
        draw = torch.rand(self.items.shape, generator=generator).to(self.items.device)
        self.pick = draw.argsort(dim=1)[:, : self.pairs]

    def loss(self, model, batch: Batch, epoch: int) -> torch.Tensor:
        users = torch.unique(batch.users)
        rows = self.row[users]
        keep = rows >= 0
        users, rows = users[keep], rows[keep]
        if not self.active or len(users) == 0:
            return torch.zeros((), device=batch.users.device)
        pos = self.pick[rows]  # (B, P)
        items = torch.gather(self.items[rows], 1, pos)
        teacher = torch.gather(self.scores[rows], 1, pos)
        return structured_score_loss(model.score(users, items), teacher)
