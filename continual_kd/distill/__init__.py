"""Distillation methods, one file each; ``DISTILLERS`` maps job-file names to (config, targets)."""

from .rrd import RRDConfig, RRDTargets, relaxed_ranking_loss

DISTILLERS = {"rrd": (RRDConfig, RRDTargets)}

__all__ = ["DISTILLERS", "RRDConfig", "RRDTargets", "relaxed_ranking_loss"]
