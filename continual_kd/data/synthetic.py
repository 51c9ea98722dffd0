"""A seeded synthetic interaction stream with the properties continual recommenders must cope with.

Users and items have clustered latent vectors (learnable structure); item popularity and user
activity follow power laws; user tastes drift between periods; new users and items arrive in later
periods. In period t user u picks distinct items, each pick following approximately

    P(i | u, t) ∝ popularity_i · exp(<u_t, v_i> / temperature)     over items available at t,

drawn in two steps that cost O(CANDIDATES) per interaction (never a users × items matrix):
CANDIDATES items are drawn from the popularity law among the available items, and one of them
is chosen by a softmax of the user's taste (Gumbel-max). This is sampling-importance-resampling
of the law above. A pick of an item the user already has is rejected and drawn again in the next
round; the few picks still missing after many rounds (a very active user that has most of the
popular items) are drawn from uniform candidates, and at last uniformly, which always succeeds
since a user never needs more than half of the available items.

``synthetic_truth(cfg)`` rebuilds the latent factors, popularity and arrival periods from the
seed alone, so later analyses can compare a model against what users prefer.
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
CANDIDATES = 32  # items drawn from the popularity law per pick, among which taste chooses
CHUNK_CELLS = 1 << 20  # picks per chunk × CANDIDATES: bounds the (chunk, C, d) gather to ~32 MB
POPULARITY_ROUNDS = 12  # rounds with popularity candidates; then uniform candidates, then uniform picks
UNIFORM_CANDIDATE_ROUNDS = 12
MAX_ROUNDS = 200  # never reached: a pick from >= half the items unseen succeeds with p >= 1/2


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


@dataclass(frozen=True)
class SyntheticTruth:
    """The world behind a stream, rebuilt from the seed (dense ids: user u is "u<u>", item i is "i<i>")."""

    user_vectors: np.ndarray  # (P, U, d) float32, unit norm: each user's taste in each period
    item_vectors: np.ndarray  # (I, d) float32, unit norm
    log_popularity: np.ndarray  # (I,) float32: -exponent · log(popularity rank + 1)
    user_arrival: np.ndarray  # (U,) int64: first period the user is active
    item_arrival: np.ndarray  # (I,) int64: first period the item can be picked

    def preference(self, period: int, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(n,) taste logit <u_t, v_i> of each (user, item) pair in ``period``."""
        return np.einsum("nd,nd->n", self.user_vectors[period, users], self.item_vectors[items])


def synthetic_truth(cfg: SyntheticConfig) -> SyntheticTruth:
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(0,)))  # the world
    U, I, P, d = cfg.users, cfg.items, cfg.periods, cfg.latent_dim
    centres = _unit(rng.standard_normal((d, d)))  # one cluster per latent dimension
    user_vec = _around(centres, rng.integers(0, d, U), rng)  # (U, d) at period 0
    item_vec = _around(centres, rng.integers(0, d, I), rng)  # (I, d)
    log_pop = -cfg.popularity_exponent * np.log(rng.permutation(I) + 1.0)  # (I,)
    user_arrival = _arrivals(U, cfg.new_user_fraction, P, rng)
    item_arrival = _arrivals(I, cfg.new_item_fraction, P, rng)
    tastes = np.empty((P, U, d), dtype=np.float32)
    tastes[0] = user_vec
    for t in range(1, P):
        user_vec = _unit(user_vec + cfg.drift * rng.standard_normal((U, d)) / math.sqrt(d))
        tastes[t] = user_vec
    return SyntheticTruth(tastes, item_vec.astype(np.float32), log_pop.astype(np.float32),
                          user_arrival, item_arrival)


