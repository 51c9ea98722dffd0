"""HTD: hierarchical topology distillation (Topology Distillation, KDD'21).

A small student cannot hold the teacher's whole topology (FTD), so HTD decomposes it:

1. Group assignment (as DE's experts, per side, ``groups`` = K each): a selection net
   ``softmax(Linear(d_t → K))`` on the teacher's representation gives α; an expert
   (MLP d_s → (d_t+d_s)//2 → d_t) is picked by Gumbel-softmax ``z = softmax((log(α+1e-10)+g)/τ)``, τ
   annealed per epoch from ``tau_start`` to ``tau_end`` (τ(e) = τ_s·(τ_e/τ_s)^(e/epochs)); GA loss
   ``Σ ||t - Σ_e z_e·expert_e(s)||²`` over the batch's users and items (``experts.mixture_loss``:
   experts with z < 1e-6 are skipped, so once τ is small each entity costs about one expert). Hard groups: the argmax of α
   (no grad); items' groups offset by K, so users and items never share a group.
2. Entity-level topology: ``Σ (cos_T(x,y) - cos_S(x,y))²`` only over pairs in the same group (with
   ``positive_only``, as the reference code, also only pairs whose teacher cosine is > 0); only those
   pairs are computed (``within_group_topology``), never the N×N cosine matrices.
3. Group-level topology: prototypes = group means of each side's representations (no grad);
   ``choice: second`` (default) compares every prototype with every entity,
   ``Σ (cos(P_s, s) - cos(P_t, t))²``; ``first`` compares prototypes with prototypes (the student's
   prototypes then keep their gradient, else the term would be a constant).
4. ``HTD = α·(entity + group) + (1-α)·GA``; the job weight λ multiplies it (BPR + 1e-3·HTD).

The experts and selection nets are the term's own parameters (stepped by the model's optimiser),
never part of the served student. Batch entities and the teacher space are FTD's (``ftd.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, KDTerm, TermContext, register_term
from .experts import mixture_loss
from .ftd import TeacherSpace, cosine_matrix, student_rows


def annealed_temperature(epoch: int, epochs: int, start: float, end: float) -> float:
    """τ(e) = start · (end/start)^(e/epochs): ``start`` at epoch 0, ``end`` at epoch ``epochs``."""
    return start * (end / start) ** (epoch / max(epochs, 1))


def group_prototypes(x: torch.Tensor, groups: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of ``x`` (N, d) per group of ``groups`` (N,) in [0, num_groups): → (present group ids (G,),
    prototypes (G, d)), groups in increasing id order; groups without a member are left out."""
    one_hot = F.one_hot(groups, num_groups).to(x.dtype)  # (N, K)
    counts = one_hot.sum(0)  # (K,)
    present = torch.nonzero(counts > 0).squeeze(1)
    sums = one_hot.T @ x  # (K, d)
    return present, sums[present] / counts[present].unsqueeze(1)


EXACT_GROUP = 256  # groups at least this large are computed unpadded, one product each


