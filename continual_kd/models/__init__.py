"""Backbones, one file per family; ``BACKBONES`` maps job-file names to classes."""

from . import mf  # noqa: F401  (registers "mf")
from .base import BACKBONES, Recommender, build_backbone, num_parameters

__all__ = ["BACKBONES", "Recommender", "build_backbone", "num_parameters"]
