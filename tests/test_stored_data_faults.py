"""Stored data that proves itself, through the real CLI (issue 18): a skewed stream whose metrics are
undefined in some blocks, damaged segments, a full disk, a snapshot that does not fit, and an ingest
whose memory does not grow with the file. Every fault ends in one line and exit code 2."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from continual_kd.cli import app
from continual_kd.data.synthetic import SyntheticConfig, generate_stream
from continual_kd.stream import StreamStore

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(r, *needles: str) -> str:
    """The run ended in exit code 2 with exactly one `error:` line (no traceback) holding every needle."""
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def strict_json(path: Path):
    """Parse as strict JSON: NaN / Infinity are refused, as any standard parser would."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def nulls(tree, where: str = "") -> list[str]:
    """Paths of every null in a JSON tree."""
    if tree is None:
        return [where]
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in nulls(v, f"{where}/{k}")]
    if isinstance(tree, list):
        return [p for i, v in enumerate(tree) for p in nulls(v, f"{where}/{i}")]
    return []


JOB = """
name: {name}
seed: 0
source: {source}
blocks: {{base_fraction: 0.5, incremental: 2}}
teachers:
  - name: mf16
    backbone: mf
    dim: 16
    train: {{epochs_base: 3, epochs_block: 2, batch_size: 512}}
student:
  dim: 8
  train: {{epochs_base: 3, epochs_block: 2, batch_size: 512}}
distill: {{terms: [{{name: rrd, weight: 0.01, k: 5, pool: 10, uninteresting: 5}}]}}
eval: {{ks: [5, 20]}}
snapshots: {{dir: {runs}}}
"""


# ------------------------------------------------------------------ 1. a skewed stream finishes, with nulls


def test_skewed_stream_finishes_with_undefined_metrics_as_null(ray_cluster, tmp_path, monkeypatch, one_thread):
    """Few items and a steep popularity law: some popularity group has no test user in a block. The job
    finishes (before: ValueError … nan at block 0's snapshot, exit 1, every re-submit the same); the
    undefined metric is null in the manifest and --json, "–" in the tables, and means skip it."""
    monkeypatch.chdir(tmp_path)
    source = ("{dataset: synthetic, store: stores/skew, synthetic: {users: 60, items: 12, interactions: 300, "
              "periods: 3, popularity_exponent: 3.0, seed: 1}}")
    job = tmp_path / "skew.yaml"
    job.write_text(JOB.format(name="skew", source=source, runs="runs/skew"))
    r = run("submit", job, "--json", "out.json")
    assert r.exit_code == 0, r.output
    history = strict_json(tmp_path / "out.json")["history"]
    assert [h["block"] for h in history] == [0, 1, 2]
    undefined = nulls([h["metrics"] for h in history])
    assert undefined and all("/recall@" in p and p.rsplit("/", 1)[-1] in ("head", "mid", "tail", "eq0", "eq1", "eq2", "eq3") for p in undefined)
    manifest = strict_json(tmp_path / "runs/skew/block-0002/manifest.json")
    assert manifest["history"] == history and nulls(manifest["metrics"])
    assert "all 3 blocks already committed" in run("submit", job).output  # the re-submit is a no-op, exit 0

    r = run("evaluate", "--runs", "runs/skew", "--json", "ev.json")
    assert r.exit_code == 0, r.output
    assert not re.search(r"\bnan\b", r.output.lower())
    assert re.search(r"\d\.\d{4} \([12]/3\)", r.output)  # a mean that skips blocks says over how many it runs
    ev = strict_json(tmp_path / "ev.json")
    for model in ev["models"].values():
        for key, over in model["mean_blocks"].items():  # a mean says over how many blocks it runs
            defined = [b[key] for b in model["blocks"].values() if b.get(key) is not None]
            assert over == len(defined)
            assert model["mean"][key] == (pytest.approx(sum(defined) / len(defined)) if defined else None)
    assert any(n < 3 for m in ev["models"].values() for n in m["mean_blocks"].values())
    r = run("evaluate", "--runs", "runs/skew", "--snapshot", "0", "--json", "ev0.json")  # no stability at block 0
    assert r.exit_code == 0 and "–" in r.output and not re.search(r"\bnan\b", r.output.lower()), r.output
    assert nulls(strict_json(tmp_path / "ev0.json"))


# ------------------------------------------------------------------ a small real store built from two files


