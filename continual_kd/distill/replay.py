"""``replay``: CCD's proxy-guided replay (KDD'24).

A source X (a proxy of the student, or the student itself for a teacher) hands over its top lists.
Per user, the candidates are the items X ranks in its top ``top`` *and* better than the trained
model M ranks them: what X still knows and M has lost. Ranks here are 0-based, 0 = best; M's rank
of an item is the number of unknown items M scores strictly higher (full scores, known pairs
masked), X's rank is the item's position in X's list. Every ``every`` epochs ``per_user`` candidates
are drawn without replacement with

    p(i) ∝ exp(eps · (rank_M(i) - rank_X(i)))

(the further M has let the item drop, the likelier it is replayed), each labelled σ(score_X(u, i)),
and the loss is the summed BCE(σ(s_M(u, i)), label) over the batch's users. Its weight decays,
λ_e = weight · exp(-epoch / decay).

Sources: ``spec.source == "proxies"`` reads the model's own lists whose ``Knowledge.source`` starts
with ``PROXY_PREFIX`` (the stability and plasticity proxies, ``continual.proxies``); ``"peers"`` reads
every list handed over (for a teacher: the student's and its proxies'). Several sources are pooled:
each (source, user, item) entry is a candidate of its own, with its own ranks and label, so an item
two sources both offer may be replayed twice (once with each label). Entries already known to M,
padding (-1) and non-finite scores are dropped; a user without candidates contributes nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Batch, KDTerm, TermContext, register_term

PROXY_PREFIX = "proxy:"  # Knowledge.source of a proxy's lists, e.g. "proxy:stability"
RANK_CHUNK = 1024  # users per full-score chunk when ranking


def _replay_logits(rank_model: torch.Tensor, rank_source: torch.Tensor, top: int, eps: float) -> torch.Tensor:
    """Log-weights eps·(rank_M - rank_X) of the eligible entries (rank_X < top, rank_M > rank_X), -inf elsewhere."""
    rank_model, rank_source = rank_model.double(), rank_source.double()
    eligible = (rank_source < top) & (rank_model > rank_source)
    return torch.where(eligible, eps * (rank_model - rank_source), torch.full_like(rank_model, -math.inf))


def replay_probabilities(rank_model: torch.Tensor, rank_source: torch.Tensor, top: int, eps: float) -> torch.Tensor:
    """(..., C) replay probabilities of C candidate items per row from their 0-based ranks (0 = best) by
    the trained model and by the source: ∝ exp(eps·(rank_M - rank_X)) where the source ranks the item
    in its top ``top`` and better than the model, 0 elsewhere; a row with no such item is all 0."""
    p = torch.softmax(_replay_logits(rank_model, rank_source, top, eps), dim=-1)
    return torch.nan_to_num(p, nan=0.0).float()  # all -inf rows: softmax gives NaN


@torch.no_grad()
def model_ranks(model, users: torch.Tensor, items: torch.Tensor, known, chunk_size: int = RANK_CHUNK) -> torch.Tensor:
    """(U, C) 0-based rank of each items[u, c] among the items ``model`` scores for users[u], known pairs
    masked: the number of unknown items scored strictly higher."""
    out = []
    for start in range(0, len(users), chunk_size):
        cu, ci = users[start : start + chunk_size], items[start : start + chunk_size]
        s = model.full_scores(cu).float()  # (B, I)
        if known is not None:
            known.mask_(s, cu)
        target = s.gather(1, ci)  # (B, C)
        ascending = s.sort(dim=1).values
        out.append(s.shape[1] - torch.searchsorted(ascending, target.contiguous(), right=True))
    if not out:
        return torch.zeros(0, items.shape[1], dtype=torch.int64, device=items.device)
    return torch.cat(out)


@register_term("replay")
class ReplayTerm(KDTerm):
    @classmethod
    def needs_knowledge(cls, spec) -> bool:
        return spec.source == "peers"

    def __init__(self, spec, ctx: TermContext):
        super().__init__(spec, ctx)
        self.top, self.eps, self.every = int(spec.top), float(spec.eps), int(spec.every)
        self.per_user, self.decay = int(spec.per_user), float(spec.decay)
        self._model = (ctx.model,)  # in a tuple: read for ranking, not registered as a submodule
        self.known = ctx.known
        if spec.source == "proxies":
            # the student's own proxies, or (for a teacher) the student's proxies handed over
            lists = [k for k in [*ctx.own, *ctx.knowledge] if k.source.startswith(PROXY_PREFIX)]
        elif spec.source == "peers":
            lists = list(ctx.knowledge)
        else:
            raise ValueError(f"replay: unknown source {spec.source!r}; use proxies or peers")
        self.sources = [k.source for k in lists]

        # every source's entries in its top `top`, flattened to (user, item, rank_X, label)
        us, its, ranks, labels = [], [], [], []
        for k in lists:
            users = ctx.tensor(k.users)
            items = ctx.tensor(k.items[:, : self.top])  # (U, T)
            scores = ctx.tensor(k.scores[:, : self.top], torch.float32)
            t = items.shape[1]
            us.append(users.unsqueeze(1).expand(-1, t).reshape(-1))
            its.append(items.reshape(-1))
            ranks.append(torch.arange(t, device=items.device).expand(len(users), -1).reshape(-1))
            labels.append(torch.sigmoid(scores).reshape(-1))
        dev = ctx.device
        u = torch.cat(us) if us else torch.zeros(0, dtype=torch.int64, device=dev)
        i = torch.cat(its) if its else torch.zeros(0, dtype=torch.int64, device=dev)
        r = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64, device=dev)
        lab = torch.cat(labels) if labels else torch.zeros(0, device=dev)
        ok = (u >= 0) & (u < ctx.num_users) & (i >= 0) & (i < ctx.num_items) & torch.isfinite(lab)
        ok &= ~ctx.known.contains(u.clamp(0, ctx.num_users - 1), i.clamp(0, ctx.num_items - 1))
        u, i, r, lab = u[ok], i[ok], r[ok], lab[ok]

        # per-user padded layout (U', C): padding gets rank_X = top, so it is never eligible
        order = torch.argsort(u, stable=True)
        u, i, r, lab = u[order], i[order], r[order], lab[order]
        self.users, counts = torch.unique_consecutive(u, return_counts=True)
        width = int(counts.max()) if len(counts) else 0
        row = torch.repeat_interleave(torch.arange(len(counts), device=u.device), counts)
        col = torch.arange(len(u), device=u.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        shape = (len(self.users), width)
        self.cand_items = torch.zeros(shape, dtype=torch.int64, device=u.device)
        self.cand_rank = torch.full(shape, self.top, dtype=torch.int64, device=u.device)
        self.cand_label = torch.zeros(shape, device=u.device)
        self.cand_items[row, col], self.cand_rank[row, col], self.cand_label[row, col] = i, r, lab
        self.row = torch.full((ctx.num_users,), -1, dtype=torch.int64, device=u.device)
        self.row[self.users] = torch.arange(len(self.users), device=u.device)
        # this draw's replayed items: (U', per_user) items, labels, which slots hold one
        n = min(self.per_user, width)
        self.items = torch.zeros(len(self.users), n, dtype=torch.int64, device=u.device)
        self.labels = torch.zeros(len(self.users), n, device=u.device)
        self.chosen = torch.zeros(len(self.users), n, dtype=torch.bool, device=u.device)
        self._drawn = False

    def resample(self, generator: torch.Generator, epoch: int) -> None:
        if (self._drawn and epoch % self.every != 0) or self.items.shape[1] == 0:
            return
        model = self._model[0]
        was_training = model.training
        model.eval()
        rank_m = model_ranks(model, self.users, self.cand_items, self.known)
        model.train(was_training)
        logits = _replay_logits(rank_m, self.cand_rank, self.top, self.eps)  # (U', C)
        # Gumbel top-k: per_user draws without replacement with p ∝ exp(logits)
        uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
        keys = logits - torch.log(-torch.log(uniform.clamp(min=1e-300)))
        top = torch.topk(keys, self.items.shape[1], dim=1)
        self.chosen = torch.isfinite(top.values)
        self.items = torch.gather(self.cand_items, 1, top.indices)
        self.labels = torch.gather(self.cand_label, 1, top.indices)
        self._drawn = True

    def loss(self, model, batch: Batch, epoch: int) -> torch.Tensor:
        users = torch.unique(batch.users)
        users = users[users < len(self.row)]
        rows = self.row[users]
        keep = rows >= 0
        users, rows = users[keep], rows[keep]
        keep = self.chosen[rows].any(1)
        users, rows = users[keep], rows[keep]
        if len(users) == 0:
            return torch.zeros((), device=batch.users.device)
        s = model.score(users, self.items[rows])  # (B, per_user)
        bce = F.binary_cross_entropy_with_logits(s, self.labels[rows], reduction="none")
        return torch.where(self.chosen[rows], bce, torch.zeros_like(bce)).sum()

    def weight_at(self, epoch: int) -> float:
        return self.weight * math.exp(-epoch / self.decay)


__all__ = ["PROXY_PREFIX", "ReplayTerm", "model_ranks", "replay_probabilities"]
