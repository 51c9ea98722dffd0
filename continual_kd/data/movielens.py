"""MovieLens-100K as a normalised Arrow table (user, item, timestamp, rating).

Sources, tried in order: the Parquet copy cached by an earlier call (or a ``u.data`` /
``ml-100k.zip`` the user dropped into the cache folder); the official GroupLens archive (short
timeout: it is usually unreachable offline); the ``recbole==1.2.1`` wheel from PyPI, which ships
the same 100,000 ratings as ``ml-100k.inter`` (downloaded, read as a zip, never installed).
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tempfile
import urllib.request
import uuid
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import CkdError

log = logging.getLogger(__name__)

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
GROUPLENS_TIMEOUT_S = 5.0
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"
PIP_TIMEOUT_S = 180.0
CACHE_FILE = "ml-100k.parquet"

ROWS, USERS, ITEMS = 100_000, 943, 1_682
SCHEMA = pa.schema([
    ("user", pa.string()),
    ("item", pa.string()),
    ("timestamp", pa.int64()),
    ("rating", pa.float32()),
])


def default_cache_dir() -> Path:
    env = os.environ.get("CKD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "continual-kd"


def load_movielens_100k(cache_dir: Path | None = None) -> pa.Table:
    """The 100,000 MovieLens-100K ratings: user (str), item (str), timestamp (int64 s), rating (float32)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache_dir / CACHE_FILE
    tried: list[str] = []

    table = _read_cached(cached, tried)
    if table is not None:
        return table
    for name, fetch in (
        (f"{cache_dir / 'u.data'}", lambda: _parse_u_data((cache_dir / "u.data").read_bytes())),
        (f"{cache_dir / 'ml-100k.zip'}", lambda: _from_grouplens_zip((cache_dir / "ml-100k.zip").read_bytes())),
        (GROUPLENS_URL, _from_grouplens),
        (f"PyPI wheel {RECBOLE_REQUIREMENT}", _from_recbole_wheel),
    ):
        try:
            table = _checked(fetch())
        except FileNotFoundError:
            tried.append(f"{name} (not present)")
            continue
        except Exception as exc:  # any failure of one source means: try the next one
            tried.append(f"{name} ({type(exc).__name__}: {exc})")
            log.info("MovieLens-100K source %s failed: %s", name, exc)
            continue
        _write_cache(table, cached)
        return table
    raise CkdError(
        "Could not load MovieLens-100K; tried " + "; ".join(tried)
        + f". Put the GroupLens u.data (or ml-100k.zip) into {cache_dir} (or set CKD_CACHE_DIR), "
        "or import it with `ckd ingest u.data`."
    )


def _read_cached(path: Path, tried: list[str]) -> pa.Table | None:
    if not path.is_file():
        tried.append(f"{path} (not present)")
        return None
    try:
        return _checked(pq.read_table(path))
    except Exception as exc:  # a damaged cache is rebuilt from the other sources
        tried.append(f"{path} (unreadable: {exc})")
        log.warning("ignoring damaged MovieLens cache %s: %s", path, exc)
        return None


def _write_cache(table: pa.Table, path: Path) -> None:
    """Write via a temp file + rename so a concurrent reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache folder only costs speed
        log.warning("could not cache MovieLens-100K at %s: %s", path, exc)


def _checked(table: pa.Table) -> pa.Table:
    """Cast to SCHEMA and make sure it is the whole data set (guards against truncated files)."""
    table = table.select(SCHEMA.names).cast(SCHEMA)
    users = pc.count_distinct(table["user"]).as_py()
    items = pc.count_distinct(table["item"]).as_py()
    if (table.num_rows, users, items) != (ROWS, USERS, ITEMS):
        raise ValueError(f"expected {ROWS} rows / {USERS} users / {ITEMS} items, "
                         f"got {table.num_rows} / {users} / {items}")
    return table


def _read_tsv(data: bytes, skip_header: bool) -> pa.Table:
    # timestamps are read as float64 because the RecBole file declares them float; all are whole seconds
    table = pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=["user", "item", "rating", "timestamp"],
                                       skip_rows=1 if skip_header else 0),
        parse_options=pacsv.ParseOptions(delimiter="\t"),
        convert_options=pacsv.ConvertOptions(column_types={
            "user": pa.string(), "item": pa.string(), "rating": pa.float32(), "timestamp": pa.float64(),
        }),
    )
    ts = pc.cast(table["timestamp"], pa.int64())  # safe cast: raises on a fractional value
    return pa.table({"user": table["user"], "item": table["item"], "timestamp": ts, "rating": table["rating"]})


def _parse_u_data(data: bytes) -> pa.Table:
    return _read_tsv(data, skip_header=False)


def _from_grouplens_zip(data: bytes) -> pa.Table:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return _parse_u_data(zf.read("ml-100k/u.data"))


def _from_grouplens() -> pa.Table:
    with urllib.request.urlopen(GROUPLENS_URL, timeout=GROUPLENS_TIMEOUT_S) as resp:
        return _from_grouplens_zip(resp.read())


def _from_recbole_wheel() -> pa.Table:
    with tempfile.TemporaryDirectory(prefix="ckd-recbole-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               RECBOLE_REQUIREMENT, "-d", tmp]
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, env=env)
        wheels = sorted(Path(tmp).glob("recbole-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"pip download exited {proc.returncode}: {tail[0]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            return _read_tsv(zf.read(RECBOLE_MEMBER), skip_header=True)
