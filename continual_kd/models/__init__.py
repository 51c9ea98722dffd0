"""Backbones, one file per family; ``BACKBONES`` maps job-file names to classes."""

from . import lightgcn, mf, multvae  # noqa: F401  (register "lightgcn", "mf", "multvae")
from . import pathrec  # noqa: F401  (registers "pathrec": the path-based teacher)
from .base import BACKBONES, Recommender, build_backbone, num_parameters

__all__ = ["BACKBONES", "Recommender", "build_backbone", "num_parameters"]
