"""A fixed benchmark split as a source (dataset files): one block whose splits are exactly the files'
rows, one id map across the three files, one clear error per bad file; submit and evaluate on it."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from continual_kd.config import parse_job
from continual_kd.data.sources import open_source, source_plan
from continual_kd.errors import CkdError
from continual_kd.types import TEST, TRAIN, VALID


def _write_csv(path, header, rows):
    path.write_text(header + "\n" + "".join(f"{u},{i}\n" for u, i in rows))
    return path


def _split(n_users=24, n_items=30, per_user=10, seed=0):
    """Each user: per_user distinct items, the first 8 train, then 1 valid, 1 test (external ids as text)."""
    rng = np.random.default_rng(seed)
    train, valid, test = [], [], []
    for u in range(n_users):
        items = rng.choice(n_items, per_user, replace=False)
        rows = [(f"u{u}", f"i{i}") for i in items]
        train += rows[:-2]
        valid.append(rows[-2])
        test.append(rows[-1])
    return train, valid, test


def _files_job(tmp_path, train="train.csv", valid="valid.csv", test="test.parquet", extra=""):
    return parse_job({"name": "fixed", "source": {"dataset": "files", "train": str(tmp_path / train),
                                                  "valid": str(tmp_path / valid), "test": str(tmp_path / test),
                                                  "store": str(tmp_path / "stores" / "fixed")}})


@pytest.fixture
def split_files(tmp_path):
    train, valid, test = _split()
    _write_csv(tmp_path / "train.csv", "user_id,item_id", train)
    (tmp_path / "valid.csv").write_text("user\titem\n" + "".join(f"{u}\t{i}\n" for u, i in valid))  # tabs too
    pq.write_table(pa.table({"user": [u for u, _ in test], "item": [i for _, i in test]}), tmp_path / "test.parquet")
    return train, valid, test


def test_one_block_whose_splits_are_exactly_the_files_rows(tmp_path, split_files):
    train, valid, test = split_files
    job = _files_job(tmp_path)
    store = open_source(job.source)
    plan = source_plan(store, job)
    assert plan.num_blocks == 1 and plan.blocks[0].rows == len(train) + len(valid) + len(test)
    block = store.read_block(plan.plan_id, 0)
    assert set(np.unique(block.block)) == {0}
    users = store.external_ids("user", block.users)
    items = store.external_ids("item", block.items)
    for code, rows in ((TRAIN, train), (VALID, valid), (TEST, test)):
        mask = block.split == code
        got = sorted(zip(np.array(users)[mask], np.array(items)[mask]))
        assert got == sorted(rows)
    # one id map: a user's dense id is the same in every split; ids are dense 0..n-1 (train rows first)
    assert block.num_users == 24 and sorted(set(block.users.tolist())) == list(range(24))
    first_train = store.external_ids("user", [0])[0]
    assert first_train == train[0][0]
    # the same files again: the same store and plan (nothing re-ingested)
    again = open_source(job.source)
    assert source_plan(again, job).plan_id == plan.plan_id and again.status()["ingests"] == 3


def test_a_changed_file_is_refused_for_the_old_store(tmp_path, split_files):
    train, valid, test = split_files
    job = _files_job(tmp_path)
    open_source(job.source)
    _write_csv(tmp_path / "train.csv", "user,item", train[:-1])
    with pytest.raises(CkdError, match="lacks the rows"):
        open_source(job.source)


def test_default_store_is_named_after_the_files():
    a = parse_job({"source": {"dataset": "files", "train": "a.csv", "valid": "b.csv", "test": "c.csv"}})
    b = parse_job({"source": {"dataset": "files", "train": "a.csv", "valid": "b.csv", "test": "d.csv"}})
    assert a.source.store.startswith("stores/files-") and a.source.store != b.source.store
    assert parse_job(a.to_dict()).source.store == a.source.store  # a manifest's job reads back the same store


@pytest.mark.parametrize("case, match", [
    ("missing", r"source\.valid .*valid\.csv: the file does not exist"),
    ("no item column", r"source\.train .*train\.csv: no item column \(columns: user, thing\)"),
    ("empty id", r"source\.train .*train\.csv: row 2 \(line 3\) has no user id"),
    ("repeat in a file", r"source\.train .*train\.csv: rows 1 and 4 are the same pair \(user u0, item i1\)"),
    ("pair in two splits", r"source\.test .*test\.parquet: row 1 \(user u0, item i1\) is also row 1 of source\.train"),
    ("no rows", r"source\.valid .*valid\.csv: the file has no data rows"),
])
def test_bad_files_end_in_one_error_naming_the_file(tmp_path, case, match):
    train = [("u0", "i1"), ("u1", "i2"), ("u2", "i3")]
    _write_csv(tmp_path / "train.csv", "user,item", train)
    _write_csv(tmp_path / "valid.csv", "user,item", [("u0", "i2")])
    pq.write_table(pa.table({"user": ["u1"], "item": ["i1"]}), tmp_path / "test.parquet")
    if case == "missing":
        (tmp_path / "valid.csv").unlink()
    elif case == "no item column":
        _write_csv(tmp_path / "train.csv", "user,thing", train)
    elif case == "empty id":
        (tmp_path / "train.csv").write_text("user,item\nu0,i1\n ,i2\n")
    elif case == "repeat in a file":
        _write_csv(tmp_path / "train.csv", "user,item", train + [("u0", "i1")])
    elif case == "pair in two splits":
        pq.write_table(pa.table({"user": ["u0"], "item": ["i1"]}), tmp_path / "test.parquet")
    elif case == "no rows":
        (tmp_path / "valid.csv").write_text("user,item\n")
    with pytest.raises(CkdError, match=match):
        open_source(_files_job(tmp_path).source)
    assert not (tmp_path / "stores" / "fixed").exists()  # nothing was built


def test_cli_refuses_a_bad_split_file_in_one_line(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_csv(tmp_path / "train.csv", "user,item", [("u0", "i1")])
    _write_csv(tmp_path / "valid.csv", "user,item", [("u0", "i1")])
    _write_csv(tmp_path / "test.csv", "user,item", [("u0", "i2")])
    (tmp_path / "job.yaml").write_text("name: bad\nsource: {dataset: files, train: train.csv, valid: valid.csv, "
                                       "test: test.csv}\n")
    r = cli("submit", "job.yaml")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "source.valid valid.csv: row 1 (user u0, item i1) is also row 1 of source.train train.csv" in r.output


JOB = """
name: fixed
source: {{dataset: files, train: train.csv, valid: valid.csv, test: test.parquet}}
teachers:
  - {{name: mf16, backbone: mf, dim: 16, train: {{epochs_base: 6, batch_size: 64}}, resources: {{num_cpus: 0.5}}}}
