"""The ``ckd`` command line: thin wrappers over the packages, Rich output, exit code 2 on user errors.

Set ``CKD_DEBUG=1`` to see the traceback behind an error message.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import string
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import CkdError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="continual-kd: continual knowledge distillation for recommenders, on Ray.")
data_app = typer.Typer(no_args_is_help=True, help="Build a stream store from a dataset.")
app.add_typer(data_app, name="data")

out = Console(emoji=False)  # no :name: → emoji replacement in ids and paths either
err = Console(stderr=True, emoji=False)


def _e(value) -> str:
    """Any user-supplied value (id, path, source, name, message) as Rich text that prints as-is."""
    return escape(str(value))


class _EscapingFormatter(string.Formatter):
    def format_field(self, value, format_spec: str) -> str:
        return _e(format(value, format_spec))


def _m(template: str, *values) -> str:
    """Rich markup from a trusted ``template`` whose ``{}`` fields are filled with escaped ``values``."""
    return _EscapingFormatter().format(template, *values)

StoreOpt = Annotated[Path, typer.Option("--store", help="Stream store directory.", envvar="CKD_STORE")]
RunsOpt = Annotated[Path, typer.Option("--runs", help="Directory holding the jobs' snapshot folders.", envvar="CKD_RUNS")]


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _guard(fn):
    """Turn a CkdError into one red line on stderr and exit code 2 (CKD_DEBUG=1 keeps the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CkdError as e:
            if os.environ.get("CKD_DEBUG"):
                raise
            err.print(_m("[bold red]error:[/] {}", e), highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:  # the environment, not a bug: a full disk, a read-only folder, no permission
            if os.environ.get("CKD_DEBUG") or e.errno not in _ENVIRONMENT_ERRNOS:
                raise
            err.print(_m("[bold red]error:[/] {} ({}); free space or fix the permissions, then run the command "
                         "again (`ckd submit` resumes after the last committed block).",
                         e.strerror or e, e.filename or "a file it writes"), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _fmt(v: float | None, digits: int = 4) -> str:
    """A metric; an undefined one (None / NaN) shows as "–"."""
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _write_json(path: Optional[Path], payload) -> None:
    """``--json``: strict JSON (an undefined metric is null, never NaN), to stdout for '-'."""
    from .eval.metrics import undefined_as_none

    if path is None:
        return
    text = json.dumps(undefined_as_none(payload), indent=2, default=str, allow_nan=False)
    if str(path) == "-":
        sys.stdout.write(text + "\n")
        return
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise CkdError(f"--json {path}: cannot write it ({e.strerror or e}); choose a writable path "
                       f"with free space") from None


WideOpt = Annotated[bool, typer.Option("--wide", help="More metrics; each table whole at its natural width "
                                                        "(a narrow terminal wraps it).")]


def _human(json_path: Optional[Path]) -> Console:
    """Where the tables and messages go: stderr when ``--json -`` keeps stdout for the JSON alone."""
    return err if json_path is not None and str(json_path) == "-" else out


def _print_tables(console: Console, tables: list, legend: str | None, wide: bool) -> None:
    """Tables built by ``tables.py`` (they fit ``console.width`` unless ``wide``), then the legend."""
    from .tables import natural_width

    for t in tables:
        need = natural_width(t)
        if wide and need > console.width:  # print whole; the terminal wraps the lines, nothing is cut
            Console(file=console.file, width=need, emoji=False, force_terminal=console.is_terminal,
                    no_color=console.no_color).print(t)
        else:
            console.print(t)
    if legend:
        console.print(_m("[dim]{}[/]", legend))


# ---------------------------------------------------------------------------------------- ingest / data


def _print_report(r) -> None:
    if r.already_ingested:
        out.print(_m("[yellow]{}[/]: already ingested (content {}); store unchanged", r.source, r.content_hash[:12]))
        return
    if r.repaired:
        out.print(_m("[bold]{}[/]: already ingested; its damaged segment {} was rewritten from it ({:,} rows, "
                     "matching the size and checksum recorded at commit)", r.source, r.segment_id, r.rows_taken))
        return
    out.print(_m("[bold]{}[/]: {:,} rows taken, {:,} quarantined ({:,} new users, {:,} new items){}", r.source,
                 r.rows_taken, r.rows_quarantined, r.new_users, r.new_items,
                 f", segment {r.segment_id}" if r.segment_id is not None else ""))
    for reason, n in sorted(r.reasons.items()):
        out.print(_m("  quarantined: {:,} × {}", n, reason))


@app.command()
@_guard
def ingest(
    files: Annotated[list[Path], typer.Argument(help="CSV/TSV/Parquet files with user, item, timestamp columns.")],
    store: StoreOpt,
    user_col: Annotated[str, typer.Option(help="Name of the user id column.")] = "user",
    item_col: Annotated[str, typer.Option(help="Name of the item id column.")] = "item",
    time_col: Annotated[str, typer.Option(help="Name of the timestamp column.")] = "timestamp",
    weight_col: Annotated[Optional[str], typer.Option(help="Name of a rating/weight column (default: 'weight' or 'rating' if present).")] = None,
):
    """Validate and append interaction files to a stream store (bad rows are quarantined with a reason)."""
    from .stream import ColumnMap, StreamStore

    st = StreamStore.open(store, create=True)
    cols = ColumnMap(user=user_col, item=item_col, timestamp=time_col, weight=weight_col)
    for f in files:
        _print_report(st.ingest_file(f, cols))


@data_app.command("movielens-100k")
@_guard
def data_movielens(store: StoreOpt = Path("stores/ml-100k")):
    """MovieLens-100K (943 users, 1,682 items, 100k rated interactions with timestamps)."""
    from .data.sources import build_store

    _, report = build_store("movielens-100k", store)
    _print_report(report)


@data_app.command("synthetic")
@_guard
def data_synthetic(
    store: StoreOpt = Path("stores/synthetic"),
    users: int = 2000, items: int = 1000, interactions: int = 60000, periods: int = 6,
    popularity_exponent: float = 1.0, drift: float = 0.3, new_user_fraction: float = 0.3,
    new_item_fraction: float = 0.3, seed: int = 0,
):
    """A seeded stream with power-law item popularity, taste drift and users/items arriving later."""
    from .config import SyntheticSpec, parse_spec
    from .data.sources import build_store

    spec = parse_spec(SyntheticSpec, dict(users=users, items=items, interactions=interactions, periods=periods,
                                          popularity_exponent=popularity_exponent, drift=drift,
                                          new_user_fraction=new_user_fraction, new_item_fraction=new_item_fraction,
                                          seed=seed), "ckd data synthetic")
    _, report = build_store("synthetic", store, spec)
    _print_report(report)


# ---------------------------------------------------------------------------------------- submit


class _BlockProgress:
    """Rich progress: one bar over the blocks, its description naming the running stage."""

    def __init__(self, console: Console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=False)
        self.task = None

    def __call__(self, e: dict) -> None:
        kind = e["type"]
        if kind == "plan":
            plan = e["plan"]
            self.console.print(_m("block plan {}: {} blocks ({} rows), running {}..{}", plan.plan_id, plan.num_blocks,
                                  ", ".join(f"{b.rows:,}" for b in plan.blocks), e["start"], e["end"] - 1))
            self.bar.start()
            self.task = self.bar.add_task("starting", total=e["end"] - e["start"])
        elif kind == "ray":
            dash = f", dashboard http://{e['dashboard']}" if e.get("dashboard") else ""
            self.console.print(_m("Ray at {}{}", e["address"], dash))
        elif kind == "stage" and self.task is not None:
            self.bar.update(self.task, description=f"block {e['block']}: {e['stage']}")
        elif kind == "block" and self.task is not None:
            r = e["result"]
            ndcg = [k for m in r.metrics.values() for k in m if k.startswith("ndcg@") and "/" not in k]
            key = "ndcg@20" if "ndcg@20" in ndcg or not ndcg else ndcg[0]  # the job's eval.ks may lack 20
            from .tables import model_labels

            labels = model_labels(r.metrics)  # teacher:<name> → <name>: a block's line fits 80 columns
            cells = "  ".join(f"{labels[n]} {_fmt(m.get(key))}" for n, m in r.metrics.items())
            self.bar.console.print(_m("block {} ({:.1f}s) {}: {}", r.block, r.seconds, key.replace("ndcg", "NDCG"),
                                      cells))
            self.bar.advance(self.task)
        elif kind in ("info", "warning"):
            style = "yellow" if kind == "warning" else "dim"
            self.console.print(_m(f"[{style}]{{}}[/]", e["message"]))

    def stop(self) -> None:
        self.bar.stop()


@app.command()
@_guard
def submit(
    job_file: Annotated[Path, typer.Argument(help="Job spec (YAML), e.g. jobs/stream.yaml.")],
    address: Annotated[Optional[str], typer.Option(help="Ray cluster to join (host:port); default: an embedded local Ray.", envvar="CKD_RAY_ADDRESS")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Discard this job's snapshots and start from block 0.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue after the last snapshot (also the default when one exists).")] = False,
    max_blocks: Annotated[Optional[int], typer.Option(help="Run at most this many blocks now (resume later).")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the per-block metrics as JSON ('-' for stdout).")] = None,
    wide: WideOpt = False,
    dashboard_host: Annotated[str, typer.Option(help="Interface of the embedded Ray dashboard. Anything but 127.0.0.1 exposes it (and job submission) to the network; token auth stays on.")] = "127.0.0.1",
    node_ip_address: Annotated[Optional[str], typer.Option(help="Address of this machine the embedded Ray binds all its ports to (GCS, raylet, object manager, metrics); default 127.0.0.1, this machine only. Another address exposes the cluster to that network; token auth stays on.")] = None,
):
    """Run the stream: every block updates the teachers, distils into the student, evaluates, snapshots."""
    from .config import load_job
    from .runtime.coordinator import run_job

    if restart and resume:
        raise CkdError("--restart and --resume contradict each other; pass one")
    job = load_job(job_file)
    if dashboard_host not in ("127.0.0.1", "localhost", "::1"):
        if address:
            raise CkdError("--dashboard-host only applies to the embedded Ray; drop it when using --address")
        err.print(_m("[yellow]warning:[/] the Ray dashboard will listen on {}:8265: anyone who can ", dashboard_host) +
                  "reach it and holds the token in ~/.ray/auth_token can see this job and submit code to run here")
    if node_ip_address:
        from .runtime.cluster import check_node_ip_address, is_loopback

        if address:
            raise CkdError("--node-ip-address only applies to the embedded Ray; drop it when using --address")
        node_ip_address = check_node_ip_address(node_ip_address)
        if not is_loopback(node_ip_address):
            err.print(_m("[yellow]warning:[/] the embedded Ray will listen on {} (GCS, raylet, object store, metrics): "
                         "anyone on that network who holds the token in ~/.ray/auth_token can run code here",
                         node_ip_address))
    console = _human(json_path)
    progress = _BlockProgress(console)
    try:
        result = run_job(job, address=address, restart=restart, progress=progress, max_blocks=max_blocks,
                         dashboard_host=dashboard_host, node_ip_address=node_ip_address)
    finally:
        progress.stop()
    if result.history:
        from .tables import history_tables

        _print_tables(console, *history_tables(result.history, console.width, wide), wide)
    console.print(_m("snapshots: {}  (evaluate with `ckd evaluate --snapshot latest`)", result.runs_dir))
    _write_json(json_path, {"job": job.name, "plan_id": result.plan.plan_id, "history": result.history})


# ---------------------------------------------------------------------------------------- evaluate / status


def _find_job_runs(runs: Path, job: Optional[str]) -> Path:
    """The snapshot folder of ``job`` under ``runs`` (or the only / most recently written one)."""
    from .snapshots import list_snapshots

    if job is not None:
        if job in ("", ".", "..") or "/" in job or "\\" in job or job.startswith("."):
            raise CkdError(f"--job {job!r}: give a job name (the name: in its job file), not a path; "
                           f"it is looked up under --runs {runs}")
        d = runs / job
        if not list_snapshots(d):
            raise CkdError(f"{d}: no snapshots of job {job!r}; run `ckd submit` for it first")
        return d
    if list_snapshots(runs):  # --runs points at a job's snapshot folder itself
        return runs
    candidates = [d for d in runs.iterdir() if d.is_dir() and list_snapshots(d)] if runs.is_dir() else []
    if not candidates:
        raise CkdError(f"{runs}: no snapshots found; run `ckd submit JOB.yaml` here first or pass --runs DIR")
    return max(candidates, key=lambda d: d.stat().st_mtime)


@app.command()
@_guard
def evaluate(
    snapshot: Annotated[str, typer.Option(help="'latest' or a block number.")] = "latest",
    runs: RunsOpt = Path("runs"),
    job: Annotated[Optional[str], typer.Option(help="Job name when --runs holds several jobs.")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the metrics as JSON ('-' for stdout).")] = None,
    wide: WideOpt = False,
):
    """Full-ranking metrics of every model in a snapshot, on the test part of every block seen so far."""
    from .continual.snapshot_eval import evaluate_snapshot
    from .snapshots import resolve_snapshot
    from .stream import StreamStore

    which: str | int = snapshot
    if snapshot != "latest":
        if not snapshot.isdigit():
            raise CkdError(f"--snapshot {snapshot!r}: use 'latest' or a block number such as 3")
        which = int(snapshot)
    job_dir = _find_job_runs(runs, job)
    snap, warnings = resolve_snapshot(job_dir, which)
    for w in warnings:
        err.print(_m("[yellow]warning:[/] {}", w))
    m = snap.manifest
    store = StreamStore.open(m["store"])
    seen = store.read_blocks(m["plan_id"], snap.block)
    res = evaluate_snapshot(snap, seen)
    from .tables import evaluate_tables

    console = _human(json_path)
    _print_tables(console, *evaluate_tables(res, m["job"], snap.block, console.width, wide), wide)
    _write_json(json_path, {"snapshot": str(snap.path), "warnings": warnings, **res})


@app.command()
@_guard
def recommend(
    user: Annotated[list[str], typer.Option("--user", help="External user id (repeat for several users).")],
    snapshot: Annotated[str, typer.Option(help="'latest' or a block number.")] = "latest",
    runs: RunsOpt = Path("runs"),
    job: Annotated[Optional[str], typer.Option(help="Job name when --runs holds several jobs.")] = None,
    k: Annotated[int, typer.Option("-k", help="How many items per user.")] = 10,
    model: Annotated[str, typer.Option(help="Which model serves: student (default) or teacher:<name>.")] = "student",
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the lists as JSON ('-' for stdout).")] = None,
):
    """Serve a snapshot's student: the top-k unseen items for each --user (external ids in and out)."""
    from .continual.snapshot_eval import recommend_from_snapshot
    from .snapshots import resolve_snapshot
    from .stream import StreamStore

    if k < 1:
        raise CkdError(f"-k: must be at least 1, got {k}")
    which: str | int = int(snapshot) if snapshot.isdigit() else snapshot
    if which != "latest" and not isinstance(which, int):
        raise CkdError(f"--snapshot {snapshot!r}: use 'latest' or a block number such as 3")
    snap, warnings = resolve_snapshot(_find_job_runs(runs, job), which)
    for w in warnings:
        err.print(_m("[yellow]warning:[/] {}", w))
    store = StreamStore.open(snap.manifest["store"])
    dense = store.dense_ids("user", user)
    seen = store.read_blocks(snap.manifest["plan_id"], snap.block)
    if (dense >= seen.num_users).any():
        raise CkdError(f"--user: {user[int((dense >= seen.num_users).argmax())]!r} first appears after block "
                       f"{snap.block}; use a later snapshot")
    items, scores = recommend_from_snapshot(snap, seen, dense, k, model)
    names = store.external_ids("item", items.flatten().numpy())
    payload = {}
    t = Table(title=_m("{} @ block-{:04d}: top-{}", model, snap.block, k))
    t.add_column("user", overflow="fold")
    t.add_column("items (best first)", overflow="fold")
    for row, u in enumerate(user):
        ids = names[row * items.shape[1] : (row + 1) * items.shape[1]]
        payload[u] = [{"item": i, "score": float(sc)} for i, sc in zip(ids, scores[row].tolist())]
        t.add_row(_e(u), _e(", ".join(ids)))
    _human(json_path).print(t)
    _write_json(json_path, {"snapshot": str(snap.path), "model": model, "recommendations": payload})


@app.command()
@_guard
def status(
    store: StoreOpt = Path("stores/ml-100k"),
    runs: RunsOpt = Path("runs"),
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the status as JSON ('-' for stdout).")] = None,
    wide: WideOpt = False,
    verify: Annotated[bool, typer.Option("--verify", help="Also check every segment's sha256 checksum against the "
                                                          "catalog (reads every segment; size and row count are "
                                                          "always checked).")] = False,
):
    """Segments, blocks, quarantine counts of a store, and the snapshots under --runs; exit code 2 when a
    segment does not match what the catalog recorded."""
    from .snapshots import list_snapshots
    from .stream import StreamStore
    from .tables import segment_tables

    out = _human(json_path)  # this command's human output (stderr under --json -)
    st = StreamStore.open(store)
    s = st.status()
    if verify:
        checked = {seg["id"]: seg["problem"] for seg in st.segment_problems(checksum=True)}
        for seg in s["segments"]:
            seg["problem"] = checked.get(seg["id"], seg.get("problem"))
    out.print(_m("[bold]store {}[/]: {:,} interactions, {:,} users, {:,} items, {} segments", store, s["rows"],
                 s["users"], s["items"], len(s["segments"])))
    _print_tables(out, segment_tables(s["segments"], out.width, wide), None, wide)
    q = s.get("quarantine", {})
    out.print(_m("quarantine: {}", ", ".join(f"{n:,} × {r}" for r, n in q.items()) if q else "empty"))
    for plan in s.get("plans", []):
        out.print(_m("plan {}: {}", plan["plan_id"], ", ".join(f"b{b['index']}={b['rows']:,}" for b in plan["blocks"])))
    commits = st.commit_summary()
    for c in commits:
        out.print(_m("job {} (lineage {}): committed blocks {}{}", c["job"], c["lineage"],
                     ", ".join(map(str, c["blocks"])) or "none", f"; {c['revoked']} revoked" if c["revoked"] else ""))
    s["commits"] = commits
    snaps = {}
    if runs.is_dir():
        for d in sorted(runs.iterdir()):
            blocks = list_snapshots(d) if d.is_dir() else []
            if blocks:
                snaps[d.name] = blocks
                out.print(_m("snapshots {}: blocks {}", d, ", ".join(map(str, blocks))))
    _write_json(json_path, {**s, "snapshots": snaps, "verified": verify})
    damaged = [seg for seg in s["segments"] if seg.get("problem")]
    if damaged:  # named after the overview, in one line, exit code 2
        from .stream.segments import damaged_error

        first = damaged[0]
        raise damaged_error(st.root, first["path"], first["source"], first["problem"], len(damaged) - 1)
    if verify:
        out.print(_m("verified {} segments: size, rows and sha256 checksum match the catalog", len(s["segments"])))


@app.command()
@_guard
def report(
    runs: RunsOpt = Path("runs"),
    job: Annotated[Optional[str], typer.Option(help="Job name when --runs holds several jobs.")] = None,
    out_path: Annotated[Optional[Path], typer.Option("--out", help="report.html (PNGs beside it as "
                                                     "report-<plot>.png) or a folder; default reports/<job>/.")] = None,
    ensemble: Annotated[bool, typer.Option(help="Score the teachers' rank-fusion ensemble from each block's "
                                                "snapshot still on disk.")] = True,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the plotted numbers and file paths as "
                                                                     "JSON ('-' for stdout).")] = None,
):
    """Plots of a job's stream (accuracy, plasticity/stability, popularity bias, seconds per stage) as PNGs
    and one self-contained HTML page, from the newest snapshot's history."""
    from .report import write_report

    job_dir = _find_job_runs(runs, job)
    console = _human(json_path)
    rep = write_report(job_dir, out_path if out_path is not None else Path("reports") / job_dir.name, ensemble)
    for note in rep.notes:
        err.print(_m("[yellow]note:[/] {}", note), soft_wrap=True)
    console.print(_m("report: {}", rep.html), soft_wrap=True)
    for name, path in rep.pngs.items():
        console.print(_m("  {}: {}", name, path), soft_wrap=True)
    _write_json(json_path, {"job": job_dir.name, "html": str(rep.html), "pngs": {n: str(p) for n, p in rep.pngs.items()},
                            "notes": rep.notes, "series": rep.series})


def main() -> None:
    app()


if __name__ == "__main__":
    main()
