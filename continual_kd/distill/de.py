"""DE: distillation experts (DE-RRD, CIKM'20; reference Models/DE.py).

The trained model's user and item representations (``model.embeddings()``; MF: its tables) are
mapped into the other side's representation space (``Knowledge.user_vectors`` / ``item_vectors``, the
tables its scores factorise into) by experts, one set per side:

    expert_e(s) = W2_e · relu(W1_e · s + b1_e) + b2_e        d_s → (d_t + d_s)//2 → d_t, e = 1..E
    α = softmax(Linear(t))                                   selection net on the *teacher's* row
    z = softmax((log(α + 1e-10) + g) / τ),  g ~ Gumbel(0, 1)  one expert picked per entity
    L_DE = Σ_users ||t - Σ_e z_e · expert_e(s)||² + item_weight · Σ_items ||t - Σ_e z_e · expert_e(s)||²

over the batch's unique users and its unique positive and unique negative items (an item that is both
counts twice, as the reference's two sums; one Gumbel draw per unique entity). τ is annealed per
epoch, τ(e) = τ_start · (τ_end/τ_start)^(e/epochs). Once τ ≤ ``hard_tau`` z is one-hot to float
precision for nearly every entity and its gradient vanishes, so the term routes each entity to its
Gumbel-max expert only (the τ → 0 limit: 1/E of the expert work; ``hard_tau: 0`` keeps the
mixture throughout). Above it, the mixture skips the (entity, expert) pairs whose z < 1e-6
(``experts.mixture_loss``: the same loss to 1e-6, and 1-3 experts per entity once τ ≲ 0.1); while most
pairs count it is one product over the z-weighted hidden units of every expert, never an (N, E, d_t)
tensor.

The experts and selection nets are the term's own parameters: the model's optimiser steps them, they
are rebuilt every block (initialised from a generator fixed per block, so any process builds the same
term) and never carried, saved or served (``carry`` is None).

Several teachers: one independent DE per teacher that hands over vectors (its own experts, selection
nets and dimension d_t), the losses added with the fusion weights normalised to sum 1 (uniform
without weights), so the term's scale does not grow with the number of teachers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Batch, KDTerm, TermContext, register_term
from .experts import _expert_outputs, mixture_loss


def annealed_tau(epoch: int, epochs: int, start: float, end: float) -> float:
    """τ(e) = start · (end/start)^(e/epochs), never below ``end``."""
    return max(start * (end / start) ** (epoch / max(epochs, 1)), end)


def gumbel_noise(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device).clamp(1e-10, 1 - 1e-7)
    return -torch.log(-torch.log(u))


def _uniform(shape, bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


class DistillationExperts(nn.Module):
    """One side's E experts (MLP d_s → h → d_t, stored stacked) and its selection net on the
    teacher's rows. Initialised as ``nn.Linear`` is (U(±1/√fan_in)), from ``generator``."""

    def __init__(self, student_dim: int, teacher_dim: int, experts: int, generator: torch.Generator):
        super().__init__()
        hidden = (teacher_dim + student_dim) // 2
        b1, b2, b3 = 1 / math.sqrt(student_dim), 1 / math.sqrt(hidden), 1 / math.sqrt(teacher_dim)
        self.experts, self.hidden, self.teacher_dim = experts, hidden, teacher_dim
        self.w1 = nn.Parameter(_uniform((student_dim, experts * hidden), b1, generator))  # (d_s, E·h)
        self.b1 = nn.Parameter(_uniform((experts * hidden,), b1, generator))
        self.w2 = nn.Parameter(_uniform((experts * hidden, teacher_dim), b2, generator))  # (E·h, d_t)
        self.b2 = nn.Parameter(_uniform((experts, teacher_dim), b2, generator))
        self.select_w = nn.Parameter(_uniform((teacher_dim, experts), b3, generator))  # (d_t, E)
        self.select_b = nn.Parameter(_uniform((experts,), b3, generator))

    def selection(self, teacher: torch.Tensor) -> torch.Tensor:
        """(N, E) α = softmax(Linear(t))."""
        return torch.softmax(teacher @ self.select_w + self.select_b, dim=-1)

    def gumbel_logits(self, teacher: torch.Tensor, gumbel: torch.Tensor) -> torch.Tensor:
        """(N, E) log(α + 1e-10) + g."""
        return torch.log(self.selection(teacher) + 1e-10) + gumbel

    def mixture(self, student: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(N, d_t) Σ_e z_e · expert_e(s) for weights z (N, E)."""
        n = len(student)
        hidden = torch.relu(student @ self.w1 + self.b1).view(n, self.experts, self.hidden)  # (N, E, h)
        return (hidden * z.unsqueeze(-1)).reshape(n, -1) @ self.w2 + z @ self.b2

    def expert_views(self):
        """The experts stacked (views of the parameters, no copy): w1 (E, d_s, h), b1 (E, h),
        w2 (E, h, d_t), b2 (E, d_t)."""
        d_s = self.w1.shape[0]
        return (self.w1.view(d_s, self.experts, self.hidden).transpose(0, 1),
                self.b1.view(self.experts, self.hidden), self.w2.view(self.experts, self.hidden, self.teacher_dim),
                self.b2)

    def routed(self, student: torch.Tensor, teacher: torch.Tensor, choice: torch.Tensor,
               weight: torch.Tensor) -> torch.Tensor:
        """Σ weight·||t - expert_choice(s)||² with one expert per entity: entities grouped by expert,
        one small product per expert (a loop over the E experts, never over entities)."""
        order, out = _expert_outputs(student, choice, *self.expert_views())
        return (weight[order] * (teacher[order] - out).pow(2).sum(-1)).sum()

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, tau: float,
             gumbel: torch.Tensor | None, hard: bool = False) -> torch.Tensor:
        """Σ weight·||t - Σ_e z_e·expert_e(s)||² (student (N, d_s), teacher (N, d_t), weight (N,)).
        ``gumbel`` (N, E) noise; ``hard``: each entity routed to argmax(log α + g) only. The mixture
        skips the experts whose z is negligible (``experts.mixture_loss``)."""
        if self.experts == 1:
            z = torch.ones(len(student), 1, dtype=student.dtype, device=student.device)
            return (weight * (teacher - self.mixture(student, z)).pow(2).sum(-1)).sum()
        return mixture_loss(student, teacher, weight, self.gumbel_logits(teacher, gumbel), tau, hard,
                            *self.expert_views(), dense=self.mixture)


class TeacherTables:
    """One teacher's rows for every user/item id of the block (zeros + a mask where it has none)."""

    def __init__(self, knowledge, ctx: TermContext):
        nu, ni, dev = ctx.num_users, ctx.num_items, ctx.device
        u_vec = ctx.tensor(knowledge.user_vectors, torch.float32)  # (U_k, d_t), rows of knowledge.users
        i_vec = ctx.tensor(knowledge.item_vectors, torch.float32)[:ni]  # (I_t, d_t)
        self.dim = u_vec.shape[1]
        self.users = torch.zeros(nu, self.dim, device=dev)
        self.has_user = torch.zeros(nu, dtype=torch.bool, device=dev)
        ids = ctx.tensor(knowledge.users)
        self.users[ids] = u_vec
        self.has_user[ids] = True
        self.items = torch.zeros(ni, self.dim, device=dev)
        self.items[: len(i_vec)] = i_vec
        self.has_item = torch.zeros(ni, dtype=torch.bool, device=dev)
        self.has_item[: len(i_vec)] = True


@register_term("de")
class DETerm(KDTerm):
    """DE from the vectors of every knowledge list that carries them (one DE per such teacher)."""

    def __init__(self, spec, ctx: TermContext):
        super().__init__(spec, ctx)
        lists = [i for i, k in enumerate(ctx.knowledge) if k.user_vectors is not None and k.item_vectors is not None]
        if not lists:
            raise ValueError(f"de needs the other side's user/item vectors (Knowledge.user_vectors / item_vectors); "
                             f"none of the {len(ctx.knowledge)} knowledge lists carries them")
        w = [ctx.weights[i] for i in lists] if ctx.weights is not None else [1.0] * len(lists)
        self.teacher_weights = [x / sum(w) for x in w]
        self.teachers = [TeacherTables(ctx.knowledge[i], ctx) for i in lists]
        self.experts = int(spec.experts)
        self.item_weight = float(spec.item_weight)
        self.tau_start, self.tau_end, self.hard_tau = float(spec.tau_start), float(spec.tau_end), float(spec.hard_tau)
        self.epochs = max(ctx.epochs, 1)
        self.known = ctx.known
        student_dim = ctx.model.embeddings()[0].shape[1]
        init = torch.Generator().manual_seed(2_000_003 * (ctx.block + 1))  # fixed per block: the same term anywhere
        self.user_experts = nn.ModuleList([DistillationExperts(student_dim, t.dim, self.experts, init)
                                           for t in self.teachers]).to(ctx.device)
        self.item_experts = nn.ModuleList([DistillationExperts(student_dim, t.dim, self.experts, init)
                                           for t in self.teachers]).to(ctx.device)
        self.device = torch.device(ctx.device)
        self.tau = self.tau_start
        self._generator: torch.Generator | None = None

    @property
    def hard(self) -> bool:
        return self.tau <= self.hard_tau

    def resample(self, generator: torch.Generator, epoch: int) -> None:
        self.tau = annealed_tau(epoch, self.epochs, self.tau_start, self.tau_end)
        # the epoch's Gumbel draws: a generator on the term's device, seeded from the epoch's generator
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self._generator = torch.Generator(device=self.device).manual_seed(seed)

    def entities(self, model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's unique users, and its items with their weight: item_weight × (1 if only a
        positive or only a negative, 2 if both). A row model (pos = neg = users): the batch users'
        known items, item_weight each."""
        users = torch.unique(batch.users)
        if getattr(model, "batch_unit", "interaction") == "user":
            items = torch.unique(self.known.rows_for(users)[1])
            counts = torch.ones_like(items)
        else:
            items, counts = torch.unique(torch.cat([torch.unique(batch.pos), torch.unique(batch.neg)]),
                                         return_counts=True)
        return users, items, self.item_weight * counts.float()

    def loss(self, model, batch: Batch, epoch: int) -> torch.Tensor:
        if self._generator is None:
            self._generator = torch.Generator(device=self.device).manual_seed(0)
        users, items, item_w = self.entities(model, batch)
        u_all, i_all = model.embeddings()
        total = torch.zeros((), device=batch.users.device)
        for wt, teacher, ue, ie in zip(self.teacher_weights, self.teachers, self.user_experts, self.item_experts):
            u = users[users < len(teacher.has_user)]
            u = u[teacher.has_user[u]]
            keep = (items < len(teacher.has_item)) & teacher.has_item[items.clamp(max=len(teacher.has_item) - 1)]
            i, iw = items[keep], item_w[keep]
            part = torch.zeros((), device=batch.users.device)
            if len(u):
                g = gumbel_noise((len(u), self.experts), self._generator, self.device)
                part = part + ue.loss(u_all[u], teacher.users[u], torch.ones(len(u), device=self.device), self.tau,
                                      g, self.hard)
            if len(i):
                g = gumbel_noise((len(i), self.experts), self._generator, self.device)
                part = part + ie.loss(i_all[i], teacher.items[i], iw, self.tau, g, self.hard)
            total = total + wt * part
        return total


__all__ = ["DETerm", "DistillationExperts", "TeacherTables", "annealed_tau", "gumbel_noise"]
