"""Calibration on a missing-at-random labelled sample (a model's `calibrate: mar`): the simulator's uniform
sample, its ingest into the store and its arrival with the blocks (only what was collected by then), the fit
on hand-made cases, and a calibrated model's ranking — evaluated, handed over and kept in its snapshot."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from continual_kd.config import EvalSpec, ModelSpec, TrainSpec, parse_job
from continual_kd.continual.calibrate import calibrate
from continual_kd.continual.learner import Learner
from continual_kd.data.simulate import SimulationConfig, simulate, uniform_sample, write_simulation
from continual_kd.errors import CkdError
from continual_kd.stream import StreamStore
from continual_kd.stream.labelled import ingest_labelled_file

SIM = dict(users=300, items=200, clicks=6_000, periods=3, dim=8, seed=4)


def _dense(table, column):
    return np.array([int(x[1:]) for x in table.column(column).to_pylist()])


def test_the_uniform_sample_shows_items_uniformly_and_labels_them_by_the_truth():
    _, truth = simulate(SimulationConfig(**SIM))
    per_user = 60
    sample = uniform_sample(truth, per_user, seed=4)
    u, i = _dense(sample, "user"), _dense(sample, "item")
    label = sample.column("label").to_numpy()
    ts = sample.column("timestamp").to_numpy()
    assert np.array_equal(np.bincount(u, minlength=truth.num_users), np.full(truth.num_users, per_user))
    cfg = truth.config
    period = np.minimum((ts - cfg["start_ts"]) // cfg["period_seconds"], cfg["periods"] - 1)
    assert np.all(truth.item_birth[i] <= period) and np.all(truth.user_arrival[u] <= period)  # both existed then
    # uniform, not by exposure: items of period 0 are shown about equally often (a Zipf log is far from it)
    old = truth.item_birth == 0
    counts = np.bincount(i, minlength=truth.num_items)[old]
    assert counts.std() / counts.mean() < 0.35
    # labelled with the truth's preference at the time: the click rate matches its expectation
    pref = np.array([truth.preference(np.array([uu]), int(p))[0, ii] for uu, ii, p in zip(u[:3000], i[:3000],
                                                                                          period[:3000])])
    assert abs(label[:3000].mean() - pref.mean()) < 4 * np.sqrt(pref.mean() / 3000)
    assert uniform_sample(truth, per_user, seed=4).equals(sample)  # seeded


def _hidden_quality_case(n_items=60, rows=20_000, seed=0):
    """Scores that follow popularity; labels that follow a quality the scores do not know."""
    g = torch.Generator().manual_seed(seed)
    popularity = torch.arange(n_items, 0, -1).double() ** 2  # item 0 the most popular
    quality = torch.randn(n_items, generator=g, dtype=torch.float64)
    items = torch.randint(n_items, (rows,), generator=g)
    scores = torch.log1p(popularity)[items].float() + 0.01 * torch.randn(rows, generator=g)
    labels = torch.bernoulli(torch.sigmoid(2 * quality[items] - 1), generator=g)
    return scores, items, labels, popularity, quality


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@pytest.mark.parametrize("rows", [5_000, 20_000])
def test_calibration_finds_the_quality_the_scores_miss(rows):
    scores, items, labels, popularity, quality = _hidden_quality_case(rows=rows)
    vector, info = calibrate(scores, items, labels, popularity, len(popularity), (0.3, 1.0, 3.0))
    assert info["rows"] == len(labels) and info["l2"] in (0.3, 1.0, 3.0)
    assert 0 < info["a"] < 0.1  # the scores know nothing the labels use: the item offsets decide
    ranked = torch.log1p(popularity).float() - vector  # what the model ranks by once calibrated
    assert abs(_spearman(torch.log1p(popularity), quality)) < 0.3  # the raw ranking knows nothing of quality
    assert _spearman(ranked, quality) > 0.8
    assert abs(_spearman(ranked, torch.log1p(popularity))) < 0.4  # and it is not popularity again
    # scores that carry half of what the labels follow keep their weight, and the rest is found
    g = torch.Generator().manual_seed(2)
    half = torch.randn(len(quality), generator=g, dtype=torch.float64)
    truth = 2 * quality + 2 * half
    labels = torch.bernoulli(torch.sigmoid(truth[items] - 1), generator=g)
    vector, info = calibrate(half[items].float(), items, labels, popularity, len(popularity), (1.0,))
    assert info["a"] > 0.3
    assert _spearman(half.float() - vector, truth) > 0.85 > _spearman(half, truth) + 0.1
    # too few rows, or one label value only: nothing fitted
    assert calibrate(scores[:5], items[:5], labels[:5], popularity, 60, (1.0,))[0] is None
    assert calibrate(scores, items, torch.zeros(len(scores)), popularity, 60, (1.0,))[0] is None


@pytest.mark.parametrize("rows", [300, 3000])
def test_a_sample_that_says_nothing_beyond_the_scores_leaves_the_ranking_as_it_is(rows):
    g = torch.Generator().manual_seed(0)
    items = torch.randint(0, 60, (rows,), generator=g)
    popularity = torch.randint(0, 500, (60,), generator=g).float()
    scores = torch.randn(rows, generator=g)
    labels = torch.bernoulli(torch.sigmoid(2 * scores - 1), generator=g)  # the labels follow the scores alone
    vector, info = calibrate(scores, items, labels, popularity, 60, (0.3, 1.0, 3.0, 10.0, 30.0))
    assert info["kept"] == "scores" and info["l2"] is None
    assert info["log_loss"]["none"] < min(v for k, v in info["log_loss"].items() if k != "none")
    assert torch.equal(vector, torch.zeros(60))  # installed: replaces an earlier calibration, ranks as the model does


def _store_with_sample(tmp_path, timestamps=True):
    stream, _, _ = write_simulation(tmp_path / "sim", SimulationConfig(**SIM), uniform_per_user=10)
    store = StreamStore.open(tmp_path / "store", create=True)
    store.ingest_file(stream)
    sample = pq.read_table(tmp_path / "sim" / "uniform.parquet")
    if not timestamps:
        sample = sample.drop(["timestamp"])
        pq.write_table(sample, tmp_path / "sim" / "uniform.parquet")
    report = ingest_labelled_file(store, tmp_path / "sim" / "uniform.parquet")
    return store, sample, report


def test_the_sample_is_stored_once_and_arrives_with_the_blocks_collected_by_then(tmp_path):
    store, sample, report = _store_with_sample(tmp_path)
    assert report.rows_taken == sample.num_rows == 10 * SIM["users"] and not report.already_ingested
    assert ingest_labelled_file(store, tmp_path / "sim" / "uniform.parquet").already_ingested  # the same file: no-op
    from continual_kd.stream.labelled import labelled_status

    positives = int((sample.column("label").to_numpy() > 0).sum())
    assert labelled_status(store) == {"ingests": 1, "rows": sample.num_rows, "positives": positives}
    plan = store.ensure_plan(0.5, 2, (0.8, 0.1, 0.1), 0)
    ts = sample.column("timestamp").to_numpy()
    ext_u, ext_i = sample.column("user").to_pylist(), sample.column("item").to_pylist()
    sizes = []
    for k in range(plan.num_blocks):
        seen = store.read_blocks(plan.plan_id, k)
        users, items, labels = seen.meta["labelled"]
        info = plan.blocks[k]
        # the rows collected by the block's end whose user and item the stream has shown by then
        known_u = set(store.external_ids("user", np.arange(info.num_users)))
        known_i = set(store.external_ids("item", np.arange(info.num_items)))
        expected = [t <= info.ts_end and u in known_u and i in known_i for t, u, i in zip(ts, ext_u, ext_i)]
        assert len(users) == sum(expected) > 0
        assert users.max() < seen.num_users and items.max() < seen.num_items
        assert set(np.unique(labels)) <= {0.0, 1.0}
        sizes.append(len(users))
    assert sizes[0] < sizes[1] < sizes[2] <= sample.num_rows
    # external ids map to the store's dense ids: the pairs read back are pairs of the file
    pairs = set(zip(store.external_ids("user", users), store.external_ids("item", items)))
    assert pairs <= set(zip(ext_u, ext_i))


def test_rows_without_a_time_count_from_the_first_block_and_bad_files_are_refused(tmp_path):
    store, sample, _ = _store_with_sample(tmp_path, timestamps=False)
    plan = store.ensure_plan(0.5, 2, (0.8, 0.1, 0.1), 0)
    users, _, _ = store.read_blocks(plan.plan_id, 0).meta["labelled"]
    known_u = set(store.external_ids("user", np.arange(plan.blocks[0].num_users)))
    known_i = set(store.external_ids("item", np.arange(plan.blocks[0].num_items)))
    expected = sum(u in known_u and i in known_i for u, i in zip(sample.column("user").to_pylist(),
                                                                sample.column("item").to_pylist()))
    assert len(users) == expected > 0.8 * sample.num_rows  # not held back by time: only by ids unknown yet
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,rating\nu1,i1,1\n")
    with pytest.raises(CkdError, match=r"bad\.csv: no column 'label'"):
        ingest_labelled_file(store, bad)
    import continual_kd.cli as cli_module

    r = CliRunner().invoke(cli_module.app, ["ingest-labelled", str(bad), "--store", str(store.root)])
    assert r.exit_code == 2 and "bad.csv" in r.output
    words = tmp_path / "words.csv"
    words.write_text("user,item,label\nu1,i1,yes\n")
    with pytest.raises(CkdError, match="label column is not numeric"):
        ingest_labelled_file(store, words)
    some = tmp_path / "some.csv"  # a CSV whose label column has some text: those rows are dropped and counted
    some.write_text("user,item,label\nu1,i1,1\nu1,i2,five\nu2,i1,0\n")
    r = ingest_labelled_file(store, some)
    assert (r.rows_read, r.rows_taken, r.rows_dropped, r.positives) == (3, 2, 1, 1)
    header = tmp_path / "header.csv"
    header.write_text("user,item,label\n")
    r = CliRunner().invoke(cli_module.app, ["ingest-labelled", str(header), "--store", str(store.root)])
    assert r.exit_code == 2 and "header.csv: the file has no rows" in r.output
    holes = tmp_path / "holes.parquet"  # rows without a user, a label or a time are dropped and counted
    pq.write_table(pa.table({"user": ["u1", None, "u2", "u3"], "item": ["i1", "i2", "i3", "i4"],
                             "label": [1.0, 0.0, None, 1.0], "timestamp": [1_600_000_000, 1, 2, None]}), holes)
    r = ingest_labelled_file(store, holes)
    assert (r.rows_read, r.rows_taken, r.rows_dropped, r.rows_known) == (4, 1, 3, 1)
    # ratings: a label ≥ positive is a 1; ids read as `ckd ingest` reads them (trimmed); times in milliseconds
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("user,item,label,timestamp\n u1 ,i1,5,1600000000000\nu1,i2,2,1600000000000\n")
    r = ingest_labelled_file(store, ratings, positive=4)
    assert (r.rows_taken, r.positives, r.rows_known) == (2, 1, 2)
    with store._connect(write=False) as con:
        rows = con.sql("SELECT \"user\", item, label, ts FROM labelled l JOIN labelled_ingests g USING (ingest_id) "
                       "WHERE g.source LIKE '%ratings.csv' ORDER BY item").fetchall()
    assert rows == [("u1", "i1", 1.0, 1_600_000_000), ("u1", "i2", 0.0, 1_600_000_000)]


def test_a_calibrated_model_ranks_by_its_calibration_everywhere_and_keeps_it(tmp_path):
    store, _, _ = _store_with_sample(tmp_path)
    plan = store.ensure_plan(0.5, 1, (0.8, 0.1, 0.1), 0)
    seen = store.read_blocks(plan.plan_id, 1)
    train = TrainSpec(epochs_base=3, epochs_block=1, select="last", batch_size=256)
    plain = Learner(ModelSpec(name="m", backbone="mf", dim=8, train=train), seed=0)
    calibrated = Learner(ModelSpec(name="m", backbone="mf", dim=8, train=train, calibrate="mar"), seed=0)
    logs = {}
    for key, learner in (("plain", plain), ("calibrated", calibrated)):
        learner.update(store.read_blocks(plan.plan_id, 0), 0)
        logs[key] = learner.update(seen, 1)
    assert "calibration" not in logs["plain"]
    cal = logs["calibrated"]["calibration"]
    assert cal["rows"] == len(seen.meta["labelled"][0]) and cal["a"] > 0 and cal["l2"] in ModelSpec().calibrate_l2
    # the same weights (training never sees the calibration), a different ranking wherever it ranks
    for a, b in zip(plain.model.state_dict().values(), calibrated.model.state_dict().values()):
        assert torch.equal(a, b)
    users = torch.arange(20)
    assert not torch.equal(plain.model.full_scores(users), calibrated.model.full_scores(users))
    assert not np.array_equal(plain.knowledge(seen, 1, 20).items, calibrated.knowledge(seen, 1, 20).items)
    assert plain.evaluate(seen, [1], EvalSpec(ks=[20])) != calibrated.evaluate(seen, [1], EvalSpec(ks=[20]))
    # a snapshot ranks as the job did
    again = Learner(calibrated.spec, seed=0)
    again.load(calibrated.state())
    assert torch.equal(again.model.full_scores(users), calibrated.model.full_scores(users))
    # one ranking, one adjustment: a popularity penalty beside it is refused
    with pytest.raises(CkdError, match="calibrate"):
        parse_job({"name": "j", "student": {"calibrate": "mar", "rank_penalty": [0.1]}}, "job.yaml")


@pytest.mark.slow
def test_under_ray_the_sample_travels_with_the_blocks_and_calibrates_as_in_process(ray_cluster, tiny_job, tmp_path):
    """`calibrate: mar` on a teacher and the student, a labelled sample in the store: the Ray actors get it
    with the blocks and rank exactly as the in-process stages do; the snapshot holds the calibration."""
    import math

    from continual_kd.continual import run_stream_local
    from continual_kd.data.sources import open_source
    from continual_kd.runtime.coordinator import run_job
    from continual_kd.snapshots import resolve_snapshot

    job = _with_calibration(tiny_job("cal"))
    store = open_source(job.source)
    seen = store.read_blocks(store.ensure_plan(job.blocks.base_fraction, job.blocks.incremental, job.blocks.split,
                                               job.seed).plan_id, job.blocks.incremental)
    g = np.random.default_rng(0)  # a sample over the stream's ids and times: labels follow a hidden item quality
    users = g.integers(0, seen.num_users, 3000)
    items = g.integers(0, seen.num_items, 3000)
    quality = g.standard_normal(seen.num_items)
    path = tmp_path / "uniform.csv"
    pa_table = pa.table({"user": store.external_ids("user", users), "item": store.external_ids("item", items),
                         "label": (g.random(3000) < 1 / (1 + np.exp(-(2 * quality[items] - 1)))).astype(np.int8),
                         "timestamp": g.integers(int(seen.ts.min()), int(seen.ts.max()) + 1, 3000)})
    import pyarrow.csv as pacsv

    pacsv.write_csv(pa_table, path)
    ingest_labelled_file(store, path)
    ray_result = run_job(job)
    local = run_stream_local(job, lambda k: store.read_blocks(ray_result.plan.plan_id, k), ray_result.plan.num_blocks)
    assert [r.block for r in local] == [r.block for r in ray_result.results] == list(range(ray_result.plan.num_blocks))
    for a, b in zip(local, ray_result.results):
        assert set(a.metrics) == set(b.metrics)
        for model in a.metrics:
            for key, value in a.metrics[model].items():
                other = b.metrics[model][key]
                assert (math.isnan(value) and math.isnan(other)) or math.isclose(value, other, rel_tol=1e-5,
                                                                                 abs_tol=1e-7), (a.block, model, key)
        for model in ("student", "teacher:mf32"):
            assert a.updates[model]["calibration"]["rows"] == b.updates[model]["calibration"]["rows"] > 0
    sizes = [r.updates["student"]["calibration"]["rows"] for r in local]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]  # more of the sample by each later block
    weights = resolve_snapshot(ray_result.runs_dir, "latest")[0].load_states()["student"]
    assert "aux.rank_penalty" in weights and float(weights["aux.rank_penalty"].abs().sum()) > 0


def _with_calibration(path):
    text = path.read_text()
    text = text.replace("student:\n", "student:\n  calibrate: mar\n").replace("    backbone: mf\n",
                                                                            "    backbone: mf\n    calibrate: mar\n", 1)
    path.write_text(text)
    from continual_kd.config import load_job

    return load_job(path)


def test_a_file_read_again_with_another_positive_replaces_its_labels_and_a_nan_threshold_is_refused(tmp_path):
    store = StreamStore.open(tmp_path / "store", create=True)
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("user,item,label\nu1,i1,5\nu1,i2,3\nu2,i1,4\nu2,i3,1\n")
    import continual_kd.cli as cli_module

    r = CliRunner().invoke(cli_module.app, ["ingest-labelled", str(ratings), "--store", str(tmp_path / "store"),
                                            "--positive", "nan"])
    assert r.exit_code == 2 and "--positive nan" in r.output and "Traceback" not in r.output
    from continual_kd.stream.labelled import labelled_status

    assert labelled_status(store)["rows"] == 0
    first = ingest_labelled_file(store, ratings)  # the default threshold 1: every rating is a positive
    assert (first.positives, first.relabelled) == (4, False)
    assert ingest_labelled_file(store, ratings).already_ingested  # the same file, the same labels: nothing added
    again = ingest_labelled_file(store, ratings, positive=4)  # the fix the warning asks for
    assert (again.already_ingested, again.relabelled, again.positives) == (False, True, 2)
    assert labelled_status(store) == {"ingests": 1, "rows": 4, "positives": 2}  # replaced, not counted twice
    assert ingest_labelled_file(store, ratings, positive=3.5).already_ingested  # {≥ 3.5} = {≥ 4} here
