"""A click stream simulated from a known truth: what users prefer, what they were shown, what they clicked.

The world (all seeded):
- users and items have unit latent vectors around d cluster centres; each user's vector drifts
  between periods (``drift``); a share of users arrives and a share of items is born after period 0;
- each item has a quality q_i ~ N(0, 1); the true preference of user u for item i in period t is
  pref = sigmoid(taste · <u_t, v_i> + quality · q_i + offset);
- exposure: items are ranked by an exposure score ρ·q_i + √(1-ρ²)·ε_i (ρ = ``quality_popularity``,
  how much true quality correlates with popularity) and item i is shown to each user, once, at a
  uniform time after both exist, with probability θ_i = min(1, c · (rank_i + 1)^-skew) — a Zipf-like
  propensity (``exposure_skew``); c is solved for so that the expected clicks are ``clicks``;
- a click happens when the item is shown and a Bernoulli(pref at the time shown) succeeds.

So P(click(u, i)) = θ_i · E_t[pref(u, i, t)]: the log over-shows popular items, and a model trained on
it learns exposure as much as preference. ``simulate`` draws it by chunks of users (a (B, I) uniform
draw against θ, then dot products for the exposed pairs only): no Python loop per user or pair.

``write_simulation(out)`` writes ``stream.parquet`` (or ``.csv``: user, item, timestamp — what
``ckd ingest`` reads) and ``truth.npz`` (every factor, the preference at the stream's end, the
propensities); ``load_truth`` reads it back.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import CkdError, file_in_the_way
from .synthetic import _arrivals, _around, _unit  # the same latent-space helpers as the synthetic stream

CHUNK_CELLS = 1 << 22  # user × item cells drawn at a time (~16 MB of float32 uniforms)
PILOT_USERS = 512  # users whose preferences estimate the expected clicks when solving for c
TRUTH_FILE = "truth.npz"
UNIFORM_STEM = "uniform"  # OUT/uniform.parquet: the missing-at-random labelled sample (--uniform N)


@dataclass(frozen=True)
class SimulationConfig:
    users: int = 1500
    items: int = 2000
    clicks: int = 100_000  # expected clicks (the stream has about this many)
    periods: int = 6
    dim: int = 16
    drift: float = 0.3  # how far a user's taste moves per period (0 = static)
    new_user_fraction: float = 0.2  # share of users first active after period 0
    new_item_fraction: float = 0.3  # share of items born after period 0
    exposure_skew: float = 1.0  # Zipf exponent of the exposure propensity by popularity rank
    quality_popularity: float = 0.0  # correlation of true quality with exposure popularity, in [-1, 1]
    taste: float = 4.0  # weight of <user, item> in the preference logit
    quality: float = 1.0  # weight of the item's quality in the preference logit
    offset: float = -3.0  # preference logit offset (lower: pickier users)
    seed: int = 0
    start_ts: int = 1_600_000_000
    period_seconds: int = 30 * 86400

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
                raise CkdError(f"simulate: {f.name} must be a finite number, got {v!r}.")
        for name in ("users", "items", "clicks", "periods", "dim", "period_seconds"):
            if getattr(self, name) < 1:
                raise CkdError(f"simulate: {name} must be at least 1, got {getattr(self, name)}.")
        for name in ("drift", "exposure_skew", "taste", "quality", "seed", "start_ts"):
            if getattr(self, name) < 0:
                raise CkdError(f"simulate: {name} must be ≥ 0, got {getattr(self, name)}.")
        if not -1 <= self.quality_popularity <= 1:
            raise CkdError(f"simulate: quality_popularity is a correlation in [-1, 1], got {self.quality_popularity}.")
        for name in ("new_user_fraction", "new_item_fraction"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise CkdError(f"simulate: {name} must be in [0, 1), got {v}.")
            if v > 0 and self.periods == 1:
                raise CkdError(f"simulate: {name} must be 0 with one period (nothing can arrive later); "
                               f"set periods ≥ 2.")
        if self.clicks > self.users * self.items // 2:
            raise CkdError(f"simulate: clicks ({self.clicks}) must be at most users·items/2 "
                           f"({self.users * self.items // 2}); lower clicks or add users/items.")


@dataclass(frozen=True)
class SimulationTruth:
    """The world behind a simulated stream. Dense ids: user u is "u<u>", item i is "i<i>"."""

    user_factors: np.ndarray  # (P, U, d) float32: each user's taste in each period
    item_factors: np.ndarray  # (I, d) float32
    item_quality: np.ndarray  # (I,) float32
    propensity: np.ndarray  # (I,) float64: probability an item is shown to a user (once, over the stream)
    exposures: np.ndarray  # (I,) int64: how many users were shown each item
    user_arrival: np.ndarray  # (U,) int64 first period active
    item_birth: np.ndarray  # (I,) int64 first period an item exists
    taste: float
    quality: float
    offset: float
    config: dict

    @property
    def num_users(self) -> int:
        return self.user_factors.shape[1]

    @property
    def num_items(self) -> int:
        return self.item_factors.shape[0]

    def user_ids(self) -> list[str]:
        return [f"u{u}" for u in range(self.num_users)]

    def item_ids(self) -> list[str]:
        return [f"i{i}" for i in range(self.num_items)]

    def logits(self, users: np.ndarray, period: int = -1) -> np.ndarray:
        """(B, I) preference logits of ``users`` for every item in ``period`` (default: the last)."""
        uf = self.user_factors[period][np.asarray(users)]
        return self.taste * (uf @ self.item_factors.T) + self.quality * self.item_quality[None, :] + self.offset

    def preference(self, users: np.ndarray, period: int = -1) -> np.ndarray:
        """(B, I) float32 true preference (click probability if shown) at the stream's end by default."""
        return _sigmoid(self.logits(users, period)).astype(np.float32)

    def expected_clicks(self, users: np.ndarray) -> np.ndarray:
        """(B, I) float64 P(click) of each pair over the whole stream: θ_i · E_t[pref] with the time shown
        uniform over the periods after both exist (0 for a pair that never coexists)."""
        users = np.asarray(users)
        P = self.user_factors.shape[0]
        start = np.maximum(self.user_arrival[users][:, None], self.item_birth[None, :])  # (B, I)
        acc = np.zeros(start.shape, dtype=np.float64)
        for t in range(P):  # P is small (periods)
            acc += np.where(t >= start, _sigmoid(self.logits(users, t)), 0.0)
        return self.propensity[None, :] * acc / np.maximum(P - start, 1)


