"""blocks.holdout: a share of every (block, user) group held out for good — never trained on, never used to
choose an epoch — and judged like test by `ckd evaluate` and `tune.metric: holdout`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from continual_kd.config import parse_job
from continual_kd.errors import CkdError
from continual_kd.eval import model_pairs_mask
from continual_kd.stream.plan import plan_id_for, split_per_user, validate_plan_args
from continual_kd.types import HOLDOUT, TEST, TRAIN, VALID


def test_the_held_out_share_comes_from_train_and_leaves_valid_and_test_as_they_were():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 200, 12_000)
    block = rng.integers(0, 3, 12_000).astype(np.int16)
    three = split_per_user(block, users, (0.8, 0.1, 0.1), 5)
    four = split_per_user(block, users, (0.75, 0.1, 0.1, 0.05), 5)
    assert np.array_equal(three == TEST, four == TEST) and np.array_equal(three == VALID, four == VALID)
    assert (three[four == HOLDOUT] == TRAIN).all() and not (four == HOLDOUT)[three != TRAIN].any()
    # per (block, user) group: floor(0.05 n + 0.5) rows held out, and never the group's last training row
    for b, u in {(int(b), int(u)) for b, u in zip(block[:300], users[:300])}:
        g = (block == b) & (users == u)
        n, held, train = int(g.sum()), int((four[g] == HOLDOUT).sum()), int((three[g] == TRAIN).sum())
        assert held == min(int(np.floor(0.05 * n + 0.5 + 1e-9)), max(train - 1, 0))
    assert abs((four == HOLDOUT).mean() - 0.05) < 0.01
    # a plan without a held-out share keeps its id; with one it is another plan
    assert plan_id_for(0.5, 2, (0.8, 0.1, 0.1), 0, ["h"]) == plan_id_for(0.5, 2, [0.8, 0.1, 0.1], 0, ["h"])
    assert plan_id_for(0.5, 2, (0.75, 0.1, 0.1, 0.05), 0, ["h"]) != plan_id_for(0.5, 2, (0.8, 0.1, 0.1), 0, ["h"])
    validate_plan_args(0.5, 2, (0.75, 0.1, 0.1, 0.05), 0)
    with pytest.raises(CkdError, match="three non-negative fractions"):
        validate_plan_args(0.5, 2, (0.7, 0.1, 0.1, 0.05, 0.05), 0)


def test_the_job_file_takes_a_held_out_share_and_refuses_what_cannot_hold_one():
    job = parse_job({"blocks": {"split": [0.8, 0.1, 0.1], "holdout": 0.05}}, "job.yaml")
    assert job.blocks.plan_split == pytest.approx((0.75, 0.1, 0.1, 0.05))
    assert parse_job({}, "job.yaml").blocks.plan_split == (0.8, 0.1, 0.1)
    with pytest.raises(CkdError, match="blocks.holdout"):
        parse_job({"blocks": {"split": [0.1, 0.45, 0.45], "holdout": 0.2}}, "job.yaml")
    with pytest.raises(CkdError, match="blocks.holdout"):
        parse_job({"source": {"dataset": "files", "train": "a.csv", "valid": "b.csv", "test": "c.csv"},
                   "blocks": {"holdout": 0.05}}, "job.yaml")
    tune = {"space": {"student.train.lr": {"choice": [0.001, 0.005]}}, "metric": "holdout"}
    with pytest.raises(CkdError, match="tune.metric"):
        parse_job({"tune": tune}, "job.yaml")
    assert parse_job({"tune": tune, "blocks": {"holdout": 0.05}}, "job.yaml").tune.metric == "holdout"


def test_test_rankings_mask_the_held_out_pairs_and_held_out_rankings_never_mask_a_test_pair():
    from continual_kd.eval import eval_sets
    from continual_kd.types import Interactions

    # user 0: item 0 train, 1 held out, 2 test, 3 valid — one block
    split = np.array([TRAIN, HOLDOUT, TEST, VALID], np.int8)
    seen = Interactions(np.zeros(4, np.int64), np.arange(4), np.zeros(4, np.int64), np.ones(4, np.float32),
                        np.zeros(4, np.int32), split, 1, 5)
    for mask, hidden in (("standard", {0, 1, 3}), ("train", {0, 1}), ("all_seen", {0, 1, 3})):
        relevant, exclude = eval_sets(seen, 0, TEST, mask=mask)
        assert set(relevant.items.tolist()) == {2} and set(exclude.items.tolist()) == hidden
    for mask, hidden in (("standard", {0, 3}), ("train", {0}), ("all_seen", {0, 2, 3})):
        relevant, exclude = eval_sets(seen, 0, HOLDOUT, mask=mask)
        assert set(relevant.items.tolist()) == {1} and set(exclude.items.tolist()) == hidden


JOB = {"name": "held", "source": {"dataset": "synthetic", "store": "stores/held",
                                  "synthetic": {"users": 150, "items": 120, "interactions": 5000, "periods": 3,
                                                "seed": 2}},
       "blocks": {"base_fraction": 0.5, "incremental": 2, "holdout": 0.1},
       "teachers": [{"name": "mf", "backbone": "mf", "dim": 8, "train": {"epochs_base": 3, "epochs_block": 2}}],
       "student": {"dim": 4, "train": {"epochs_base": 3, "epochs_block": 2}},
       "distill": {"terms": [{"name": "rrd", "k": 5, "pool": 20, "uninteresting": 5}]},
       "eval": {"ks": [10, 20]}, "snapshots": {"dir": "runs/held"}}


def test_held_out_pairs_are_never_trained_on_and_evaluate_reports_them(tmp_path, monkeypatch, one_thread,
                                                                       local_snapshot):
    """A stream with a held-out share through the stages and a snapshot: the pairs no model may see exclude
    every held-out pair, the plan keeps its four shares in the catalog, and `ckd evaluate` reports each
    block's held-out figures (equal to ranking them directly) in a table and the JSON."""
    from typer.testing import CliRunner

    import continual_kd.cli as cli_module
    from continual_kd.continual import make_learners, run_stream_local
    from continual_kd.data.sources import open_source
    from continual_kd.stream import StreamStore

    monkeypatch.chdir(tmp_path)
    job = parse_job(JOB, "held.yaml")
    store = open_source(job.source)
    plan = store.ensure_plan(job.blocks.base_fraction, job.blocks.incremental, job.blocks.plan_split, job.seed)
    again = StreamStore.open(store.root).ensure_plan(0.5, 2, job.blocks.plan_split, job.seed)
    assert again.plan_id == plan.plan_id and again.split == pytest.approx((0.7, 0.1, 0.1, 0.1))
    seen = store.read_blocks(plan.plan_id, plan.num_blocks - 1)
    held = seen.split == HOLDOUT
    assert held.sum() > 100
    for k in range(plan.num_blocks):
        assert not (model_pairs_mask(seen, k) & held).any()
    learners = make_learners(job)
    run_stream_local(job, lambda k: store.read_blocks(plan.plan_id, k), plan.num_blocks, learners=learners)
    known = learners["student"].pairs.known(seen)
    keys = set(zip(known.users.tolist(), known.items.tolist()))
    assert not keys & set(zip(seen.users[held].tolist(), seen.items[held].tolist()))
    local_snapshot(tmp_path / "runs", job, plan, store, learners)
    monkeypatch.setenv("COLUMNS", "200")
    r = CliRunner().invoke(cli_module.app, ["evaluate", "--runs", str(tmp_path / "runs"), "--json", "-"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert "held-out part of each block" in r.stderr
    direct = learners["student"].evaluate(seen, list(range(plan.num_blocks)), job.eval, split=HOLDOUT)
    student = res["models"]["student"]
    for b in range(plan.num_blocks):
        assert student["blocks"][str(b)]["holdout_ndcg@20"] == pytest.approx(direct[b]["ndcg@20"], abs=1e-6)
        assert student["blocks"][str(b)]["holdout_users"] == direct[b]["users"] > 0
        assert student["blocks"][str(b)]["holdout_ndcg@20"] != student["blocks"][str(b)]["ndcg@20"]
    assert student["mean"]["holdout_ndcg@20"] == pytest.approx(np.mean([direct[b]["ndcg@20"] for b in direct]))


def test_a_catalog_from_before_held_out_shares_gets_the_column_on_open_and_keeps_its_plans(tmp_path, monkeypatch):
    import duckdb

    from continual_kd.data.sources import open_source
    from continual_kd.stream import StreamStore, catalog

    monkeypatch.chdir(tmp_path)
    job = parse_job(JOB, "held.yaml")
    store = open_source(job.source)
    old = store.ensure_plan(0.5, 2, (0.8, 0.1, 0.1), 0)
    with duckdb.connect(str(store.root / catalog.CATALOG_FILE)) as con:  # as a catalog of session 19 was
        con.execute("ALTER TABLE plans DROP COLUMN split_holdout")
    store = StreamStore.open(store.root)
    assert store.ensure_plan(0.5, 2, (0.8, 0.1, 0.1), 0) == old  # the same plan, read back whole
    held = store.ensure_plan(0.5, 2, (0.7, 0.1, 0.1, 0.1), 0)
    assert held.plan_id != old.plan_id and held.split == pytest.approx((0.7, 0.1, 0.1, 0.1))
    assert (store.read_blocks(held.plan_id, 2).split == HOLDOUT).any()
