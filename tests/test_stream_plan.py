"""Block plans: sizes, time order, per-user splits, determinism, idempotence, new-id counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from continual_kd.errors import CkdError
from continual_kd.stream import BlockPlan, StreamStore
from continual_kd.types import TEST, TRAIN, VALID


def rows_table(users: list[str], ts: list[int], items: list[str] | None = None) -> pa.Table:
    items = items if items is not None else [f"i{k}" for k in range(len(users))]
    return pa.table({"user": users, "item": items, "timestamp": ts})


@pytest.fixture
def store(tmp_path: Path) -> StreamStore:
    return StreamStore.open(tmp_path / "store", create=True)


@pytest.fixture
def split_store(store: StreamStore) -> StreamStore:
    """40 rows. Block 0 (t < 100): A x10, B x5, C x4, D x1. Block 1 (t >= 100): A x10, E x10."""
    users = ["A"] * 10 + ["B"] * 5 + ["C"] * 4 + ["D"] + ["A"] * 10 + ["E"] * 10
    ts = list(range(20)) + list(range(100, 120))
    order = np.random.default_rng(3).permutation(40)  # ingestion order differs from time order
    store.ingest_table(rows_table([users[k] for k in order], [ts[k] for k in order]), "split-data")
    return store


def split_counts(store: StreamStore, plan: BlockPlan, k: int, user: str) -> tuple[int, int, int]:
    block = store.read_block(plan.plan_id, k)
    mine = block.split[block.users == store.dense_ids("user", [user])[0]]
    return int((mine == TRAIN).sum()), int((mine == VALID).sum()), int((mine == TEST).sum())


def test_block_sizes_and_time_order(store: StreamStore) -> None:
    ts = np.random.default_rng(0).integers(0, 50, size=103)  # many ties
    store.ingest_table(rows_table([f"u{k % 9}" for k in range(103)], ts.tolist()), "t")
    plan = store.ensure_plan(base_fraction=0.5, incremental=5)
    assert plan.num_blocks == 6 and plan.total_rows == 103
    assert [b.rows for b in plan.blocks] == [52, 11, 10, 10, 10, 10]  # round(51.5) = 52
    blocks = [store.read_block(plan.plan_id, k) for k in range(6)]
    assert [len(b) for b in blocks] == [52, 11, 10, 10, 10, 10]
    for k in range(5):
        assert blocks[k].ts.max() <= blocks[k + 1].ts.min()
    for k, b in enumerate(blocks):
        assert np.all(np.diff(b.ts) >= 0) and set(b.block.tolist()) == {k}
        assert (b.ts.min(), b.ts.max()) == (plan.blocks[k].ts_start, plan.blocks[k].ts_end)
    upto = store.read_blocks(plan.plan_id, 2)
    assert len(upto) == 73 and upto.block.tolist() == [0] * 52 + [1] * 11 + [2] * 10
    assert np.array_equal(np.sort(upto.ts), upto.ts)
    assert (upto.users.dtype, upto.ts.dtype, upto.weight.dtype, upto.block.dtype, upto.split.dtype) == (
        np.int64, np.int64, np.float32, np.int32, np.int8)  # block: INTEGER in the catalog (> 32,767 blocks)


def test_equal_timestamps_keep_ingestion_order(store: StreamStore) -> None:
    store.ingest_table(rows_table(["a", "b", "c", "d"], [5, 5, 5, 1], items=["p", "q", "r", "s"]), "ties")
    plan = store.ensure_plan(base_fraction=0.5, incremental=1)
    everything = store.read_blocks(plan.plan_id, 1)
    assert store.external_ids("item", everything.items) == ["s", "p", "q", "r"]  # (ts, offset) order


def test_split_per_user(split_store: StreamStore) -> None:
    plan = split_store.ensure_plan(base_fraction=0.5, incremental=1)
    assert [b.rows for b in plan.blocks] == [20, 20]
    assert split_counts(split_store, plan, 0, "A") == (8, 1, 1)
    assert split_counts(split_store, plan, 0, "B") == (3, 1, 1)
    assert split_counts(split_store, plan, 0, "C") == (4, 0, 0)
    assert split_counts(split_store, plan, 0, "D") == (1, 0, 0)
    assert split_counts(split_store, plan, 1, "A") == (8, 1, 1)
    assert split_counts(split_store, plan, 1, "E") == (8, 1, 1)
    other = split_store.ensure_plan(base_fraction=0.5, incremental=1, split=(0.6, 0.2, 0.2))
    assert split_counts(split_store, other, 1, "E") == (6, 2, 2)
    assert split_counts(split_store, other, 0, "B") == (3, 1, 1)


def test_split_is_deterministic_in_the_seed(split_store: StreamStore) -> None:
    first = split_store.ensure_plan(base_fraction=0.5, incremental=1, seed=7)
    split_a = split_store.read_blocks(first.plan_id, 1).split
    same = split_store.ensure_plan(base_fraction=0.5, incremental=1, seed=7)
    split_b = split_store.read_blocks(same.plan_id, 1).split
    other = split_store.ensure_plan(base_fraction=0.5, incremental=1, seed=8)
    split_c = split_store.read_blocks(other.plan_id, 1).split
    assert other.plan_id != first.plan_id
    assert np.array_equal(split_a, split_b)
    assert not np.array_equal(split_a, split_c)
    assert np.array_equal(np.bincount(split_a), np.bincount(split_c))  # same counts, other rows


def test_ensure_plan_is_idempotent(split_store: StreamStore) -> None:
    plan = split_store.ensure_plan(base_fraction=0.5, incremental=2, seed=1)
    before = split_store.fingerprint()
    again = split_store.ensure_plan(base_fraction=0.5, incremental=2, seed=1)
    assert again == plan and split_store.get_plan(plan.plan_id) == plan
    assert split_store.fingerprint() == before
    assert [p["plan_id"] for p in split_store.status()["plans"]] == [plan.plan_id]
    split_store.ingest_table(rows_table(["Z"], [500]), "more")
    assert split_store.ensure_plan(base_fraction=0.5, incremental=2, seed=1).plan_id != plan.plan_id


def test_new_users_and_items_per_block(store: StreamStore) -> None:
    # Ingestion order = time order, so dense ids grow with time. 12 rows, base 6 + 3 x 2.
    users = ["a", "b", "a", "b", "a", "b", "c", "a", "d", "e", "e", "a"]
    items = ["x", "x", "y", "y", "x", "y", "x", "z", "x", "w", "v", "x"]
    store.ingest_table(rows_table(users, list(range(12)), items), "ids")
    plan = store.ensure_plan(base_fraction=0.5, incremental=3)
    assert [b.rows for b in plan.blocks] == [6, 2, 2, 2]
    assert [b.new_users for b in plan.blocks] == [2, 1, 2, 0]
    assert [b.new_items for b in plan.blocks] == [2, 1, 1, 1]
    assert [b.num_users for b in plan.blocks] == [2, 3, 5, 5]
    assert [b.num_items for b in plan.blocks] == [2, 3, 4, 5]
    assert (store.read_block(plan.plan_id, 1).num_users, store.read_blocks(plan.plan_id, 3).num_items) == (3, 5)
    status_blocks = store.status()["plans"][0]["blocks"]
    assert [b["new_users"] for b in status_blocks] == [2, 1, 2, 0]


@pytest.mark.parametrize("kwargs, needle", [
    ({"base_fraction": 0.0}, "base_fraction"),
    ({"base_fraction": 1.0}, "base_fraction"),
    ({"incremental": 0}, "incremental"),
    ({"split": (0.8, 0.1, 0.2)}, "sum to 1"),
    ({"split": (0.8, 0.2)}, "three"),
    ({"seed": -1}, "seed"),
    ({"incremental": 30}, "lower incremental"),  # 40 rows: 20 left for 30 blocks
])
def test_bad_plan_arguments(split_store: StreamStore, kwargs: dict, needle: str) -> None:
    before = split_store.fingerprint()
    with pytest.raises(CkdError, match=needle):
        split_store.ensure_plan(**kwargs)
    assert split_store.fingerprint() == before


def test_plan_lookup_errors(split_store: StreamStore, store: StreamStore, tmp_path: Path) -> None:
    plan = split_store.ensure_plan(base_fraction=0.5, incremental=1)
    with pytest.raises(CkdError, match="Unknown block plan 'nope'"):
        split_store.read_block("nope", 0)
    with pytest.raises(CkdError, match=r"blocks 0\.\.1"):
        split_store.read_block(plan.plan_id, 2)
    empty = StreamStore.open(tmp_path / "empty", create=True)
    with pytest.raises(CkdError, match="no interactions"):
        empty.ensure_plan()


def test_failed_plan_write_leaves_store_unchanged(split_store: StreamStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from continual_kd.stream import catalog

    real_insert = catalog.insert_plan

    def insert_then_fail(*args, **kwargs):  # plans, plan_blocks and plan_rows rows are in, then a crash
        real_insert(*args, **kwargs)
        raise RuntimeError("killed")

    before = split_store.fingerprint()
    monkeypatch.setattr(catalog, "insert_plan", insert_then_fail)
    with pytest.raises(RuntimeError, match="killed"):
        split_store.ensure_plan(base_fraction=0.5, incremental=1)
    assert split_store.fingerprint() == before
    monkeypatch.setattr(catalog, "insert_plan", real_insert)
    assert split_store.ensure_plan(base_fraction=0.5, incremental=1).total_rows == 40
