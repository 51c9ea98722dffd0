"""A recommended item's rationale (its text from the store's item knowledge, stream/rationale.py) and the
facts of it that the user's history shares: "genre Crime", "same director as Casino, Ronin", each with
the user's films that have it. The rarest facts first (fewest items share them: they say the most).

No model is read: it is what rationale distillation (distill/rationale.py) taught the student's item side,
shown next to the path teacher's reasons by ``ckd recommend --explain``.
"""

from __future__ import annotations

import numpy as np

from ..types import ItemRationales

TOP_FACTS = 3  # shared facts shown per item
WITH_FILMS = 2  # history films named per shared fact


def shared_facts(rationales: ItemRationales, history: np.ndarray, items: np.ndarray,
                 top: int = TOP_FACTS) -> list[list[dict]]:
    """For one user's ``history`` (dense items) and recommended ``items`` (K,): per item, at most ``top``
    facts it shares with the history, rarest first: {"fact", "key", "items": history items with it}."""
    fi, keys = rationales.fact_items, rationales.fact_keys
    in_hist = np.isin(fi, history)
    hist_keys, hist_items = keys[in_hist], fi[in_hist]
    out = []
    for item in np.asarray(items).tolist():
        mine = np.flatnonzero(fi == item)
        shared = mine[np.isin(keys[mine], hist_keys)]
        order = shared[np.lexsort((keys[shared].astype(str), rationales.fact_degrees[shared]))][:top]
        out.append([{"fact": str(rationales.fact_texts[f]), "key": str(keys[f]),
                     "items": hist_items[(hist_keys == keys[f]) & (hist_items != item)][:WITH_FILMS].tolist()}
                    for f in order])
    return out


def rationale_text(rationales: ItemRationales | None, item: int) -> str | None:
    if rationales is None or not 0 <= item < len(rationales.texts):
        return None
    return rationales.texts[item] or None
