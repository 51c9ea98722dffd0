"""``ckd recommend --explain``: a snapshot's recommendations with the paths behind them, in words.

The served model (the student) picks the items; the snapshot's path teacher (backbone ``pathrec``) says
why, from its learned weights per path type, the interactions seen up to the snapshot's block and the
store's item knowledge — no retraining. A snapshot without a path teacher is explained by a path model
with every weight 1 (said in the output: ``path_model``). Where the store holds item knowledge, each item also
comes with its rationale (its text, and the facts the user's history shares with it: ``rationale.py``).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..models.pathrec import PathRec
from ..types import Interactions
from .faithfulness import faithfulness, removal_drops
from .paths import reason_parts, reasons
from .rationale import rationale_text, shared_facts
from .words import COLLABORATIVE, reason_text

TOP_PARTS = 3  # path types named per reason


def path_model_of(learners: dict, seen: Interactions) -> tuple[PathRec, str]:
    """The snapshot's path teacher (name), or an untrained one ("untrained path model")."""
    for name, learner in learners.items():
        if isinstance(learner.model, PathRec):
            return learner.model, name
    return PathRec(seen.num_users, seen.num_items), "untrained path model (no pathrec teacher in the snapshot)"


def explain_recommendations(learners: dict, store, seen: Interactions, users: np.ndarray, k: int,
                            model_name: str = "student", top: int = 3, seed: int = 0) -> dict:
    """For dense ``users``: the served model's top-k unseen items, each with its ``top`` reasons (a known item,
    its weight and share of the path score, the path types in words) and, per item, the score drop when the
    cited interaction is removed against a random other one (``faithfulness``)."""
    from ..eval import known_pairs, top_k_items
    from ..stream.kg import explanation_names

    t0 = time.perf_counter()
    known = known_pairs(seen, "cpu")
    served = learners[model_name].model
    served.observe(known.users, known.items)
    u = torch.as_tensor(np.asarray(users), dtype=torch.int64)
    recs, scores = top_k_items(served, u, k, known)
    listed = ~torch.isneginf(scores)  # k past a user's unseen items: the list ends there (known items score -inf)
    width = int(listed.sum(1).max()) if len(u) else 0
    recs, scores, listed = recs[:, :width], scores[:, :width], listed[:, :width]
    t_rec = time.perf_counter() - t0

    path, path_name = path_model_of(learners, seen)
    path.observe(known.users, known.items)
    path.set_item_graph(seen.meta.get("item_graph"))
    path.eval()
    r = reasons(path, u, recs, top)
    with torch.no_grad():
        path_scores = r.path_score + path.item_bias[recs]
    valid = r.via >= 0
    qb, qk, qt = valid.nonzero(as_tuple=True)
    kg, cf, ent = reason_parts(path, u[qb], r.via[qb, qk, qt], recs[qb, qk])
    rng = torch.Generator().manual_seed(seed)
    cited = r.via[..., 0]
    has_reason = cited >= 0
    drops_cited = removal_drops(path, u, recs, cited.clamp(min=0), r)
    # a random other known item per (user, item)
    mask = known.dense(u).unsqueeze(1).expand(-1, recs.shape[1], -1).clone()
    mask.scatter_(2, cited.clamp(min=0).unsqueeze(-1), False)
    enough = mask.any(-1)
    pick = torch.multinomial(torch.where(enough.unsqueeze(-1), mask.float(), torch.ones_like(mask, dtype=torch.float32))
                             .reshape(-1, mask.shape[-1]), 1, generator=rng).reshape(cited.shape)
    drops_random = removal_drops(path, u, recs, pick, r)

    # rationales (stream/rationale.py): each item's text and the facts the user's history shares with it
    rationales = seen.meta.get("item_rationales")
    shared = None
    if rationales is not None:
        rows, hist = known.rows_for(u)
        rows, hist = rows.numpy(), hist.numpy()
        shared = [shared_facts(rationales, hist[rows == b], recs[b].numpy()) for b in range(len(u))]
    with_items = [i for per_user in shared or () for facts in per_user for f in facts for i in f["items"]]

    # names: items (recommended, cited, random, sharing a fact), relations, the entities of the paths shown
    uniq_items = np.unique(np.concatenate([torch.cat([recs.reshape(-1), r.via[valid], pick.reshape(-1)]).numpy(),
                                           np.asarray(with_items, dtype=np.int64)]))
    ext_ids, titles, rel_names, ent_names = explanation_names(store, uniq_items, ent[ent >= 0].numpy())
    labels, ext = dict(zip(uniq_items.tolist(), titles)), dict(zip(uniq_items.tolist(), ext_ids))
    rel_names_of = lambda rid: rel_names.get(int(rid), f"relation {int(rid)}")  # noqa: E731

    parts_of = {}
    for row, (b, j, t) in enumerate(zip(qb.tolist(), qk.tolist(), qt.tolist())):  # the reasons shown: formatting
        weights = torch.cat([kg[row], cf[row : row + 1]])
        order = weights.argsort(descending=True)[:TOP_PARTS].tolist()
        parts = []
        for p in order:
            if weights[p] <= 0:
                continue
            if p == len(weights) - 1:
                parts.append((COLLABORATIVE, float(weights[p]), None))
            else:
                e = int(ent[row, p])
                parts.append((rel_names_of(p), float(weights[p]), ent_names.get(e) if e >= 0 else None))
        parts_of[(b, j, t)] = parts

    out_users = []
    for b in range(len(u)):
        items = []
        for j in range(int(listed[b].sum())):
            i = int(recs[b, j])
            total = float(path_scores[b, j])
            ps = float(r.path_score[b, j])
            rs = []
            for t in range(r.via.shape[2]):
                v = int(r.via[b, j, t])
                if v < 0:
                    continue
                parts = parts_of[(b, j, t)]
                w = float(r.weight[b, j, t])
                rs.append({"item": ext[v], "title": labels[v], "weight": w, "share": w / ps if ps > 0 else None,
                           "paths": [{"type": n, "weight": pw, "entity": e} for n, pw, e in parts],
                           "text": reason_text(labels[v], parts)})
            # path_score: Σ over the user's known items (what each reason's share and the faithfulness drops are
            # of); the path model's score of the item adds its item bias
            entry = {"item": ext[i], "title": labels[i], "score": float(scores[b, j]), "path_score": ps,
                     "item_bias": total - ps, "reasons": rs}
            if rationales is not None:
                entry["rationale"] = {"text": rationale_text(rationales, i), "shared": [
                    {"fact": f["fact"], "with": [labels[h] for h in f["items"]]} for f in shared[b][j]]}
            if bool(has_reason[b, j]) and bool(enough[b, j]):
                rnd = int(pick[b, j])
                entry["faithfulness"] = {"cited": ext[int(cited[b, j])], "cited_drop": float(drops_cited[b, j]),
                                         "random": ext[rnd], "random_title": labels[rnd],
                                         "random_drop": float(drops_random[b, j])}
            items.append(entry)
        out_users.append(items)
    summary = faithfulness(path, u, recs, torch.Generator().manual_seed(seed), listed=listed)
    return {"path_model": path_name, "users": out_users, "faithfulness": summary,
            "seconds": {"recommend": t_rec, "explain": time.perf_counter() - t0 - t_rec}}
