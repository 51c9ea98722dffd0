import numpy as np
import pytest

from continual_kd.data.synthetic import SyntheticConfig, generate_stream
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


def _first_period(ids, period):
    _, first = np.unique(ids, return_index=True)  # rows are in time order
    return period[first]


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
