"""Distillation terms, one file each, registered in ``TERMS`` under the names used in job files
(``distill.terms`` / ``distill.feedback``); ``base.py`` says what a term is."""

from .base import TERMS, Batch, KDTerm, TermContext, build_terms, register_term
from .fusion import FUSION_METHODS, FusionConfig, fuse_rankings, teacher_weights_from_ndcg
from .rrd import RRDConfig, RRDTargets, relaxed_ranking_loss
from .unkd import (UnKDConfig, UnKDTargets, fuse_group_rankings, group_rankings, popularity_groups,
                   teacher_group_rankings)
from . import hetcomp  # noqa: F401  (registers the term)
from . import replay  # noqa: F401  (registers the term)
from . import bd, ir_rrd, keep  # noqa: F401  (register the terms)
from . import ftd, htd  # noqa: F401  (register the terms)
from . import cd, de, rd  # noqa: F401  (register the terms)
from . import skd  # noqa: F401  (registers the term)
from . import rationale  # noqa: F401  (registers the term)

__all__ = ["TERMS", "Batch", "FUSION_METHODS", "FusionConfig", "KDTerm", "RRDConfig", "RRDTargets", "TermContext",
           "UnKDConfig", "UnKDTargets", "build_terms", "fuse_group_rankings", "fuse_rankings", "group_rankings",
           "popularity_groups", "register_term", "relaxed_ranking_loss", "teacher_group_rankings",
           "teacher_weights_from_ndcg"]