def within_group_topology(student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor, num_groups: int,
                          positive_only: bool = True) -> torch.Tensor:
    """Σ over the ordered pairs (diagonal included) inside one group of (cos_T - cos_S)², from unit rows
    student (N, d_s) and teacher (N, d_t) and hard groups (N,).

    Only same-group pairs are formed, never the N×N matrices: groups smaller than ``EXACT_GROUP`` are
    padded to the next power of two of their size and stacked by padded size (≤ log2(EXACT_GROUP)
    stacks), larger ones form a stack each at their own size (≤ N / EXACT_GROUP of them); each stack's
    cosines are one batched product, (G_w, w, w). Padded slots are masked. (Few stacks: each costs a
    dozen small ops forward and backward, which outweighs the padded pairs' products.)
    """
    counts = torch.bincount(groups, minlength=num_groups)  # (K,)
    order = torch.argsort(groups, stable=True)  # entities grouped
    starts = torch.cumsum(counts, 0) - counts
    present = torch.nonzero(counts).squeeze(1)
    size = counts[present]
    # next power of two of each group's size (exact: log2 of a power of two is exact in float64)
    width = torch.exp2(torch.ceil(torch.log2(size.double()))).long()
    width = torch.where(size >= EXACT_GROUP, size, width)  # a large group is its own stack: no padding
    total = student.sum() * 0.0
    for w in torch.unique(width).tolist():
        gs = present[width == w]  # (G_w,) groups padded to w
        slot = torch.arange(w, device=groups.device)
        valid = slot < counts[gs].unsqueeze(1)  # (G_w, w)
        members = order[torch.where(valid, starts[gs].unsqueeze(1) + slot, 0)].reshape(-1)  # (G_w·w,) entity ids
        s = student.index_select(0, members).view(len(gs), w, -1)  # (G_w, w, d_s)
        cos_s = torch.bmm(s, s.transpose(1, 2))  # (G_w, w, w)
        with torch.no_grad():  # the target: cos_T on the counted pairs, the student's own value elsewhere (gap 0)
            t = teacher.index_select(0, members).view(len(gs), w, -1)
            cos_t = torch.bmm(t, t.transpose(1, 2))
            pair = valid.unsqueeze(2) & valid.unsqueeze(1)
            if positive_only:
                pair &= cos_t > 0
            target = torch.where(pair, cos_t, cos_s)
        total = total + (cos_s - target).pow(2).sum()
    return total


