"""Reasons for a recommendation: the exact path decomposition of the path teacher's score (``paths``),
the path types in words (``words``), whether the cited interaction matters (``faithfulness``), and the
``ckd recommend --explain`` payload from a snapshot (``service``)."""

from .faithfulness import faithfulness, removal_drops
from .paths import Reasons, paths_into, reason_parts, reasons
from .words import reason_text, relation_phrase

__all__ = ["Reasons", "faithfulness", "paths_into", "reason_parts", "reason_text", "reasons", "relation_phrase",
           "removal_drops"]
