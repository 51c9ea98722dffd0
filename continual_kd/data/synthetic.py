"""A seeded synthetic interaction stream with the properties continual recommenders must cope with.

Users and items have clustered latent vectors (learnable structure); item popularity and user
activity follow power laws; user tastes drift between periods; new users and items arrive in later
periods. In period t user u picks items without replacement with

    P(i | u, t) ∝ popularity_i · exp(<u_t, v_i> / temperature)     over items available at t,

sampled by Gumbel-top-k on a (users chunk × items) score matrix, never re-picking an item.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import CkdError

USER_ACTIVITY_EXPONENT = 0.5  # Zipf exponent of how many interactions each user has
CLUSTER_SPREAD = 0.6  # norm of a user's / item's offset from its cluster centre (centres have norm 1)
CHUNK_CELLS = 1 << 22  # users per chunk × items: bounds the score matrix to ~16 MB of float32


@dataclass(frozen=True)
class SyntheticConfig:
    users: int = 2000
    items: int = 1000
    interactions: int = 60000
    periods: int = 6
    popularity_exponent: float = 1.0  # power-law (Zipf) item popularity
    drift: float = 0.3  # how far user tastes move per period (0 = static)
    new_user_fraction: float = 0.3  # share of users who first appear after period 0
    new_item_fraction: float = 0.3  # share of items first available after period 0
    latent_dim: int = 8
    temperature: float = 0.5
    seed: int = 0
    start_ts: int = 1_600_000_000
    period_seconds: int = 7 * 86400

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            want_int = f.type in ("int", int)
            ok = (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) if want_int else (
                isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
                and math.isfinite(value))
            if not ok:
                kind = "an integer" if want_int else "a finite number"
                raise CkdError(f"SyntheticConfig.{f.name} must be {kind}, got {value!r}.")
        for name in ("users", "items", "interactions", "periods", "latent_dim", "period_seconds"):
            if getattr(self, name) < 1:
                raise CkdError(f"SyntheticConfig.{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("popularity_exponent", "drift", "seed", "start_ts"):
            if getattr(self, name) < 0:
                raise CkdError(f"SyntheticConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if self.temperature <= 0:
            raise CkdError(f"SyntheticConfig.temperature must be > 0, got {self.temperature}.")
        for name in ("new_user_fraction", "new_item_fraction"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise CkdError(f"SyntheticConfig.{name} must be in [0, 1), got {value}.")
            if value > 0 and self.periods == 1:
                raise CkdError(f"SyntheticConfig.{name} must be 0 when periods is 1 (nothing can arrive later); "
                               "set periods >= 2 or the fraction to 0.")
        if self.interactions < self.users:
            raise CkdError(f"SyntheticConfig.interactions ({self.interactions}) must be at least users "
                           f"({self.users}): every user interacts at least once.")
        if self.interactions > self.users * self.items // 2:
            raise CkdError(f"SyntheticConfig.interactions ({self.interactions}) must be at most users*items/2 "
                           f"({self.users * self.items // 2}); lower it or add users/items.")


def generate_stream(cfg: SyntheticConfig) -> pa.Table:
    """Columns user ("u<id>"), item ("i<id>"), timestamp (int64, ascending), weight (float32, 1.0)."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(0,)))  # the world
    U, I, P, d = cfg.users, cfg.items, cfg.periods, cfg.latent_dim

    centres = _unit(rng.standard_normal((d, d)))  # one cluster per latent dimension
    user_vec = _around(centres, rng.integers(0, d, U), rng)  # (U, d) at period 0
    item_vec = _around(centres, rng.integers(0, d, I), rng).astype(np.float32)  # (I, d)
    log_pop = (-cfg.popularity_exponent * np.log(rng.permutation(I) + 1.0)).astype(np.float32)  # (I,)
    user_arrival = _arrivals(U, cfg.new_user_fraction, P, rng)  # (U,) first active period
    item_arrival = _arrivals(I, cfg.new_item_fraction, P, rng)  # (I,) first available period
    counts = _period_counts(cfg, user_arrival, item_arrival, rng)  # (U, P) picks per user and period

    chunk = max(1, CHUNK_CELLS // I)
    parts_u, parts_i, parts_ts = [], [], []
    for c, start in enumerate(range(0, U, chunk)):
        crng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(1, c)))  # this chunk's users
        rows = np.arange(start, min(start + chunk, U))
        vec = user_vec[rows]  # (B, d)
        seen = np.zeros((len(rows), I), dtype=bool)  # (B, I) items already picked by each user
        for t in range(P):
            if t > 0:
                vec = _unit(vec + cfg.drift * crng.standard_normal(vec.shape) / math.sqrt(d))
            n = counts[rows, t]  # (B,)
            active = np.flatnonzero(n)
            if len(active) == 0:
                continue
            log_pop_t = np.where(item_arrival <= t, log_pop, np.float32(-np.inf))  # (I,)
            users, items = _sample(vec[active].astype(np.float32), item_vec, log_pop_t, seen[active],
                                   n[active], cfg.temperature, crng)
            seen[active[users], items] = True
            parts_u.append(rows[active[users]])
            parts_i.append(items)
            parts_ts.append(cfg.start_ts + t * cfg.period_seconds + crng.integers(0, cfg.period_seconds, len(items)))

    user_ids = np.concatenate(parts_u)
    item_ids = np.concatenate(parts_i)
    ts = np.concatenate(parts_ts).astype(np.int64)
    order = np.lexsort((item_ids, user_ids, ts))
    return pa.table({
        "user": _names("u", U, user_ids[order]),
        "item": _names("i", I, item_ids[order]),
        "timestamp": pa.array(ts[order], pa.int64()),
        "weight": pa.array(np.ones(len(ts), np.float32), pa.float32()),
    })


