"""A path-based recommender: scores (user, item) through the paths that connect them, with a learned
weight per path type (the teacher of structured-knowledge distillation, Zhang et al. WSDM'20).

Path types, summed:
    user → i' → (r, e) → item      i' rated by the user shares entity e with the item under relation r
                                   (same director, same actor, same genre, …): weight w_r per relation
    user → i' → u' → item          another user u' rated both i' and the item (collaborative): weight w_cf

    score(u, i) = Σ_r w_r · Σ_{i'≠i} x_ui' S_r[i', i]  +  w_cf · Σ_{i'≠i} x_ui' C[i', i]  +  b_i
    x_ui' = 1/√n_u for the user's n_u known items (0 elsewhere)
    S_r = A_r A_rᵀ,  A[i, (r,e)] = 1/√(deg(r,e) · deg_kg(i))   items linked to entity e by relation r
    C   = Rᵀ R,      R[u', i]   = 1/√(n_u' · d_i)              the interaction graph, user- and item-damped

Every path's contribution is a product of graph constants and one learned weight, so the model is
differentiable in its weights (w = exp(log-weight): positive, and an explanation's parts add up to the
score) and each recommendation decomposes exactly into the paths that produced it (``explain/``).
The graph terms are fixed by the data, so training is cheap: a pair's path features are gathered from
sparse matrices (``_pair_features``), never a per-user loop; ``full_scores`` is two sparse products.
A path from an item to itself (i' = i) is left out, so a training positive gains nothing from itself.

The interaction graph is what ``observe`` gives; the item knowledge graph (``set_item_graph``) comes from
the store's catalog with the blocks (``Interactions.meta["item_graph"]``, attached by the Learner). Without
one the model still scores through the collaborative paths. Parameters: one log-weight per relation slot
(``RELATION_SLOTS``: the catalog's stable relation ids index them, so the state's shapes depend only on the
item count), the collaborative log-weight, an item bias.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from ..errors import CkdError
from ..sparse import UserItemSet
from .base import INITS, register
from .debias import LossShaping, bpr_loss

RELATION_SLOTS = 256  # relation ids the weights can index (the catalog's relations must fit)
MIN_ENTITY_ITEMS = 2  # an entity linked to one item joins no two items: left out


class _SpMM(torch.autograd.Function):
    """a @ x for a constant sparse ``a``; the gradient w.r.t. x is aᵀ @ grad (aᵀ given, not re-transposed)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, a_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.a_t = a_t
        return torch.sparse.mm(a, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None, torch.sparse.mm(ctx.a_t, grad.contiguous())


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from unique (row, col) entries."""
    n = shape[0]
    order = torch.argsort(rows * max(shape[1], 1) + cols)
    rows, cols, values = rows[order], cols[order], values[order]
    crow = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow, cols, values, size=shape, check_invariants=False)


def expand_rows(crow: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For CSR ``crow`` and query ``rows`` (P,): (index into rows, position in the CSR arrays) of every stored
    entry of each queried row."""
    start, deg = crow[rows], crow[rows + 1] - crow[rows]
    total = int(deg.sum())
    rep = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), deg, output_size=total)
    first = torch.repeat_interleave(torch.cumsum(deg, 0) - deg, deg, output_size=total)
    pos = torch.repeat_interleave(start, deg, output_size=total) + torch.arange(total, device=rows.device) - first
    return rep, pos


