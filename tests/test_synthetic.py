import numpy as np
import pyarrow.compute as pc
import pytest

from continual_kd.data.synthetic import SyntheticConfig, generate_stream, synthetic_truth
from continual_kd.errors import CkdError

CFG = SyntheticConfig(users=600, items=400, interactions=15000, periods=5, seed=3)


@pytest.fixture(scope="module")
def stream():
    return generate_stream(CFG)


def _arrays(table):
    users = np.array(table["user"].to_pylist())
    items = np.array(table["item"].to_pylist())
    ts = table["timestamp"].to_numpy()
    return users, items, ts


def _dense(table, cfg):
    """(user id, item id, period) int arrays: "u17" → 17, a timestamp → its period."""
    user = pc.cast(pc.utf8_slice_codeunits(table["user"], 1), "int64").to_numpy()
    item = pc.cast(pc.utf8_slice_codeunits(table["item"], 1), "int64").to_numpy()
    period = (table["timestamp"].to_numpy() - cfg.start_ts) // cfg.period_seconds
    return user, item, period


def _first_period(ids, period):
    _, first = np.unique(ids, return_index=True)  # rows are in time order
    return period[first]


def _taste(truth, user, item, period):
    """(n,) <u_t, v_i> of each interaction under the period's taste."""
    return (truth.user_vectors[period, user] * truth.item_vectors[item]).sum(1)


def _taste_gap(cfg):
    """Mean taste of the real pairs minus that of the same pairs with users shuffled within each period
    (which keeps popularity and activity, and breaks only who picked what)."""
    user, item, period = _dense(generate_stream(cfg), cfg)
    truth = synthetic_truth(cfg)
    rng = np.random.default_rng(0)
    shuffled = user.copy()
    for t in range(cfg.periods):
        rows = np.flatnonzero(period == t)
        shuffled[rows] = rng.permutation(user[rows])
    return _taste(truth, user, item, period).mean() - _taste(truth, shuffled, item, period).mean()


def test_schema_and_row_count(stream):
    assert stream.num_rows == CFG.interactions
    assert stream.schema.names == ["user", "item", "timestamp", "weight"]
    assert str(stream.schema.field("user").type) == "string"
    assert str(stream.schema.field("timestamp").type) == "int64"
    assert str(stream.schema.field("weight").type) == "float"
    assert set(stream["weight"].to_numpy().tolist()) == {1.0}
    users, items, _ = _arrays(stream)
    assert len(np.unique(users)) == CFG.users  # every user interacts at least once
    assert all(u.startswith("u") for u in np.unique(users)) and all(i.startswith("i") for i in np.unique(items))
    assert len(np.unique(items)) <= CFG.items


def test_deterministic_from_seed(stream):
    assert generate_stream(CFG).equals(stream)
    other = generate_stream(SyntheticConfig(users=600, items=400, interactions=15000, periods=5, seed=4))
    assert other.num_rows == stream.num_rows
    assert not other.equals(stream)


