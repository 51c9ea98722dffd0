"""What a user looks at: tables that fit 80 columns, `--json -` alone on stdout, `ckd report`, and the
committed blocks' results as rows of the catalog (issue 15)."""

from __future__ import annotations

import base64
import json
import math

import duckdb
import pytest
from rich.console import Console

from continual_kd.stream import StreamStore
from continual_kd.tables import Column, fit_tables, model_labels

WIDTH = 80

TWO_TEACHERS = """
name: two
seed: 0
source:
  dataset: synthetic
  store: stores/two
  synthetic: {users: 150, items: 120, interactions: 3000, periods: 3, seed: 1}
blocks: {base_fraction: 0.5, incremental: 2}
teachers:
  - name: mf32
    backbone: mf
    dim: 32
    train: {epochs_base: 6, epochs_block: 3, batch_size: 512}
    resources: {num_cpus: 0.5}
  - name: lightgcn16
    backbone: lightgcn
    dim: 16
    layers: 1
    train: {epochs_base: 6, epochs_block: 3, batch_size: 512}
    resources: {num_cpus: 0.5}
student:
  dim: 8
  train: {epochs_base: 6, epochs_block: 3, batch_size: 512}
  resources: {num_cpus: 0.5}
distill: {terms: [{name: rrd, weight: 0.01, k: 10, pool: 30, uninteresting: 10}]}
eval: {ks: [10, 20]}
"""


def _render(tables, width: int = WIDTH) -> str:
    console = Console(width=width, record=True, emoji=False, color_system=None, file=open("/dev/null", "w"))
    for t in tables:
        console.print(t)
    return console.export_text()


# --------------------------------------------------------------------------------- pure table helpers


def test_fit_tables_splits_value_columns_so_each_table_fits():
    # key "student" (7 wide) + twelve "0.1234" columns: 1 + (7+3) + 9n ≤ 80 → 7 value columns per table
    values = [Column(f"b{i}", [f"0.{1000 + i}", f"0.{2000 + i}"]) for i in range(12)]
    tables = fit_tables("per block", [Column("model", ["mf", "student"], "left")], values, WIDTH)
    assert [len(t.columns) for t in tables] == [8, 6]  # the key column is repeated in each
    text = _render(tables)
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= WIDTH
    for i in range(12):  # every number whole
        assert f"0.{1000 + i}" in text and f"0.{2000 + i}" in text
    assert "per block (1/2)" in text and "per block (2/2)" in text
    # no width limit: one table
    assert len(fit_tables("t", [Column("model", ["mf"])], values, None)) == 1


def test_choices_rows_show_what_each_update_chose_per_block():
    from continual_kd.report import choices_rows

    history = [{"block": 0, "choice": {"student": {"best_epoch": 33, "epochs": 43, "valid_ndcg@20": 0.26124,
                                                   "fusion_popularity_beta": 0.008, "fusion_popularity_used": 1.0},
                                       "teacher:mf": {"best_epoch": 6, "epochs": 16}}},
               {"block": 1, "choice": {"student": {"best_epoch": 17, "epochs": 20, "fusion_popularity_beta": 0.011,
                                                   "fusion_popularity_used": 0.0, "teachers_left_out": 1.0,
                                                   "weight_power": -1.0}}}]
    rows = choices_rows(history, ["teacher:mf", "student"], {"teacher:mf": "mf", "student": "student"})
    assert rows == [["mf", "best epoch / run", "6 / 16", "—"],
                    ["student", "best epoch / run", "33 / 43", "17 / 20"],
                    ["student", "validation NDCG@20", "0.2612", "—"],
                    ["student", "fusion popularity β", "0.0080", "0.0110 (unused)"],
                    ["student", "teachers left out", "—", "1"],
                    ["student", "fusion weight power", "—", "∞"]]
    assert choices_rows([{"block": 0}], ["student"], {}) == []  # an old history without choices: no table


def test_model_labels_shorten_teachers_unless_they_collide():
    labels = model_labels(["teacher:mf", "teacher:student", "student", "teacher:"])
    assert labels == {"teacher:mf": "mf", "teacher:student": "teacher:student", "student": "student",
                      "teacher:": "teacher:"}


# --------------------------------------------------------------------------------- catalog results