def hierarchical_topology_losses(student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor,
                                 num_groups: int, choice: str = "second",
                                 positive_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(entity-level, group-level) topology losses, summed, for N entities' student (N, d_s) and
    teacher (N, d_t) rows and their hard groups (N,) in [0, num_groups)."""
    entity = within_group_topology(F.normalize(student, dim=-1), F.normalize(teacher, dim=-1), groups,
                                   num_groups, positive_only)
    if choice == "second":
        with torch.no_grad():
            _, proto_s = group_prototypes(student, groups, num_groups)
            _, proto_t = group_prototypes(teacher, groups, num_groups)
        group = (cosine_matrix(proto_s, student) - cosine_matrix(proto_t, teacher)).pow(2).sum()  # (G, N)
    elif choice == "first":
        _, proto_s = group_prototypes(student, groups, num_groups)
        with torch.no_grad():
            _, proto_t = group_prototypes(teacher, groups, num_groups)
        group = (cosine_matrix(proto_s) - cosine_matrix(proto_t)).pow(2).sum()  # (G, G)
    else:
        raise ValueError(f"unknown HTD group-level choice {choice!r}; expected 'second' or 'first'")
    return entity, group


def _uniform(shape, bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


class GroupAssignment(nn.Module):
    """One side's K experts (MLP d_s → (d_t+d_s)//2 → d_t, all evaluated in one batched product) and
    its selection net on the teacher's representation. Init as ``nn.Linear`` (U(±1/√fan_in)), from
    ``generator`` so the same job builds the same term in any process."""

    def __init__(self, student_dim: int, teacher_dim: int, groups: int, generator: torch.Generator):
        super().__init__()
        hidden = (teacher_dim + student_dim) // 2
        b1, b2, b3 = 1 / math.sqrt(student_dim), 1 / math.sqrt(hidden), 1 / math.sqrt(teacher_dim)
        self.w1 = nn.Parameter(_uniform((groups, student_dim, hidden), b1, generator))  # (K, d_s, h)
        self.b1 = nn.Parameter(_uniform((groups, hidden), b1, generator))
        self.w2 = nn.Parameter(_uniform((groups, hidden, teacher_dim), b2, generator))  # (K, h, d_t)
        self.b2 = nn.Parameter(_uniform((groups, teacher_dim), b2, generator))
        self.select_w = nn.Parameter(_uniform((teacher_dim, groups), b3, generator))  # (d_t, K)
        self.select_b = nn.Parameter(_uniform((groups,), b3, generator))
        self.groups = groups

    def selection(self, teacher: torch.Tensor) -> torch.Tensor:
        """(N, K) α = softmax(Linear(t))."""
        return torch.softmax(teacher @ self.select_w + self.select_b, dim=-1)

    @torch.no_grad()
    def hard_groups(self, teacher: torch.Tensor) -> torch.Tensor:
        """(N,) argmax of α (no grad)."""
        return self.selection(teacher).argmax(-1)

    def experts(self, student: torch.Tensor) -> torch.Tensor:
        """(N, K, d_t): every expert's output for every entity."""
        h = torch.relu(torch.einsum("nd,kdh->nkh", student, self.w1) + self.b1)
        return torch.einsum("nkh,kht->nkt", h, self.w2) + self.b2

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, tau: float,
             generator: torch.Generator | None) -> torch.Tensor:
        """Σ ||t - Σ_e z_e·expert_e(s)||² with z the Gumbel-softmax of α at temperature τ."""
        alpha = self.selection(teacher)  # (N, K)
        u = torch.rand(alpha.shape, generator=generator, device=alpha.device).clamp(1e-10, 1 - 1e-7)
        gumbel = -torch.log(-torch.log(u))
        return mixture_loss(student, teacher, None, torch.log(alpha + 1e-10) + gumbel, tau, False,
                            self.w1, self.b1, self.w2, self.b2, dense=self.mixture)

    def mixture(self, student: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(N, d_t) Σ_e z_e·(W2_e h_e + b2_e) as one (N, K·h) @ (K·h, d_t) product: the (N, K, d_t)
        outputs are never built."""
        h = torch.relu(torch.einsum("nd,kdh->nkh", student, self.w1) + self.b1)  # (N, K, h)
        return (z.unsqueeze(-1) * h).flatten(1) @ self.w2.flatten(0, 1) + z @ self.b2  # (N, d_t)


@register_term("htd")
class HTDTerm(KDTerm):
    """HTD for the student of ``ctx`` from the other side's user/item vectors."""

    def __init__(self, spec, ctx: TermContext):
        super().__init__(spec, ctx)
        self.teacher = TeacherSpace(ctx, "htd")
        self.groups, self.alpha, self.choice = int(spec.groups), float(spec.alpha), spec.choice
        self.positive_only = bool(spec.positive_only)
        self.tau_start, self.tau_end, self.epochs = float(spec.tau_start), float(spec.tau_end), max(ctx.epochs, 1)
        u_all, _ = ctx.model.embeddings()
        student_dim = u_all.shape[1]
        init = torch.Generator().manual_seed(1_000_003 * (ctx.block + 1))  # fixed per block: same term anywhere
        self.user_groups = GroupAssignment(student_dim, self.teacher.dim, self.groups, init).to(ctx.device)
        self.item_groups = GroupAssignment(student_dim, self.teacher.dim, self.groups, init).to(ctx.device)
        self._generator: torch.Generator | None = None
        self.tau = self.tau_start

    def resample(self, generator: torch.Generator, epoch: int) -> None:
        self.tau = annealed_temperature(epoch, self.epochs, self.tau_start, self.tau_end)
        # the Gumbel draws of the epoch's batches: a generator on the term's device, seeded from the epoch's
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self._generator = torch.Generator(device=self.teacher.users.device).manual_seed(seed)

    def loss(self, model, batch: Batch, epoch: int) -> torch.Tensor:
        users, items = self.teacher.batch_entities(batch)
        if len(users) + len(items) == 0:
            return torch.zeros((), device=batch.users.device)
        if self._generator is None:
            self._generator = torch.Generator(device=self.teacher.users.device).manual_seed(0)
        s = student_rows(model, users, items)  # (N, d_s)
        t = self.teacher.of(users, items)  # (N, d_t)
        nu = len(users)
        s_u, s_i, t_u, t_i = s[:nu], s[nu:], t[:nu], t[nu:]
        groups = torch.cat([self.user_groups.hard_groups(t_u), self.item_groups.hard_groups(t_i) + self.groups])
        entity, group = hierarchical_topology_losses(s, t, groups, 2 * self.groups, self.choice, self.positive_only)
        assignment = (self.user_groups.loss(s_u, t_u, self.tau, self._generator)
                      + self.item_groups.loss(s_i, t_i, self.tau, self._generator))
        return self.alpha * (entity + group) + (1 - self.alpha) * assignment


__all__ = ["GroupAssignment", "HTDTerm", "within_group_topology", "annealed_temperature", "group_prototypes", "hierarchical_topology_losses"]