@pytest.fixture(scope="module")
def stored(ray_cluster, tmp_path_factory):
    """A store ingested from two CSV files (the second repeats a row of the first: a stored duplicate),
    and a job run on it to the end (snapshots to evaluate / serve). Tests that damage it restore it."""
    where = tmp_path_factory.mktemp("stored")
    table = generate_stream(SyntheticConfig(users=150, items=120, interactions=3000, periods=3, seed=1))
    first, second = table.slice(0, 1800), table.slice(1800)
    second = pa.concat_tables([second, first.slice(5, 1)])  # a copy of a stored row
    pacsv.write_csv(first, where / "a.csv")
    pacsv.write_csv(second, where / "b.csv")
    store = where / "store"
    for f in ("a.csv", "b.csv"):
        r = run("ingest", where / f, "--store", store)
        assert r.exit_code == 0, r.output
    assert "1 × duplicate of stored row" in r.output
    source = f"{{dataset: store, store: {store}}}"
    (where / "job.yaml").write_text(JOB.format(name="served", source=source, runs=where / "runs" / "served"))
    (where / "fresh.yaml").write_text(JOB.format(name="fresh", source=source, runs=where / "runs" / "fresh"))
    cwd = os.getcwd()
    os.chdir(where)
    try:
        r = run("submit", where / "job.yaml")
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    return {"dir": where, "store": store, "runs": where / "runs" / "served", "user": first.column("user")[0].as_py()}


def _truncate(f: Path) -> str:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "bytes, the catalog recorded"


def _delete(f: Path) -> str:
    f.unlink()
    return "the file is missing"


