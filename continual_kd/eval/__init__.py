"""Evaluation: full-ranking metrics, popularity-bias metrics and the per-block protocol."""

from .metrics import METRICS, evaluate_ranking, ndcg_at_k, recall_at_k, top_k_items, top_k_users

__all__ = ["METRICS", "evaluate_ranking", "ndcg_at_k", "recall_at_k", "top_k_items", "top_k_users"]
from .bias import (POPULARITY_GROUP_NAMES, average_popularity, coverage, covered_items,  # noqa: E402
                   group_recall_at_k, item_popularity_groups)

__all__ += ["POPULARITY_GROUP_NAMES", "average_popularity", "coverage", "covered_items", "group_recall_at_k",
            "item_popularity_groups"]
from .protocol import eval_sets, known_pairs, model_pairs, model_pairs_mask  # noqa: E402

__all__ += ["eval_sets", "known_pairs", "model_pairs", "model_pairs_mask"]
from .continual import CONTINUAL_KEYS, harmonic_mean, plasticity_stability  # noqa: E402

__all__ += ["CONTINUAL_KEYS", "harmonic_mean", "plasticity_stability"]