class _Graphs:
    """The constant matrices of one (interaction graph, item graph, id-space sizes) on one device."""

    def __init__(self, users, items, graph, num_users: int, num_items: int, device, dtype):
        self.known = UserItemSet(users, items, num_users, num_items, device)
        n_u = self.known.degree.to(dtype)
        self.x_user = torch.where(n_u > 0, n_u.clamp(min=1).rsqrt(), torch.zeros_like(n_u))  # (U,) x_ui' value
        d_i = torch.bincount(self.known.items, minlength=num_items).to(dtype)
        self.item_damp = torch.where(d_i > 0, d_i.clamp(min=1).rsqrt(), torch.zeros_like(d_i))  # (I,)
        ku, ki = self.known.users, self.known.items
        r_val = self.x_user[ku] * self.item_damp[ki]
        self.R = _csr(ku, ki, r_val, (num_users, num_items))  # (U, I)
        self.RT = _csr(ki, ku, r_val, (num_items, num_users))  # (I, U)
        self.cf_diag = torch.zeros(num_items, dtype=dtype, device=device).index_add_(0, ki, r_val * r_val)  # C[i, i]
        # the item graph: columns are (relation, entity) pairs linked to ≥ MIN_ENTITY_ITEMS known items
        gi, gr, ge = (torch.as_tensor(np.asarray(a), dtype=torch.int64, device=device) for a in
                      ((graph.items, graph.relations, graph.entities) if graph is not None else ([], [], [])))
        keep = gi < num_items
        gi, gr, ge = gi[keep], gr[keep], ge[keep]
        pair_key = gr * (int(ge.max()) + 1 if len(ge) else 1) + ge
        uniq, col = torch.unique(pair_key, return_inverse=True)
        edge_key, first = torch.unique(gi * max(len(uniq), 1) + col, return_inverse=True)  # one edge per (item, column)
        pick = torch.full((len(edge_key),), -1, dtype=torch.int64, device=device).scatter_(
            0, first, torch.arange(len(first), device=device))
        gi, gr, ge, col = gi[pick], gr[pick], ge[pick], col[pick]
        col_deg = torch.bincount(col, minlength=len(uniq))
        keep = col_deg[col] >= MIN_ENTITY_ITEMS
        gi, gr, col = gi[keep], gr[keep], col[keep]
        used, col = torch.unique(col, return_inverse=True)  # renumber the kept columns 0..C-1
        num_cols = len(used)
        self.col_relation = torch.zeros(num_cols, dtype=torch.int64, device=device)
        self.col_relation[col] = gr
        self.col_entity = torch.zeros(num_cols, dtype=torch.int64, device=device)  # for naming a path's entity
        self.col_entity[col] = ge[keep]
        col_deg = torch.bincount(col, minlength=num_cols).to(dtype)
        kg_deg = torch.bincount(gi, minlength=num_items).to(dtype)
        a_val = (col_deg[col] * kg_deg[gi]).rsqrt() if len(col) else torch.zeros(0, dtype=dtype, device=device)
        self.A = _csr(gi, col, a_val, (num_items, num_cols))  # (I, C)
        self.AT = _csr(col, gi, a_val, (num_cols, num_items))  # (C, I)
        # Σ_{c ∈ cols(i), rel r} A[i, c]²: the self-path i → e → i per relation, left out of every score
        self.kg_diag = torch.zeros(num_items, RELATION_SLOTS, dtype=dtype, device=device)
        self.kg_diag.index_put_((gi, gr), a_val * a_val, accumulate=True)

    def x(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """x_ui: the user's input weight of each (user, item) pair (0 where not known)."""
        return self.known.contains(users, items).to(self.x_user.dtype) * self.x_user[users]

    def rows(self, users: torch.Tensor) -> torch.Tensor:
        """(B, I) the users' input rows x_u."""
        return self.known.dense(users).to(self.x_user.dtype) * self.x_user[users].unsqueeze(1)


@register("pathrec")
class PathRec(nn.Module):
    def __init__(self, num_users: int, num_items: int):
        super().__init__()
        self._num_users = int(num_users)
        self.relation_log_weight = nn.Parameter(torch.zeros(RELATION_SLOTS))  # w_r = exp(·): 1 at the start
        self.cf_log_weight = nn.Parameter(torch.zeros(1))
        self.item_bias = nn.Parameter(torch.zeros(num_items))
        self._edges = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
        self._graph = None  # types.ItemGraph
        self._cache: tuple | None = None  # (key, _Graphs)

    @property
    def num_users(self) -> int:
        return self._num_users

    @property
    def num_items(self) -> int:
        return self.item_bias.shape[0]

    # ------------------------------------------------------------------ graphs
    def observe(self, users: torch.Tensor, items: torch.Tensor) -> None:
        """The interaction graph (every pair it may know) from now on."""
        users, items = users.to(torch.int64), items.to(torch.int64)
        if len(users) and (int(users.max()) >= self.num_users or int(items.max()) >= self.num_items):
            raise ValueError(f"observe: ids beyond the model's id spaces ({self.num_users} users, "
                             f"{self.num_items} items); grow the model first")
        self._edges = (users, items)
        self._cache = None

    def set_item_graph(self, graph) -> None:
        """The item knowledge graph (``types.ItemGraph`` or None) from now on."""
        if graph is not None and graph.num_relations > RELATION_SLOTS:
            raise CkdError(f"The store's item knowledge graph has {graph.num_relations} relations; the path model "
                           f"(backbone pathrec) weighs at most {RELATION_SLOTS}: merge relations in the triples you "
                           f"ingest with `ckd ingest-kg`.")
        if graph is not self._graph:
            self._graph = graph
            self._cache = None

    @property
    def item_graph(self):
        return self._graph

    def graphs(self) -> _Graphs:
        dev, dtype = self.item_bias.device, self.item_bias.dtype
        key = (self.num_users, self.num_items, dev, dtype)
        if self._cache is None or self._cache[0] != key:
            users, items = (t.to(dev) for t in self._edges)
            self._cache = (key, _Graphs(users, items, self._graph, self.num_users, self.num_items, dev, dtype))
        return self._cache[1]

    def __getstate__(self) -> dict:
        # deepcopy / pickle: CSR tensors have no storage to copy; they are rebuilt lazily
        return {**super().__getstate__(), "_cache": None}

    # ------------------------------------------------------------------ weights
    def relation_weights(self) -> torch.Tensor:
        return self.relation_log_weight.exp()  # (RELATION_SLOTS,)

    def cf_weight(self) -> torch.Tensor:
        return self.cf_log_weight.exp()  # (1,)

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    def _pair_features(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Path features of (P,) pairs: (P, RELATION_SLOTS) knowledge-graph paths per relation and (P,)
        collaborative paths, before the learned weights (they are constants of the graph)."""
        g = self.graphs()
        uniq, urow = torch.unique(users, return_inverse=True)
        xt = g.rows(uniq).T.contiguous()  # (I, Bu)
        x_pair = g.x(users, items)  # (P,) the pair's own input weight: its self-paths are left out
        kg = torch.zeros(len(users), RELATION_SLOTS, dtype=xt.dtype, device=xt.device)
        if g.A.shape[1]:
            z = torch.sparse.mm(g.AT, xt)  # (C, Bu): Σ_i' x_ui' A[i', c]
            rep, pos = expand_rows(g.A.crow_indices(), items)
            cols = g.A.col_indices()[pos]
            kg.index_put_((rep, g.col_relation[cols]), z[cols, urow[rep]] * g.A.values()[pos], accumulate=True)
            kg -= x_pair.unsqueeze(1) * g.kg_diag[items]
        zc = torch.sparse.mm(g.R, xt)  # (U, Bu): Σ_i' x_ui' R[u', i']
        rep, pos = expand_rows(g.RT.crow_indices(), items)
        cf = torch.zeros(len(users), dtype=xt.dtype, device=xt.device)
        cf.index_add_(0, rep, zc[g.RT.col_indices()[pos], urow[rep]] * g.RT.values()[pos])
        cf -= x_pair * g.cf_diag[items]
        return kg, cf

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        shape = items.shape
        u = users.unsqueeze(1).expand(shape).reshape(-1) if items.dim() == 2 else users
        i = items.reshape(-1)
        kg, cf = self._pair_features(u, i)
        out = kg @ self.relation_weights() + cf * self.cf_weight() + self.item_bias[i]
        return out.reshape(shape)

    def full_scores(self, users: torch.Tensor) -> torch.Tensor:
        g = self.graphs()
        xb = g.rows(users)  # (B, I)
        xt = xb.T.contiguous()
        w = self.relation_weights()
        out = self.item_bias.unsqueeze(0) - xb * (g.kg_diag @ w + self.cf_weight() * g.cf_diag).unsqueeze(0)
        if g.A.shape[1]:
            z = torch.sparse.mm(g.AT, xt) * w[g.col_relation].unsqueeze(1)  # (C, B), weighted per relation
            out = out + _SpMM.apply(g.A, g.AT, z).T
        cf = torch.sparse.mm(g.RT, torch.sparse.mm(g.R, xt)).T  # (B, I)
        return out + self.cf_weight() * cf

    def base_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                  shaping: LossShaping | None = None) -> torch.Tensor:
        s = self.score(torch.cat([users, users]), torch.cat([pos, neg]))
        return bpr_loss(s[: len(users)], s[len(users):], pos, neg, shaping)

    def regularization(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        return self.item_bias[pos].pow(2).sum() + self.item_bias[neg].pow(2).sum()

    def item_paths(self) -> torch.Tensor:
        """(I, I) M[i', i]: the weighted paths from a known item i' to item i (zero diagonal)."""
        g = self.graphs()
        eye = torch.eye(self.num_items, dtype=self.item_bias.dtype, device=self.item_bias.device)
        w = self.relation_weights()
        m = self.cf_weight() * torch.sparse.mm(g.RT, torch.sparse.mm(g.R, eye))
        if g.A.shape[1]:
            m = m + torch.sparse.mm(g.A, torch.sparse.mm(g.AT, eye) * w[g.col_relation].unsqueeze(1))
        return m * (1 - eye)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Users: [x_u, 1] (U, I + 1); items: [M[:, i], b_i] (I, I + 1): their dot products are the scores."""
        g = self.graphs()
        users = torch.cat([g.rows(torch.arange(self.num_users, device=self.item_bias.device)),
                           torch.ones(self.num_users, 1, dtype=self.item_bias.dtype, device=self.item_bias.device)], 1)
        return users, torch.cat([self.item_paths().T, self.item_bias.unsqueeze(1)], 1)

    @torch.no_grad()
    def grow(self, num_users: int, num_items: int, users: torch.Tensor | None = None,
             items: torch.Tensor | None = None, init: str = "neighbor",
             generator: torch.Generator | None = None) -> None:
        """New items start with bias 0 ("neighbor": the paths to them carry their score) or N(0, 0.01)
        ("random"); new users need nothing (a user is the items it rated)."""
        if init not in INITS:  # neighbor_capped as neighbor (one table: nothing to rescale)
            raise ValueError(f"unknown init {init!r}")
        self._num_users = max(self._num_users, int(num_users))
        extra = int(num_items) - self.num_items
        if extra > 0:
            new = torch.randn(extra, generator=generator) * 0.01 if init == "random" else torch.zeros(extra)
            self.item_bias = nn.Parameter(torch.cat([self.item_bias.data, new.to(self.item_bias)]))
        self._cache = None