student: {{dim: 4, train: {{epochs_base: 6, batch_size: 64}}, resources: {{num_cpus: 0.5}}}}
distill: {{terms: [{{name: rrd, k: 5, pool: 10, uninteresting: 5}}]}}
eval: {{ks: [10, 20]}}
{extra}"""


def test_submit_and_evaluate_on_a_fixed_split(ray_cluster, cli, tmp_path, split_files, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fixed.yaml").write_text(JOB.format(extra=""))
    r = cli("submit", "fixed.yaml", "--json", "run.json")
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "run.json").read_text())
    history = run.get("history") or run.get("blocks")
    assert [h["block"] for h in history] == [0]
    r = cli("evaluate", "--snapshot", "latest", "--json", "eval.json")
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["block"] == 0 and set(ev["models"]) == {"teacher:mf16", "student"}
    for model, res in ev["models"].items():  # evaluate reproduces the run's own numbers on the same split
        assert res["blocks"]["0"]["ndcg@20"] == pytest.approx(history[0]["metrics"][model]["ndcg@20"], rel=1e-5)
        assert 0 < res["blocks"]["0"]["recall@20"] <= 1
    assert (tmp_path / "stores").is_dir() and any(p.name.startswith("files-") for p in (tmp_path / "stores").iterdir())
