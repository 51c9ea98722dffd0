"""FTD: full topology distillation (Topology Distillation, KDD'21).

The batch's entities are one set: its unique users and its unique (positive ∪ negative) items. Their
relational structure in the teacher's representation space (the cosine of every pair) is the
target of the student's:

    L = Σ_{x,y} (cos_T(x, y) - cos_S(x, y))²      (summed over every ordered pair, diagonal included)

The teacher's representations are the user/item tables its scores factorise into
(``Knowledge.user_vectors`` / ``item_vectors``, asked for by ``stages.knowledge_request``); the
student's are ``model.embeddings()`` (MF: its tables). With several teachers the teacher space is the
concatenation of each teacher's unit-length rows scaled by √w_t (weights summing to 1), so a teacher
cosine is the weighted mean of the teachers' cosines and teachers of any dimension mix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Batch, KDTerm, TermContext, register_term


def cosine_matrix(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """(N, d) × (M, d) → (N, M) cosines of every row pair (zero rows give 0)."""
    xn = F.normalize(x, dim=-1)
    return xn @ (xn if y is None else F.normalize(y, dim=-1)).T


def full_topology_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Σ over every pair of the squared gap between the teacher's and the student's cosines.
    student: (N, d_s), teacher: (N, d_t) representations of the same N entities.

    With unit rows S, T: Σ_xy (t_x·t_y - s_x·s_y)² = ||TᵀT||² - 2||TᵀS||² + ||SᵀS||² (Frobenius), so the
    N×N matrices are never built: O(N·(d_t + d_s)²) instead of O(N²·(d_t + d_s)); the Gram matrices are
    summed in float64 so the difference of the three large sums keeps its precision."""
    s = F.normalize(student, dim=-1).double()
    t = F.normalize(teacher, dim=-1).double()
    loss = (t.T @ t).pow(2).sum() - 2 * (t.T @ s).pow(2).sum() + (s.T @ s).pow(2).sum()
    return loss.to(student.dtype)


class TeacherSpace:
    """The teacher's representation of every user and item of the block, from the knowledge's vectors.

    ``users`` (num_users, D) / ``items`` (num_items, D) with ``has_user`` / ``has_item`` masks: users
    without knowledge, and items a teacher does not know yet, have no teacher representation and take
    no part in a topology.
    """

    def __init__(self, ctx: TermContext, term: str):
        lists = [i for i, k in enumerate(ctx.knowledge) if k.user_vectors is not None and k.item_vectors is not None]
        if not lists:
            raise ValueError(f"{term} needs the other side's user/item vectors (Knowledge.user_vectors / "
                             f"item_vectors); none of the {len(ctx.knowledge)} knowledge lists carries them")
        w = [ctx.weights[i] for i in lists] if ctx.weights is not None else [1.0] * len(lists)
        w = [x / sum(w) for x in w]
        nu, ni, dev = ctx.num_users, ctx.num_items, ctx.device
        user_parts, item_parts = [], []
        self.has_user = torch.ones(nu, dtype=torch.bool, device=dev)
        self.has_item = torch.ones(ni, dtype=torch.bool, device=dev)
        for i, wt in zip(lists, w):
            k = ctx.knowledge[i]
            u_vec = ctx.tensor(k.user_vectors, torch.float32)  # (U_k, d_t) rows of k.users
            i_vec = ctx.tensor(k.item_vectors, torch.float32)[:ni]  # (I_t, d_t)
            users = ctx.tensor(k.users)
            table_u = torch.zeros(nu, u_vec.shape[1], device=dev)
            table_u[users] = u_vec
            known_u = torch.zeros(nu, dtype=torch.bool, device=dev)
            known_u[users] = True
            table_i = torch.zeros(ni, i_vec.shape[1], device=dev)
            table_i[: len(i_vec)] = i_vec
            known_i = torch.zeros(ni, dtype=torch.bool, device=dev)
            known_i[: len(i_vec)] = True
            self.has_user &= known_u
            self.has_item &= known_i
            if len(lists) > 1:  # unit rows × √w: the concatenation's cosine is the weighted mean cosine
                table_u, table_i = F.normalize(table_u, dim=1) * wt ** 0.5, F.normalize(table_i, dim=1) * wt ** 0.5
            user_parts.append(table_u)
            item_parts.append(table_i)
        self.users = torch.cat(user_parts, 1)  # (num_users, D)
        self.items = torch.cat(item_parts, 1)  # (num_items, D)
        self.dim = self.users.shape[1]

    def batch_entities(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's unique users and unique (pos ∪ neg) items that have a teacher representation."""
        users = torch.unique(batch.users)
        users = users[users < len(self.has_user)]
        users = users[self.has_user[users]]
        items = torch.unique(torch.cat([batch.pos, batch.neg]))
        items = items[items < len(self.has_item)]
        items = items[self.has_item[items]]
        return users, items

    def of(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(N_u + N_i, D) teacher rows, users first."""
        return torch.cat([self.users[users], self.items[items]])


def student_rows(model, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """(N_u + N_i, d_s) the student's representations of the entities (with grad), users first."""
    u_all, i_all = model.embeddings()
    return torch.cat([u_all[users], i_all[items]])


@register_term("ftd")
class FTDTerm(KDTerm):
    """FTD: the student's cosine matrix of the batch's entities matches the teacher's."""

    def __init__(self, spec, ctx: TermContext):
        super().__init__(spec, ctx)
        self.teacher = TeacherSpace(ctx, "ftd")

    def loss(self, model, batch: Batch, epoch: int) -> torch.Tensor:
        users, items = self.teacher.batch_entities(batch)
        if len(users) + len(items) == 0:
            return torch.zeros((), device=batch.users.device)
        return full_topology_loss(student_rows(model, users, items), self.teacher.of(users, items))


__all__ = ["FTDTerm", "TeacherSpace", "cosine_matrix", "full_topology_loss", "student_rows"]