def generate_stream(cfg: SyntheticConfig) -> pa.Table:
    """Columns user ("u<id>"), item ("i<id>"), timestamp (int64, ascending), weight (float32, 1.0)."""
    truth = synthetic_truth(cfg)
    counts = _period_counts(cfg, truth.user_arrival, truth.item_arrival,
                            np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(1,))))  # (U, P)
    I = cfg.items
    seen = np.empty(0, dtype=np.int64)  # sorted keys user * I + item of every pick so far
    parts_u, parts_i, parts_ts = [], [], []
    for t in range(cfg.periods):
        keys = _pick_period(cfg, truth, t, counts[:, t], seen)  # sorted, disjoint from seen
        seen = np.sort(np.concatenate([seen, keys]), kind="stable")  # two sorted runs: a linear merge
        trng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(3, t)))
        parts_u.append(keys // I)
        parts_i.append(keys % I)
        parts_ts.append(cfg.start_ts + t * cfg.period_seconds + trng.integers(0, cfg.period_seconds, len(keys)))

    user_ids = np.concatenate(parts_u)
    item_ids = np.concatenate(parts_i)
    ts = np.concatenate(parts_ts).astype(np.int64)
    order = np.lexsort((item_ids, user_ids, ts))
    return pa.table({
        "user": _names("u", cfg.users, user_ids[order]),
        "item": _names("i", I, item_ids[order]),
        "timestamp": pa.array(ts[order], pa.int64()),
        "weight": pa.array(np.ones(len(ts), np.float32), pa.float32()),
    })


def _pick_period(cfg: SyntheticConfig, truth: SyntheticTruth, t: int, need: np.ndarray,
                 seen: np.ndarray) -> np.ndarray:
    """Sorted keys (user * I + item) of need[u] new distinct items per user u, none of them in ``seen``."""
    I = cfg.items
    available = np.flatnonzero(truth.item_arrival <= t)  # (A,)
    cdf = np.cumsum(np.exp(truth.log_popularity[available].astype(np.float64)))  # (A,) popularity law
    taken = np.empty(0, dtype=np.int64)  # sorted keys picked in this period so far
    need = need.astype(np.int64)
    for r in range(MAX_ROUNDS):
        if not need.any():
            return taken
        users = np.repeat(np.arange(cfg.users), need)  # (n,) one entry per missing pick
        rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(2, t, r)))
        stage = 0 if r < POPULARITY_ROUNDS else 1 if r < POPULARITY_ROUNDS + UNIFORM_CANDIDATE_ROUNDS else 2
        items = np.concatenate([
            _draw(users[s:s + CHUNK_CELLS // CANDIDATES], truth.user_vectors[t], truth.item_vectors,
                  available, cdf, stage, cfg.temperature, rng)
            for s in range(0, len(users), CHUNK_CELLS // CANDIDATES)])
        keys = np.unique(users * I + items)  # sorted; a pair drawn twice in a round counts once
        keys = keys[~(_member(keys, seen) | _member(keys, taken))]
        taken = np.sort(np.concatenate([taken, keys]), kind="stable")
        need -= np.bincount(keys // I, minlength=cfg.users)
    raise RuntimeError(f"synthetic period {t}: {int(need.sum())} picks still missing after {MAX_ROUNDS} rounds")


def _draw(users: np.ndarray, user_vec: np.ndarray, item_vec: np.ndarray, available: np.ndarray,
          cdf: np.ndarray, stage: int, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) one item per entry of ``users``: stage 0 popularity candidates + taste, 1 uniform
    candidates + taste, 2 uniform."""
    n, A = len(users), len(available)
    if stage == 2:
        return available[rng.integers(0, A, n)]
    if stage == 0:
        pos = np.searchsorted(cdf, rng.random((n, CANDIDATES)) * cdf[-1], side="right")  # (n, C)
        cand = available[np.minimum(pos, A - 1)]
    else:
        cand = available[rng.integers(0, A, (n, CANDIDATES))]
    logits = np.matmul(item_vec[cand], user_vec[users][:, :, None])[..., 0]  # (n, C) <u, v_c>
    logits /= np.float32(temperature)
    noise = rng.random((n, CANDIDATES), dtype=np.float32)
    np.maximum(noise, np.float32(1e-30), out=noise)
    logits -= np.log(-np.log(noise))  # + Gumbel: argmax is a softmax draw
    return np.take_along_axis(cand, logits.argmax(1)[:, None], axis=1)[:, 0]


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """(n,) bool: keys[j] occurs in sorted_keys."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


def _period_counts(cfg: SyntheticConfig, user_arrival: np.ndarray, item_arrival: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """(U, P) interactions of each user in each period, summing to cfg.interactions.

    Each user gets one pick in its arrival period (so it first appears there) plus a power-law share
    of the rest spread uniformly over its active periods, capped so that by period t it never needs
    more than half (rounded up) of the items available at t: rejection sampling then always ends.
    """
    U, I, P = cfg.users, cfg.items, cfg.periods
    cap_total = (I + 1) // 2
    activity = (rng.permutation(U) + 1.0) ** -USER_ACTIVITY_EXPONENT  # (U,)
    extra = np.zeros(U, dtype=np.int64)
    remaining = cfg.interactions - U
    while remaining > 0:  # water-filling: users at the cap take no more; a few rounds
        room = extra < cap_total - 1
        p = activity * room
        extra = np.minimum(extra + rng.multinomial(remaining, p / p.sum()), cap_total - 1)
        remaining = cfg.interactions - U - int(extra.sum())

    periods = np.arange(P)
    active = periods[None, :] >= user_arrival[:, None]  # (U, P)
    counts = rng.multinomial(extra, active / active.sum(1, keepdims=True))  # (U, P)
    counts[np.arange(U), user_arrival] += 1
    available = np.cumsum(np.bincount(item_arrival, minlength=P))  # (P,) items available by t; ends at I
    cap = (available + 1) // 2  # >= 1 whenever an item is available; ends at cap_total
    capped = np.minimum(np.cumsum(counts, axis=1), cap[None, :])  # still ends at each user's total
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
