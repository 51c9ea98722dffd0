"""Distillation methods, one file each; ``DISTILLERS`` maps job-file names to (config, targets)."""

from .fusion import FUSION_METHODS, FusionConfig, fuse_rankings, teacher_weights_from_ndcg
from .rrd import RRDConfig, RRDTargets, relaxed_ranking_loss
from .unkd import (UnKDConfig, UnKDTargets, fuse_group_rankings, group_rankings, popularity_groups,
                   teacher_group_rankings)

DISTILLERS = {"rrd": (RRDConfig, RRDTargets), "unkd": (UnKDConfig, UnKDTargets)}

__all__ = ["DISTILLERS", "FUSION_METHODS", "FusionConfig", "RRDConfig", "RRDTargets", "UnKDConfig", "UnKDTargets",
           "fuse_group_rankings", "fuse_rankings", "group_rankings", "popularity_groups", "relaxed_ranking_loss",
           "teacher_group_rankings", "teacher_weights_from_ndcg"]
