"""BD: bidirectional distillation (WWW'21), one direction per term: the model being trained learns
from the *other* side's lists (the teachers' for the student, the student's for a teacher).

Candidates per user: every item (full mode: the other side hands over the user/item tables whose
dot products are its scores, ``Knowledge.user_vectors`` / ``item_vectors``, fixed for the block) or,
without them, the other side's top-N list (list mode; with several lists, their fusion). Ranks follow METHODS.md: ascending order of score over all items with the model's known
pairs at -inf, so a higher rank is preferred. The other side's rank of the item at 0-based list
position p is ``I - 1 - p`` (items outside its list would rank below it; they have no score to
learn from, so they are never candidates). The trained model's own ranks of the candidates are
recomputed from its full scores every ``refresh`` epochs. Per user, KD items are drawn with

    teacher: exp(ε_T · d)             student: tanh(max(ε_S · d, 0))
    d = own_rank - other_rank  (sign "code": train on items it ranks above the other)
    d = other_rank - own_rank  (sign "paper")

one per training pair of the batch, and the loss is Σ BCE(σ(s(u,j)), σ(other(u,j)/τ)), label detached.

Several lists (e.g. teachers for the student, or the student and its proxies for a teacher) become
one: items and order from ``fuse_rankings`` (``ctx.fusion``, ``ctx.weights``, ``ctx.fusion_penalty``), kept to
the longest input list; the score of a fused item is the weighted mean of the raw scores of the lists that hold
it (a list that misses the item does not count), so the label stays on the models' score scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Batch, KDTerm, TermContext, register_term
from .fusion import fuse_rankings

SIGNS = ("code", "paper")
ROLES = ("student", "teacher")


def bd_sampling_weights(own_rank: torch.Tensor, other_rank: torch.Tensor, role: str, eps: float,
                        sign: str = "code") -> torch.Tensor:
    """BD's unnormalised sampling weights of candidate items (any equal shapes; ascending ranks).

    role "teacher": exp(eps · d); role "student": tanh(max(eps · d, 0)); d = own - other under
    sign "code", other - own under sign "paper"."""
    if role not in ROLES:
        raise ValueError(f"unknown BD role {role!r}; expected one of {ROLES}")
    if sign not in SIGNS:
        raise ValueError(f"unknown BD sign {sign!r}; expected one of {SIGNS}")
    d = (own_rank - other_rank).double()
    if sign == "paper":
        d = -d
    w = torch.exp(eps * d) if role == "teacher" else torch.tanh(torch.clamp(eps * d, min=0.0))
    return w.float()


def fuse_scored_lists(items: list[torch.Tensor], scores: list[torch.Tensor], size: int, method: str,
                      weights: list[float] | None, num_items: int,
                      item_penalty: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One (U, size) list from several (U, N_t) scored lists over the same users, and the weighted
    mean score of each fused item over the lists that hold it (0 for padding, item -1). ``item_penalty``
    (``distill.fusion_popularity``) orders the fused items as in ``fuse_rankings``; the scores stay the lists'."""
    if len(items) == 1:
        return items[0][:, :size], scores[0][:, :size].float()
    fused, _ = fuse_rankings(items, size, method, weights, num_items=num_items, item_penalty=item_penalty)
    w = weights if weights is not None else [1.0] * len(items)
    n_users = fused.shape[0]
    row = torch.arange(n_users, device=fused.device).unsqueeze(1)
    query = row * num_items + fused.clamp(min=0)  # (U, size) keys of the fused pairs
    total = torch.zeros(fused.shape, dtype=torch.float64, device=fused.device)
    mass = torch.zeros_like(total)
    for lst, sc, wt in zip(items, scores, w):
        lst = lst.long()
        valid = lst >= 0
        keys = (row * num_items + lst)[valid]
        vals = sc.to(torch.float64)[valid]
        keys, order = torch.sort(keys)
        vals = vals[order]
        if len(keys) == 0:
            continue
        pos = torch.searchsorted(keys, query).clamp(max=len(keys) - 1)
        hit = (keys[pos] == query) & (fused >= 0)
        total += torch.where(hit, wt * vals[pos], 0.0)
        mass += torch.where(hit, float(wt), 0.0)
    return fused, (total / mass.clamp(min=1e-12)).float()


