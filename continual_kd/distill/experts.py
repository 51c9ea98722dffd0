"""The expert mixture DE and HTD share, computed only where its weights are not negligible.

Both terms map N student rows s (N, d_s) to the teacher's space with E experts
``expert_e(s) = W2_e·relu(W1_e·s + b1_e) + b2_e`` mixed by Gumbel-softmax weights z (N, E):

    L = Σ_n w_n · ||t_n - Σ_e z_ne · expert_e(s_n)||²

The dense mixture costs N·E expert evaluations. Once τ is small, z is one-hot to float precision for
nearly every entity, so ``mixture_loss`` evaluates only the (entity, expert) pairs whose weight is at
least ``MIXTURE_CUTOFF`` (the experts left out weigh < 1e-6 each: the loss and its gradients move by
less than that, relatively): the pairs are grouped by expert, one small product per expert (a loop
over experts, never over entities), and scattered back weighted by z. With ``hard`` each entity goes
to its Gumbel-max expert with weight 1 (the τ → 0 limit; no gradient to the selection). Off the CPU,
or while most pairs still count, the dense product is used. On the CPU the per-expert products are
one grouped matrix product per layer (``torch.nn.functional.grouped_mm`` over the pairs sorted by
expert; a loop over experts where it is missing): the same sums, without E small products and their
backward.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

MIXTURE_CUTOFF = 1e-6  # z below this (of a total of 1) is left out of the mixture
DENSE_SHARE = 0.6  # sparse evaluation only when fewer than this share of the N·E pairs count
_grouped_mm = getattr(F, "grouped_mm", None)  # torch ≥ 2.8


def _aligned(*tensors: torch.Tensor) -> bool:
    """Whether grouped_mm takes these operands (and the gradients of their shapes): every start, every
    size past the first and every non-unit stride a multiple of 16 bytes."""
    return all(t.data_ptr() % 16 == 0 and all(n * t.element_size() % 16 == 0 for n in t.shape[1:])
               and all(st * t.element_size() % 16 == 0 for st, n in zip(t.stride(), t.shape) if n > 1 and st != 1)
               for t in tensors)


def _expert_outputs(student: torch.Tensor, experts: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                    w2: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of the given experts (P,) for the student rows (P, d_s): → (order (P,), outputs (P, d_t))
    with the outputs in ``order`` (pairs grouped by expert). The experts' weights come stacked:
    w1 (E, d_s, h), b1 (E, h), w2 (E, h, d_t), b2 (E, d_t) (views of the terms' parameters)."""
    order = torch.argsort(experts, stable=True)
    counts = torch.bincount(experts, minlength=w1.shape[0])  # (E,)
    x = student[order]  # (P, d_s) grouped by expert
    if _grouped_mm is not None and x.device.type == "cpu" and x.dtype == torch.float32 and len(x) and _aligned(
            x, w1, w2, w1.new_empty(len(x), w1.shape[2])):
        e = experts[order]
        offs = torch.cumsum(counts, 0).to(torch.int32)  # end of each expert's rows
        hidden = (_grouped_mm(x, w1, offs=offs) + b1[e]).relu_()  # (P, h)
        return order, _grouped_mm(hidden, w2, offs=offs) + b2[e]  # (P, d_t)
    sizes = counts.tolist()
    # per-expert views (unbind: its backward is one stack, not E full-size zero gradients)
    w1s, b1s, w2s, b2s = w1.unbind(0), b1.unbind(0), w2.unbind(0), b2.unbind(0)
    outs = [torch.addmm(b2s[k], torch.addmm(b1s[k], part, w1s[k]).relu_(), w2s[k])  # bias folded into the product
            for k, part in enumerate(x.split(sizes)) if sizes[k]]
    return order, torch.cat(outs) if outs else x.new_zeros(0, w2.shape[2])


def mixture_loss(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None, logits: torch.Tensor,
                 tau: float, hard: bool, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                 dense: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Σ_n w_n·||t_n - Σ_e z_ne·expert_e(s_n)||² with z = softmax(logits / τ) (``hard``: one-hot argmax).

    student (N, d_s), teacher (N, d_t), weight (N,) or None (all 1), logits (N, E) = log α + g. The
    experts come stacked: w1 (E, d_s, h), b1 (E, h), w2 (E, h, d_t), b2 (E, d_t);
    ``dense(student, z)`` → (N, d_t) is the term's one-product mixture, used when it is cheaper.
    """
    n, num_experts = logits.shape
    if n == 0:
        return student.sum() * 0.0
    w = torch.ones(n, dtype=student.dtype, device=student.device) if weight is None else weight
    cpu = student.device.type == "cpu"
    if hard:
        with torch.no_grad():
            choice = logits.argmax(-1)
        if not cpu:  # one product with a one-hot z: no host sync
            z = torch.nn.functional.one_hot(choice, num_experts).to(student.dtype)
            return (w * (teacher - dense(student, z)).pow(2).sum(-1)).sum()
        order, out = _expert_outputs(student, choice, w1, b1, w2, b2)
        return (w[order] * (teacher[order] - out).pow(2).sum(-1)).sum()
    z = torch.softmax(logits / tau, dim=-1)  # (N, E)
    if not cpu:
        return (w * (teacher - dense(student, z)).pow(2).sum(-1)).sum()
    with torch.no_grad():
        keep = z >= MIXTURE_CUTOFF
        keep[torch.arange(n, device=z.device), z.argmax(-1)] = True  # never an empty mixture
        pairs = keep.nonzero()  # (P, 2): entity, expert
    if len(pairs) >= DENSE_SHARE * n * num_experts:
        return (w * (teacher - dense(student, z)).pow(2).sum(-1)).sum()
    entity, expert = pairs[:, 0], pairs[:, 1]
    order, out = _expert_outputs(student[entity], expert, w1, b1, w2, b2)
    entity = entity[order]
    mixed = torch.zeros(n, out.shape[1], dtype=out.dtype, device=out.device).index_add(
        0, entity, z[entity, expert[order]].unsqueeze(1) * out)  # (N, d_t)
    return (w * (teacher - mixed).pow(2).sum(-1)).sum()


__all__ = ["DENSE_SHARE", "MIXTURE_CUTOFF", "mixture_loss"]
