"""Rationale distillation (after RDRec, ACL'24, offline): each item's rationale — its title, genres and
knowledge-graph facts as a short text (stream/rationale.py) — is embedded once, and the model's item
embeddings learn to predict it, an auxiliary target on the item side.

The encoder: no registry package was found that ships sentence-embedding weights inside its wheel and
runs without a hub download on this project's Python (see README), so it is the fallback the issue names,
TF-IDF + latent semantic analysis from scikit-learn: ``TfidfVectorizer`` (sublinear tf, English stop words)
→ ``TruncatedSVD`` (randomized, ``seed``) → rows L2-normalised. Items that share facts share words (an
unnamed director is named by the same films in every text that cites it), so they land close. The
embedding is fitted on the texts of the items known at the block (no interactions, no later items) and
computed once per item set and process (``rationale_embeddings`` keeps the last few by content digest).

The loss, for the batch's items B with a rationale (rows ``r_i``) and the model's item rows ``v_i``:

    L = Σ_{i ∈ B} (1 − cos(W v_i, r_i))

``W`` (d_model → d_rationale, no bias) belongs to the term: stepped by the same optimiser, rebuilt every
block (the rationale space is refitted on the block's items), never part of the served model — whose
inference stays embedding-only and whose size is unchanged.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from ..errors import CkdError
from .base import Batch, KDTerm, TermContext, register_term

EPS = 1e-8
CACHE_SIZE = 4  # item sets whose embeddings a process keeps
_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()


def encode_rationales(texts, dim: int = 64, seed: int = 0) -> np.ndarray:
    """(I, dim) float32 LSA embeddings of ``texts``, rows of unit length; an empty text (or one with no word
    the vocabulary keeps) is a zero row. Fewer than ``dim`` components fit (tiny item sets): zero-padded."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [t or "" for t in texts]
    out = np.zeros((len(texts), dim), dtype=np.float32)
    if not any(t.strip() for t in texts):
        return out
    try:
        tfidf = TfidfVectorizer(sublinear_tf=True, stop_words="english", dtype=np.float64).fit_transform(texts)
    except ValueError:  # no word left (every text is stop words)
        return out
    k = min(dim, tfidf.shape[1] - 1, tfidf.shape[0] - 1)
    if k < 1:  # one document or one word: the tf-idf rows themselves
        dense = tfidf.toarray()[:, :dim]
    else:
        dense = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=7, random_state=seed).fit_transform(tfidf)
    norm = np.linalg.norm(dense, axis=1, keepdims=True)
    out[:, : dense.shape[1]] = np.where(norm > 0, dense / np.maximum(norm, EPS), 0.0)
    return out


def rationale_embeddings(texts, dim: int = 64, seed: int = 0) -> np.ndarray:
    """``encode_rationales``, computed once per (texts, dim, seed) in this process (a block's item set is
    embedded once however many terms, grid combinations or retries ask)."""
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    key = (digest, len(texts), int(dim), int(seed))
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    emb = encode_rationales(texts, dim, seed)
    emb.setflags(write=False)
    _cache[key] = emb
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return emb


def rationale_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ_i (1 − cos(projected_i, target_i)) over (B, d) rows; a zero row has cosine 0."""
    cos = (projected * target).sum(1) / (projected.norm(dim=1) * target.norm(dim=1)).clamp(min=EPS)
    return (1.0 - cos).sum()


@register_term("rationale")
class RationaleTerm(KDTerm):
    """The model's item rows → (own projection) → the items' rationale embeddings, cosine loss."""

    def __init__(self, spec, ctx: TermContext):
        super().__init__(spec, ctx)
        rationales = ctx.meta.get("item_rationales")
        if rationales is None:
            raise CkdError("distill term 'rationale' needs item knowledge (titles, genres or knowledge-graph "
                           "triples) in the job's store, and it has none; add it with `ckd data movielens-100k "
                           "--kg` or `ckd ingest-kg FILE`, or remove the term.")
        texts = list(rationales.texts)[: ctx.num_items]
        texts += [""] * (ctx.num_items - len(texts))  # items newer than the knowledge read: no rationale
        emb = rationale_embeddings(texts, spec.dim, spec.seed)
        self.target = torch.as_tensor(np.array(emb), device=ctx.device)  # (I, d_r)
        self.has = self.target.norm(dim=1) > 0  # (I,) items with a rationale
        self.known = ctx.known
        model_dim = ctx.model.embeddings()[1].shape[1]
        gen = torch.Generator().manual_seed(int(spec.seed) * 1_000_003 + int(ctx.block))
        w = torch.randn(spec.dim, model_dim, generator=gen) / model_dim ** 0.5
        self.projection = nn.Parameter(w.to(ctx.device))  # (d_r, d_model): the term's, never the model's

    @classmethod
    def needs_knowledge(cls, spec) -> bool:
        return False  # its target comes with the blocks, not from the other side's lists

    def items_of(self, model, batch: Batch) -> torch.Tensor:
        """The batch's unique items with a rationale (a row model, pos = neg = users: the users' known items)."""
        if getattr(model, "batch_unit", "interaction") == "user":
            items = torch.unique(self.known.rows_for(torch.unique(batch.users))[1])
        else:
            items = torch.unique(torch.cat([batch.pos, batch.neg]))
        items = items[items < len(self.has)]
        return items[self.has[items]]

    def loss(self, model, batch: Batch, epoch: int) -> torch.Tensor:
        items = self.items_of(model, batch)
        if len(items) == 0:
            return torch.zeros((), device=batch.users.device)
        item_rows = model.embeddings()[1][items]  # (B, d_model)
        return rationale_loss(item_rows @ self.projection.T, self.target[items])


__all__ = ["RationaleTerm", "encode_rationales", "rationale_embeddings", "rationale_loss"]