class RowCategorical:
    """Draws from each row's categorical distribution over (U, N) non-negative weights, built once.

    One flat float64 CDF in which row r spans (r, r + 1]: a draw for row r is the first entry above
    r + u (u uniform in [0, 1)), one binary search per sample. ``torch.multinomial`` on the rows of a
    batch re-reads and re-normalises every row on every call (B × N work per batch: most of a BD epoch).
    A zero-weight entry is never drawn; a row without weight must not be asked for."""

    def __init__(self, weights: torch.Tensor):
        rows, self.width = weights.shape
        cdf = weights.to(torch.float64).cumsum(1)
        cdf /= cdf[:, -1:].clamp(min=torch.finfo(torch.float64).tiny)  # each row ends at exactly 1 (0 if empty)
        cdf += torch.arange(rows, dtype=torch.float64, device=weights.device).unsqueeze(1)
        self.flat = cdf.reshape(-1)

    def draw(self, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B,) column drawn for each of ``rows`` (row indices)."""
        u = torch.rand(len(rows), dtype=torch.float64, generator=generator, device=rows.device).clamp_(max=1 - 1e-9)
        at = torch.searchsorted(self.flat, rows.to(torch.float64) + u, right=True)
        return (at - rows * self.width).clamp_(0, self.width - 1)


def ascending_ranks(scores: torch.Tensor) -> torch.Tensor:
    """(B, I) rank of every entry in its row by ascending score: how many entries are strictly lower
    (so the best item has rank I-1 when there is no tie; -inf entries share rank 0).

    One sort: an entry's rank is the sorted position of the first entry equal to it (a run of ties
    starts where the sorted value changes; ``cummax`` carries that start along the run), scattered back
    to the entry's column — the same as searching each entry in the sorted row, at half the cost."""
    values, order = torch.sort(scores, dim=1)
    pos = torch.arange(values.shape[1], device=values.device).expand_as(order)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    first = torch.where(starts, pos, 0).cummax(dim=1).values
    return torch.empty_like(order).scatter_(1, order, first)