def test_commit_writes_results_rows_nan_as_null_and_revoked_hidden(tmp_path):
    store = StreamStore.open(tmp_path / "s", create=True)
    results = {"student": {"ndcg@20": 0.25, "recall@20/tail": float("nan"), "stability/ndcg@20": None},
               "teacher:mf": {"ndcg@20": 0.5}}
    store.commit_block("job", "lin1", "plan", 0, 10, "runs/job/block-0000", "d0", results=results)
    store.commit_block("job", "lin1", "plan", 1, 20, "runs/job/block-0001", "d1",
                       results={"student": {"ndcg@20": 0.125}})
    rows = {(r["block"], r["model"], r["metric"]): r["value"] for r in store.results("job")}
    assert rows == {(0, "student", "ndcg@20"): 0.25, (0, "student", "recall@20/tail"): None,
                    (0, "student", "stability/ndcg@20"): None, (0, "teacher:mf", "ndcg@20"): 0.5,
                    (1, "student", "ndcg@20"): 0.125}
    assert store.revoke_commits("job", "lin1", 1, "test") == 1
    # read-only, as a user would with the duckdb CLI: the view shows active commits only ...
    con = duckdb.connect(str(tmp_path / "s" / "catalog.duckdb"), read_only=True)
    try:
        assert con.sql("SELECT block, value FROM results WHERE model = 'student' AND metric = 'ndcg@20'").fetchall() \
            == [(0, 0.25)]
        # ... the table keeps the revoked block's numbers for the record
        assert con.sql("SELECT count(*) FROM block_results").fetchall() == [(5,)]
    finally:
        con.close()


# --------------------------------------------------------------------------------- the CLI on a finished job


@pytest.fixture(scope="module")
def finished_job(ray_cluster, tmp_path_factory):
    """The two-teacher job submitted once with `--json -` in an 80-column console; (dir, CliRunner result)."""
    from typer.testing import CliRunner

    import continual_kd.cli as cli_module

    work = tmp_path_factory.mktemp("two")
    (work / "two.yaml").write_text(TWO_TEACHERS)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setattr(cli_module, "out", Console(width=WIDTH, emoji=False))
        mp.setattr(cli_module, "err", Console(stderr=True, width=WIDTH, emoji=False))
        result = CliRunner().invoke(cli_module.app, ["submit", "two.yaml", "--json", "-"])
    return work, result


@pytest.fixture
def ckd80(finished_job, monkeypatch):
    """Run ckd in the finished job's folder with 80-column consoles; returns the CliRunner result."""
    from typer.testing import CliRunner

    import continual_kd.cli as cli_module

    work, _ = finished_job
    monkeypatch.chdir(work)
    monkeypatch.setattr(cli_module, "out", Console(width=WIDTH, emoji=False))
    monkeypatch.setattr(cli_module, "err", Console(stderr=True, width=WIDTH, emoji=False))
    runner = CliRunner()
    return lambda *args: runner.invoke(cli_module.app, [str(a) for a in args])


def _fits(text: str) -> None:
    assert "…" not in text, text
    too_long = [line for line in text.splitlines() if len(line) > WIDTH]
    assert not too_long, too_long


@pytest.mark.slow
def test_submit_json_alone_on_stdout_and_tables_fit(finished_job):
    work, r = finished_job
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)  # nothing but the JSON on stdout
    history = payload["history"]
    assert [h["block"] for h in history] == [0, 1, 2]
    _fits(r.stderr)
    # the per-block table holds every model's NDCG@20 whole, under its short label, with a legend
    for h in history:
        for model, label in (("teacher:mf32", "mf32"), ("teacher:lightgcn16", "lightgcn16"), ("student", "student")):
            assert f"{h['metrics'][model]['ndcg@20']:.4f}" in r.stderr
    assert "mf32 = teacher:mf32" in r.stderr
    # seconds per stage are in the history (and the snapshot), in the order the stages ran
    assert list(history[1]["stages"]) == ["update teachers", "teacher knowledge", "update student", "evaluate"]
    assert all(s >= 0 for s in history[1]["stages"].values())
    assert sum(history[1]["stages"].values()) <= history[1]["seconds"] + 1e-6
    # the catalog holds the committed numbers, one row per (job, lineage, block, model, metric)
    con = duckdb.connect(str(work / "stores" / "two" / "catalog.duckdb"), read_only=True)
    try:
        rows = con.sql("SELECT block, model, value FROM results WHERE job = 'two' AND metric = 'hmean/ndcg@20' "
                       "ORDER BY block, model").fetchall()
    finally:
        con.close()
    expected = [(h["block"], m, h["continual"][m]["hmean/ndcg@20"]) for h in history for m in sorted(h["continual"])]
    assert [(b, m) for b, m, _ in rows] == [(b, m) for b, m, _ in expected]
    for (_, _, got), (_, _, want) in zip(rows, expected):
        assert (got is None and want is None) or math.isclose(got, want, rel_tol=1e-12)
    assert all(v is None for b, _, v in rows if b == 0)  # block 0 has no stability, so no H-mean


