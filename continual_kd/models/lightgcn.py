"""LightGCN: base user/item tables propagated over the normalised user–item graph, score = dot product.

    Â = D^-1/2 A D^-1/2        A: the (U+I)×(U+I) symmetric bipartite adjacency of the observed pairs
    E_l = Â E_{l-1}            E_0 = [user_emb; item_emb]
    E = mean(E_0, …, E_L)      score(u, i) = E[u] · E[U + i]

The graph is whatever ``observe`` was last given (every known non-test pair), held as a sparse CSR
tensor built lazily for the current id spaces; before any ``observe`` it has no edges.

Propagation cache (``_propagate``): results computed with grad disabled (evaluation, knowledge,
``full_scores`` per chunk) are kept and reused while the key is unchanged: graph version (bumped by
``observe`` and ``grow``), the parameter tensors themselves and their in-place ``_version`` counters
(bumped by every optimiser step and by ``load_state_dict``'s copy), device and dtype. Calls with
grad enabled (training) propagate afresh, except inside ``batch_scope()`` (one training batch's forward,
opened by the training loop): there the first propagation is shared by every loss of the batch — the
base loss and the terms that score the model (BD) — so a batch propagates, and back-propagates, once.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from ..gather import gather_rows
from .base import grow_tables, pair_dot, register
from .debias import LossShaping, bpr_loss

INIT_STD = 0.01  # N(0, 0.01) as BPR-MF, and as the protocol's random init for new rows


class _SymmetricSpMM(torch.autograd.Function):
    """Â @ x for a constant symmetric sparse Â: the gradient is Â @ grad (no transpose needed).

    PyTorch's generic sparse backward re-transposes the matrix every call (~10× slower on CPU).
    """

    @staticmethod
    def forward(ctx, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adj = adj
        return torch.sparse.mm(adj, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, torch.sparse.mm(ctx.adj, grad.contiguous())


def normalized_adjacency(users: torch.Tensor, items: torch.Tensor, num_users: int, num_items: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of the bipartite graph as a (U+I, U+I) sparse CSR tensor (pairs deduplicated).

    Nodes 0..U-1 are users, U..U+I-1 items; isolated nodes get empty rows.
    """
    n = num_users + num_items
    keys = torch.unique(users * num_items + items)
    u, i = keys // num_items, keys % num_items + num_users
    rows, cols = torch.cat([u, i]), torch.cat([i, u])  # both directions: symmetric
    order = torch.argsort(rows * n + cols)
    rows, cols = rows[order], cols[order]
    deg = torch.bincount(rows, minlength=n).to(dtype)
    values = (deg[rows] * deg[cols]).rsqrt()
    crow = torch.zeros(n + 1, dtype=torch.int64, device=users.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    with warnings.catch_warnings():  # CSR @ dense is stable on CPU and CUDA; invariants hold by construction
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow, cols, values, size=(n, n), check_invariants=False)


