"""HetComp: distillation from heterogeneous teachers' trajectories (Kang et al., WWW'23).

Each teacher t saved C_t checkpoints while it trained (early → converged); for every user we keep,
per teacher, the index of the checkpoint the student is currently taught from.

Target per user: the top-``k`` unobserved items of the summed per-teacher importance of the
teachers' current checkpoints, importance(pos) = exp(-pos / T) for an item at position ``pos`` of a
teacher's top-N list (0 outside it), plus the first ``observed`` observed items ranked the same way
over the teachers' last checkpoints (ties: ascending item id).

Loss, on the scores s (clamped to ±score_clamp) of the batch's unique users; 𝒩 = the user's
unobserved items, τ = the unobserved targets (top-k, best first), o = the first observed targets:
  early  Σ_{j ∈ τ ∪ o} -log( e^{s_j} / (e^{s_j} + Σ_{n ∈ 𝒩 \\ τ} e^{s_n}) )
         (each target beats every unobserved non-target item; the other observed items are ignored)
  late   PL(o | 𝒩 \\ τ[:50]) + ½·[ PL(τ[:50] | 𝒩 \\ τ[:50]) + PL(τ[:10] | 𝒩 \\ τ[:10]) ]
         with PL(π | R) = Σ_k -[ s_{π_k} - log( Σ_{l ≥ k} e^{s_{π_l}} + Σ_{r ∈ R} e^{s_r} ) ]
The late phase starts once every user reached every teacher's last checkpoint.

Dynamic knowledge construction (DKC, every ``dkc_every`` epochs): per (user, teacher), d = distance
of the student's top-M unobserved items to the *next* checkpoint's top-M (``checkpoint_distance``).
The first step only records d₀; later steps advance to the next checkpoint when the student moved
close enough to it since d₀ was recorded, d₀ > θ·d with θ = threshold · decay^(epoch // dkc_every),
or (as the authors' code does) when it moved away from it, d₀ < d. An advanced pair records d₀ of
its new next checkpoint. θ falls below 1 after ~10 steps, so every pair eventually advances.

Versus the authors' code (SeongKu-Kang/HetComp_WWW23): it loads precomputed dense importance
matrices per checkpoint; here importance comes from the top-N lists. Its DKC relevance is graded by
the student's position (``distance_relevance="student"``); the default here grades by the
checkpoint's position (a true NDCG against its order). Its late switch tests a 2-decimal rounded mean
position; here it is exact. Its logs are floored at 1e-5 and its sums of exps unshifted; here
everything is in log space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..sparse import UserItemSet
from .base import Batch, KDTerm, TermContext, register_term
from .fusion import fuse_rankings

NEG = -1e4  # a finite "-inf": masked entries vanish under exp yet keep gradients finite
RELEVANCE_TEMPERATURE = 10.0  # graded relevance 2^{exp(-pos/10)} - 1 of the DKC distance


@dataclass(frozen=True)
class HetCompConfig:
    weight: float = 1.0  # scale on the whole HetComp loss, on top of the phase weights
    k: int = 100  # unobserved targets per user: top-k of the summed importance
    observed: int = 10  # first observed items added to the targets
    early_weight: float = 0.01
    late_weight: float = 0.005
    rank_top: tuple[int, ...] = (50, 10)  # late phase: a PL term per prefix of the targets, averaged
    dkc_every: int = 10  # epochs between dynamic knowledge construction steps
    dkc_top: int = 50  # M: student top-M vs checkpoint top-M in the distance
    threshold: float = 1.05
    threshold_decay: float = 0.995
    advance_when_farther: bool = True  # the authors' code also advances when d grew (d₀ < d)
    distance_relevance: str = "checkpoint"  # "checkpoint": gain by the item's checkpoint position;
    # "student": the authors' code, gain by the student's position of items in the checkpoint top-M
    importance_temperature: float = 10.0  # T of importance(pos) = exp(-pos / T)
    score_clamp: float = 40.0


# ---------------------------------------------------------------------------------------------
# pure functions on tensors


def checkpoint_distance(student_top: torch.Tensor, checkpoint_top: torch.Tensor,
                        relevance: str = "checkpoint") -> torch.Tensor:
    """1 - NDCG of the student's top-M against a checkpoint's top-M, per user. (U, M) × (U, M) → (U,).

    gain(p) = 2^{exp(-p/10)} - 1, discount(t) = 1 / log2(t + 2) (0-based positions).
    "checkpoint": the student's item at position t earns gain(position of that item in the checkpoint
    list); the ideal DCG is the checkpoint's own order. "student": it earns gain(t) if it is anywhere
    in the checkpoint list (the authors' code); the ideal DCG is Σ_t gain(t)·discount(t).
    Entries < 0 in ``checkpoint_top`` are padding and never match.
    """
    m = student_top.shape[1]
    device = student_top.device
    pos = torch.arange(m, device=device, dtype=torch.float32)
    gain = torch.exp2(torch.exp(-pos / RELEVANCE_TEMPERATURE)) - 1  # (M,)
    disc = 1.0 / torch.log2(pos + 2)  # (M,)
    ck = checkpoint_top[:, :m]
    ck_sorted, ck_order = torch.sort(ck, dim=1)  # row-wise lookup table of the checkpoint's items
    at = torch.searchsorted(ck_sorted, student_top.contiguous()).clamp(max=ck.shape[1] - 1)  # (U, M)
    found = (torch.gather(ck_sorted, 1, at) == student_top) & (student_top >= 0)
    if relevance == "checkpoint":
        ck_pos = torch.gather(ck_order, 1, at)  # the student item's position in the checkpoint list
        dcg = (torch.where(found, gain[ck_pos], 0.0) * disc).sum(1)
        valid = torch.zeros_like(gain).expand(len(ck), -1).clone()
        valid[:, : ck.shape[1]] = (ck >= 0).float()
        idcg = (valid * gain * disc).sum(1)
    elif relevance == "student":
        dcg = (found.float() * gain * disc).sum(1)
        idcg = (gain * disc).sum().expand(len(ck))
    else:
        raise ValueError(f"distance_relevance must be 'checkpoint' or 'student', got {relevance!r}")
    return 1 - torch.where(idcg > 0, dcg / idcg.clamp(min=1e-12), 0.0)


def _masked_logsumexp(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log Σ_{keep} e^{scores} per row: (B, I) × (B, I) bool → (B,)."""
    return torch.logsumexp(scores.masked_fill(~keep, NEG), dim=1)


def _without(mask: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """A copy of the (B, I) bool ``mask`` with the columns ``items`` (B, L) set False; -1 is padding."""
    b, i = mask.shape
    out = torch.cat([mask, mask.new_zeros(b, 1)], dim=1)  # column I takes the padding
    out.scatter_(1, torch.where(items >= 0, items, i), False)
    return out[:, :i]


def target_softmax_loss(scores: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Early phase, summed: each target j against all negatives, -log e^{s_j} / (e^{s_j} + Σ_n e^{s_n}).

    scores (B, I); targets (B, L) item ids, -1 padding; negatives (B, I) bool.
    """
    valid = targets >= 0
    below = _masked_logsumexp(scores, negatives).unsqueeze(1)  # (B, 1)
    s = torch.gather(scores, 1, targets.clamp(min=0))  # (B, L)
    return F.softplus(below - s).masked_fill(~valid, 0.0).sum()


def plackett_luce_loss(ordered: torch.Tensor, valid: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """Summed PL negative log-likelihood of the ordered scores (B, L) above the rest.

    Σ_k -[ s_k - log( Σ_{l ≥ k} e^{s_l} + e^{rest} ) ] over the valid (B, L) entries;
    ``rest`` (B,) is log Σ e^{s} over the items that only have to fall below the whole list.
    """
    s = ordered.masked_fill(~valid, NEG)
    tail = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)  # (B, L): log Σ_{l ≥ k} e^{s_l}
    return -(s - torch.logaddexp(tail, rest.unsqueeze(1))).masked_fill(~valid, 0.0).sum()


def ranking_loss(scores: torch.Tensor, observed_targets: torch.Tensor, top_targets: torch.Tensor,
                 unobserved: torch.Tensor, rank_top: tuple[int, ...]) -> torch.Tensor:
    """Late phase, summed: PL of the observed targets + the mean over n in ``rank_top`` of PL(top-n).

    Each list competes with the unobserved items outside it; the observed list with the unobserved
    items outside the first (largest) prefix, so it need not beat the best unobserved targets.
    scores (B, I); observed_targets (B, P), top_targets (B, K) best first, -1 padding; unobserved (B, I).
    """
    sizes = [min(n, top_targets.shape[1]) for n in rank_top]
    rests = [_masked_logsumexp(scores, _without(unobserved, top_targets[:, :n])) for n in sizes]  # (B,) each
    obs_scores = torch.gather(scores, 1, observed_targets.clamp(min=0))
    loss = plackett_luce_loss(obs_scores, observed_targets >= 0, rests[0])
    top_scores = torch.gather(scores, 1, top_targets.clamp(min=0))
    tops = [plackett_luce_loss(top_scores[:, :n], top_targets[:, :n] >= 0, rest) for n, rest in zip(sizes, rests)]
    return loss + torch.stack(tops).mean()


# ---------------------------------------------------------------------------------------------
# target construction


def _summed_importance(lists: list[torch.Tensor], temperature: float, num_items: int):
    """Sum importance exp(-pos/T) per (row, item) over several (R, N_t) top lists (-1 padding).

    Returns unique (row, item) pairs sorted by key and their summed importance.
    """
    rows, items, imp = [], [], []
    for lst in lists:
        r, n = lst.shape
        w = torch.exp(-torch.arange(n, device=lst.device, dtype=torch.float32) / temperature)
        rows.append(torch.arange(r, device=lst.device).repeat_interleave(n))
        items.append(lst.reshape(-1))
        imp.append(w.repeat(r))
    rows, items, imp = torch.cat(rows), torch.cat(items), torch.cat(imp)
    ok = items >= 0
    keys, inverse = torch.unique(rows[ok] * num_items + items[ok], return_inverse=True)  # sorted keys
    total = torch.zeros(len(keys), device=imp.device).index_add_(0, inverse, imp[ok])
    return keys // num_items, keys % num_items, total


def _top_per_row(rows: torch.Tensor, items: torch.Tensor, score: torch.Tensor, num_rows: int, k: int) -> torch.Tensor:
    """(num_rows, k) items of highest score per row, best first, -1 padding.

    ``rows``/``items`` sorted by (row, item): stable sorts keep ties in ascending item order.
    """
    out = torch.full((num_rows, k), -1, dtype=torch.int64, device=rows.device)
    if len(rows) == 0 or k == 0:
        return out
    by_score = torch.sort(-score, stable=True).indices
    order = by_score[torch.sort(rows[by_score], stable=True).indices]  # by row, then score desc
    r = rows[order]
    rank = torch.arange(len(r), device=r.device) - torch.searchsorted(r, r)  # position within its row
    keep = rank < k
    out[r[keep], rank[keep]] = items[order][keep]
    return out


def _stack_checkpoints(trajectory: list[torch.Tensor], num_rows: int, device) -> torch.Tensor:
    """(C, U, N) from C lists (U, N_c), padded with -1 to the longest N."""
    if not trajectory:
        raise ValueError("every teacher's trajectory needs at least one checkpoint")
    width = max(t.shape[1] for t in trajectory)
    out = torch.full((len(trajectory), num_rows, width), -1, dtype=torch.int64, device=device)
    for c, t in enumerate(trajectory):
        if t.shape[0] != num_rows:
            raise ValueError(f"a checkpoint has top lists for {t.shape[0]} users, expected {num_rows}")
        out[c, :, : t.shape[1]] = t.to(device=device, dtype=torch.int64)
    return out


@torch.no_grad()
def student_top_items(model, users: torch.Tensor, observed: UserItemSet, m: int, chunk: int = 4096) -> torch.Tensor:
    """(U, m) the model's top-m unobserved items of ``users``, best first (chunks of users)."""
    was_training = model.training
    model.eval()
    tops = []
    for start in range(0, len(users), chunk):
        u = users[start : start + chunk]
        scores = observed.mask_(model.full_scores(u).float(), u)
        tops.append(torch.topk(scores, min(m, scores.shape[1]), dim=1).indices)
    model.train(was_training)
    return torch.cat(tops) if tops else users.new_zeros((0, m))


class HetCompTargets:
    """Per-user HetComp targets over the teachers' trajectories, the DKC state and the loss.

    users (U,); trajectories[t][c]: teacher t's checkpoint c, (U, N) top-N item ids (best first,
    -1 padding) for the same users, early → converged; ``observed`` the users' training items.
    ``observed_ranked`` (U, P), optional: the users' observed items best first (-1 padding); by
    default they are ranked by the summed importance of the teachers' last checkpoints, which is 0
    (so ascending item id) when the teachers' lists leave observed items out.
    """

    def __init__(self, cfg: HetCompConfig, users: torch.Tensor, trajectories: list[list[torch.Tensor]],
                 observed: UserItemSet, num_users: int, num_items: int, observed_ranked: torch.Tensor | None = None):
        if not trajectories:
            raise ValueError("HetComp needs at least one teacher trajectory")
        if cfg.distance_relevance not in ("checkpoint", "student"):
            raise ValueError(f"distance_relevance must be 'checkpoint' or 'student', got {cfg.distance_relevance!r}")
        if not cfg.rank_top:
            raise ValueError("rank_top needs at least one list size")
        self.cfg = cfg
        self.users = users.long()
        device = self.users.device
        self.observed = observed
        self.num_items = num_items
        self.checkpoints = [_stack_checkpoints(t, len(self.users), device) for t in trajectories]  # (C_t, U, N_t)
        self.last = torch.tensor([len(t) - 1 for t in trajectories], device=device)  # (T,)
        self.position = torch.zeros(len(trajectories), len(self.users), dtype=torch.int64, device=device)  # (T, U)
        self.baseline: torch.Tensor | None = None  # (T, U) d₀ to the next checkpoint; None before the first step
        self.row = torch.full((num_users,), -1, dtype=torch.int64, device=device)
        self.row[self.users] = torch.arange(len(self.users), device=device)
        self.observed_items = self._rank_observed(observed_ranked)  # (U, P)
        self.top_items = self._build_top()  # (U, k)
        # the users' observed items as CSR over rows of ``users``, for the per-batch mask
        obs_rows, self._obs_items = observed.rows_for(self.users)
        self._obs_degree = torch.bincount(obs_rows, minlength=len(self.users))
        self._obs_start = torch.cumsum(self._obs_degree, 0) - self._obs_degree

    # -- targets ------------------------------------------------------------------------------

    def _lists_at(self, index: torch.Tensor) -> list[torch.Tensor]:
        """Each teacher's (U, N_t) lists at the per-user checkpoint ``index`` (T, U)."""
        ar = torch.arange(len(self.users), device=self.users.device)
        return [ck[index[t], ar] for t, ck in enumerate(self.checkpoints)]

    def _build_top(self, chunk: int = 8192) -> torch.Tensor:
        """Top-k unobserved items of the summed importance of the current checkpoints, (U, k)."""
        lists = self._lists_at(self.position)
        out = []
        for start in range(0, len(self.users), chunk):  # bounds memory at chunk · Σ N_t pairs
            part = [lst[start : start + chunk] for lst in lists]
            rows, items, total = _summed_importance(part, self.cfg.importance_temperature, self.num_items)
            unseen = ~self.observed.contains(self.users[start : start + chunk][rows], items)
            out.append(_top_per_row(rows[unseen], items[unseen], total[unseen], len(part[0]), self.cfg.k))
        return torch.cat(out)

    def _rank_observed(self, observed_ranked: torch.Tensor | None) -> torch.Tensor:
        p = self.cfg.observed
        if observed_ranked is not None:
            ranked = observed_ranked[:, :p].to(self.users.device, torch.int64)
            return torch.cat([ranked, ranked.new_full((len(ranked), p - ranked.shape[1]), -1)], dim=1)
        rows, items = self.observed.rows_for(self.users)  # sorted by (row, item)
        score = torch.zeros(len(rows), device=self.users.device)
        if len(rows):
            last = self.last.unsqueeze(1).expand(-1, len(self.users))
            r, i, total = _summed_importance(self._lists_at(last), self.cfg.importance_temperature, self.num_items)
            keys = r * self.num_items + i
            if len(keys):
                q = rows * self.num_items + items
                at = torch.searchsorted(keys, q).clamp(max=len(keys) - 1)
                score = torch.where(keys[at] == q, total[at], 0.0)
        return _top_per_row(rows, items, score, len(self.users), p)

    def targets(self) -> torch.Tensor:
        """(U, k + observed): the top-k unobserved targets, then the first observed items; -1 padding."""
        return torch.cat([self.top_items, self.observed_items], dim=1)

    @property
    def phase(self) -> str:
        return "late" if bool((self.position == self.last.unsqueeze(1)).all()) else "early"

    # -- dynamic knowledge construction ----------------------------------------------------------

    def threshold(self, epoch: int) -> float:
        return self.cfg.threshold * self.cfg.threshold_decay ** (epoch // self.cfg.dkc_every)

    def due(self, epoch: int) -> bool:
        """Whether the training loop should run a DKC step after this epoch (as the reference: epochs 10, 20, ...)."""
        every = self.cfg.dkc_every
        return self.phase == "early" and epoch >= every and epoch % every == 0

    def _next_distance(self, student_top: torch.Tensor) -> torch.Tensor:
        """(T, U) distance of the student's top-M to each teacher's next checkpoint."""
        nxt = torch.minimum(self.position + 1, self.last.unsqueeze(1))
        out = []
        for lst in self._lists_at(nxt):
            m = min(self.cfg.dkc_top, student_top.shape[1], lst.shape[1])
            out.append(checkpoint_distance(student_top[:, :m], lst[:, :m], self.cfg.distance_relevance))
        return torch.stack(out)

    def step(self, epoch: int, student_top: torch.Tensor) -> int:
        """One DKC step with the student's (U, ≥dkc_top) top unobserved items of ``self.users``.

        The first call records d₀ only. Returns how many (user, teacher) pairs advanced.
        """
        if self.phase == "late":
            return 0
        student_top = student_top.to(self.users.device)
        dist = self._next_distance(student_top)  # (T, U)
        if self.baseline is None:
            self.baseline = dist
            return 0
        movable = self.position < self.last.unsqueeze(1)
        advance = self.baseline > self.threshold(epoch) * dist  # d₀ / d > θ, also when d = 0 < d₀
        if self.cfg.advance_when_farther:
            advance |= self.baseline < dist  # d₀ / d < 1
        advance &= movable
        n = int(advance.sum())
        if n:
            self.position += advance.long()
            self.baseline = torch.where(advance, self._next_distance(student_top), self.baseline)
            self.top_items = self._build_top()
        return n

    def update(self, epoch: int, model) -> int:
        """Run ``step`` with the model's current top items when ``due(epoch)``; else 0."""
        if not self.due(epoch):
            return 0
        top = student_top_items(model, self.users, self.observed, self.cfg.dkc_top)
        return self.step(epoch, top)

    # -- training hooks ------------------------------------------------------------------------

    def _observed_mask(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """(B, width) bool: the observed items of the users at ``rows``.

        A segment gather over the precomputed CSR by searchsorted (CPU repeat_interleave can take
        milliseconds per call when its thread pool is contended).
        """
        deg = self._obs_degree[rows]  # (B,)
        ends = torch.cumsum(deg, 0)
        pair = torch.arange(int(ends[-1]), device=rows.device)  # one per (user, observed item)
        b = torch.searchsorted(ends, pair, right=True)  # its batch row
        items = self._obs_items[self._obs_start[rows][b] + pair - (ends - deg)[b]]
        mask = torch.zeros(len(rows), width, dtype=torch.bool, device=rows.device)
        ok = items < width
        mask[b[ok], items[ok]] = True
        return mask

    def resample(self, generator: torch.Generator) -> None:
        """Per-epoch hook of the training loop: nothing to draw, the loss uses the full item set."""

    def loss(self, model, batch_users: torch.Tensor) -> torch.Tensor:
        """weight · phase weight · the phase's loss, summed over the batch's unique users with targets."""
        cfg = self.cfg
        users = torch.unique(batch_users)
        users = users[users < len(self.row)]
        rows = self.row[users]
        keep = rows >= 0
        users, rows = users[keep], rows[keep]
        if len(users) == 0:
            return torch.zeros((), device=batch_users.device)
        scores = model.full_scores(users).clamp(-cfg.score_clamp, cfg.score_clamp)  # (B, I)
        unobserved = ~self._observed_mask(rows, scores.shape[1])  # (B, I)
        top, obs = self.top_items[rows], self.observed_items[rows]
        if self.phase == "early":
            raw = target_softmax_loss(scores, torch.cat([top, obs], 1), _without(unobserved, top))
            return cfg.weight * cfg.early_weight * raw
        raw = ranking_loss(scores, obs, top, unobserved, cfg.rank_top)
        return cfg.weight * cfg.late_weight * raw


@register_term("hetcomp")
class HetCompTerm(KDTerm):
    """HetComp on the teachers' trajectories (one per knowledge list); DKC after the due epochs.
    The student learns from this loss alone unless ``with_bpr`` (the authors' set-up)."""

    def __init__(self, spec, ctx: TermContext):
        super().__init__(spec, ctx)
        cfg = HetCompConfig(weight=spec.weight, k=spec.k, observed=spec.observed, early_weight=spec.early_weight,
                            late_weight=spec.late_weight, dkc_every=spec.dkc_every)
        trajectories = [[ctx.tensor(c) for c in (k.trajectory or (k.items,))] for k in ctx.knowledge]
        observed_ranked = None
        if all(k.observed_items is not None for k in ctx.knowledge):  # the teachers' order of the known items
            lists = [ctx.tensor(k.observed_items) for k in ctx.knowledge]
            observed_ranked = fuse_rankings(lists, spec.observed, "importance", ctx.weights, num_items=ctx.num_items)[0]
        self.targets = HetCompTargets(cfg, ctx.users, trajectories, ctx.known, ctx.num_users, ctx.num_items,
                                      observed_ranked=observed_ranked)
        self.weight = 1.0  # spec.weight is inside the loss (with the phase weights)
        self.base_weight = 1.0 if spec.with_bpr else 0.0

    def loss(self, model, batch: Batch, epoch: int) -> torch.Tensor:
        return self.targets.loss(model, batch.users)

    def on_epoch_end(self, model, epoch: int) -> None:
        self.targets.update(epoch, model)


__all__ = ["HetCompConfig", "HetCompTargets", "checkpoint_distance", "plackett_luce_loss", "ranking_loss",
           "student_top_items", "target_softmax_loss"]