def _sample(vec: np.ndarray, item_vec: np.ndarray, log_pop: np.ndarray, seen: np.ndarray, n: np.ndarray,
            temperature: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Gumbel-top-n[b] items per row b without replacement; → (row index, item id) pairs.

    log_pop is -inf for items not available yet; seen marks items a row has already picked.
    Works on cost = -(logit + Gumbel) so the picks are the n[b] smallest costs of row b.
    """
    cost = rng.random(seen.shape, dtype=np.float32)  # (B, I) uniform → Gumbel noise below
    np.maximum(cost, np.float32(1e-30), out=cost)  # no log(0): an infinite cost must mean "not allowed"
    np.log(cost, out=cost)
    np.negative(cost, out=cost)
    np.log(cost, out=cost)  # log(-log U) = -Gumbel
    cost -= log_pop
    cost -= (vec @ item_vec.T) / np.float32(temperature)
    np.copyto(cost, np.float32(np.inf), where=seen)
    # rows grouped by ceil(log2 n) so one heavy user does not make every row sort n.max() candidates
    group = np.ceil(np.log2(n)).astype(np.int64)
    out_rows, out_items = [], []
    for g in np.unique(group):
        rows = np.flatnonzero(group == g)
        k = int(n[rows].max())
        c = cost[rows]  # (R, I)
        top = np.argpartition(c, k - 1, axis=1)[:, :k]  # (R, k) cheapest k, unordered
        top = np.take_along_axis(top, np.argsort(np.take_along_axis(c, top, axis=1), axis=1), axis=1)
        keep = np.arange(k) < n[rows, None]  # (R, k) first n[b] of row b
        out_rows.append(np.broadcast_to(rows[:, None], keep.shape)[keep])
        out_items.append(top[keep])
    return np.concatenate(out_rows), np.concatenate(out_items)


def _period_counts(cfg: SyntheticConfig, user_arrival: np.ndarray, item_arrival: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """(U, P) interactions of each user in each period, summing to cfg.interactions.

    Each user gets one pick in its arrival period (so it first appears there) plus a power-law share
    of the rest spread uniformly over its active periods, capped so that by period t it never needs
    more distinct items than are available at t.
    """
    U, I, P = cfg.users, cfg.items, cfg.periods
    activity = (rng.permutation(U) + 1.0) ** -USER_ACTIVITY_EXPONENT  # (U,)
    extra = np.zeros(U, dtype=np.int64)
    remaining = cfg.interactions - U
    while remaining > 0:  # water-filling: users at the cap (all items) take no more; a few rounds
        room = extra < I - 1
        p = activity * room
        extra = np.minimum(extra + rng.multinomial(remaining, p / p.sum()), I - 1)
        remaining = cfg.interactions - U - int(extra.sum())

    periods = np.arange(P)
    active = periods[None, :] >= user_arrival[:, None]  # (U, P)
    counts = rng.multinomial(extra, active / active.sum(1, keepdims=True))  # (U, P)
    counts[np.arange(U), user_arrival] += 1
    available = np.cumsum(np.bincount(item_arrival, minlength=P))  # (P,) items available by t; ends at I
    capped = np.minimum(np.cumsum(counts, axis=1), available[None, :])  # still ends at each user's total
    return np.diff(capped, axis=1, prepend=0)


def _arrivals(n: int, new_fraction: float, periods: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) arrival period: 0 for all but floor(new_fraction·n) random ids, uniform over 1..periods-1."""
    arrival = np.zeros(n, dtype=np.int64)
    new = rng.permutation(n)[: int(new_fraction * n)]
    if len(new):
        arrival[new] = rng.integers(1, periods, len(new))
    return arrival


def _around(centres: np.ndarray, cluster: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    d = centres.shape[1]
    return _unit(centres[cluster] + CLUSTER_SPREAD * rng.standard_normal((len(cluster), d)) / math.sqrt(d))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _names(prefix: str, n: int, ids: np.ndarray) -> pa.Array:
    names = pa.array(np.char.add(prefix, np.arange(n).astype(str)), pa.string())  # (n,) id → name
    return pc.take(names, pa.array(ids, pa.int64()))