def pairs_adjacency(pairs, num_users: int, num_items: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``normalized_adjacency`` of a pair set kept sorted by the caller (``sparse.UserItemSet``: CSR by
    user, and ``pairs.by_item`` by item when it has one): the user rows are its CSR, the item rows its
    item-major CSR, so the graph costs one linear pass over the edges, no sort (the same tensor)."""
    by_item = getattr(pairs, "by_item", None)
    if by_item is None:
        by_item = pairs.transposed()
    device = pairs.keys.device
    n = num_users + num_items

    def fit(indptr: torch.Tensor, rows: int) -> torch.Tensor:  # CSR row pointer cut / padded to `rows` rows
        if len(indptr) >= rows + 1:
            return indptr[: rows + 1]
        return torch.cat([indptr, indptr[-1:].expand(rows + 1 - len(indptr))])

    crow_u, crow_i = fit(pairs.indptr, num_users), fit(by_item.indptr, num_items)
    crow = torch.cat([crow_u, crow_u[-1] + crow_i[1:]])
    cols = torch.cat([pairs.items + num_users, by_item.items])
    counts = crow[1:] - crow[:-1]
    rows = torch.repeat_interleave(torch.arange(n, device=device), counts, output_size=len(cols))
    deg = counts.to(dtype)
    values = (deg[rows] * deg[cols]).rsqrt()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow, cols, values, size=(n, n), check_invariants=False)


@register("lightgcn")
class LightGCN(nn.Module):
    observes_pairs = True  # observe(..., pairs=UserItemSet): the Learner's kept pair set, graph built without a sort
    needs_item_major = True  # ... and it needs the set's item-major copy (pairs.by_item)
    shared_on_copy = ("_edges", "_pairs", "_adj")  # the graph: replaced by observe and grow, never changed in place

    def __init__(self, num_users: int, num_items: int, dim: int = 64, layers: int = 2):
        super().__init__()
        self.dim, self.layers = dim, layers
        self.user_emb = nn.Parameter(torch.randn(num_users, dim) * INIT_STD)  # base (layer-0) tables
        self.item_emb = nn.Parameter(torch.randn(num_items, dim) * INIT_STD)
        self._edges = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
        self._pairs = None  # the sorted pair set observe was given (a UserItemSet), if any
        self._adj: torch.Tensor | None = None  # built lazily from _edges for the current sizes
        self._graph_version = 0
        self._cache: tuple | None = None  # (key, users (U, d), items (I, d))
        self._batch_cache: tuple | None = None  # the same, with grad, for one batch (``batch_scope``)
        self._in_batch = False

    @property
    def num_users(self) -> int:
        return self.user_emb.shape[0]

    @property
    def num_items(self) -> int:
        return self.item_emb.shape[0]

    # ------------------------------------------------------------------ graph
    def observe(self, users: torch.Tensor, items: torch.Tensor, pairs=None) -> None:
        """Use these (user, item) pairs as the graph's edges from now on. ``pairs``: the same pairs as a
        sorted set (``sparse.UserItemSet``, kept up to date block by block by the Learner): the graph is
        then laid out from its CSR in one pass, and observing the very same set again changes nothing."""
        if pairs is not None and pairs is self._pairs:
            return  # the same graph, asked for by another stage of the block: keep adjacency and cache
        users, items = users.to(torch.int64), items.to(torch.int64)
        if len(users) and (int(users.max()) >= self.num_users or int(items.max()) >= self.num_items):
            raise ValueError(f"observe: ids beyond the model's id spaces ({self.num_users} users, "
                             f"{self.num_items} items); grow the model first")
        self._edges = (users, items)
        self._pairs = pairs
        self._graph_changed()

    def __getstate__(self) -> dict:
        # deepcopy / pickle: a CSR tensor has no storage to copy; it is rebuilt lazily from _edges
        return {**super().__getstate__(), "_adj": None, "_cache": None, "_pairs": None, "_batch_cache": None,
                "_in_batch": False}

    @contextlib.contextmanager
    def batch_scope(self):
        """One training batch's forward: propagations with grad share the first one (same key)."""
        self._in_batch, self._batch_cache = True, None
        try:
            yield
        finally:
            self._in_batch, self._batch_cache = False, None

    def _graph_changed(self) -> None:
        self._adj, self._cache = None, None
        self._graph_version += 1

    def _adjacency(self) -> torch.Tensor:
        emb = self.user_emb
        if self._adj is None or self._adj.device != emb.device or self._adj.dtype != emb.dtype:
            if self._pairs is not None:
                self._adj = pairs_adjacency(self._pairs, self.num_users, self.num_items, emb.dtype).to(emb.device)
            else:
                users, items = (t.to(emb.device) for t in self._edges)
                self._adj = normalized_adjacency(users, items, self.num_users, self.num_items, emb.dtype)
        return self._adj

    def _propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final (mean-of-layers) user and item tables: (U, d), (I, d)."""
        cacheable = not torch.is_grad_enabled()
        key = (self._graph_version, self.user_emb, self.item_emb, self.user_emb._version,
               self.item_emb._version, self.user_emb.device, self.user_emb.dtype)
        if cacheable and self._cache is not None and _same_key(self._cache[0], key):
            return self._cache[1], self._cache[2]
        shared = not cacheable and self._in_batch
        if shared and self._batch_cache is not None and _same_key(self._batch_cache[0], key):
            return self._batch_cache[1], self._batch_cache[2]
        adj = self._adjacency()
        h = torch.cat([self.user_emb, self.item_emb])  # (U+I, d)
        total = h
        for _ in range(self.layers):
            h = _SymmetricSpMM.apply(adj, h)
            total = total + h
        final = total / (self.layers + 1)
        users, items = final[: self.num_users], final[self.num_users :]
        self._cache = (key, users, items) if cacheable else None
        if shared:
            self._batch_cache = (key, users, items)
        return users, items

    # ------------------------------------------------------------------ protocol
    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        ue, ie = self._propagate()
        return pair_dot(gather_rows(ue, users), gather_rows(ie, items))

    def candidate_scores(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores without gradients from the propagation a training batch shares (``batch_scope``): choosing
        hard negatives (``train.hard_negatives``) costs no propagation of its own."""
        ue, ie = self._propagate()
        return pair_dot(gather_rows(ue.detach(), users), gather_rows(ie.detach(), items))

    def full_scores(self, users: torch.Tensor) -> torch.Tensor:
        ue, ie = self._propagate()  # propagated once, reused across chunks while nothing changes
        return ue[users] @ ie.T  # (B, I)

    def base_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                  shaping: LossShaping | None = None) -> torch.Tensor:
        ue, ie = self._propagate()  # one propagation for the whole batch
        u = gather_rows(ue, users)  # (B, d)
        scores = (u * gather_rows(ie, torch.stack([pos, neg]))).sum(-1)  # (2, B): one gather for both sides
        return bpr_loss(scores[0], scores[1], pos, neg, shaping)

    def regularization(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """On the base (layer-0) rows of the batch, as in the LightGCN paper."""
        return (self.user_emb[users].pow(2).sum() + self.item_emb[pos].pow(2).sum()
                + self.item_emb[neg].pow(2).sum())

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The final (propagated) tables, whose dot products are the scores; base tables are
        ``user_emb`` / ``item_emb``."""
        return self._propagate()

    @torch.no_grad()
    def grow(self, num_users: int, num_items: int, users: torch.Tensor | None = None,
             items: torch.Tensor | None = None, init: str = "neighbor",
             generator: torch.Generator | None = None) -> None:
        """New base rows: mean of 1-hop neighbours' base rows ("neighbor", new users from old items
        and new items from old users in the given pairs; random when a row has none) or N(0, 0.01)."""
        if num_users <= self.num_users and num_items <= self.num_items:
            return
        u, i = grow_tables(self.user_emb.data, self.item_emb.data, num_users, num_items, users, items, init,
                           generator, INIT_STD)
        self.user_emb, self.item_emb = nn.Parameter(u), nn.Parameter(i)
        self._graph_changed()  # same edges, larger id spaces: rebuilt on next use


def _same_key(a: tuple, b: tuple) -> bool:
    # parameters compared by identity (a grown table is a new tensor), everything else by value
    return a[0] == b[0] and a[1] is b[1] and a[2] is b[2] and a[3:] == b[3:]