def _drop_rows(f: Path) -> str:  # rewritten as valid Parquet with 10% of its rows gone
    t = pq.read_table(f)
    pq.write_table(t.slice(0, t.num_rows - t.num_rows // 10), f, compression="zstd")
    return "the catalog recorded"


def _flip_a_byte(f: Path) -> str:  # same size, same footer: only the checksum tells
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x01
    f.write_bytes(bytes(data))
    return "sha256 checksum differs"


@pytest.mark.parametrize("damage", [_truncate, _delete, _drop_rows, _flip_a_byte],
                         ids=["truncated", "deleted", "rows-removed", "byte-flipped"])
def test_a_damaged_segment_is_named_refused_and_rewritten_by_re_ingesting_its_source(stored, tmp_path, monkeypatch,
                                                                                       damage):
    monkeypatch.chdir(tmp_path)
    store, runs = stored["store"], stored["runs"]
    before = StreamStore.open(store).fingerprint()
    segment = next((store / "segments").glob("seg-000002-*.parquet"))
    what = damage(segment)
    cheap = damage is not _flip_a_byte  # size or rows differ: every read notices
    try:
        r = run("status", "--store", store, "--runs", tmp_path, "--verify", "--json", "st.json")
        one_error_line(r, "seg-000002", what, "ckd ingest", "b.csv")
        problems = {s["id"]: s["problem"] for s in strict_json(tmp_path / "st.json")["segments"]}
        assert problems[1] is None and what in problems[2]
        r = run("status", "--store", store, "--runs", tmp_path)
        if cheap:  # before: exit 0, nothing said
            one_error_line(r, "seg-000002", what)
            one_error_line(run("evaluate", "--runs", runs), "seg-000002", what)  # before: a DuckDB traceback
            one_error_line(run("recommend", "--runs", runs, "--user", stored["user"]), "seg-000002")
            one_error_line(run("submit", stored["dir"] / "fresh.yaml"), "seg-000002", what)
        else:
            assert r.exit_code == 0, r.output
        r = run("ingest", stored["dir"] / "b.csv", "--store", store)
        assert r.exit_code == 0 and "was rewritten" in r.output, r.output
    finally:
        if StreamStore.open(store).fingerprint() != before:  # leave the shared store whole
            run("ingest", stored["dir"] / "b.csv", "--store", store)
    r = run("status", "--store", store, "--runs", tmp_path, "--verify")
    assert r.exit_code == 0 and "verified 2 segments" in r.output, r.output
    assert StreamStore.open(store).fingerprint() == before  # byte for byte what was committed


def test_a_repair_that_does_not_reproduce_the_segment_changes_nothing(stored):
    store = stored["store"]
    before = StreamStore.open(store).fingerprint()
    segment = next((store / "segments").glob("seg-000002-*.parquet"))
    original = segment.read_bytes()
    _truncate(segment)
    try:  # the same bytes read with other column options give other rows: refused, nothing replaced
        r = run("ingest", stored["dir"] / "b.csv", "--store", store, "--time-col", "weight")
        one_error_line(r, "Cannot rewrite segment", "do not match")
        assert segment.stat().st_size == len(original) // 2
    finally:
        segment.write_bytes(original)
    assert StreamStore.open(store).fingerprint() == before


# ------------------------------------------------------------------ 4. a snapshot file that does not fit


def _copy_runs(stored, tmp_path: Path) -> Path:
    runs = tmp_path / "served"
    shutil.copytree(stored["runs"], runs)
    return runs


def _replace_file(block_dir: Path, filename: str, data: bytes) -> None:
    """Put ``data`` in place of ``filename`` and record its checksum in the manifest, as a careful hand would."""
    import hashlib

    (block_dir / filename).write_bytes(data)
    manifest = json.loads((block_dir / "manifest.json").read_text())
    manifest["files"][filename] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (block_dir / "manifest.json").write_text(json.dumps(manifest))


def _saved(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class NotATensor:  # torch.load(weights_only=True) refuses to build it
    pass


@pytest.mark.parametrize("content, needle", [
    (lambda w: {k: torch.zeros(v.shape[0], 16) if v.ndim == 2 else v for k, v in w.items()}, "does not fit"),
    (lambda w: {**w, "extra": NotATensor()}, "cannot be loaded as plain tensors"),
    (lambda w: [v for v in w.values()], "does not hold a state dict"),
], ids=["other-shapes", "weights-only-refuses", "not-a-dict"])
def test_a_snapshot_that_loads_but_does_not_fit_is_refused_in_one_line(stored, tmp_path, content, needle):
    runs = _copy_runs(stored, tmp_path)
    block = runs / "block-0002"
    weights = torch.load(block / "student.pt", weights_only=True)
    _replace_file(block, "student.pt", _saved(content(weights)))
    line = one_error_line(run("evaluate", "--runs", runs, "--snapshot", "2"), "student.pt", needle)
    if needle == "does not fit":
        assert "×16, expected" in line and "×8" in line
    one_error_line(run("recommend", "--runs", runs, "--snapshot", "2", "--user", stored["user"]), "student.pt")


# ------------------------------------------------------------------ 3. a full disk, a read-only folder


@contextmanager
def small_tmpfs(where: Path, size: str, read_only: bool = False):
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs here ({done.stderr.decode().strip() or 'not root'}); the full-disk "
                    f"tests need one")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(where: Path) -> Path:
    """Fill the file system of ``where`` to the last byte with one file; → that file."""
    filler = where / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_a_full_disk_under_the_snapshots_ends_in_one_line_and_the_job_resumes(stored, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with small_tmpfs(tmp_path / "runs", "2m") as runs:
        job = tmp_path / "full.yaml"
        job.write_text(JOB.format(name="full", source=f"{{dataset: store, store: {stored['store']}}}", runs=runs))
        filler = fill(runs)
        r = run("submit", job)  # before: an OSError traceback
        one_error_line(r, "Cannot write the snapshot", str(runs / "block-0000"), "No space left",
                       "ckd submit")
        assert not [p for p in runs.iterdir() if p.name.startswith((".tmp", "block"))]  # nothing half-written
        assert StreamStore.open(stored["store"]).committed_blocks("full") == []
        filler.unlink()
        r = run("submit", job)
        assert r.exit_code == 0, r.output
        assert [c["block"] for c in StreamStore.open(stored["store"]).committed_blocks("full")] == [0, 1, 2]


def test_a_full_disk_under_the_store_ends_in_one_line_and_the_ingest_works_after(tmp_path, monkeypatch):
    """8 MiB: the catalog alone takes 2 MiB. Staging, segment or catalog: whichever write meets the full disk
    ends in one line, the store is unchanged, and the same ingest works once space is freed."""
    monkeypatch.chdir(tmp_path)
    csv = "user,item,timestamp\n" + "".join(f"u{i % 97},i{i % 89},{1_600_000_000 + i}\n" for i in range(20_000))
    (tmp_path / "a.csv").write_text(csv)
    (tmp_path / "b.csv").write_text(csv.replace("\nu", "\nv"))
    with small_tmpfs(tmp_path / "disk", "8m") as disk:
        store = disk / "store"
        assert run("ingest", tmp_path / "a.csv", "--store", store).exit_code == 0
        before = StreamStore.open(store).fingerprint()
        filler = fill(disk)
        one_error_line(run("ingest", tmp_path / "b.csv", "--store", store), str(store), "No space left")
        assert not any((store / ".staging").iterdir())
        assert [p.name for p in (store / "segments").iterdir()] == [p.name for p in (store / "segments").glob("seg-*")]
        filler.unlink()
        assert StreamStore.open(store).fingerprint() == before
        r = run("ingest", tmp_path / "b.csv", "--store", store)
        assert r.exit_code == 0 and "20,000 rows taken" in r.output, r.output
        assert StreamStore.open(store).status()["rows"] == 40_000


def test_a_read_only_snapshot_folder_ends_in_one_line(stored, tmp_path):
    runs = tmp_path / "ro"
    job = tmp_path / "ro.yaml"
    job.write_text(JOB.format(name="ro", source=f"{{dataset: store, store: {stored['store']}}}", runs=runs))
    if os.geteuid() == 0:  # root writes into a folder without write permission: a file system mounted read-only
        with small_tmpfs(runs, "1m", read_only=True):
            one_error_line(run("submit", job), str(runs))
        return
    runs.mkdir()
    runs.chmod(0o500)
    try:
        one_error_line(run("submit", job), str(runs))
    finally:
        runs.chmod(0o700)


# ------------------------------------------------------------------ 5. ingest memory bounded by the batch


def _peak_mib(path: Path, store: Path) -> float:
    """Peak RSS of a `ckd ingest` process with small batches and a small DuckDB memory budget."""
    code = ("import resource, sys\n"
            "import continual_kd.stream.ingest as ingest, continual_kd.stream.store as store\n"
            "ingest.BATCH_ROWS, ingest.CSV_BLOCK_BYTES, store.INGEST_MEMORY_LIMIT = 20_000, 1 << 19, '64MB'\n"
            "from continual_kd.cli import app\n"
            "try:\n"
            "    app(['ingest', sys.argv[1], '--store', sys.argv[2]])\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path), str(store)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return float(done.stdout.strip().splitlines()[-1])


def test_ingest_memory_is_bounded_by_the_batch_not_the_file(tmp_path):
    """10× the rows, nearly the same peak memory: 100k rows 281 MiB, 1M rows 327-352 MiB here (the interpreter
    with pyarrow, DuckDB, Typer is ~250 of it; the catalog's ids grow too). Before, the whole file was in memory
    (~16× its size): 281 → 451 MiB, 1.61×."""
    def write(n: int) -> Path:
        path = tmp_path / f"{n}.csv"
        with open(path, "w") as f:
            f.write("user,item,timestamp,rating\n")
            f.writelines(f"user-{i * 7919 % (n // 8)},item-{i * 104729 % 5000},{1_500_000_000 + i},{i % 5 + 1}\n"
                         for i in range(n))
        return path

    small, large = write(100_000), write(1_000_000)
    peak_small, peak_large = _peak_mib(small, tmp_path / "s1"), _peak_mib(large, tmp_path / "s2")
    assert StreamStore.open(tmp_path / "s2").status()["rows"] == 1_000_000
    assert peak_large <= 1.4 * peak_small, (peak_small, peak_large)


def test_batches_change_nothing_duplicates_across_batches_and_quarantine_order(tmp_path, monkeypatch):
    """The same input ingested in 3-row batches and in one batch gives the same store, byte for byte:
    duplicates across batch boundaries, stored duplicates, new ids in order of time, quarantine rows."""
    import continual_kd.stream.ingest as ingest

    rows = ["user,item,timestamp,rating",
            "u2,i1,300,4", "u1,i2,200,5", " u2 ,i1,300,4", "u3,,400,1", "u1,i2,200,5",  # dups across batches
            "u4,i3,100,2", "u5,i4,yesterday,3", "u4,i3,100,2", "u6,i5,50,nan", "u7,i1,350,1"]
    (tmp_path / "in.csv").write_text("\n".join(rows) + "\n")
    pq.write_table(pacsv.read_csv(tmp_path / "in.csv", convert_options=pacsv.ConvertOptions(
        column_types={"user": pa.string(), "item": pa.string(), "timestamp": pa.string(), "rating": pa.string()})),
        tmp_path / "in.parquet")
    prints = {}
    for batch_rows, block in [(3, 64), (1 << 18, 1 << 23)]:
        monkeypatch.setattr(ingest, "BATCH_ROWS", batch_rows)
        monkeypatch.setattr(ingest, "CSV_BLOCK_BYTES", block)
        for fmt in ("csv", "parquet"):
            store = tmp_path / f"store-{batch_rows}-{fmt}"
            (tmp_path / "seed.csv").write_text("user,item,timestamp\nu7,i1,350\n")  # a stored row: u7,i1,350 w=1
            assert run("ingest", tmp_path / "seed.csv", "--store", store).exit_code == 0
            r = run("ingest", tmp_path / f"in.{fmt}", "--store", store)
            assert r.exit_code == 0, r.output
            st = StreamStore.open(store)
            quarantine = [{k: v for k, v in x.items() if k != "source"} for x in st.quarantine()]
            prints[(batch_rows, fmt)] = (quarantine, st.external_ids("user", list(range(st.num_users))),
                                         pq.read_table(sorted((store / "segments").glob("seg-000002-*"))[0]))
    (q, users, seg), *others = prints.values()
    assert all(o == (q, users, seg) for o in others)
    assert [(x["row_number"], x["reason"]) for x in q] == [
        (3, "duplicate row"), (4, "missing item id"), (5, "duplicate row"), (7, "unparseable timestamp"),
        (8, "duplicate row"), (9, "non-finite weight"), (10, "duplicate of stored row")]
    assert users == ["u7", "u4", "u1", "u2"]  # new ids in order of first appearance in time
    assert seg.column("offset").to_pylist() == [1, 2, 3] and seg.column("ts").to_pylist() == [300, 200, 100]
