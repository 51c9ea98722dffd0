"""Evaluation: full-ranking metrics and the per-block protocol."""

from .metrics import METRICS, evaluate_ranking, ndcg_at_k, recall_at_k, top_k_items

__all__ = ["METRICS", "evaluate_ranking", "ndcg_at_k", "recall_at_k", "top_k_items"]
from .protocol import eval_sets, known_pairs  # noqa: E402

__all__ += ["eval_sets", "known_pairs"]
