"""Evaluation: full-ranking metrics, popularity-bias metrics and the per-block protocol."""

from .metrics import METRICS, evaluate_ranking, ndcg_at_k, recall_at_k, top_k_items

__all__ = ["METRICS", "evaluate_ranking", "ndcg_at_k", "recall_at_k", "top_k_items"]
from .bias import (POPULARITY_GROUP_NAMES, average_popularity, coverage, covered_items,  # noqa: E402
                   group_recall_at_k, item_popularity_groups)

__all__ += ["POPULARITY_GROUP_NAMES", "average_popularity", "coverage", "covered_items", "group_recall_at_k",
            "item_popularity_groups"]
from .protocol import eval_sets, known_pairs  # noqa: E402

__all__ += ["eval_sets", "known_pairs"]