@register_term("bd")
class BDTerm(KDTerm):
    """BD for the model of ``ctx`` (student or teacher, ``ctx.role``) from the other side's knowledge.

    Full mode (the knowledge carries ``user_vectors`` / ``item_vectors``, as ``stages`` asks for BD):
    as the reference, every item is a candidate; the other side's ranks and labels come from its
    factorised scores (several lists: mean of their ascending ranks, mean of their labels, weighted).
    List mode (no vectors): only the other side's (fused) top list is a candidate set.
    """

    chunk_size = 1024  # users whose full scores are ranked at once
    memory_mb = 512  # full mode keeps (U, I) ranks and weights up to this size; beyond it, DRAWS draws per user
    draws = 64  # bounded full mode: items drawn per user at each refresh (from the exact weights, chunk by chunk)

    def __init__(self, spec, ctx: TermContext):
        super().__init__(spec, ctx)
        if not ctx.knowledge:
            raise ValueError("bd needs the other side's knowledge (ctx.knowledge is empty)")
        users = ctx.users
        if any(len(k.users) != len(users) or not torch.equal(ctx.tensor(k.users), users) for k in ctx.knowledge):
            raise ValueError("bd: every knowledge list must cover the same users in the same order")
        self.role = getattr(ctx, "role", "student")
        if self.role not in ROLES:
            raise ValueError(f"unknown BD role {self.role!r}; expected one of {ROLES}")
        if spec.sign not in SIGNS:
            raise ValueError(f"unknown BD sign {spec.sign!r}; expected one of {SIGNS}")
        self.sign, self.temperature, self.refresh = spec.sign, float(spec.temperature), int(spec.refresh)
        self.eps = float(spec.eps_teacher if self.role == "teacher" else spec.eps_student)
        self.users = users.long()
        self.known = ctx.known
        self.num_items = ctx.num_items
        self.row = torch.full((ctx.num_users,), -1, dtype=torch.int64, device=self.users.device)
        self.row[self.users] = torch.arange(len(self.users), device=self.users.device)
        # full mode from the lists that carry vectors (a student's proxies hand over lists only)
        with_vectors = [i for i, k in enumerate(ctx.knowledge)
                        if k.user_vectors is not None and k.item_vectors is not None]
        self.full = bool(with_vectors)
        self.bounded = False
        if self.full:
            w = [ctx.weights[i] for i in with_vectors] if ctx.weights is not None else [1.0] * len(with_vectors)
            self.list_weights = [x / sum(w) for x in w]
            self.vectors = [(ctx.tensor(ctx.knowledge[i].user_vectors, torch.float32),
                             ctx.tensor(ctx.knowledge[i].item_vectors, torch.float32)) for i in with_vectors]
            # (U, I) ranks and weights kept only while they fit memory_mb; beyond, a block's users × items
            # never exist at once: each refresh ranks a chunk of users, draws `draws` items per user from
            # the exact weights, and a batch picks one of its user's draws uniformly
            self.bounded = 5 * 4 * len(users) * ctx.num_items > self.memory_mb * 2**20  # ranks ×2, weights, CDF
            self.other_rank = None if self.bounded else self._other_ranks()  # the other side is fixed for the block
            self._refreshes = 0
        else:
            size = max(k.items.shape[1] for k in ctx.knowledge)
            self.items, self.other_score = fuse_scored_lists(
                [ctx.tensor(k.items) for k in ctx.knowledge],
                [ctx.tensor(k.scores, torch.float32) for k in ctx.knowledge], size, ctx.fusion, ctx.weights,
                ctx.num_items, ctx.fusion_penalty)  # (U, N) each, best first
            self.other_pos = torch.arange(self.items.shape[1], device=self.items.device)  # (N,) list positions
            # a candidate is usable if it is a real item the trained model does not already know
            self.valid = (self.items >= 0) & ~ctx.known.contains(self.users.unsqueeze(1).expand_as(self.items),
                                                                 self.items.clamp(min=0))
        self.own_rank: torch.Tensor | None = None  # (U, N | I) ascending ranks by the trained model
        self.sample_weights: torch.Tensor | None = None  # (U, N | I)
        self.sampler: RowCategorical | None = None  # draws from sample_weights' rows
        self.drawn: torch.Tensor | None = None  # (U, draws) bounded full mode: items drawn at the last refresh
        self._has_weight: torch.Tensor | None = None  # (U,) rows with something to draw
        self.__dict__["_model"] = ctx.model  # read, never owned: not a submodule (no shared parameters)
        self._generator: torch.Generator | None = None

    # -- the other side, from its factorised scores (full mode) ----------------------------------

    def _other_scores(self, rows: torch.Tensor, items: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each list's scores of the users at ``rows``: all items (B, I), or ``items`` (B,) one each."""
        out = []
        for u_vec, i_vec in self.vectors:
            if items is None:
                s = u_vec[rows] @ i_vec.T  # (B, I_t)
                if s.shape[1] < self.num_items:  # items the other model does not know yet: last
                    s = torch.cat([s, s.new_full((len(rows), self.num_items - s.shape[1]), float("-inf"))], 1)
                out.append(s[:, : self.num_items])
            else:
                inside = items < i_vec.shape[0]
                s = (u_vec[rows] * i_vec[items.clamp(max=i_vec.shape[0] - 1)]).sum(-1)
                out.append(torch.where(inside, s, torch.zeros_like(s)))
        return out

    @torch.no_grad()
    def _other_ranks(self) -> torch.Tensor:
        ranks = []
        for start in range(0, len(self.users), self.chunk_size):
            rows = torch.arange(start, min(start + self.chunk_size, len(self.users)), device=self.users.device)
            ranks.append(self._other_ranks_of(rows))
        return torch.cat(ranks) if ranks else torch.zeros(0, self.num_items, device=self.users.device)

    def _other_ranks_of(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, I) the other side's (weighted mean) ascending ranks for the users at ``rows``."""
        fused = torch.zeros(len(rows), self.num_items, device=self.users.device)
        for w, s in zip(self.list_weights, self._other_scores(rows)):
            self.known.mask_(s, self.users[rows])
            fused += w * ascending_ranks(s).float()
        return fused

    @torch.no_grad()
    def _refresh_drawn(self, model) -> None:
        """Bounded full mode: per chunk of users, the exact weights over every item, then ``draws`` items per
        user drawn from them (with replacement); only (U, draws) ids are kept."""
        self._refreshes += 1
        gen = torch.Generator(device=self.users.device).manual_seed(1_000_003 * self._refreshes)
        drawn, has = [], []
        for start in range(0, len(self.users), self.chunk_size):
            rows = torch.arange(start, min(start + self.chunk_size, len(self.users)), device=self.users.device)
            s = model.full_scores(self.users[rows]).float()[:, : self.num_items]
            self.known.mask_(s, self.users[rows])
            w = bd_sampling_weights(ascending_ranks(s).float(), self._other_ranks_of(rows), self.role, self.eps,
                                    self.sign)
            w = self.known.mask_(w, self.users[rows], 0.0)
            ok = w.sum(1) > 0
            d = torch.zeros(len(rows), self.draws, dtype=torch.int64, device=w.device)
            if bool(ok.any()):
                d[ok] = torch.multinomial(w[ok], self.draws, replacement=True, generator=gen)
            drawn.append(d)
            has.append(ok)
        self.drawn = torch.cat(drawn) if drawn else torch.zeros(0, self.draws, dtype=torch.int64)
        self._has_weight = torch.cat(has) if has else torch.zeros(0, dtype=torch.bool)

    # -- the trained model's own ranks, every `refresh` epochs ------------------------------------

    @torch.no_grad()
    def refresh_ranks(self, model) -> None:
        """Own ascending ranks (known pairs at -inf) → sampling weights of the candidates."""
        if self.full and self.bounded:
            return self._refresh_drawn(model)
        ranks = []
        for start in range(0, len(self.users), self.chunk_size):
            cu = self.users[start : start + self.chunk_size]
            s = model.full_scores(cu).float()[:, : self.num_items]  # (B, I)
            self.known.mask_(s, cu)
            if self.full:
                ranks.append(ascending_ranks(s).float())
            else:
                cand = torch.gather(s, 1, self.items[start : start + self.chunk_size].clamp(min=0))  # (B, N)
                ranks.append(torch.searchsorted(torch.sort(s, dim=1).values, cand.contiguous()))
        self.own_rank = torch.cat(ranks) if ranks else None
        if self.own_rank is None:
            self._has_weight = torch.zeros(0, dtype=torch.bool)
            return
        if self.full:
            w = bd_sampling_weights(self.own_rank, self.other_rank, self.role, self.eps, self.sign)
            self.sample_weights = self.known.mask_(w, self.users, 0.0)  # known pairs never drawn (no dense mask)
        else:
            other_rank = (self.num_items - 1 - self.other_pos).expand_as(self.items)  # its list on top, in order
            w = bd_sampling_weights(self.own_rank, other_rank, self.role, self.eps, self.sign)
            self.sample_weights = torch.where(self.valid, w, torch.zeros_like(w))
        self._has_weight = self.sample_weights.sum(1) > 0
        self.sampler = RowCategorical(self.sample_weights)

    def resample(self, generator: torch.Generator, epoch: int) -> None:
        if (self.sample_weights is None and self.drawn is None) or epoch % self.refresh == 0:
            self.refresh_ranks(self._model)
        # the batch draws use a generator on the candidates' device, seeded from the epoch's generator
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self._generator = torch.Generator(device=self.users.device).manual_seed(seed)

    def loss(self, model, batch: Batch, epoch: int) -> torch.Tensor:
        """One KD item per training pair of the batch (its user's weights), Σ BCE to the other's label."""
        if self.sample_weights is None and self.drawn is None:
            self.refresh_ranks(model)
        if self._generator is None:
            self._generator = torch.Generator(device=self.users.device).manual_seed(0)
        users = batch.users
        if len(self.users) == 0:
            return torch.zeros((), device=users.device)
        inside = users < len(self.row)
        rows = torch.where(inside, self.row[users.clamp(max=len(self.row) - 1)], -1)
        keep = (rows >= 0) & self._has_weight[rows.clamp(min=0)]
        users, rows = users[keep], rows[keep]
        if len(users) == 0:
            return torch.zeros((), device=batch.users.device)
        if self.drawn is not None:  # bounded full mode: one of the user's draws of this refresh
            pick = self.drawn[rows, torch.randint(self.draws, (len(rows),), generator=self._generator,
                                                  device=rows.device)]
        else:
            pick = self.sampler.draw(rows, self._generator)  # (B',)
        if self.full:
            items = pick
            label = sum(w * torch.sigmoid(s / self.temperature)
                        for w, s in zip(self.list_weights, self._other_scores(rows, items)))
        else:
            items = self.items[rows, pick]
            label = torch.sigmoid(self.other_score[rows, pick] / self.temperature)
        s = model.score(users, items)
        return F.binary_cross_entropy_with_logits(s, label.detach().to(s.dtype), reduction="sum")


__all__ = ["BDTerm", "RowCategorical", "ascending_ranks", "bd_sampling_weights", "fuse_scored_lists"]