def simulate(cfg: SimulationConfig) -> tuple[pa.Table, SimulationTruth]:
    """(stream: user, item, timestamp sorted by time; its truth)."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(0,)))
    U, I, P, d = cfg.users, cfg.items, cfg.periods, cfg.dim
    centres = _unit(rng.standard_normal((d, d)))
    item_vec = _around(centres, rng.integers(0, d, I), rng).astype(np.float32)
    user_vec = _around(centres, rng.integers(0, d, U), rng)
    tastes = np.empty((P, U, d), dtype=np.float32)
    tastes[0] = user_vec
    for t in range(1, P):
        user_vec = _unit(user_vec + cfg.drift * rng.standard_normal((U, d)) / math.sqrt(d))
        tastes[t] = user_vec
    quality = rng.standard_normal(I).astype(np.float32)
    rho = float(cfg.quality_popularity)
    score = rho * quality + math.sqrt(max(1 - rho * rho, 0.0)) * rng.standard_normal(I)
    rank = np.empty(I, dtype=np.int64)
    rank[np.argsort(-score, kind="stable")] = np.arange(I)
    weight = (rank + 1.0) ** -cfg.exposure_skew  # (I,) Zipf-like exposure weight
    user_arrival = _arrivals(U, cfg.new_user_fraction, P, rng)
    item_birth = _arrivals(I, cfg.new_item_fraction, P, rng)
    truth = SimulationTruth(tastes, item_vec, quality, np.zeros(I), np.zeros(I, np.int64), user_arrival,
                            item_birth, float(cfg.taste), float(cfg.quality), float(cfg.offset), asdict(cfg))

    pilot = rng.choice(U, min(U, PILOT_USERS), replace=False)
    per_item = truth_clicks_per_weight(truth, pilot) * (U / len(pilot))  # (I,) Σ_u E_t[pref]
    theta = _solve_propensity(weight, per_item, cfg.clicks)
    truth = SimulationTruth(**{**truth.__dict__, "propensity": theta})

    users_out, items_out, ts_out = [], [], []
    exposures = np.zeros(I, dtype=np.int64)
    chunk = max(1, CHUNK_CELLS // I)
    draw = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(1,)))
    theta32 = theta.astype(np.float32)
    for s in range(0, U, chunk):
        cu = np.arange(s, min(s + chunk, U))
        shown = draw.random((len(cu), I), dtype=np.float32) < theta32[None, :]  # (B, I)
        rows, items = np.nonzero(shown)
        users = cu[rows]
        exposures += np.bincount(items, minlength=I)
        start = np.maximum(user_arrival[users], item_birth[items])
        when = start + draw.random(len(users)) * (P - start)  # periods, continuous
        period = np.minimum(when.astype(np.int64), P - 1)
        logit = cfg.taste * np.einsum("nd,nd->n", tastes[period, users], item_vec[items]) \
            + cfg.quality * quality[items] + cfg.offset
        click = draw.random(len(users)) < _sigmoid(logit)
        users_out.append(users[click])
        items_out.append(items[click])
        ts_out.append(cfg.start_ts + (when[click] * cfg.period_seconds).astype(np.int64))
    truth = SimulationTruth(**{**truth.__dict__, "exposures": exposures})
    u, i, ts = (np.concatenate(x) for x in (users_out, items_out, ts_out))
    order = np.lexsort((i, u, ts))
    table = pa.table({"user": _names("u", U, u[order]), "item": _names("i", I, i[order]),
                      "timestamp": pa.array(ts[order], pa.int64())})
    return table, truth


def uniform_sample(truth: SimulationTruth, per_user: int, seed: int = 0, start_ts: int | None = None,
                   period_seconds: int | None = None) -> pa.Table:
    """A missing-at-random labelled sample: every user is shown ``per_user`` items drawn uniformly among the
    items that exist at a uniform time after the user arrived, and clicks with its true preference then
    (columns user, item, label 0/1, timestamp) — what a uniform-exposure slot collects (Yahoo!R3, Coat).
    Its own random stream (the log is unchanged); no Python loop per user."""
    cfg = truth.config
    start_ts = cfg["start_ts"] if start_ts is None else start_ts
    period_seconds = cfg["period_seconds"] if period_seconds is None else period_seconds
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
    U, P = truth.num_users, truth.user_factors.shape[0]
    users = np.repeat(np.arange(U), per_user)
    start = truth.user_arrival[users]
    when = start + rng.random(len(users)) * (P - start)
    period = np.minimum(when.astype(np.int64), P - 1)
    by_birth = np.argsort(truth.item_birth, kind="stable")
    alive = np.searchsorted(truth.item_birth[by_birth], np.arange(P), side="right")  # items born ≤ each period
    pick = np.minimum((rng.random(len(users)) * alive[period]).astype(np.int64), alive[period] - 1)
    ok = alive[period] > 0
    users, items, period, when = users[ok], by_birth[pick[ok]], period[ok], when[ok]
    logit = truth.taste * np.einsum("nd,nd->n", truth.user_factors[period, users], truth.item_factors[items]) \
        + truth.quality * truth.item_quality[items] + truth.offset
    label = (rng.random(len(users)) < _sigmoid(logit)).astype(np.int8)
    return pa.table({"user": _names("u", U, users), "item": _names("i", truth.num_items, items),
                     "label": pa.array(label, pa.int8()),
                     "timestamp": pa.array(start_ts + (when * period_seconds).astype(np.int64), pa.int64())})


def truth_clicks_per_weight(truth: SimulationTruth, users: np.ndarray) -> np.ndarray:
    """(I,) Σ over ``users`` of E_t[pref(u, i, t)] (what θ_i multiplies into expected clicks)."""
    saved = truth.propensity
    ones = SimulationTruth(**{**truth.__dict__, "propensity": np.ones_like(saved, dtype=np.float64)})
    out = np.zeros(truth.num_items)
    chunk = max(1, CHUNK_CELLS // max(truth.num_items, 1))
    for s in range(0, len(users), chunk):
        out += ones.expected_clicks(users[s:s + chunk]).sum(0)
    return out


def _solve_propensity(weight: np.ndarray, per_item: np.ndarray, clicks: int) -> np.ndarray:
    """θ = min(1, c·weight) with Σ θ·per_item = clicks (bisection on log c)."""
    most = float(per_item.sum())
    if most < clicks:
        raise CkdError(f"simulate: even showing every item to every user gives about {most:,.0f} clicks, fewer than "
                       f"clicks={clicks:,}; lower clicks, add users/items or raise offset.")
    lo, hi = -60.0, 60.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if float((np.minimum(1.0, math.exp(mid) * weight) * per_item).sum()) < clicks:
            lo = mid
        else:
            hi = mid
    return np.minimum(1.0, math.exp(hi) * weight)


def write_simulation(out: str | Path, cfg: SimulationConfig, fmt: str = "parquet",
                     uniform_per_user: int = 0) -> tuple[Path, Path, int]:
    """Write OUT/stream.<fmt> and OUT/truth.npz (and, with ``uniform_per_user``, OUT/uniform.<fmt>: a
    missing-at-random labelled sample, ``uniform_sample``); → (stream path, truth path, clicks)."""
    if fmt not in ("parquet", "csv"):
        raise CkdError(f"--format {fmt!r}: use parquet or csv")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CkdError(f"{out} is a file; give a folder for the stream and its truth")
    blocking = file_in_the_way(out.parent)
    if blocking is not None:  # refused before the simulation runs
        raise CkdError(f"{out}: {blocking} is a file, not a folder; give a folder for the stream and its truth")
    table, truth = simulate(cfg)
    out.mkdir(parents=True, exist_ok=True)
    stream = out / f"stream.{fmt}"
    _write_table(table, stream, fmt)
    if uniform_per_user > 0:
        _write_table(uniform_sample(truth, uniform_per_user, cfg.seed), out / f"{UNIFORM_STEM}.{fmt}", fmt)
    path = out / TRUTH_FILE
    save_truth(truth, path)
    return stream, path, table.num_rows


def _write_table(table: pa.Table, path: Path, fmt: str) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    if fmt == "parquet":
        pq.write_table(table, tmp)
    else:
        pacsv.write_csv(table, tmp)
    tmp.replace(path)


def save_truth(truth: SimulationTruth, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, user_factors=truth.user_factors, item_factors=truth.item_factors,
                        item_quality=truth.item_quality, propensity=truth.propensity, exposures=truth.exposures,
                        user_arrival=truth.user_arrival, item_birth=truth.item_birth,
                        scalars=np.array([truth.taste, truth.quality, truth.offset]),
                        config=np.array(json.dumps(truth.config)))
    tmp.replace(path)


def load_truth(path: str | Path) -> SimulationTruth:
    """A ``truth.npz`` written by ``ckd data simulate`` (or the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / TRUTH_FILE
    if path.is_file() and not zipfile.is_zipfile(path):  # np.load would read any other file as a pickle
        raise CkdError(f"--truth {path}: not a simulator's truth file (not an .npz archive); give the truth.npz "
                       f"`ckd data simulate OUT` wrote (or OUT itself)")
    try:
        with np.load(path, allow_pickle=False) as z:
            taste, quality, offset = (float(x) for x in z["scalars"])
            return SimulationTruth(z["user_factors"], z["item_factors"], z["item_quality"], z["propensity"],
                                   z["exposures"], z["user_arrival"], z["item_birth"], taste, quality, offset,
                                   json.loads(str(z["config"])))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a truncated file is a bad zip
        raise CkdError(f"--truth {path}: not a simulator's truth file ({e}); give the truth.npz "
                       f"`ckd data simulate OUT` wrote (or OUT itself)") from None


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _names(prefix: str, n: int, ids: np.ndarray) -> pa.Array:
    import pyarrow.compute as pc

    names = pa.array(np.char.add(prefix, np.arange(n).astype(str)), pa.string())
    return pc.take(names, pa.array(ids, pa.int64()))