@pytest.mark.slow
def test_evaluate_and_status_fit_80_columns_and_json_is_alone(ckd80, finished_job):
    r = ckd80("evaluate", "--json", "-")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    _fits(r.stderr)
    for model, m in res["models"].items():
        for b in ("0", "1", "2"):  # Recall@20 and NDCG@20 of every block, whole
            for key in ("recall@20", "ndcg@20"):
                assert f"{m['blocks'][b][key]:.4f}" in r.stderr, (model, b, key)
        assert f"{m['parameters']:,}" in r.stderr
        for key in ("plasticity/ndcg@20", "stability/ndcg@20", "hmean/ndcg@20"):
            assert f"{m['continual'][key]:.4f}" in r.stderr
    r = ckd80("evaluate", "--wide")  # every K per block
    assert r.exit_code == 0 and "Recall@10" in r.stdout and "NDCG@10" in r.stdout
    r = ckd80("status", "--store", "stores/two", "--json", "-")
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert st["rows"] == 3000 and st["snapshots"] == {"two": [0, 1, 2]}
    _fits(r.stderr)
    assert st["segments"][0]["content_hash"][:12] in r.stderr and "3,000" in r.stderr
    r = ckd80("status", "--store", "stores/two", "--wide")
    assert r.exit_code == 0 and st["segments"][0]["content_hash"] in r.stdout.replace("\n", "").replace("│", "")


@pytest.mark.slow
def test_report_writes_pngs_and_one_self_contained_html(ckd80, finished_job):
    work, submitted = finished_job
    history = json.loads(submitted.stdout)["history"]
    r = ckd80("report", "--out", "rep/index.html", "--json", "-")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    html = (work / "rep" / "index.html").read_text()
    assert set(rep["pngs"]) == {"accuracy", "continual", "bias", "seconds"}
    for name, path in rep["pngs"].items():
        png = (work / path).read_bytes()
        assert path == f"rep/index-{name}.png" and png[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in html  # embedded: no server needed
    # plotted numbers are the history's; the teachers' ensemble is scored from every block's snapshot
    series = rep["series"]
    assert series["ndcg@20"]["student"] == [h["metrics"]["student"]["ndcg@20"] for h in history]
    assert len(series["ndcg@20"]["ensemble"]) == 3 and all(0 < v <= 1 for v in series["ndcg@20"]["ensemble"])
    assert series["continual/stability/ndcg@20"]["ensemble"][0] is None
    assert series["seconds/stage"]["evaluate"] == [h["stages"]["evaluate"] for h in history]
    # settings and the last block's numbers are on the page
    assert "lightgcn16" in html and "rank-fusion ensemble" in html and "keep_last" in html
    assert f"{history[-1]['metrics']['student']['ndcg@20']:.4f}" in html
    # what each update chose on validation, per block (the history's choice)
    assert "What each update chose on validation" in html
    assert f"<td>{history[0]['choice']['student']['best_epoch']} / {history[0]['choice']['student']['epochs']}</td>" in html


@pytest.mark.slow
def test_the_ensemble_notes_tell_a_pruned_snapshot_from_a_damaged_one(finished_job, tmp_path):
    import shutil

    from continual_kd.report import ensemble_history

    work, _ = finished_job
    runs = tmp_path / "two"
    shutil.copytree(work / "runs" / "two", runs)
    manifest = json.loads((runs / "block-0002" / "manifest.json").read_text())
    shutil.rmtree(runs / "block-0000")  # pruned (keep_last)
    (runs / "block-0001" / "manifest.json").unlink()  # damaged
    scored, notes = ensemble_history(runs, manifest, [0, 1, 2])
    assert sorted(scored) == [2]
    assert notes == ["ensemble at block 1 skipped: its snapshot block-0001 has no manifest (damaged)",
                     "ensemble not scored for block(s) 0: their snapshots were pruned (snapshots.keep_last)"]


@pytest.mark.slow
def test_status_names_damaged_snapshots(ckd80, finished_job, tmp_path):
    import shutil

    work, _ = finished_job
    runs = tmp_path / "runs"
    shutil.copytree(work / "runs", runs)
    (runs / "two" / "block-0001" / "manifest.json").unlink()
    student = runs / "two" / "block-0002" / "student.pt"
    data = bytearray(student.read_bytes())
    data[100] ^= 0xFF
    student.write_bytes(bytes(data))
    r = ckd80("status", "--store", "stores/two", "--runs", runs, "--json", "-")
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert st["snapshots"] == {"two": [0, 2]} and st["snapshots_damaged"] == {"two": {"1": "manifest.json missing"}}
    r = ckd80("status", "--store", "stores/two", "--runs", runs, "--verify", "--json", "-")
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert st["snapshots_damaged"] == {"two": {"1": "manifest.json missing", "2": "student.pt checksum mismatch"}}
    assert "damaged: 1 (manifest.json missing), 2 (student.pt checksum mismatch)" in r.stderr.replace("\n", " ")
