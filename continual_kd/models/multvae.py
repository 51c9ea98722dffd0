"""MultVAE: a variational autoencoder over each user's interaction row, multinomial likelihood.

    x_u  = L2-normalised multi-hot row of u (the pairs ``observe`` was given), input dropout
    h    = tanh(x_u W_in + b)                      W_in: (I, hidden), one row per item
    μ, log σ² = h W_enc + b                        (dim each)
    z    = μ + σ·ε in training, μ when scoring
    logits = tanh(z W_dec + b) W_outᵀ + b_out      W_out: (I, hidden), b_out: (I,)

Both item-sized layers are stored as item tables (``item_in``, ``item_out``, ``item_bias``), so
growth appends rows and the encoder reads a sparse row with ``embedding_bag`` (no dense input).
No user table: a user is its row, so new users need no growth (``num_users`` is only a size).

Training: ``base_loss(users, pos, neg)`` takes the unique users of the (per-interaction) batch the
training loop hands it and ignores pos/neg; the loss is the summed multinomial NLL of those users'
whole rows + beta · KL (summed). So the loop's per-interaction batches become per-user batches, and a
user is seen once per batch it has an interaction in (≈ min(degree, batches) times per epoch): use
far fewer epochs than for a BPR model.

Noise (input dropout, ε) comes from the model's own generator, seeded from a number drawn from the
global RNG at construction (``Learner`` seeds that per model) and re-seeded by every ``observe``, so
a block's training is the same in one process, under Ray, and after resuming from a snapshot.
Scoring (``full_scores``, ``score``, ``embeddings``) never uses noise, in either mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import INITS, neighbor_mean, register
from .debias import LossShaping

INIT_STD = 0.01  # new items' random rows, as the protocol's random init


@register("multvae")
class MultVAE(nn.Module):
    batch_unit = "user"  # the training loop batches users (a whole row each), not interactions
    shared_on_copy = ("_indptr", "_cols")  # the observed rows: replaced by observe, never changed in place
    observes_pairs = True  # observe(..., pairs=UserItemSet): the rows are the Learner's kept CSR (no sort)

    def __init__(self, num_users: int, num_items: int, dim: int = 200, hidden: int = 600,
                 dropout: float = 0.5, beta: float = 0.2):
        super().__init__()
        self.dim, self.hidden, self.dropout, self.beta = dim, hidden, dropout, beta
        self.num_users = num_users
        # Xavier-uniform weights, zero biases; item_in / item_out are the item-sized layers as tables
        self.item_in = nn.Parameter(_xavier(num_items, hidden, fan_in=num_items, fan_out=hidden))
        self.in_bias = nn.Parameter(torch.zeros(hidden))
        self.enc = nn.Linear(hidden, 2 * dim)
        self.dec = nn.Linear(dim, hidden)
        self.item_out = nn.Parameter(_xavier(num_items, hidden, fan_in=hidden, fan_out=num_items))
        self.item_bias = nn.Parameter(torch.zeros(num_items))
        for layer in (self.enc, self.dec):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self._noise_seed = int(torch.randint(0, 2**62, (1,)))  # drawn from the (seeded) global RNG
        self._seed_now = self._noise_seed  # re-derived by observe
        self._generator: torch.Generator | None = None
        empty = torch.zeros(0, dtype=torch.int64)
        self._indptr, self._cols = torch.zeros(1, dtype=torch.int64), empty  # observed rows (CSR)

    @property
    def num_items(self) -> int:
        return self.item_out.shape[0]

    # ------------------------------------------------------------------ input rows
    def observe(self, users: torch.Tensor, items: torch.Tensor, pairs=None) -> None:
        """Store each user's row (CSR over users; pairs deduplicated) and re-seed the noise. ``pairs``: the
        same pairs as a sorted set (``sparse.UserItemSet``, kept block by block by the Learner): its CSR
        is used as it is (no sort)."""
        if pairs is not None:
            if len(pairs) and int(pairs.items.max()) >= self.num_items:
                raise ValueError(f"observe: item ids beyond the model's {self.num_items} items; grow the model first")
            n_users = max(self.num_users, int(pairs.users[-1]) + 1 if len(pairs) else 0)
            indptr = pairs.indptr
            if len(indptr) >= n_users + 1:
                indptr = indptr[: n_users + 1]
            else:
                indptr = torch.cat([indptr, indptr[-1:].expand(n_users + 1 - len(indptr))])
            self._indptr, self._cols = indptr, pairs.items
            self._generator = None
            self._seed_now = (self._noise_seed + 1_000_003 * len(pairs) + n_users) % 2**62
            return
        users, items = users.to(torch.int64), items.to(torch.int64)
        if len(items) and int(items.max()) >= self.num_items:
            raise ValueError(f"observe: item ids beyond the model's {self.num_items} items; grow the model first")
        n_users = max(self.num_users, int(users.max()) + 1 if len(users) else 0)
        keys = torch.unique(users * self.num_items + items)  # sorted by user, then item
        self._cols = keys % self.num_items
        self._indptr = torch.zeros(n_users + 1, dtype=torch.int64, device=keys.device)
        self._indptr[1:] = torch.cumsum(torch.bincount(keys // self.num_items, minlength=n_users), 0)
        self._generator = None
        self._seed_now = (self._noise_seed + 1_000_003 * len(keys) + n_users) % 2**62

    def _rows(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The users' observed rows as (flat item ids, offsets (B,), degrees (B,)) on the model's device."""
        device = self.item_in.device
        if self._indptr.device != device:
            self._indptr, self._cols = self._indptr.to(device), self._cols.to(device)
        users = users.to(device)
        n = len(self._indptr) - 1
        inside = users < n
        safe = users.clamp(max=max(n - 1, 0))
        starts = torch.where(inside, self._indptr[safe], 0) if n else torch.zeros_like(users)
        deg = torch.where(inside, self._indptr[safe + 1] - self._indptr[safe], 0) if n else torch.zeros_like(users)
        offsets = torch.cumsum(deg, 0) - deg  # (B,) start of each user's items in the flat list
        first = torch.repeat_interleave(offsets, deg)
        flat = torch.repeat_interleave(starts, deg) + torch.arange(len(first), device=device) - first
        return self._cols[flat], offsets, deg

    def restart_noise(self) -> None:
        """The noise starts again from where the last ``observe`` set it (fits of one update from the same start
        draw the same noise)."""
        self._generator = None

    def _noise(self) -> torch.Generator:
        device = self.item_in.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._seed_now)
        return self._generator

    # ------------------------------------------------------------------ network
    def encode(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) users → μ, log σ² (B, dim) from their observed rows, no noise."""
        return self._encode_rows(*self._rows(users), noisy=False)

    def _encode_rows(self, cols: torch.Tensor, offsets: torch.Tensor, deg: torch.Tensor,
                     noisy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.repeat_interleave(deg.to(self.item_in.dtype).clamp(min=1).rsqrt(), deg)  # L2-normalised
        if noisy and self.dropout > 0:
            keep = torch.rand(len(values), generator=self._noise(), device=values.device) >= self.dropout
            values = values * keep / (1 - self.dropout)
        h = F.embedding_bag(cols, self.item_in, offsets, mode="sum", per_sample_weights=values)  # (B, hidden)
        h = torch.tanh(h + self.in_bias)
        mu, logvar = self.enc(h).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, dim) → (B, I) logits."""
        return torch.tanh(self.dec(z)) @ self.item_out.T + self.item_bias

    # ------------------------------------------------------------------ protocol
    def full_scores(self, users: torch.Tensor) -> torch.Tensor:
        mu, _ = self.encode(users)
        return self.decode(mu)  # (B, I), no dropout, no sampling

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B,) users × (B,) or (B, L) items → their logits (``full_scores`` at those columns). A few items
        per user (BD's draws in a teacher's batch) are scored from their own output rows: the decoder's
        (B, hidden) × (hidden, I) product over every item is what made BD double a MultVAE epoch."""
        mu, _ = self.encode(users)
        one = items.dim() == 1
        cols = items.unsqueeze(1) if one else items  # (B, L)
        if cols.shape[1] * 4 >= self.num_items:  # most of the row anyway: one dense product
            out = self.decode(mu).gather(1, cols)
        else:
            h = torch.tanh(self.dec(mu))  # (B, hidden)
            out = torch.einsum("bh,blh->bl", h, self.item_out[cols]) + self.item_bias[cols]
        return out.squeeze(1) if one else out

    def base_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                  shaping: LossShaping | None = None) -> torch.Tensor:
        """Summed multinomial NLL of the batch's unique users' rows + beta · KL; pos/neg unused.

        ``shaping`` (``models.debias``): IPS weights multiply each row item's log-likelihood term; PDA's
        popularity adds log m_i^γ to the training logits (never to ``full_scores``)."""
        uniq = torch.unique(users)
        cols, offsets, deg = self._rows(uniq)
        mu, logvar = self._encode_rows(cols, offsets, deg, noisy=self.training)
        z = mu
        if self.training:
            eps = torch.randn(mu.shape, generator=self._noise(), device=mu.device, dtype=mu.dtype)
            z = mu + eps * torch.exp(0.5 * logvar)
        logits = self.decode(z)  # (B, I)
        if shaping is not None and shaping.pop_factor is not None:
            logits = logits + shaping.pop_factor.log()[: logits.shape[1]]
        log_probs = F.log_softmax(logits, dim=1)  # (B, I)
        rows = torch.repeat_interleave(torch.arange(len(uniq), device=mu.device), deg)
        terms = log_probs[rows, cols]
        if shaping is not None and shaping.item_weight is not None:
            terms = terms * shaping.item_weight[cols]
        nll = -terms.sum()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum()
        return nll + self.beta * kl

    def regularization(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """Every weight is used by every user's row: plain L2 over all parameters."""
        return sum(p.pow(2).sum() for p in self.parameters())

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables whose dot products are the scores: users (U, hidden+1) = [tanh(μ_u W_dec + b), 1]
        for every user's observed row (computed now), items (I, hidden+1) = [W_out, b_out]."""
        mu, _ = self.encode(torch.arange(self.num_users, device=self.item_in.device))
        h = torch.tanh(self.dec(mu))
        users = torch.cat([h, torch.ones_like(h[:, :1])], 1)
        items = torch.cat([self.item_out, self.item_bias.unsqueeze(1)], 1)
        return users, items

    @torch.no_grad()
    def grow(self, num_users: int, num_items: int, users: torch.Tensor | None = None,
             items: torch.Tensor | None = None, init: str = "neighbor",
             generator: torch.Generator | None = None) -> None:
        """New users: nothing to add. New items: rows of ``item_in``, ``item_out``, ``item_bias``.

        "neighbor": the mean, over the new item's users in the given pairs, of each user's mean row
        over the old items it consumed there (1-hop mean of the users' item means); items without
        such users, and "random", get N(0, 0.01) from ``generator``. Old rows are kept as they are.
        """
        if init not in INITS:  # neighbor_capped as neighbor (one table: nothing to rescale)
            raise ValueError(f"unknown init {init!r}")
        self.num_users = max(self.num_users, num_users)
        old_i = self.num_items
        n_new = num_items - old_i
        if n_new <= 0:
            return
        device, dtype = self.item_out.device, self.item_out.dtype
        table = torch.cat([self.item_in, self.item_out, self.item_bias.unsqueeze(1)], 1)  # (I, 2·hidden+1)
        new = (torch.randn(n_new, table.shape[1], generator=generator) * INIT_STD).to(device, dtype)
        if init != "random" and users is not None and items is not None and len(users):
            size = int(users.max()) + 1
            keys = torch.unique(users.to(device) * num_items + items.to(device))  # each pair once
            users, items = keys // num_items, keys % num_items
            old = items < old_i
            user_mean, user_cnt = neighbor_mean(table, users[old], items[old], size)  # (size, ·)
            sel = ~old & (user_cnt[users] > 0)
            mean, cnt = neighbor_mean(user_mean, items[sel] - old_i, users[sel], n_new)
            new = torch.where(cnt.unsqueeze(1) > 0, mean, new)
        h = self.hidden
        self.item_in = nn.Parameter(torch.cat([self.item_in.data, new[:, :h]]))
        self.item_out = nn.Parameter(torch.cat([self.item_out.data, new[:, h : 2 * h]]))
        self.item_bias = nn.Parameter(torch.cat([self.item_bias.data, new[:, 2 * h]]))


def _xavier(rows: int, cols: int, fan_in: int, fan_out: int) -> torch.Tensor:
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    return torch.empty(rows, cols).uniform_(-bound, bound)
