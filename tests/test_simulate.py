"""The simulator with known truth: its clicks follow its own truth (click rate by popularity decile), its
knobs move the log the way they say, and its files are what `ckd ingest` and `ckd evaluate --truth` read."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from continual_kd.data.simulate import SimulationConfig, load_truth, simulate, write_simulation
from continual_kd.errors import CkdError

SMALL = dict(users=400, items=300, clicks=6_000, periods=3, dim=8, seed=5)


def _dense(table, prefix):
    return np.array([int(x[1:]) for x in table.column(prefix).to_pylist()])


def test_clicks_follow_the_truth_by_popularity_decile():
    table, truth = simulate(SimulationConfig(**SMALL))
    assert abs(table.num_rows - 6_000) < 4 * np.sqrt(6_000)  # c was solved for the expected clicks
    items = _dense(table, "item")
    observed = np.bincount(items, minlength=300).astype(float)
    expected = truth.expected_clicks(np.arange(400)).sum(0)  # (I,) θ_i · Σ_u E_t[pref]
    order = np.argsort(-truth.propensity, kind="stable")  # most exposed first
    for decile in np.array_split(order, 10):
        obs, exp = observed[decile].sum(), expected[decile].sum()
        assert abs(obs - exp) < 4 * np.sqrt(exp) + 5, (obs, exp)
    # exposure follows the propensity: shown to θ_i of the users on average
    shown = truth.exposures / 400
    assert abs(shown[order[:30]].mean() - truth.propensity[order[:30]].mean()) < 0.05
    # the log over-shows popular items: top decile of propensity holds far more clicks than the bottom one
    assert observed[order[:30]].sum() > 5 * observed[order[-30:]].sum()
    # no pair is clicked twice, timestamps are ordered, users and items are named as the truth names them
    pairs = _dense(table, "user") * 300 + items
    assert len(np.unique(pairs)) == len(pairs)
    ts = table.column("timestamp").to_numpy()
    assert np.all(np.diff(ts) >= 0)
    # items are clicked only after their birth
    born = SimulationConfig(**SMALL).start_ts + truth.item_birth[items] * SimulationConfig().period_seconds
    assert np.all(ts >= born)


def test_knobs_move_the_log():
    skewed = simulate(SimulationConfig(**{**SMALL, "exposure_skew": 2.0}))[1]
    flat = simulate(SimulationConfig(**{**SMALL, "exposure_skew": 0.0}))[1]
    assert np.ptp(flat.propensity) < 1e-9 and skewed.propensity.max() / skewed.propensity.min() > 15
    aligned = simulate(SimulationConfig(**{**SMALL, "quality_popularity": 1.0}))[1]
    assert np.corrcoef(aligned.item_quality, np.log(aligned.propensity))[0, 1] > 0.8
    static = simulate(SimulationConfig(**{**SMALL, "drift": 0.0}))[1]
    assert np.allclose(static.user_factors[0], static.user_factors[-1])
    moving = simulate(SimulationConfig(**{**SMALL, "drift": 0.5}))[1]
    assert not np.allclose(moving.user_factors[0], moving.user_factors[-1], atol=0.05)
    with pytest.raises(CkdError, match="quality_popularity"):
        SimulationConfig(quality_popularity=2.0)
    with pytest.raises(CkdError, match="fewer than clicks"):
        simulate(SimulationConfig(users=20, items=20, clicks=190, offset=-8.0))


def test_files_round_trip_and_ingest(tmp_path):
    from continual_kd.stream import StreamStore

    stream, truth_path, n = write_simulation(tmp_path / "sim", SimulationConfig(**SMALL), "parquet")
    assert pq.read_table(stream).column_names == ["user", "item", "timestamp"] and n > 0
    truth = load_truth(tmp_path / "sim")
    again = simulate(SimulationConfig(**SMALL))[1]  # seeded: the same world
    assert np.array_equal(truth.item_factors, again.item_factors)
    assert truth.preference(np.arange(3)).shape == (3, 300)
    assert np.all((truth.preference(np.arange(3)) > 0) & (truth.preference(np.arange(3)) < 1))
    store = StreamStore.open(tmp_path / "store", create=True)
    report = store.ingest_file(stream)
    assert store.num_users == len(set(pq.read_table(stream).column("user").to_pylist()))
    # every simulated click is a valid, distinct row (each item is shown to a user once): nothing quarantined
    assert (report.rows_read, report.rows_taken, report.rows_quarantined) == (n, n, 0)
    assert report.new_items == len(set(pq.read_table(stream).column("item").to_pylist()))
    with pytest.raises(CkdError, match="not a simulator's truth"):
        load_truth(stream)
    (tmp_path / "job.yaml").write_text("name: x\n")  # a text file np.load would take for a pickle
    with pytest.raises(CkdError, match=r"not an \.npz archive\); give the truth\.npz") as e:
        load_truth(tmp_path / "job.yaml")
    assert "pickle" not in str(e.value)
    csv, _, n_csv = write_simulation(tmp_path / "csv", SimulationConfig(**SMALL), "csv")
    assert csv.suffix == ".csv" and n_csv == n


def test_evaluate_a_snapshot_against_the_truth(tmp_path, monkeypatch, one_thread, local_snapshot):
    """A simulated stream → store → models trained in-process → snapshot → `ckd evaluate --truth`: the
    truth figures, the pooled figure, the estimates and the mask are in the table and the JSON."""
    import json

    from typer.testing import CliRunner

    import continual_kd.cli as cli_module
    from continual_kd.config import parse_job
    from continual_kd.continual import make_learners, run_stream_local
    from continual_kd.stream import StreamStore

    stream, truth_path, _ = write_simulation(tmp_path / "sim", SimulationConfig(
        users=120, items=80, clicks=1500, periods=3, dim=4, seed=2))
    store = StreamStore.open(tmp_path / "store", create=True)
    store.ingest_file(stream)
    job = parse_job({"name": "sim", "source": {"dataset": "store", "store": str(tmp_path / "store")},
                     "blocks": {"incremental": 1},
                     "teachers": [{"name": "mf8", "backbone": "mf", "dim": 8,
                                   "train": {"epochs_base": 2, "epochs_block": 1}}],
                     "student": {"dim": 4, "train": {"epochs_base": 2, "epochs_block": 1}},
                     "distill": {"terms": []}, "eval": {"ks": [5, 10]}})
    plan = store.ensure_plan(0.5, 1, (0.8, 0.1, 0.1), job.seed)
    learners = make_learners(job)
    run_stream_local(job, lambda k: store.read_blocks(plan.plan_id, k), plan.num_blocks, learners=learners)
    local_snapshot(tmp_path / "runs", job, plan, store, learners)
    monkeypatch.setenv("COLUMNS", "200")
    r = CliRunner().invoke(cli_module.app, ["evaluate", "--runs", str(tmp_path / "runs"), "--truth", str(truth_path),
                                            "--json", "-", "--ips-exponent", "0"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["mask"] == "standard" and res["mask_label"] == "train + valid masked"
    seen = store.read_blocks(plan.plan_id, plan.num_blocks - 1)
    assert res["pooled_users"] == len(np.unique(seen.users[seen.split == 2]))
    # the share recomputed here from the truth's own ids (u<k>, i<k>) and the snapshot's student, train + valid masked
    import torch

    from continual_kd.continual.snapshot_eval import learners_from_snapshot
    from continual_kd.snapshots import resolve_snapshot

    truth = load_truth(truth_path)
    row = np.array([int(u[1:]) for u in store.external_ids("user", np.arange(store.num_users))])
    col = np.array([int(i[1:]) for i in store.external_ids("item", np.arange(store.num_items))])
    model = learners_from_snapshot(resolve_snapshot(tmp_path / "runs" / "sim", "latest")[0])["student"].model
    users = np.unique(seen.users[seen.split == 0])
    with torch.no_grad():
        scores = model.full_scores(torch.as_tensor(users)).numpy().astype(np.float64)
    pref = truth.preference(row[users])[:, col].astype(np.float64)
    masked = np.zeros_like(scores, dtype=bool)
    known = np.isin(seen.users, users) & (seen.split != 2)
    masked[np.searchsorted(users, seen.users[known]), seen.items[known]] = True
    scores[masked], best = -np.inf, np.where(masked, -np.inf, pref)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    share = np.take_along_axis(pref, top, 1).sum(1) / -np.sort(-best, axis=1)[:, :10].sum(1)
    assert res["models"]["student"]["truth"]["truth_users"] == len(users)
    assert res["models"]["student"]["truth"]["truth_share@10"] == pytest.approx(share.mean(), rel=1e-5)
    for name, m in res["models"].items():
        assert 0 < m["truth"]["truth_share@10"] <= 1 and m["truth"]["truth_users"] > 0
        assert 0 <= m["truth"]["truth_ndcg@5"] <= 1
        for part in [m["pooled"], *m["blocks"].values()]:  # exponent 0: the estimates are the logged figures
            assert part["ips_ndcg@10"] == pytest.approx(part["ndcg@10"], rel=1e-6)
            assert 0 <= part["iv_recall@10"] <= 1
    assert "pooled: every block's test pairs as one test set (train + valid masked)" in r.stderr
    assert "against the truth" in r.stderr
    old = CliRunner().invoke(cli_module.app, ["evaluate", "--runs", str(tmp_path / "runs"), "--mask", "all_seen",
                                              "--json", "-"])
    assert old.exit_code == 0 and json.loads(old.stdout)["mask"] == "all_seen"
    bad = CliRunner().invoke(cli_module.app, ["evaluate", "--runs", str(tmp_path / "runs"), "--mask", "none"])
    assert bad.exit_code == 2 and "--mask 'none'" in bad.output
    # the truth of another simulation with the same ids (u0, i0, …): its arrivals and births contradict the store
    _, other, _ = write_simulation(tmp_path / "other", SimulationConfig(users=120, items=80, clicks=1500, periods=3,
                                                                        dim=4, seed=3))
    wrong = CliRunner().invoke(cli_module.app, ["evaluate", "--runs", str(tmp_path / "runs"), "--truth", str(other)])
    assert wrong.exit_code == 2 and "the truth of another simulation" in wrong.output, wrong.output
