"""Calibration on a missing-at-random labelled sample (a model's ``calibrate: mar``): what the log cannot say.

A log shows what users were shown, so every model trained on it learns exposure with preference, and no
reweighting of the log finds the good items it hardly shows (docs/RESULTS.md, issue 17). A small sample
collected under uniform exposure (every user shown a few items drawn uniformly, clicked or not: Yahoo!R3,
Coat, a simulator's ``--uniform``) does. After every update the model's scores are calibrated on the part of
that sample collected so far (``Interactions.meta["labelled"]``, ingested with ``ckd ingest-labelled``):

    P(label = 1 | u, i) = σ(a · z(u, i) + b + β · log(1 + n_i) + δ_i)

z the model's own score standardised over the sample's pairs, n_i the item's training count, δ_i a
per-item offset with an L2 penalty λ‖δ‖² (λ chosen by K-fold log-loss on the sample among the
candidates; when the model's own scores, σ(a · z + b) alone, predict the held-out labels at least as well as
every candidate, the ranking is left as it is: a sample too small or too noisy to say more changes nothing).
β learns from the uniform labels how much of the log's popularity is exposure; δ_i what the sample says of an
item beyond it (its quality). The model then ranks by z + (β · log(1 + n_i) + δ_i) / a —
installed as a per-item vector on ``full_scores`` exactly as ``rank_penalty`` (continual/rank_penalty.py):
training never sees it; evaluation, the ranked lists a teacher hands the student, snapshots and serving do (the
vectors BD reads and CCD's proxies are the model's own). a is fitted as ``A_FLOOR`` + softplus(·): where the
sample finds (almost) no signal in the model's scores, the item offsets — fitted for that small a — decide the
ranking and the scores break their ties.

Vectorised: one L-BFGS fit over (a, b, β, δ) per candidate and fold; no loop per user or item.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FOLDS = 4
MIN_ROWS = 2 * FOLDS  # a sample smaller than this (or with one label value only) calibrates nothing
A_FLOOR = 1e-3  # the least weight the model's (standardised) scores keep against the offsets


def _fit(x: torch.Tensor, items: torch.Tensor, labels: torch.Tensor, log_pop: torch.Tensor, lam: float,
         num_items: int, iterations: int = 200, offsets: bool = True) -> tuple[float, float, float, torch.Tensor]:
    """(a, b, β, item offset (I,) = β·log_pop + δ) maximising the penalised likelihood of ``labels``, with
    a = A_FLOOR + softplus(ã) ≥ A_FLOOR: the offsets are fitted for the weight the ranking will use. Without
    ``offsets`` only a and b (β and δ stay 0): the model's own ranking, its fit to the labels."""
    raw_a, b, beta = (torch.zeros((), dtype=torch.float64, requires_grad=True) for _ in range(3))
    delta = torch.zeros(num_items, dtype=torch.float64, requires_grad=offsets)
    if not offsets:
        beta.requires_grad_(False)
    opt = torch.optim.LBFGS([raw_a, b, beta, delta] if offsets else [raw_a, b], max_iter=iterations, history_size=10,
                            line_search_fn="strong_wolfe")
    n = len(labels)

    def closure():
        opt.zero_grad()
        a = A_FLOOR + F.softplus(raw_a)
        z = a * x + b + beta * log_pop[items] + delta[items]
        loss = F.binary_cross_entropy_with_logits(z, labels) + lam * (delta * delta).sum() / n
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        a = float(A_FLOOR + F.softplus(raw_a))
        return a, float(b), float(beta), (beta * log_pop + delta).detach()


def calibrate(scores: torch.Tensor, items: torch.Tensor, labels: torch.Tensor, popularity: torch.Tensor,
              num_items: int, l2: tuple[float, ...], seed: int = 0) -> tuple[torch.Tensor | None, dict]:
    """(the per-item vector to subtract from the model's scores, or None when nothing could be fitted; what
    was fitted).

    ``scores`` (n,) the model's own scores of the sample's pairs, ``items`` (n,) their items, ``labels``
    (n,) 0/1, ``popularity`` the items' training counts (shorter: the rest count 0)."""
    n = len(labels)
    y = (labels > 0).double().cpu()
    info: dict = {"rows": n, "positives": int(y.sum())}
    if n < MIN_ROWS or y.min() == y.max():
        return None, info
    s = scores.double().cpu()
    mu, sigma = s.mean(), s.std().clamp_min(1e-12)
    x = (s - mu) / sigma
    items = items.cpu()
    counts = torch.zeros(num_items, dtype=torch.float64)
    m = min(num_items, len(popularity))
    counts[:m] = popularity[:m].double().cpu()
    log_pop = torch.log1p(counts)
    fold = torch.randint(FOLDS, (n,), generator=torch.Generator().manual_seed(seed))
    losses = {}
    for lam in (None, *l2):  # the model's ranking as it is (None), then a handful of L2 candidates; × FOLDS small fits
        total = 0.0
        for f in range(FOLDS):
            train, test = fold != f, fold == f
            a, b, _, offset = _fit(x[train], items[train], y[train], log_pop, lam or 0.0, num_items,
                                   offsets=lam is not None)
            total += float(F.binary_cross_entropy_with_logits(a * x[test] + b + offset[items[test]], y[test],
                                                              reduction="sum"))
        losses[lam] = total / n
    lam = min(losses, key=losses.get)
    info["log_loss"] = {("none" if k is None else str(k)): v for k, v in losses.items()}
    if lam is None:  # the held-out labels are predicted best by the model's own ranking: calibrated, it stays as it is
        info.update({"l2": None, "kept": "scores"})
        return torch.zeros(num_items), info
    a, b, beta, offset = _fit(x, items, y, log_pop, lam, num_items)
    info.update({"l2": lam, "a": a, "b": b, "beta": beta})
    # the intercept b ranks nothing: left out, an item past the vector's end (born after the fit) counts as
    # an item the sample never showed and the log never counted
    return (-offset * float(sigma) / a).float(), info