def test_truth_is_rebuilt_from_the_seed():
    a, b = synthetic_truth(CFG), synthetic_truth(CFG)
    for name in ("user_vectors", "item_vectors", "log_popularity", "user_arrival", "item_arrival"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.user_vectors.shape == (CFG.periods, CFG.users, CFG.latent_dim)
    assert a.item_vectors.shape == (CFG.items, CFG.latent_dim)
    np.testing.assert_allclose(np.linalg.norm(a.user_vectors, axis=-1), 1.0, atol=1e-5)
    # popularity ranks are a permutation of 1..I: log_popularity = -1.0 · log(rank)
    np.testing.assert_allclose(np.sort(np.exp(-a.log_popularity)), np.arange(1, CFG.items + 1), rtol=1e-4)
    pairs = (np.array([0, 5]), np.array([3, 7]))
    np.testing.assert_allclose(a.preference(2, *pairs), _taste(a, *pairs, np.array([2, 2])), rtol=1e-6)
    other = synthetic_truth(SyntheticConfig(users=600, items=400, interactions=15000, periods=5, seed=4))
    assert not np.array_equal(a.item_vectors, other.item_vectors)


def test_no_duplicate_pairs(stream):
    users, items, _ = _arrays(stream)
    pairs = np.char.add(np.char.add(users, "|"), items)
    assert len(np.unique(pairs)) == len(pairs)


def test_timestamps_sorted_and_inside_periods(stream):
    _, _, ts = _arrays(stream)
    assert np.all(np.diff(ts) >= 0)
    assert ts.min() >= CFG.start_ts
    assert ts.max() < CFG.start_ts + CFG.periods * CFG.period_seconds
    period = (ts - CFG.start_ts) // CFG.period_seconds
    assert set(period.tolist()) == set(range(CFG.periods))


def test_new_users_and_items_arrive_later(stream):
    users, items, ts = _arrays(stream)
    period = (ts - CFG.start_ts) // CFG.period_seconds
    user_first = _first_period(users, period)
    # each user interacts in its arrival period, so exactly floor(0.3 * 600) users start after period 0
    assert int((user_first > 0).sum()) == int(CFG.new_user_fraction * CFG.users)
    assert set(user_first[user_first > 0].tolist()) == set(range(1, CFG.periods))
    item_first = _first_period(items, period)
    late_items = (item_first > 0).mean()
    # 30% of items arrive later; a few old tail items are first picked after period 0 too
    assert 0.25 <= late_items <= 0.45


def test_nobody_acts_before_arriving(stream):
    user, item, period = _dense(stream, CFG)
    truth = synthetic_truth(CFG)
    assert np.all(period >= truth.item_arrival[item])  # an item is never picked before it arrives
    assert np.all(period >= truth.user_arrival[user])
    # a user's first interaction is in its arrival period, exactly
    np.testing.assert_array_equal(_first_period(user, period), truth.user_arrival)
    # 120 items arrive after period 0 and most are picked in the period they arrive
    late = np.flatnonzero(truth.item_arrival > 0)
    assert len(late) == int(CFG.new_item_fraction * CFG.items) == 120
    picked_late = np.unique(item[np.isin(item, late)])
    first = _first_period(item, period)[np.searchsorted(np.unique(item), picked_late)]
    assert (first == truth.item_arrival[picked_late]).mean() > 0.8


def test_static_catalogue_without_new_ids():
    cfg = SyntheticConfig(users=300, items=200, interactions=5000, periods=4, new_user_fraction=0.0,
                          new_item_fraction=0.0, seed=1)
    users, items, ts = _arrays(generate_stream(cfg))
    period = (ts - cfg.start_ts) // cfg.period_seconds
    assert np.all(_first_period(users, period) == 0)
    assert (_first_period(items, period) == 0).mean() > 0.9


def test_popularity_is_heavy_tailed(stream):
    _, items, _ = _arrays(stream)
    _, counts = np.unique(items, return_counts=True)
    counts = np.sort(counts)[::-1]
    top = counts[: CFG.items // 10].sum() / counts.sum()
    assert top > 0.30
    flat = generate_stream(SyntheticConfig(users=600, items=400, interactions=15000, periods=5, seed=3,
                                           popularity_exponent=0.0))
    _, flat_counts = np.unique(np.array(flat["item"].to_pylist()), return_counts=True)
    assert np.sort(flat_counts)[::-1][: CFG.items // 10].sum() / flat_counts.sum() < top


@pytest.mark.parametrize("exponent", [0.5, 1.0, 1.5])
def test_popularity_follows_the_power_law(exponent):
    # 2 picks per user from 2,000 items: the without-replacement rule hardly bites, so item counts
    # follow the configured law: count(rank r) ∝ r^-exponent
    cfg = SyntheticConfig(users=20000, items=2000, interactions=40000, periods=2, new_user_fraction=0.0,
                          new_item_fraction=0.0, popularity_exponent=exponent, seed=5)
    _, item, _ = _dense(generate_stream(cfg), cfg)
    by_rank = np.argsort(-synthetic_truth(cfg).log_popularity, kind="stable")  # item of rank 1, 2, ...
    counts = np.bincount(item, minlength=cfg.items)[by_rank]
    ranks = np.arange(1, 201)
    slope = np.polyfit(np.log(ranks), np.log(counts[:200]), 1)[0]
    assert slope == pytest.approx(-exponent, abs=0.1)
    if exponent == 1.0:
        # the 10 head items hold H(10) / H(2000) = 2.929 / 8.178 = 0.358 of the law's mass
        assert counts[:10].sum() / counts.sum() == pytest.approx(0.358, abs=0.04)


def test_taste_decides_among_popular_items():
    # a user's items fit that user's taste clearly better than another user's of the same period,
    # more so the lower the temperature; at a huge temperature taste hardly matters
    gaps = {t: _taste_gap(SyntheticConfig(users=600, items=400, interactions=15000, periods=5, seed=3,
                                          temperature=t)) for t in (0.25, 0.5, 2.0, 100.0)}
    assert gaps[0.5] > 0.15
    assert gaps[0.25] > gaps[0.5] > gaps[2.0] > gaps[100.0]
    assert abs(gaps[100.0]) < 0.02


def test_tastes_drift_between_periods():
    static = synthetic_truth(SyntheticConfig(users=600, items=400, interactions=15000, periods=5, drift=0.0))
    assert np.array_equal(static.user_vectors[0], static.user_vectors[4])
    cfg = SyntheticConfig(users=600, items=400, interactions=15000, periods=5, seed=3, drift=2.0,
                          temperature=0.25)
    truth = synthetic_truth(cfg)
    assert (truth.user_vectors[0] * truth.user_vectors[4]).sum(1).mean() < 0.2  # tastes moved far
    user, item, period = _dense(generate_stream(cfg), cfg)
    last = period == 4
    now = _taste(truth, user[last], item[last], np.full(last.sum(), 4)).mean()
    then = _taste(truth, user[last], item[last], np.zeros(last.sum(), dtype=np.int64)).mean()
    assert now > then + 0.1  # the last period's picks follow the users' current taste


def test_memory_follows_interactions_not_users_times_items():
    # 50,000 users × 50,000 items: scoring every user against every item would hold 2.5e9 cells a period
    # (10 GB as float32); drawing candidates per interaction holds tens of MB. Memory, not seconds, is what a
    # test can assert on a shared machine (the generator's speed is bench/scale.py's)
    import tracemalloc

    cfg = SyntheticConfig(users=50_000, items=50_000, interactions=200_000, periods=4, seed=1)
    tracemalloc.start()
    try:
        table = generate_stream(cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 400e6, f"{peak / 1e6:.0f} MB"  # measured ~75 MB; one users × items float32 table is 10 GB
    assert table.num_rows == 200_000


@pytest.mark.parametrize("overrides, field", [
    ({"users": 0}, "users"),
    ({"items": -5}, "items"),
    ({"periods": 0}, "periods"),
    ({"interactions": 10_000, "users": 100, "items": 100}, "interactions"),
    ({"interactions": 50, "users": 100}, "interactions"),
    ({"temperature": 0.0}, "temperature"),
    ({"drift": -0.1}, "drift"),
    ({"new_user_fraction": 1.0}, "new_user_fraction"),
    ({"new_item_fraction": 0.2, "periods": 1, "new_user_fraction": 0.0}, "new_item_fraction"),
    ({"users": 10.5}, "users"),
    ({"popularity_exponent": float("nan")}, "popularity_exponent"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(CkdError, match=rf"SyntheticConfig\.{field} "):
        SyntheticConfig(**overrides)


def test_every_user_can_be_served_at_the_density_limit():
    # interactions = users·items/2: every user needs half the catalogue; rejection sampling still ends
    cfg = SyntheticConfig(users=40, items=30, interactions=600, periods=3, seed=2)
    user, item, period = _dense(generate_stream(cfg), cfg)
    assert len(user) == 600
    assert len(np.unique(user * cfg.items + item)) == 600
    assert np.all(np.bincount(user, minlength=40) <= 15)
