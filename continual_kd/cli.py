"""The ``ckd`` command line: thin wrappers over the packages, Rich output, exit code 2 on user errors.

Set ``CKD_DEBUG=1`` to see the traceback behind an error message.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import shutil
import signal
import string
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import CkdError
from .stopping import StopFlag, catch_stop_signals, restore_signals

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="continual-kd: continual knowledge distillation for recommenders, on Ray.")
data_app = typer.Typer(no_args_is_help=True, help="Build a stream store from a dataset.")
app.add_typer(data_app, name="data")
cluster_app = typer.Typer(no_args_is_help=True, help="A multi-node Ray cluster on this machine (head + worker raylets).")
app.add_typer(cluster_app, name="cluster")

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


# a path given to the command that cannot be what it must be: a file where a folder is needed (or the reverse), a
# missing parent, a name too long
_PATH_ERRNOS = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.ENAMETOOLONG}
_INTERRUPTED = StopFlag()  # not a threading.Event: a handler setting one can deadlock (stopping.py)


def _on_sigint(signum, frame) -> None:
    _INTERRUPTED.set()  # whatever a library makes of the KeyboardInterrupt (DuckDB: "query interrupted"), it was ^C
    signal.default_int_handler(signum, frame)


def _guard(fn):
    """Turn a CkdError into one red line on stderr and exit code 2 (CKD_DEBUG=1 keeps the traceback); an error of
    the environment or of a path given likewise; Ctrl-C into one line and exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        watch = (threading.current_thread() is threading.main_thread()
                 and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        if watch:
            _INTERRUPTED.clear()
            signal.signal(signal.SIGINT, _on_sigint)
        try:
            return fn(*args, **kwargs)
        except CkdError as e:
            if os.environ.get("CKD_DEBUG"):
                raise
            err.print(_m("[bold red]error:[/] {}", e), highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:  # the environment, not a bug: a full disk, a read-only folder, no permission
            if os.environ.get("CKD_DEBUG") or e.errno not in _ENVIRONMENT_ERRNOS | _PATH_ERRNOS:
                raise
            if e.errno in _PATH_ERRNOS:
                err.print(_m("[bold red]error:[/] {}: {}; give a path that can be used there (a folder where a folder "
                             "is expected, a file where a file is).", e.filename or "a path given", e.strerror or e),
                          highlight=False, soft_wrap=True)
            else:
                err.print(_m("[bold red]error:[/] {} ({}); free space or fix the permissions, then run the command "
                             "again (`ckd submit` resumes after the last committed block).",
                             e.strerror or e, e.filename or "a file it writes"), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except BaseException:
            if os.environ.get("CKD_DEBUG") or not _INTERRUPTED.is_set():
                raise
            err.print(_m("[bold red]interrupted[/] (Ctrl-C): what was committed or ingested before stays as it was; "
                         "run the command again to carry on."), highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        finally:
            if watch:
                signal.signal(signal.SIGINT, signal.default_int_handler)

    return wrapper


def _fmt(v: float | None, digits: int = 4) -> str:
    """A metric; an undefined one (None / NaN) shows as "–"."""
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _check_json_target(path: Optional[Path]) -> None:
    """Refuse up front a --json path that cannot be written (a folder, a read-only place), before a long run."""
    if path is None or str(path) == "-":
        return
    if path.is_dir():
        raise CkdError(f"--json {path}: is a folder; give a file path (or '-' for stdout)")
    parent = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CkdError(f"--json {path}: cannot write there ({parent} is not a writable folder); choose a writable path")


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
    store: StoreOpt,
    files: Annotated[Optional[list[Path]], typer.Argument(help="CSV/TSV/Parquet files with user, item, timestamp columns.")] = None,
    user_col: Annotated[str, typer.Option(help="Name of the user id column.")] = "user",
    item_col: Annotated[str, typer.Option(help="Name of the item id column.")] = "item",
    time_col: Annotated[str, typer.Option(help="Name of the timestamp column.")] = "timestamp",
    weight_col: Annotated[Optional[str], typer.Option(help="Name of a rating/weight column (default: 'weight' or 'rating' if present).")] = None,
    watch: Annotated[Optional[Path], typer.Option("--watch", help="Take each new file that appears in this folder, exactly once (moved to DIR/ingested/, or DIR/refused/ with the reason), until SIGINT/SIGTERM.")] = None,
    poll: Annotated[str, typer.Option("--poll", help="With --watch: how often to look (2s, 1m, ...).")] = "2s",
    settle: Annotated[str, typer.Option("--settle", help="With --watch: a file is taken once unchanged this long (a file moved in keeps its time and qualifies at once; one just written or copied waits); 0 takes every file seen.")] = "2s",
    once: Annotated[bool, typer.Option("--once", help="With --watch: one look, then exit.")] = False,
):
    """Validate and append interaction files to a stream store (bad rows are quarantined with a reason)."""
    from .stream import ColumnMap, StreamStore

    if watch is not None and files:
        raise CkdError("give FILE... or --watch DIR, not both")
    if watch is None and not files:
        raise CkdError("nothing to ingest: give FILE... or --watch DIR")
    fresh = not Path(store).exists()
    st = StreamStore.open(store, create=True)
    st.lock_wait_s = 60.0  # a job following the store holds its catalog for moments (a block cut, a commit)
    cols = ColumnMap(user=user_col, item=item_col, timestamp=time_col, weight=weight_col)
    if watch is not None:
        _watch(st, watch, cols, poll, settle, once)
        return
    with _gone_if_empty(store, fresh, lambda: st.status()["ingests"]):
        for f in files:
            _print_report(st.ingest_file(f, cols))


@contextlib.contextmanager
def _gone_if_empty(store: Path, fresh: bool, taken):
    """On a refused input, remove the store folder this command created (``fresh``) if ``taken()`` says it holds
    nothing: a refusal leaves no empty store behind; a store that took anything stays."""
    try:
        yield
    except CkdError:
        if fresh and not taken():
            shutil.rmtree(store, ignore_errors=True)
        raise


def _watch(st, folder: Path, cols, poll: str, settle: str, once: bool) -> None:
    from .config import parse_duration
    from .stream.watch import ready_files, watch_folder

    try:
        poll_s, settle_s = parse_duration(poll), (0.0 if settle.strip() in ("0", "0s") else parse_duration(settle))
    except ValueError:
        raise CkdError(f"--poll {poll!r} / --settle {settle!r}: not a duration; write e.g. 2s or 1m") from None
    stop = StopFlag()
    old = catch_stop_signals(stop)
    retries = []

    def on_event(e) -> None:
        if e.kind == "taken":
            _print_report(e.report)
        elif e.kind == "refused":
            err.print(_m("[yellow]refused[/] {}: {}", e.path, e.reason), soft_wrap=True)
        else:
            retries.append(e)
            err.print(_m("[yellow]left for the next look[/]: {}", e.reason), soft_wrap=True)

    try:
        if not once:
            out.print(_m("watching {} (every {:g}s; SIGINT/SIGTERM stops)", folder, poll_s))
        watch_folder(st, folder, cols, poll_s, settle_s, once, stop, on_event)
    finally:
        restore_signals(old)
    if once and not stop.is_set():  # files still there that were not retried: written or copied in within --settle
        unsettled = set(ready_files(folder, 0.0)) - {e.path for e in retries}
        if unsettled:
            err.print(_m("[yellow]{} file(s) in {} changed within the last {:g}s (--settle), so they may still be "
                         "written: left for the next look[/] ({})", len(unsettled), folder, settle_s,
                         ", ".join(sorted(p.name for p in unsettled)[:3]) + (", …" if len(unsettled) > 3 else "")),
                      soft_wrap=True)
    if once and retries:
        raise CkdError(f"{len(retries)} file(s) in {folder} were left for the next look: {retries[0].reason}")


def _print_kg_report(r) -> None:
    if r.already_ingested:
        out.print(_m("[yellow]{}[/]: already ingested (content {}); store unchanged", r.source, r.content_hash[:12]))
        return
    out.print(_m("[bold]{}[/]: {:,} triples taken, {:,} quarantined ({:,} new entities, {:,} new relations)", r.source,
                 r.rows_taken, r.rows_quarantined, r.new_entities, r.new_relations))
    for reason, n in sorted(r.reasons.items()):
        out.print(_m("  quarantined: {:,} × {}", n, reason))


@app.command("ingest-kg")
@_guard
def ingest_kg(
    files: Annotated[list[Path], typer.Argument(help="CSV/TSV/Parquet files of triples: item, relation, tail "
                                                     "(optional tail_name).")],
    store: StoreOpt,
):
    """Add item knowledge (item, relation, tail) triples to a stream store; bad rows are quarantined with a reason."""
    from .stream.kg import ingest_triples_file

    st = _existing_store(store, "item knowledge")
    for f in files:
        _print_kg_report(ingest_triples_file(st, f))


@app.command("ingest-labelled")
@_guard
def ingest_labelled(
    files: Annotated[list[Path], typer.Argument(help="CSV/Parquet files: user, item, label (0/1 or a rating), "
                                                     "optional timestamp — collected under uniform exposure.")],
    store: StoreOpt,
    positive: Annotated[float, typer.Option(help="A label ≥ this is a positive (1), below it a negative (0): "
                                                 "e.g. 4 for 1–5 ratings.")] = 1.0,
):
    """Add a missing-at-random labelled sample to a stream store: models with `calibrate: mar` calibrate their
    ranking on the rows collected up to each block (continual/calibrate.py)."""
    from .stream.labelled import ingest_labelled_file

    st = _existing_store(store, "a labelled sample")
    for f in files:
        _print_labelled(ingest_labelled_file(st, f, positive), positive)


def _existing_store(store: Path, what: str):
    """The stream store at ``store``, which must exist: what these commands add (``what``) belongs to a store's
    interactions, so a mistyped ``--store`` is refused instead of starting a store that holds only it."""
    from .stream import StreamStore
    from .stream.catalog import CATALOG_FILE

    if not Path(store).is_file() and not (Path(store) / CATALOG_FILE).exists():  # a file: open() names it
        raise CkdError(f"--store {store}: no stream store there (no {CATALOG_FILE}); {what} is added to a store that "
                       f"holds interactions: `ckd ingest FILE --store {store}` or `ckd data …` first, or name that store")
    return StreamStore.open(store)


def _print_labelled(r, positive: float) -> None:
    if r.already_ingested:
        out.print(_m("[yellow]{}[/]: already ingested (content {}); store unchanged", r.source, r.content_hash[:12]))
        return
    out.print(_m("[bold]{}[/]: {:,} labelled rows taken ({:,} positive, label ≥ {}), {:,} dropped (no user, item, "
                 "numeric label or readable time); {:,} name a user and item the store knows now", r.source,
                 r.rows_taken, r.positives, positive, r.rows_dropped, r.rows_known))
    if r.relabelled:
        out.print(_m("[yellow]ingested before with another --positive: its stored labels are replaced by these"))
    if r.rows_taken and r.positives in (0, r.rows_taken):
        out.print(_m("[yellow]every label is {}: nothing to calibrate on (for ratings, set --positive)",
                     "positive" if r.positives else "negative"))


@data_app.command("movielens-100k")
@_guard
def data_movielens(store: StoreOpt = Path("stores/ml-100k"),
                   kg: Annotated[bool, typer.Option("--kg", help="Also the films' titles, years, genres and "
                                                                  "Freebase knowledge graph (for pathrec / --explain).")] = False):
    """MovieLens-100K (943 users, 1,682 items, 100k rated interactions with timestamps)."""
    from .data.sources import build_store

    st, report = build_store("movielens-100k", store)
    _print_report(report)
    if kg:
        from .data.movielens_kg import add_movielens_kg

        for r in add_movielens_kg(st):
            _print_kg_report(r)


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


@data_app.command("simulate")
@_guard
def data_simulate(
    out_dir: Annotated[Path, typer.Argument(help="Folder for stream.parquet (or .csv) and truth.npz.")],
    users: int = 1500, items: int = 2000, clicks: int = 100_000, periods: int = 6, dim: int = 16,
    drift: float = 0.3, new_user_fraction: float = 0.2, new_item_fraction: float = 0.3,
    exposure_skew: Annotated[float, typer.Option(help="Zipf exponent of the exposure propensity by popularity rank.")] = 1.0,
    quality_popularity: Annotated[float, typer.Option(help="Correlation of true item quality with exposure popularity, -1..1.")] = 0.0,
    taste: float = 4.0, quality: float = 1.0, offset: float = -3.0, seed: int = 0,
    fmt: Annotated[str, typer.Option("--format", help="parquet or csv.")] = "parquet",
    uniform: Annotated[int, typer.Option(help="Also OUT/uniform.<format>: every user shown this many items drawn "
                                              "uniformly (user, item, label, timestamp), a missing-at-random sample "
                                              "for `ckd ingest-labelled`.", min=0)] = 0,
):
    """A click stream from a known truth: tastes drift, items are born, exposure follows popularity, clicks
    follow true preference. Ingest it with `ckd ingest OUT/stream.parquet --store S`; evaluate against
    the truth with `ckd evaluate --truth OUT/truth.npz`; with --uniform N, a labelled sample collected under
    uniform exposure as well, which `ckd ingest-labelled` stores for models with `calibrate: mar`."""
    import time

    from .data.simulate import SimulationConfig, write_simulation

    cfg = SimulationConfig(users=users, items=items, clicks=clicks, periods=periods, dim=dim, drift=drift,
                           new_user_fraction=new_user_fraction, new_item_fraction=new_item_fraction,
                           exposure_skew=exposure_skew, quality_popularity=quality_popularity, taste=taste,
                           quality=quality, offset=offset, seed=seed)
    t0 = time.perf_counter()
    stream, truth_path, n = write_simulation(out_dir, cfg, fmt, uniform_per_user=uniform)
    out.print(_m("{} clicks of {} users on {} items in {:.1f} s: {} (truth: {})", f"{n:,}", f"{users:,}",
                 f"{items:,}", time.perf_counter() - t0, stream, truth_path), highlight=False)


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
            todo = (f"running {e['start']}..{e['end'] - 1}" if e["end"] > e["start"] + 1 else
                    f"running {e['start']}" if e["end"] > e["start"] else "every block done; waiting for new data")
            self.console.print(_m("block plan {}: {} blocks ({} rows), {}", plan.plan_id, plan.num_blocks,
                                  ", ".join(f"{b.rows:,}" for b in plan.blocks), todo))
            self.bar.start()
            self.task = self.bar.add_task("starting", total=e["end"] - e["start"])
        elif kind == "ray":
            dash = f", dashboard http://{e['dashboard']}" if e.get("dashboard") else ""
            self.console.print(_m("Ray at {}{}", e["address"], dash))
        elif kind == "stage" and self.task is not None:
            self.bar.update(self.task, description=f"block {e['block']}: {e['stage']}")
        elif kind == "blocks" and self.task is not None:  # a live plan grew: new complete blocks to run
            self.bar.update(self.task, total=e["end"] - e["start"])
            b = e["plan"].blocks[-1]
            self.bar.console.print(_m("block {} is complete: {:,} rows{}; {} block(s) to run", b.index, b.rows,
                                      f" ({b.late:,} late)" if b.late else "", e["end"] - e["start"]
                                      - self.bar.tasks[0].completed))
        elif kind == "wait" and self.task is not None:
            self.bar.update(self.task, description=f"{e['done']} blocks done; waiting for {e['needs']} "
                                                   f"({e['pending_rows']:,} rows pending, next look in {e['poll_s']:g}s)")
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
        if self.task is not None:  # a bar never started would still end its line: a blank line before an error
            self.bar.stop()


@app.command()
@_guard
def submit(
    job_file: Annotated[Path, typer.Argument(help="Job spec (YAML), e.g. jobs/stream.yaml.")],
    address: Annotated[Optional[str], typer.Option(help="Ray cluster to join (host:port), or a head's Jobs API (http://HEAD:8265: the job runs there, see cluster/README.md); default: an embedded local Ray.", envvar="CKD_RAY_ADDRESS")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Discard this job's snapshots and start from block 0.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue after the last snapshot (also the default when one exists).")] = False,
    max_blocks: Annotated[Optional[int], typer.Option(help="Run at most this many blocks now (resume later).")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Live block policy: after the complete blocks, wait for new data and run each new block once it is complete; SIGINT/SIGTERM stop it (a re-submit resumes after the last commit).")] = False,
    poll: Annotated[str, typer.Option("--poll", help="With --follow: how often to look for new data (30s, 1m, ...).")] = "30s",
    flush: Annotated[bool, typer.Option("--flush", help="Live block policy, end of a stream: the incomplete last window (or the rows left) becomes a block too.")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the per-block metrics as JSON ('-' for stdout).")] = None,
    wide: WideOpt = False,
    dashboard_host: Annotated[str, typer.Option(help="Interface of the embedded Ray dashboard. Anything but 127.0.0.1 exposes it (and job submission) to the network; token auth stays on.")] = "127.0.0.1",
    node_ip_address: Annotated[Optional[str], typer.Option(help="Address of this machine the embedded Ray binds all its ports to (GCS, raylet, object manager, metrics); default 127.0.0.1, this machine only. Another address exposes the cluster to that network; token auth stays on.")] = None,
    working_dir: Annotated[Path, typer.Option(help="With --address http://…: the folder shipped to the cluster as the job's working directory (it must hold the job file).")] = Path("."),
    detach: Annotated[bool, typer.Option("--detach", help="With --address http://…: print the job id and return instead of following its logs to its exit status.")] = False,
):
    """Run the stream: every block updates the teachers, distils into the student, evaluates, snapshots."""
    from .config import load_job
    from .runtime.coordinator import run_job

    if restart and resume:
        raise CkdError("--restart and --resume contradict each other; pass one")
    _check_json_target(json_path)
    from .config import parse_duration

    try:
        poll_s = parse_duration(poll)
    except ValueError:
        raise CkdError(f"--poll {poll!r}: not a duration; write e.g. 30s, 1m or 5m") from None
    job = load_job(job_file)
    from .runtime.jobs import is_jobs_address

    if is_jobs_address(address):  # the driver runs on the cluster; the live options go with it
        live = [*(["--follow", "--poll", poll] if follow else []), *(["--flush"] if flush else [])]
        _submit_through_jobs_api(address, job_file, job, working_dir, detach, restart, max_blocks, live, json_path,
                                 dashboard_host, node_ip_address)
        return
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
                         dashboard_host=dashboard_host, node_ip_address=node_ip_address, follow=follow,
                         poll_s=poll_s, flush=flush)
    finally:
        progress.stop()
    if result.stopped:
        last = result.history[-1]["block"] if result.history else None
        console.print(_m("[yellow]stopped[/]: {}; `ckd submit {} --follow` resumes after it",
                         f"the last committed block is {last}" if last is not None else "no block committed",
                         job_file))
    if result.history:
        from .tables import history_tables

        from .config import MASK_LABELS

        _print_tables(console, *history_tables(result.history, console.width, wide,
                                               masked=MASK_LABELS[job.eval.mask]), wide)
    console.print(_m("snapshots: {}  (evaluate with `ckd evaluate --snapshot latest`)", result.runs_dir))
    _write_json(json_path, {"job": job.name, "plan_id": result.plan.plan_id, "mask": job.eval.mask,
                            "history": result.history})


def _submit_through_jobs_api(address: str, job_file: Path, job, working_dir: Path, detach: bool, restart: bool,
                             max_blocks: Optional[int], live: list[str], json_path: Optional[Path], dashboard_host: str,
                             node_ip_address: Optional[str]) -> None:
    """``ckd submit --address http://HEAD:8265``: ship the working folder, run the job there, follow its logs."""
    from .runtime.jobs import exit_status, follow_job, short_message, submit_job

    if json_path is not None or node_ip_address or dashboard_host not in ("127.0.0.1", "localhost", "::1"):
        raise CkdError("--json, --dashboard-host and --node-ip-address apply to a local driver; with a Jobs API "
                       "address the driver runs on the cluster (its metrics are in the snapshots' manifests)")
    extra = [*(["--restart"] if restart else []), *(["--max-blocks", str(max_blocks)] if max_blocks else []), *live]
    relative = [(f, v) for f, v in (("source.store", job.source.store), ("snapshots.dir", str(job.snapshot_dir)))
                if not Path(v).is_absolute()]
    # the driver's tables fit this terminal
    sub = submit_job(address, job_file, working_dir, extra, job.name, relative, env_vars={"COLUMNS": str(out.width)})
    for note in sub.notes:
        err.print(_m("[yellow]note:[/] {}", note), soft_wrap=True)
    out.print(_m("submitted job {} to {} (working dir {})", sub.job_id, address, sub.working_dir), soft_wrap=True)
    if detach:
        out.print(_m("follow it with `ray job logs --follow {}`; list jobs with `ckd status --address {}`",
                     sub.job_id, address), soft_wrap=True)
        return
    try:
        info = follow_job(address, sub.job_id, lambda text: (out.file.write(text), out.file.flush()))
    except KeyboardInterrupt:
        err.print(_m("stopped following; job {} keeps running (`ray job stop {}` stops it)", sub.job_id, sub.job_id))
        raise typer.Exit(130) from None
    style = "green" if info["status"] == "SUCCEEDED" else "red"
    out.print(_m(f"job {{}}: [{style}]{{}}[/]{{}}", sub.job_id, info["status"],
                 f" ({short_message(info['message'])})" if info["status"] != "SUCCEEDED" and info.get("message") else ""),
              soft_wrap=True)
    code = exit_status(info)
    if code:
        raise typer.Exit(code)


def _print_jobs(address: str, json_path: Optional[Path]) -> None:
    """``ckd status --address http://HEAD:8265``: the cluster's running and finished jobs."""
    import datetime

    from .runtime.jobs import list_jobs, short_message

    rows = list_jobs(address)
    console = _human(json_path)

    def when(ms):
        return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "–"

    t = Table(title=_m("jobs on {}", address))
    for col in ("job id", "status", "ckd job", "started", "ended", "entrypoint / message"):
        t.add_column(col, overflow="fold")
    for r in rows:
        tail = r["entrypoint"] if r["status"] in ("SUCCEEDED", "RUNNING", "PENDING") else \
            f"{r['entrypoint']} — {short_message(r['message'])}"
        t.add_row(_e(r["job_id"]), _e(r["status"]), _e(r["metadata"].get("ckd_job", "")), when(r["start_time"]),
                  when(r["end_time"]), _e(tail))
    console.print(t)
    _write_json(json_path, {"address": address, "jobs": rows})


# ---------------------------------------------------------------------------------------- evaluate / status


def _set_eval_threads(threads: int | None) -> None:
    """Evaluation is thousands of small tensor ops: on a small or busy machine more threads compete for
    the cores and slow it down (measured: 3 s with 1 thread, 4.5-13.6 s with 2 on a busy 2-core box)."""
    import torch

    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = 1 if cores <= 2 else min(4, cores // 2)
    torch.set_num_threads(threads)


def _snapshot_eval_spec(snap):
    from .config import parse_job

    return parse_job(snap.manifest["job_spec"], f"{snap.path}/manifest.json").eval


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
    if len(candidates) == 1:
        return candidates[0]

    def newest(d: Path) -> float:  # its last snapshot's time (a submit that only took the job's lock changes nothing)
        return max((m.stat().st_mtime for m in d.glob("block-*/manifest.json")), default=0.0)

    chosen = max(candidates, key=newest)
    err.print(_m("[dim]{} holds the snapshots of {} jobs ({}): using {}, the most recently snapshotted; pass --job "
                 "NAME for another[/]", runs, len(candidates), ", ".join(sorted(d.name for d in candidates)),
                 chosen.name), soft_wrap=True)
    return chosen


@app.command()
@_guard
def evaluate(
    snapshot: Annotated[str, typer.Option(help="'latest' or a block number.")] = "latest",
    runs: RunsOpt = Path("runs"),
    job: Annotated[Optional[str], typer.Option(help="Job name when --runs holds several jobs.")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the metrics as JSON ('-' for stdout).")] = None,
    wide: WideOpt = False,
    mask: Annotated[Optional[str], typer.Option(help="What a ranking hides: standard (train + valid), train, or all_seen (the old rule); default: the job's eval.mask.")] = None,
    truth: Annotated[Optional[Path], typer.Option(help="A simulator's truth (truth.npz of `ckd data simulate`, or its folder): true-relevance figures.")] = None,
    mar_test: Annotated[Optional[Path], typer.Option(help="A missing-at-random test file (user, item, label); default: the job's eval.mar_test.")] = None,
    ips_exponent: Annotated[Optional[float], typer.Option(help="Inverse-propensity estimates: propensity = (popularity / max)^exponent; default: the job's eval.ips_exponent.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Torch threads (default: 1 on a machine with ≤ 2 cores, else half the cores up to 4).")] = None,
):
    """Full-ranking metrics of every model in a snapshot, on the test part of every block seen so far."""
    _check_json_target(json_path)
    from .continual.snapshot_eval import evaluate_snapshot
    from .manifest import block_manifest_problem
    from .snapshots import resolve_snapshot
    from .stream import StreamStore

    from .config import EVAL_MASKS
    if mask is not None and mask not in EVAL_MASKS:
        raise CkdError(f"--mask {mask!r}: use one of {', '.join(EVAL_MASKS)}")
    if ips_exponent is not None and not (math.isfinite(ips_exponent) and ips_exponent >= 0):
        raise CkdError(f"--ips-exponent {ips_exponent}: use a number ≥ 0 (0 gives the logged metrics back)")
    if threads is not None and threads < 1:
        raise CkdError(f"--threads {threads}: use 1 or more")
    _set_eval_threads(threads)

    which: str | int = snapshot
    if snapshot != "latest":
        if not snapshot.isdigit():
            raise CkdError(f"--snapshot {snapshot!r}: use 'latest' or a block number such as 3")
        which = int(snapshot)
    job_dir = _find_job_runs(runs, job)
    snap, warnings = resolve_snapshot(job_dir, which, check=block_manifest_problem)
    for w in warnings:
        err.print(_m("[yellow]warning:[/] {}", w))
    m = snap.manifest
    store = StreamStore.open(m["store"])
    seen = store.read_blocks(m["plan_id"], snap.block)
    overrides = {} if ips_exponent is None else {"ips_exponent": ips_exponent}
    truth_in = mar = None
    if truth is not None:
        from .continual.snapshot_eval import check_truth_fits, truth_index
        from .data.simulate import load_truth

        truth_in = truth_index(load_truth(truth), store.external_ids("user", range(seen.num_users)),
                               store.external_ids("item", range(seen.num_items)))
        check_truth_fits(truth_in, seen, f"--truth {truth}")
    job_eval = _snapshot_eval_spec(snap)
    mar_path = mar_test if mar_test is not None else (Path(job_eval.mar_test) if job_eval.mar_test else None)
    if mar_path is not None:
        from .eval.estimates import read_labelled_file

        ids = ({x: d for d, x in enumerate(store.external_ids("user", range(seen.num_users)))},
               {x: d for d, x in enumerate(store.external_ids("item", range(seen.num_items)))})
        *mar, dropped = read_labelled_file(mar_path, *ids, positive=job_eval.mar_positive)
        if len(mar[0]) == 0:
            raise CkdError(f"{mar_path}: none of its rows names a user and an item of this snapshot ({snap.path}) with "
                           f"a numeric label ({dropped:,} rows left out); give a missing-at-random test file of this "
                           f"stream's users and items (the ids `ckd ingest` read into {m['store']})")
        if dropped:
            err.print(_m("[yellow]warning:[/] {}: {} rows name a user or item this snapshot does not know, or have no "
                         "numeric label; left out", mar_path, f"{dropped:,}"))
    res = evaluate_snapshot(snap, seen, mask=mask, truth=truth_in, mar=mar, overrides=overrides)
    if mar_path is not None:
        res["mar_test"] = str(mar_path)
    if truth is not None:
        res.setdefault("truth", {})["file"] = str(truth)
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
    explain: Annotated[bool, typer.Option("--explain", help="Say why: the paths behind each item (the snapshot's "
                                                            "pathrec teacher), with titles and relations in words.")] = False,
    reasons: Annotated[int, typer.Option("--reasons", help="Reasons shown per item with --explain.")] = 3,
):
    """Serve a snapshot's student: the top-k unseen items for each --user (external ids in and out)."""
    import numpy as np
    import torch

    from .continual.snapshot_eval import recommend_from_snapshot
    from .manifest import block_manifest_problem
    from .snapshots import resolve_snapshot
    from .stream import StreamStore

    if k < 1:
        raise CkdError(f"-k: must be at least 1, got {k}")
    if reasons < 1:
        raise CkdError(f"--reasons: must be at least 1, got {reasons}")
    if reasons != 3 and not explain:
        raise CkdError("--reasons: only applies with --explain (the reasons shown per item); add --explain")
    user = list(dict.fromkeys(user))  # a user named twice is served once
    which: str | int = int(snapshot) if snapshot.isdigit() else snapshot
    if which != "latest" and not isinstance(which, int):
        raise CkdError(f"--snapshot {snapshot!r}: use 'latest' or a block number such as 3")
    snap, warnings = resolve_snapshot(_find_job_runs(runs, job), which, check=block_manifest_problem)
    for w in warnings:
        err.print(_m("[yellow]warning:[/] {}", w))
    store = StreamStore.open(snap.manifest["store"])
    dense = store.dense_ids("user", user)
    seen = store.read_blocks(snap.manifest["plan_id"], snap.block)
    if (dense >= seen.num_users).any():
        raise CkdError(f"--user: {user[int((dense >= seen.num_users).argmax())]!r} first appears after block "
                       f"{snap.block}; use a later snapshot")
    if explain:
        return _explained(snap, store, seen, user, dense, k, model, reasons, json_path)
    items, scores = recommend_from_snapshot(snap, seen, dense, k, model)
    names = np.asarray(store.external_ids("item", items.flatten().numpy()), dtype=object).reshape(tuple(items.shape))
    unseen = ~torch.isneginf(scores)  # k past a user's unseen items: the list ends with them (seen ones score -inf)
    payload = {}
    t = Table(title=_m("{} @ block-{:04d}: top-{}", model, snap.block, k))
    t.add_column("user", overflow="fold")
    t.add_column("items (best first)", overflow="fold")
    for row, u in enumerate(user):
        ids = names[row][unseen[row].numpy()].tolist()
        payload[u] = [{"item": i, "score": float(sc)} for i, sc in zip(ids, scores[row][unseen[row]].tolist())]
        t.add_row(_e(u), _e(", ".join(ids)))
    _human(json_path).print(t)
    _write_json(json_path, {"snapshot": str(snap.path), "model": model, "recommendations": payload})


def _explained(snap, store, seen, user: list[str], dense, k: int, model: str, top: int, json_path) -> None:
    """``recommend --explain``: each item with its reasons in words, and the faithfulness check."""
    from .continual.snapshot_eval import learners_from_snapshot
    from .explain.service import explain_recommendations

    learners = learners_from_snapshot(snap)
    if model not in learners:
        raise CkdError(f"--model {model!r}: not in snapshot {snap.path.name}; it has {', '.join(learners)}")
    res = explain_recommendations(learners, store, seen, dense, k, model, top)
    console = _human(json_path)
    console.print(_m("[bold]{} @ block-{:04d}[/]: top-{}, explained by {}", model, snap.block, k, res["path_model"]))
    for u, items in zip(user, res["users"]):
        console.print(_m("[bold]user {}[/]", u))
        for rank, it in enumerate(items, 1):
            console.print(_m("  {}. {}  [dim](score {:.3f}, path score {:.3f})[/]", rank, it["title"], it["score"],
                             it["path_score"]))
            for rs in it["reasons"]:
                share = f"{rs['share']:.0%}" if rs["share"] is not None else "–"
                console.print(_m("     • {} [dim](weight {:.4f}, {} of the path score)[/]", rs["text"], rs["weight"],
                                 share))
            rat = it.get("rationale")
            if rat and rat["text"]:  # the item's rationale (item knowledge), and what your films share with it
                console.print(_m("     [dim]about it:[/] {}", rat["text"]))
                for sf in rat["shared"]:
                    console.print(_m("     [dim]shared with your {}:[/] {}", ", ".join(sf["with"]), sf["fact"]))
            f = it.get("faithfulness")
            if f:
                console.print(_m("     [dim]removing the cited rating lowers the path score by {:.4f} (a random rating of "
                                 "yours, {}: {:.4f})[/]", f["cited_drop"], f["random_title"], f["random_drop"]))
    f = res["faithfulness"]
    if f["cases"]:
        console.print(_m("faithfulness: removing the cited rating lowers the score more than removing a random one in "
                         "{:.0%} of {} cases (mean drop {:.4f} vs {:.4f})", f["cited_wins"], f["cases"], f["cited_drop"],
                         f["random_drop"]))
    _write_json(json_path, {"snapshot": str(snap.path), "model": model, "path_model": res["path_model"],
                            "recommendations": dict(zip(user, res["users"])), "faithfulness": f,
                            "seconds": res["seconds"]})


@app.command()
@_guard
def serve(
    job_file: Annotated[Path, typer.Argument(help="Job spec (YAML) whose student is served, e.g. live.yaml.")],
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    host: Annotated[str, typer.Option(help="Interface to listen on. Anything but 127.0.0.1 exposes the API (it has no authentication) to the network.")] = "127.0.0.1",
    poll: Annotated[str, typer.Option("--poll", help="How often each replica looks for a newer committed snapshot (2s, 1m, ...).")] = "2s",
    replicas: Annotated[int, typer.Option(help="Ray Serve replicas (each holds the student and follows the commits).")] = 1,
    threads: Annotated[int, typer.Option(help="torch threads per replica.")] = 1,
):
    """Serve the student of the job's newest committed snapshot over HTTP (Ray Serve), following new commits:
    GET /recommend?user=U&k=10 and GET /healthz. SIGINT or SIGTERM stops it."""
    from .config import load_job, parse_duration

    try:
        poll_s = parse_duration(poll)
    except ValueError:
        raise CkdError(f"--poll {poll!r}: not a duration; write e.g. 2s or 1m") from None
    if not 1 <= port <= 65535:
        raise CkdError(f"--port {port}: must be from 1 to 65535")
    if replicas < 1 or threads < 1:
        raise CkdError(f"--replicas {replicas} / --threads {threads}: each must be at least 1")
    job = load_job(job_file)
    from .runtime.cluster import is_loopback

    if not is_loopback(host):
        err.print(_m("[yellow]warning:[/] the recommendation API will listen on {}:{} without authentication: anyone "
                     "who can reach it can read recommendations for any user id", host, port))
    def on_event(e: dict) -> None:
        if e["event"] == "started":
            say("serving job {} at {} (GET /recommend?user=U&k=10, GET /healthz); SIGINT/SIGTERM stops",
                job.name, e["url"])
            return
        served = e.get("served")
        if served:
            say("serving block {} (commit {}, {:,} users × {:,} items) from {} (loaded and checked in {:.2f}s)",
                served["block"], served["commit"], served["users"], served["items"], served["snapshot"],
                served["load_s"])
        elif e.get("status") == "waiting":
            say("waiting for the first committed block of job {}", job.name)
        for r in e.get("refused", []):
            say("[yellow]not serving[/] block {} (commit {}): {}", r["block"], r["commit"], r["reason"])

    def say(template: str, *values) -> None:
        err.print(_m(template, *values), highlight=False, soft_wrap=True)

    from .runtime.serve import serve_job

    serve_job(job, host, port, poll_s, replicas, threads, on_event)
    say("stopped")


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
    address: Annotated[Optional[str], typer.Option(help="A head's Jobs API (http://HEAD:8265): list its running and finished jobs instead.")] = None,
):
    """Segments, blocks, quarantine counts of a store, and the snapshots under --runs; exit code 2 when a
    segment does not match what the catalog recorded. With --address http://HEAD:8265: the cluster's jobs."""
    if address is not None:
        from .runtime.jobs import is_jobs_address

        if not is_jobs_address(address):
            raise CkdError(f"--address {address}: status lists the jobs of a head's Jobs API; give http://HEAD:8265")
        _print_jobs(address, json_path)
        return
    from .snapshots import list_snapshots
    from .stream import StreamStore
    from .tables import segment_tables

    out = _human(json_path)  # this command's human output (stderr under --json -)
    st = StreamStore.open(store)
    catalog_rows = st.verify_catalog() if verify else None  # a damaged catalog stops here, named in one line
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
    from .stream.labelled import labelled_status

    s["labelled"] = labelled_status(st)
    if s["labelled"]["rows"]:
        out.print(_m("missing-at-random sample: {:,} labelled rows ({:,} positive) from {} ingest(s)",
                     s["labelled"]["rows"], s["labelled"]["positives"], s["labelled"]["ingests"]))
    for plan in s.get("plans", []):
        out.print(_m("plan {}: {}", plan["plan_id"], ", ".join(f"b{b['index']}={b['rows']:,}" for b in plan["blocks"])))
        if plan.get("policy"):  # a live plan: blocks appended as data arrive
            from .stream.live import LivePolicy

            policy = LivePolicy.from_json(plan["policy"], plan["split"], plan["seed"])
            late = [f"b{b['index']}={b['late']:,}" for b in plan["blocks"] if b["late"]]
            out.print(_m("  live ({}): {:,} late rows{}; {:,} rows not in a block yet", policy.describe(),
                         plan["late_rows"], f" ({', '.join(late)})" if late else "", plan["pending_rows"]))
    commits = st.commit_summary()
    for c in commits:
        out.print(_m("job {} (lineage {}): committed blocks {}{}", c["job"], c["lineage"],
                     ", ".join(map(str, c["blocks"])) or "none", f"; {c['revoked']} revoked" if c["revoked"] else ""))
    s["commits"] = commits
    snaps, snaps_damaged = {}, {}
    if runs.is_dir():
        from .snapshots import damaged_snapshots

        for d in sorted(runs.iterdir()):
            blocks = list_snapshots(d) if d.is_dir() else []
            bad = damaged_snapshots(d, verify) if d.is_dir() else {}
            if blocks or bad:
                snaps[d.name] = blocks
                snaps_damaged.update({d.name: {str(b): why for b, why in bad.items()}} if bad else {})
                note = "; damaged: " + ", ".join(f"{b} ({why})" for b, why in bad.items()) if bad else ""
                out.print(_m("snapshots {}: blocks {}{}", d, ", ".join(map(str, blocks)) or "none", note))
    _write_json(json_path, {**s, "snapshots": snaps, "snapshots_damaged": snaps_damaged, "verified": verify})
    damaged = [seg for seg in s["segments"] if seg.get("problem")]
    if damaged:  # named after the overview, in one line, exit code 2
        from .stream.segments import damaged_error

        first = damaged[0]
        raise damaged_error(st.root, first["path"], first["source"], first["problem"], len(damaged) - 1)
    if verify:
        out.print(_m("verified the catalog: {:,} rows read, every block's checksum matches", catalog_rows))
        out.print(_m("verified {} segments: size, rows and sha256 checksum match the catalog", len(s["segments"])))
        from .stream.compact import verify_block_digests

        out.print(_m("verified {} committed blocks: each reads the rows it was committed with (digest)",
                     verify_block_digests(st)))


@app.command()
@_guard
def compact(
    job_file: Annotated[Optional[Path], typer.Argument(help="A job file: compact its source store (or give --store).")] = None,
    store: Annotated[Optional[Path], typer.Option("--store", help="Stream store directory.", envvar="CKD_STORE")] = None,
    target_rows: Annotated[int, typer.Option(help="Rows of a compacted segment: consecutive smaller segments are merged up to it.")] = 1_000_000,
    wait: Annotated[str, typer.Option("--wait", help="How long to wait for another process's catalog lock (an ingest, a commit).")] = "60s",
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write what it did as JSON ('-' for stdout).")] = None,
):
    """Merge a store's small segments into larger ones (every committed block keeps its rows: digests prove it),
    and drop what makes the catalog grow; safe beside `ckd ingest` and a following job."""
    from .config import load_job, parse_duration
    from .stream import StreamStore
    from .stream.compact import compact_store

    if (job_file is None) == (store is None):
        raise CkdError("give a job file (its source store is compacted) or --store PATH, one of the two")
    try:
        wait_s = parse_duration(wait)
    except ValueError:
        raise CkdError(f"--wait {wait!r}: not a duration; write e.g. 30s, 1m or 5m") from None
    root = Path(load_job(job_file).source.store) if job_file is not None else store
    st = StreamStore.open(root)
    st.lock_wait_s = wait_s
    r = compact_store(st, target_rows)
    console = _human(json_path)
    console.print(_m("[bold]compacted {}[/]: {} → {} segments, {:,} → {:,} bytes ({:,} rows, {} runs merged) in {:.2f}s",
                     root, r.segments_before, r.segments_after, r.bytes_before, r.bytes_after, r.rows, len(r.runs),
                     r.seconds))
    for run in r.runs:
        ids = run["segments"]
        console.print(_m("  segments {}-{} ({}) → {} ({:,} rows, digest {})", ids[0], ids[-1], len(ids), run["path"],
                         run["rows"], run["digest"]))
    console.print(_m("verified {} committed blocks: same rows as at commit (digests){}", r.blocks_verified,
                     f"; {r.digests_recorded} digests recorded for older commits" if r.digests_recorded else ""))
    console.print(_m("catalog: {:,} → {:,} bytes{}", r.catalog_bytes_before, r.catalog_bytes_after,
                     "; the block_results index (most of its growth per block) was dropped"
                     if r.results_index_dropped else ""))
    from dataclasses import asdict

    _write_json(json_path, asdict(r))


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


# ---------------------------------------------------------------------------------------- cluster


@app.command()
@_guard
def tune(
    job_file: Annotated[Path, typer.Argument(help="Job spec with a tune: section, e.g. jobs/tune.yaml.")],
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Where the best trial's job file goes (default <job>-best.yaml next to the job file).")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster to join (host:port); default: an embedded local Ray.", envvar="CKD_RAY_ADDRESS")] = None,
    storage: Annotated[Path, typer.Option(help="Folder of Ray Tune's experiment records (a hidden folder under runs/: never a job's snapshot folder).")] = Path("runs/.tune"),
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write every trial's figures as JSON ('-' for stdout).")] = None,
):
    """Search the job's tune.space with Ray Tune + ASHA on the first blocks; write the best job file."""
    from .runtime.tune import METRICS, run_tune

    console = _human(json_path)
    with err.status("tuning: trials run the first blocks; ASHA stops weak ones after each block…"):
        res = run_tune(job_file, address=address, out=out_path, storage=storage,
                       progress=lambda e: err.print(_m("[dim]{}[/]", e["message"])) if e.get("type") == "info" else None)
    t = Table(title=f"ckd tune {job_file}: student {METRICS[res.job.tune.metric][1]} per block (* = best)")
    t.add_column("trial", overflow="fold")
    for i, _ in enumerate(res.space):
        t.add_column(f"f{i + 1}", justify="right")
    for b in range(res.blocks):
        t.add_column(f"b{b}", justify="right")
    t.add_column("status")
    for r in res.rows:
        mark = "*" if r is res.best else ""
        values = [r.config.get(p) for p in res.space]
        t.add_row(_e(mark + r.trial), *[_e(f"{v:.4g}" if isinstance(v, float) else v) for v in values],
                  *[_fmt(r.per_block[b]) if b < len(r.per_block) else "" for b in range(res.blocks)],
                  _e(r.status if r.status != "stopped" else f"stopped after b{len(r.per_block) - 1}"))
    console.print(t)
    console.print(_m("[dim]{}[/]", "  ".join(f"f{i + 1} = {p}" for i, p in enumerate(res.space))), soft_wrap=True)
    console.print(_m("best: {} (NDCG@20 {} on block {}) → {}   run it with `ckd submit {}`", res.best.trial,
                     _fmt(res.best.per_block[-1]), res.blocks - 1, res.out, res.out), soft_wrap=True)
    _write_json(json_path, {"job": res.job.name, "best": res.best.trial, "out": str(res.out),
                            "experiment": res.experiment, "metric": "student valid ndcg@20",
                            "trials": [{"trial": r.trial, "config": r.config, "per_block": r.per_block,
                                        "status": r.status, "error": r.error} for r in res.rows]})


StateDirOpt = Annotated[Optional[Path], typer.Option("--state-dir", help="Where the local cluster is recorded (default ~/.cache/continual-kd/cluster).", envvar="CKD_CLUSTER_DIR")]


@cluster_app.command("up")
@_guard
def cluster_up_cmd(
    workers: Annotated[int, typer.Option(help="Worker raylets to start next to the head.")] = 2,
    cpus_per_worker: Annotated[Optional[float], typer.Option(help="CPUs each worker offers (default: this machine's CPUs / workers).")] = None,
    gpus_per_worker: Annotated[int, typer.Option(help="GPUs each worker offers (0: none, so several workers do not claim the same GPU).")] = 0,
    head_cpus: Annotated[float, typer.Option(help="CPUs of the head (0: actors go to the workers; Jobs API drivers run on the head).")] = 0,
    port: Annotated[int, typer.Option(help="GCS port of the head (ckd submit --address 127.0.0.1:PORT).")] = 6379,
    dashboard_port: Annotated[int, typer.Option(help="Dashboard / Jobs API port (ckd submit --address http://127.0.0.1:PORT).")] = 8265,
    object_store_mb: Annotated[int, typer.Option(help="Object store of each node, MB.")] = 256,
    state_dir: StateDirOpt = None,
):
    """Start a Ray head and N worker raylets on this machine (`ray start`), each with a resource naming it
    (ckd_node_head, ckd_node_w1, …), token auth on."""
    from .runtime.local_cluster import cluster_up, node_rows

    with err.status(f"starting a head and {workers} worker raylet(s)…"):
        state = cluster_up(workers, cpus_per_worker, gpus_per_worker, head_cpus, port, dashboard_port, object_store_mb,
                           state_dir)
    _print_nodes(state, node_rows(state))
    out.print(_m("run a job here:      ckd submit JOB.yaml --address {}", state["dashboard_url"]), soft_wrap=True)
    out.print(_m("or join it directly: RAY_AUTH_MODE=token ckd submit JOB.yaml --address {}", state["address"]),
              soft_wrap=True)
    out.print("[dim]the dashboard is on 127.0.0.1 only; Ray's raylets and GCS listen on this machine's address, "
              "guarded by the token in ~/.ray/auth_token. Stop it with `ckd cluster down`.[/]")


def _print_nodes(state: dict, rows: list[dict]) -> None:
    out.print(_m("[bold]local Ray cluster[/] at {} (dashboard {}), started under {}", state["address"],
                 state["dashboard_url"], state["temp_dir"]), soft_wrap=True)
    t = Table()
    for col in ("node", "resource", "state", "CPUs", "GPUs", "node id"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(_e(r["name"]), _e(f"ckd_node_{r['name']}"), _e(r["state"]), f"{r['cpus']:g}", f"{r['gpus']:g}",
                  _e((r["node_id"] or "")[:12]))
    out.print(t)


@cluster_app.command("status")
@_guard
def cluster_status_cmd(
    state_dir: StateDirOpt = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the status as JSON ('-' for stdout).")] = None,
):
    """The local cluster's nodes as its GCS sees them (exit code 1 when none is up)."""
    from .runtime.local_cluster import cluster_status

    s = cluster_status(state_dir)
    console = _human(json_path)
    if s is None or not s["up"]:
        gone = "" if s is None else " (its processes are gone; `ckd cluster down` forgets it)"
        console.print(f"no local cluster is up{gone}; start one with `ckd cluster up`")
        _write_json(json_path, {"up": False})
        raise typer.Exit(1)
    if json_path is None or str(json_path) != "-":
        _print_nodes(s, s["nodes_now"])
    _write_json(json_path, s)


@cluster_app.command("down")
@_guard
def cluster_down_cmd(state_dir: StateDirOpt = None):
    """Stop the local cluster's processes (only those; other Rays on this machine are left alone)."""
    from .runtime.local_cluster import cluster_down, read_state

    state = read_state(state_dir)
    if state is None:
        out.print("no local cluster is up")
        return
    n = cluster_down(state_dir)
    out.print(_m("stopped the local cluster at {} ({} processes)", state["address"], n))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
