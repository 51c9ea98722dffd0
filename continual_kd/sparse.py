"""A user→items set as CSR + sorted pair keys (torch), for masking, membership and sampling.

Built once per block from index arrays; every query is a tensor operation (no loop per user).
"""

from __future__ import annotations

import numpy as np
import torch


def keys_contain(keys: torch.Tensor, num_users: int, num_items: int, users: torch.Tensor,
                 items: torch.Tensor) -> torch.Tensor:
    """Elementwise membership of (users, items) in sorted pair keys (user * num_items + item); ids past
    the id spaces are absent."""
    if len(keys) == 0:
        return torch.zeros_like(users, dtype=torch.bool)
    inside = (users < num_users) & (items < num_items)
    q = users * num_items + items
    pos = torch.searchsorted(keys, q).clamp(max=len(keys) - 1)
    return (keys[pos] == q) & inside


def as_ids(values, device) -> torch.Tensor:
    """int64 ids on ``device`` from a tensor on any device, a NumPy array or a list."""
    if torch.is_tensor(values):
        return values.to(device=device, dtype=torch.int64)
    return torch.as_tensor(np.asarray(values), dtype=torch.int64, device=device)


class UserItemSet:
    def __init__(self, users, items, num_users: int, num_items: int, device: str | torch.device = "cpu"):
        users, items = as_ids(users, device), as_ids(items, device)
        self.num_users, self.num_items = int(num_users), int(num_items)
        keys = torch.unique(users * self.num_items + items)  # sorted, deduplicated
        self.keys = keys
        self.users = keys // self.num_items
        self.items = keys % self.num_items
        self.degree = torch.bincount(self.users, minlength=self.num_users)
        self.indptr = torch.zeros(self.num_users + 1, dtype=torch.int64, device=device)
        self.indptr[1:] = torch.cumsum(self.degree, 0)

    @classmethod
    def from_sorted_keys(cls, keys: torch.Tensor, num_users: int, num_items: int,
                         degree: torch.Tensor | None = None) -> "UserItemSet":
        """A set from keys (user * num_items + item) already sorted and unique: no sort (linear)."""
        out = cls.__new__(cls)
        out.num_users, out.num_items = int(num_users), int(num_items)
        out.keys = keys
        out.users = keys // out.num_items
        out.items = keys % out.num_items
        out.degree = torch.bincount(out.users, minlength=out.num_users) if degree is None else degree
        out.indptr = torch.zeros(out.num_users + 1, dtype=torch.int64, device=keys.device)
        out.indptr[1:] = torch.cumsum(out.degree, 0)
        return out

    def added(self, users, items, num_users: int | None = None, num_items: int | None = None) -> "UserItemSet":
        """This set plus the given pairs, in id spaces grown to ``num_users`` × ``num_items``: only the new
        pairs are sorted, then merged into the stored order in one linear pass (no sort of what is stored),
        so adding a block costs its rows plus a copy, not a sort of the whole history."""
        device = self.keys.device
        nu, ni = max(self.num_users, int(num_users or 0)), max(self.num_items, int(num_items or 0))
        users, items = as_ids(users, device), as_ids(items, device)
        old = self.keys if ni == self.num_items else self.users * ni + self.items  # order kept: (user, item)
        new = torch.unique(users * ni + items)
        if len(old):
            pos = torch.searchsorted(old, new).clamp(max=len(old) - 1)
            new = new[old[pos] != new]  # pairs already stored
        degree = torch.zeros(nu, dtype=torch.int64, device=device)
        degree[: self.num_users] = self.degree
        if len(new) == 0:
            return UserItemSet.from_sorted_keys(old, nu, ni, degree)
        degree += torch.bincount(new // ni, minlength=nu)
        at = torch.searchsorted(old, new) + torch.arange(len(new), device=device)  # places in the merged order
        keys = torch.empty(len(old) + len(new), dtype=torch.int64, device=device)
        from_old = torch.ones(len(keys), dtype=torch.bool, device=device)
        from_old[at] = False
        keys[at] = new
        keys[from_old] = old
        return UserItemSet.from_sorted_keys(keys, nu, ni, degree)

    def without(self, other: "UserItemSet") -> "UserItemSet":
        """This set less the pairs of ``other`` (a membership test of every stored pair: linear, no sort)."""
        if len(other) == 0 or len(self) == 0:
            return self
        drop = other.contains(self.users, self.items)
        if not bool(drop.any()):
            return self
        return UserItemSet.from_sorted_keys(self.keys[~drop], self.num_users, self.num_items)

    def transposed(self) -> "UserItemSet":
        """The same pairs item-major: an item → users set (items as rows)."""
        return UserItemSet(self.items, self.users, self.num_items, self.num_users, self.keys.device)

    def same_as(self, other: "UserItemSet") -> bool:
        """Equal pairs in equal id spaces (CSR included)."""
        return (self.num_users, self.num_items) == (other.num_users, other.num_items) and torch.equal(
            self.keys, other.keys) and torch.equal(self.indptr, other.indptr)

    def __len__(self) -> int:
        return len(self.keys)

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Elementwise membership of (users, items) pairs of any equal shape."""
        return keys_contain(self.keys, self.num_users, self.num_items, users, items)

    def rows_for(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row index into ``users``, item) for every stored pair of the given users."""
        inside = users < self.num_users
        deg = torch.where(inside, self.degree[users.clamp(max=self.num_users - 1)], 0)
        starts = torch.where(inside, self.indptr[users.clamp(max=self.num_users - 1)], 0)
        total = int(deg.sum())  # output_size spares repeat_interleave a slow size pass
        rows = torch.repeat_interleave(torch.arange(len(users), device=users.device), deg, output_size=total)
        first = torch.repeat_interleave(torch.cumsum(deg, 0) - deg, deg, output_size=total)
        pos = torch.repeat_interleave(starts, deg, output_size=total) + torch.arange(total, device=users.device) - first
        return rows, self.items[pos]

    def mask_(self, scores: torch.Tensor, users: torch.Tensor, value: float = float("-inf")) -> torch.Tensor:
        """Set scores[(b, i)] = value for every stored pair of users[b]; in place."""
        rows, cols = self.rows_for(users)
        cols_ok = cols < scores.shape[1]
        scores[rows[cols_ok], cols[cols_ok]] = value
        return scores

    def dense(self, users: torch.Tensor, num_items: int | None = None) -> torch.Tensor:
        """(B, num_items) bool matrix of the given users' pairs (for one chunk at a time)."""
        out = torch.zeros(len(users), num_items or self.num_items, dtype=torch.bool, device=users.device)
        rows, cols = self.rows_for(users)
        out[rows, cols] = True
        return out

    def union(self, other: "UserItemSet") -> "UserItemSet":
        nu, ni = max(self.num_users, other.num_users), max(self.num_items, other.num_items)
        return UserItemSet(torch.cat([self.users, other.users]), torch.cat([self.items, other.items]), nu, ni,
                           self.keys.device)


def popularity_weights(counts: torch.Tensor, num_items: int, exponent: float) -> torch.Tensor:
    """(num_items,) CPU float weights (count + 1)^exponent for ``sample_excluding`` (an item past ``counts``
    has count 0)."""
    pop = torch.zeros(num_items)
    counts = counts.detach().float().cpu()[:num_items]
    pop[: len(counts)] = counts
    return (pop + 1.0) ** exponent


def sample_excluding(users: torch.Tensor, count: int, num_items: int, exclude: list, generator: torch.Generator,
                     rounds: int = 20, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, count) items drawn uniformly (or ∝ ``weights``, (num_items,) CPU floats) for each of
    ``users``, avoiding pairs in any of ``exclude``.

    Rejection sampling by rounds over the whole batch (not per user); after ``rounds`` the few
    remaining collisions (users who have seen almost every item) are left as drawn. Each round tests
    only the draws it replaced; membership is a lookup in a flat bit table of each set when the id
    space is small (``_membership``), else a binary search of its keys.
    """
    device = users.device

    def draw_items(shape) -> torch.Tensor:
        if weights is None:
            return torch.randint(0, num_items, shape, generator=generator, device="cpu")
        n = int(torch.Size(shape).numel())
        return torch.multinomial(weights, n, replacement=True, generator=generator).reshape(shape)

    u = users.unsqueeze(1).expand(-1, count).reshape(-1)  # (B·count,) row-major, as the draw
    draw = draw_items((len(users), count)).to(device).reshape(-1)
    tests = [_membership(s) for s in exclude]
    at = None  # the draws still to test (None: every one — the first round gathers nothing)
    for _ in range(rounds):
        uu, dd = (u, draw) if at is None else (u[at], draw[at])
        bad = torch.zeros_like(dd, dtype=torch.bool)
        for test in tests:
            bad |= test(uu, dd)
        # in row-major order: the replacements land where the whole-batch mask put them
        at = bad.nonzero().squeeze(1) if at is None else at[bad]
        if len(at) == 0:
            break
        draw[at] = draw_items((len(at),)).to(device)
    return draw.view(len(users), count)


DENSE_TABLE_PAIRS = 1 << 24  # id spaces up to this many (user, item) cells get a flat bit table


class ListSet:
    """Membership in fixed-width per-user lists ((U, P) distinct items of U distinct users, e.g. a
    teacher's top-P): only the sorted pair keys are kept (8 bytes a pair, where a UserItemSet keeps keys,
    users, items and a CSR), built without a global sort — rows ordered by user, each row sorted — in
    chunks of rows, so nothing bigger than the keys is ever held. Entries < 0 (no item) or past
    ``num_items`` are left out."""

    CHUNK_ROWS = 1 << 14

    def __init__(self, users: torch.Tensor, items: torch.Tensor, num_users: int, num_items: int):
        self.num_users, self.num_items = int(num_users), int(num_items)
        users = users.long()
        order = torch.argsort(users)
        width = items.shape[1] if items.dim() == 2 else 0
        keys = torch.empty(len(order) * width, dtype=torch.int64, device=items.device)
        listed = torch.ones(len(keys), dtype=torch.bool, device=items.device)
        for start in range(0, len(order), self.CHUNK_ROWS):
            rows = order[start : start + self.CHUNK_ROWS]
            block = items[rows].long().sort(dim=1).values
            at = slice(start * width, (start + len(rows)) * width)
            listed[at] = ((block >= 0) & (block < self.num_items)).reshape(-1)  # a list's -1 / newer items: left out
            keys[at] = (users[rows].unsqueeze(1) * self.num_items + block).reshape(-1)
        self.keys = keys if bool(listed.all()) else keys[listed]

    def __len__(self) -> int:
        return len(self.keys)

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return keys_contain(self.keys, self.num_users, self.num_items, users, items) & (items >= 0)


def _membership(s: "UserItemSet"):
    """f(users, items) → elementwise membership in ``s``: a gather from a flat (U·I,) bool table built
    here (one scatter) when U·I ≤ ``DENSE_TABLE_PAIRS``, else ``s.contains``."""
    cells = s.num_users * s.num_items
    if len(s) == 0 or cells > DENSE_TABLE_PAIRS or not isinstance(s, UserItemSet):
        return s.contains
    table = torch.zeros(cells, dtype=torch.bool, device=s.keys.device)
    table[s.keys] = True

    def test(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        inside = (users < s.num_users) & (items < s.num_items)
        return table[torch.where(inside, users * s.num_items + items, 0)] & inside

    return test


class ComplementSampler:
    """Uniform draws from each user's items *outside* a fixed set, without rejection.

    Built once from the excluded pairs (e.g. per block: the known pairs ∪ a teacher's top list). With a
    user's excluded items sorted, e_0 < e_1 < …, the r-th allowed item (0-based) is r + #{t : e_t - t ≤ r};
    the shifted values e_t - t do not decrease within a user, so one global searchsorted answers every
    draw: a draw costs one random number and one binary search, whatever the share of excluded items.
    Users with no allowed item left get a uniform item (left as drawn, as ``sample_excluding`` does).
    """

    def __init__(self, exclude: UserItemSet, num_items: int | None = None):
        self.num_items = int(num_items if num_items is not None else exclude.num_items)
        if exclude.num_items > self.num_items:
            raise ValueError(f"excluded items reach id {exclude.num_items - 1}, past num_items={self.num_items}")
        self.num_users = max(exclude.num_users, 1)
        device = exclude.keys.device
        self.indptr = torch.zeros(self.num_users + 1, dtype=torch.int64, device=device)
        self.indptr[: len(exclude.indptr)] = exclude.indptr
        self.indptr[len(exclude.indptr):] = exclude.indptr[-1]
        self.free = torch.full((self.num_users,), self.num_items, dtype=torch.int64, device=device)
        self.free[: exclude.num_users] -= exclude.degree  # (U,) allowed items per user
        self.stride = self.num_items + 1
        rank = torch.arange(len(exclude.keys), device=device) - self.indptr[exclude.users]
        self.shifted = exclude.users * self.stride + (exclude.items - rank)  # sorted: by user, then e_t - t

    def sample(self, users: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
        """(B, count) items, uniform over each of ``users``' allowed items (with replacement)."""
        u = users.unsqueeze(1).expand(-1, count)
        inside = u < self.num_users
        uc = u.clamp(max=self.num_users - 1)
        free = torch.where(inside, self.free[uc], self.num_items)
        full = free <= 0  # nothing left to draw from: any item
        span = torch.where(full, self.num_items, free)
        r = (torch.rand(u.shape, generator=generator, dtype=torch.float64).to(users.device) * span).long()
        r = torch.minimum(r, span - 1)
        if len(self.shifted) == 0:
            return r
        before = torch.searchsorted(self.shifted, uc * self.stride + r, right=True) - self.indptr[uc]
        return torch.where(inside & ~full, r + before, r)  # r + the excluded items below the draw
