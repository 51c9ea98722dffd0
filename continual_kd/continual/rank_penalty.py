"""A popularity penalty on a model's ranking (``rank_penalty`` in a model's spec): after training, the model
ranks by ``score(u, i) − β · log(1 + training count of i)``.

Training never sees it (the update clears it first); everything that ranks afterwards does — evaluation,
the knowledge a model hands over, serving and explanations — because it is installed on the model's
``full_scores``. β is chosen after every update on the block's validation pairs: of the candidates (0 always
among them), the largest whose validation NDCG@20 is within the tolerance (relative) of β = 0's. The
penalty vector (β · log(1 + count), counts of the training pairs at that block) is kept in the learner's
state, so a snapshot ranks as the job did. ``bench/popularity_penalty.py`` measures what each β costs.
"""

from __future__ import annotations

import torch


def install(model, penalty: torch.Tensor | None) -> None:
    """Rank ``model`` by its scores less ``penalty`` (I,) (items past its end: none); None removes it."""
    model.__dict__.pop("full_scores", None)  # back to the backbone's own method
    if penalty is None:
        return
    raw = model.full_scores

    def full_scores(users: torch.Tensor) -> torch.Tensor:
        scores = raw(users)
        n = min(scores.shape[1], len(penalty))
        scores[:, :n] -= penalty[:n].to(scores.device, scores.dtype)
        return scores

    model.full_scores = full_scores


def penalty_of(beta: float, popularity: torch.Tensor) -> torch.Tensor | None:
    return None if beta <= 0 else beta * torch.log1p(popularity.float())


def choose(model, candidates, tolerance: float, popularity: torch.Tensor, ndcg) -> tuple[float, dict]:
    """(β, {β: validation NDCG@20}): ``ndcg()`` scores the model as installed, for each candidate β."""
    figures = {}
    for beta in sorted({0.0, *map(float, candidates)}):
        install(model, penalty_of(beta, popularity))
        figures[beta] = float(ndcg())
    install(model, None)
    floor = (1.0 - tolerance) * figures[0.0]
    beta = max(b for b, v in figures.items() if v >= floor)
    return beta, figures
